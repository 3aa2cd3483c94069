"""Time the shard checksum check of an npuconv output, as ``verify`` and the runtime loader run it.

    python benchmarks/checksums.py OUT        # prints {"seconds": …, "scheme": …}

Uses whichever npuconv is importable (``PYTHONPATH=OLD/src`` for the code before a change):
``npuconv.io.digests.check_shards`` (per-tensor records, hashed on every core), else the older
``npuconv.io.output.check_shards`` (one sha256 stream per file). Only the check is timed, not the imports.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

try:
    from npuconv.io.digests import check_shards
except ImportError:  # npuconv before per-tensor checksums
    from npuconv.io.output import check_shards


def main() -> None:
    out = Path(sys.argv[1])
    manifest = json.loads((out / "npuconv.json").read_text())
    started = time.perf_counter()
    check_shards(out, manifest)
    seconds = time.perf_counter() - started
    record = next(iter(manifest["shards"].values()))
    scheme = record.get("scheme") if isinstance(record, dict) else "sha256-file"
    print(json.dumps({"seconds": round(seconds, 3), "scheme": scheme}))


if __name__ == "__main__":
    main()
