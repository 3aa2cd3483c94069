"""(stub) reader for awq — being written."""

from __future__ import annotations

from npuconv.readers.base import Reader


class _Stub(Reader):
    format = "awq"

    @classmethod
    def matches(cls, checkpoint) -> bool:
        return False


READER = _Stub
