"""Peak memory of each kind of unit (one layer, or a passthrough tensor) against the producer
queue's cost for it (:func:`npuconv.io.output.unit_cost`, from ``Target.production_cost``).

    PYTHONPATH=src python3 benchmarks/unit_peak.py SOURCE TARGET

Produces the first unit of each kind (``q_proj``, ``mlp.gate_proj``, …, every layer index folded)
alone in this process, with the CLI's allocator tuning, and prints its output bytes, its peak
(``VmHWM`` after resetting it through ``/proc/self/clear_refs``, minus ``VmRSS`` before) and what
the queue charges for it; ``OVER`` marks a unit whose peak exceeds its charge (raise that target's
``working_bytes_per_weight`` / ``working_bytes_fixed``). Linux only. The first unit also pays the
heap's first growth (a few MB). Sources: ``synth.py`` at a small ``--scale`` (the shapes do not
depend on it).
"""

from __future__ import annotations

import gc
import re
import sys
from pathlib import Path

from npuconv.memory import tune_allocator


def status_bytes(key: str) -> int:
    """``VmRSS`` / ``VmHWM`` of this process, in bytes."""
    return int(re.search(rf"{key}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024


def main() -> None:
    tune_allocator()
    from npuconv.convert import ConvertOptions, make_plan
    from npuconv.io import output
    from npuconv.io.source import open_source

    source, target = sys.argv[1], sys.argv[2]
    plan = make_plan(open_source(source), ConvertOptions(target=target))
    kinds: dict[str, output.Unit] = {}
    for unit in (u for shard in plan.shards for u in shard.units):
        kinds.setdefault(re.sub(r"\.\d+\.", ".", unit.label), unit)
    for kind, unit in kinds.items():
        gc.collect()
        before = status_bytes("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        produced = output._produce_hashed(unit)
        peak = status_bytes("VmHWM") - before
        del produced
        cost = output.unit_cost(unit)
        print(f"{kind:44s} output {unit.nbytes / 1e6:8.1f} MB  peak {peak / 1e6:8.1f} MB  "
              f"charged {cost / 1e6:8.1f} MB{'  OVER' if peak > cost else ''}", flush=True)


if __name__ == "__main__":
    main()
