"""(stub) reader for npuconv_output — being written."""

from __future__ import annotations

from npuconv.readers.base import Reader


class _Stub(Reader):
    format = "npuconv_output"

    @classmethod
    def matches(cls, checkpoint) -> bool:
        return False


READER = _Stub
