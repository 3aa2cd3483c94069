"""(stub) reader for compressed_tensors — being written."""

from __future__ import annotations

from npuconv.readers.base import Reader


class _Stub(Reader):
    format = "compressed_tensors"

    @classmethod
    def matches(cls, checkpoint) -> bool:
        return False


READER = _Stub
