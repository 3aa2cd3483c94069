"""The peer row: compressed-tensors' own converter, AutoAWQ GEMM → compressed-tensors W4A16.

    python benchmarks/peer_ct.py IN_DIR OUT_DIR

``compressed_tensors.entrypoints.convert.convert_checkpoint`` with its ``AutoAWQConverter`` built
from the checkpoint's ``quantization_config``, on the CPU (npuconv converts on the CPU too).
The same job in spirit as ``npuconv convert … --to npu-int4`` of the AWQ input: read int4 words,
repack them, write safetensors. An optional dependency of the benchmark only
(``pip install compressed-tensors``); ``run.py`` skips the row when it is not installed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from compressed_tensors.entrypoints.convert import convert_checkpoint
from compressed_tensors.entrypoints.convert.converters.autoawq import AutoAWQConverter


def main() -> None:
    src, dst = Path(sys.argv[1]), Path(sys.argv[2])
    config = json.loads((src / "config.json").read_text())["quantization_config"]
    convert_checkpoint(src, dst, AutoAWQConverter.from_autoawq_config(config), device="cpu")


if __name__ == "__main__":
    main()
