"""npuconv benchmark suite: conversion vs a plain safetensors copy, peak RSS, repack compute, verify.

    python benchmarks/run.py                          # 7B-shaped, every format (needs ~40 GB disk)
    python benchmarks/run.py --scale 0.125 --formats gptq-sym awq   # quick
    python benchmarks/run.py --json results.json --markdown

Each measurement runs in a fresh subprocess; wall time and peak RSS (``ru_maxrss`` of that child,
from GNU ``time``) are recorded. The baseline is ``copy_baseline.py``: ``safetensors.torch.load_file``
+ ``save_file`` of every shard (+ fsync, as npuconv fsyncs), i.e. the same bytes in and out with no
conversion. Inputs are synthesized on the fly (``synth.py``) into ``--work`` and never committed;
every input is read once before timing so both runs start from a warm page cache.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from synth import FORMATS, synthesize  # noqa: E402

TARGETS = {"gptq-sym": ["npu-int4", "float"], "gptq-asym": ["npu-int4"], "awq": ["npu-int4"],
           "ct-w4a16": ["npu-int4"], "ct-w8a8": ["npu-w8a8", "npu-int8"]}


def run_measured(cmd: list[str]) -> dict:
    """Run a command; wall seconds and its peak RSS in bytes.

    The peak RSS comes from GNU time (``/usr/bin/time -f %M``), which runs the command as its own
    child: ``ru_maxrss`` of a child forked directly from this (large) benchmark process would
    include the parent's pages it inherited before ``exec``.
    """
    with tempfile.NamedTemporaryFile("r", suffix=".rss") as rss:
        started = time.perf_counter()
        proc = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", rss.name, *cmd], capture_output=True, text=True)
        seconds = time.perf_counter() - started
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
        peak_kb = int(rss.read().strip().splitlines()[-1])
    return {"seconds": round(seconds, 3), "peak_rss_bytes": peak_kb * 1024, "stdout": proc.stdout}


def warm(path: Path) -> int:
    total = 0
    for file in sorted(path.glob("*.safetensors")):
        with open(file, "rb") as f:
            while block := f.read(64 << 20):
                total += len(block)
    return total


def bench_convert(fmt: str, work: Path, scale: float, workers: int, repeats: int) -> list[dict]:
    source = work / f"{fmt}-x{scale:g}"
    if not (source / "config.json").exists():
        shutil.rmtree(source, ignore_errors=True)
        synthesize(fmt, source, scale)
    size = warm(source)
    rows = []
    for target in TARGETS[fmt]:
        copies, converts = [], []
        for _ in range(repeats):  # alternate so neither side always runs on a hotter cache
            out = work / "out-copy"
            shutil.rmtree(out, ignore_errors=True)
            copies.append(run_measured([sys.executable, str(HERE / "copy_baseline.py"), str(source), str(out)]))
            out = work / "out-convert"
            shutil.rmtree(out, ignore_errors=True)
            converts.append(run_measured([sys.executable, "-m", "npuconv", "convert", str(source), str(out), "--to", target,
                                          "--force", "-q", "--workers", str(workers)]))
        copy = min(copies, key=lambda r: r["seconds"])
        conv = min(converts, key=lambda r: r["seconds"])
        largest = max_tensor_bytes(source)
        rows.append({
            "format": fmt, "target": target, "scale": scale, "workers": workers, "input_bytes": size,
            "copy_seconds": copy["seconds"], "convert_seconds": conv["seconds"],
            "ratio": round(conv["seconds"] / copy["seconds"], 3),
            "convert_gb_per_s": round(size / conv["seconds"] / 1e9, 3),
            "copy_peak_rss_mb": round(copy["peak_rss_bytes"] / 1e6), "convert_peak_rss_mb": round(conv["peak_rss_bytes"] / 1e6),
            "largest_tensor_mb": round(largest / 1e6),
            "rss_budget_mb": round((2 * largest + 400e6) / 1e6),
        })
        print(json.dumps(rows[-1]), flush=True)
    shutil.rmtree(work / "out-copy", ignore_errors=True)
    shutil.rmtree(work / "out-convert", ignore_errors=True)
    return rows


def max_tensor_bytes(path: Path) -> int:
    from npuconv.io.checkpoint import Checkpoint

    return max(info.nbytes for info in Checkpoint(path).tensors.values())


def bench_compute() -> list[dict]:
    """Per-core throughput of each repack step on one large layer (GB/s of packed input)."""
    out = subprocess.run([sys.executable, str(HERE / "compute.py")], capture_output=True, text=True, check=True)
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    for row in rows:
        print(json.dumps(row), flush=True)
    return rows


def bench_verify(work: Path, scale: float, layers: str) -> dict:
    source = work / f"gptq-sym-x{scale:g}"
    if not (source / "config.json").exists():
        synthesize("gptq-sym", source, scale)
    out = work / "out-verify"
    shutil.rmtree(out, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "npuconv", "convert", str(source), str(out), "--to", "npu-int4", "-q"], check=True)
    result = run_measured([sys.executable, "-m", "npuconv", "verify", str(out), "--layers", layers, "--json", "--device", "cpu"])
    report = json.loads(result["stdout"])
    shutil.rmtree(out, ignore_errors=True)
    row = {"verify_layers": report["passed"] + report["failed"], "seconds": result["seconds"], "backend": report["backend"],
           "ok": report["ok"], "peak_rss_mb": round(result["peak_rss_bytes"] / 1e6)}
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--formats", nargs="+", choices=FORMATS, default=list(FORMATS))
    parser.add_argument("--work", type=Path, default=HERE / "_work")
    parser.add_argument("--workers", type=int, nargs="+", default=[1])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--skip-compute", action="store_true")
    parser.add_argument("--verify-layers", default="*.layers.0.*", help="glob of layers verified on CPU ('' to skip)")
    parser.add_argument("--json", type=Path, help="write all results here")
    parser.add_argument("--keep", action="store_true", help="keep the synthesized inputs in --work")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    results = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
               "convert": [], "compute": [], "verify": None}
    import torch

    results["machine"]["torch"] = torch.__version__
    for fmt in args.formats:
        for workers in args.workers:
            results["convert"] += bench_convert(fmt, args.work, args.scale, workers, args.repeats)
        if not args.keep:
            shutil.rmtree(args.work / f"{fmt}-x{args.scale:g}", ignore_errors=True)
    if not args.skip_compute:
        results["compute"] = bench_compute()
    if args.verify_layers:
        results["verify"] = bench_verify(args.work, args.scale, args.verify_layers)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    if not args.keep:
        shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()
