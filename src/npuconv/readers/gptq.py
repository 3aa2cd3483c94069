"""(stub) reader for gptq — being written."""

from __future__ import annotations

from npuconv.readers.base import Reader


class _Stub(Reader):
    format = "gptq"

    @classmethod
    def matches(cls, checkpoint) -> bool:
        return False


READER = _Stub
