"""Start-up time of ``npuconv --help``, ``--version`` and ``inspect`` (issue 15: ≤ 0.3 s).

Each command runs ``--repeats`` times per side under GNU ``/usr/bin/time -f '%e %M'``; the
minimum elapsed seconds and its peak RSS are reported. With ``--before SRC`` (e.g. a checkout of
main's ``src``) the two sides alternate run by run, so a shared machine's load hits both alike.

    python benchmarks/startup.py                                  # this checkout only
    python benchmarks/startup.py --before /path/to/main/src      # before/after table
    python benchmarks/startup.py --fixtures ms_w4a8_dynamic gptq_v2_b4_g32_asym   # inspect of these
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
DEFAULT_FIXTURES = ("awq_gemm_g128", "ct020_w4a16_g32_asym", "ct020_w8a8_int", "ms_w8a8_mxfp8", "gptq_v1_b4_g32_sym")


def commands(fixtures: list[str]) -> list[list[str]]:
    """``--help``, ``--version``, then ``inspect`` and ``inspect --json`` of each fixture."""
    inspect = [["inspect", str(FIXTURES / name), *extra] for name in fixtures for extra in ([], ["--json"])]
    return [["--help"], ["--version"], *inspect]


def timed(src: Path, args: list[str]) -> tuple[float, int]:
    """(elapsed s, peak RSS KB) of one ``python -m npuconv ARGS`` with ``src`` on PYTHONPATH."""
    env = {**os.environ, "PYTHONPATH": str(src)}
    result = subprocess.run(["/usr/bin/time", "-f", "%e %M", sys.executable, "-m", "npuconv", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, check=True)
    seconds, rss = result.stderr.strip().splitlines()[-1].split()
    return float(seconds), int(rss)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, help="the src/ directory of the version to compare against")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--fixtures", nargs="+", default=list(DEFAULT_FIXTURES), metavar="NAME",
                        help="fixtures (tests/fixtures/NAME) to inspect")
    args = parser.parse_args()
    sides = {"after": ROOT / "src"} if args.before is None else {"before": args.before, "after": ROOT / "src"}
    print(f"load average {os.getloadavg()[0]:.2f}")
    print("| command | " + " | ".join(sides) + " |")
    print("|---|" + "---|" * len(sides))
    for command in commands(args.fixtures):
        runs: dict[str, list[tuple[float, int]]] = {side: [] for side in sides}
        for _ in range(args.repeats):
            for side, src in sides.items():
                runs[side].append(timed(src, command))
        cells = [f"{s:.2f} s, {rss / 1024:.0f} MB" for s, rss in (min(runs[side]) for side in sides)]
        label = " ".join(Path(a).name if a.startswith(str(ROOT)) else a for a in command)
        print(f"| `npuconv {label}` | " + " | ".join(cells) + " |")
    print(f"load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
