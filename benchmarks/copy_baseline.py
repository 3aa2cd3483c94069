"""The floor npuconv is measured against: a plain safetensors load + save of every shard.

    python benchmarks/copy_baseline.py IN_DIR OUT_DIR

Same bytes in and out, no conversion: ``safetensors.torch.load_file`` then ``save_file`` per shard,
followed by an fsync of each written file (npuconv fsyncs its outputs too), and a copy of the
side files.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from safetensors.torch import load_file, save_file


def main() -> None:
    src, dst = Path(sys.argv[1]), Path(sys.argv[2])
    dst.mkdir(parents=True)
    for path in sorted(src.iterdir()):
        if path.suffix == ".safetensors":
            save_file(load_file(path), dst / path.name, metadata={"format": "pt"})
            fd = os.open(dst / path.name, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
        elif path.is_file():
            shutil.copyfile(path, dst / path.name)


if __name__ == "__main__":
    main()
