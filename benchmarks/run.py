"""npuconv benchmark suite: conversion vs a plain safetensors copy, peak RSS, repack compute, verify.

    python benchmarks/run.py                          # 7B-shaped, every format (needs ~40 GB disk)
    python benchmarks/run.py --scale 0.125 --formats gptq-sym awq   # quick
    python benchmarks/run.py --json results.json --markdown   # + Markdown tables on stdout
    taskset -c 0,1 python benchmarks/run.py …        # the 2-core numbers (children inherit the mask)
    python benchmarks/run.py --compare-src OLD/src    # also time another npuconv tree (before/after)

Each measurement runs in a fresh subprocess; wall time and peak RSS (``ru_maxrss`` of that child,
from GNU ``time``) are recorded. The baseline is ``copy_baseline.py``: ``safetensors.torch.load_file``
+ ``save_file`` of every shard (+ fsync, as npuconv fsyncs), i.e. the same bytes in and out with no
conversion. Inputs are synthesized on the fly (``synth.py``) into ``--work`` and never committed;
every input is read once before timing so both runs start from a warm page cache.

Rows beside the conversion: ``float`` also records the copy of its *output* (13 GB of bf16 for
the 7B shapes: ``output_copy_seconds``); AWQ adds the peer row, compressed-tensors' own
converter (``peer_ct.py``) when ``compressed_tensors`` is installed; ``--startup`` times
``npuconv --help``, ``--version`` and ``inspect`` of a small fixture.
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
PEER = "peer:compressed-tensors"  # compressed-tensors' AutoAWQ → CT converter on the AWQ input (peer_ct.py)
COMPARED = ("npu-int4", "npu-w8a8")  # targets that --compare-src also times (the copy-speed goals)


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


def npuconv_cmd(source: Path, out: Path, target: str, workers: str, src: Path | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "npuconv", "convert", str(source), str(out), "--to", target, "--force", "-q"]
    if workers != "auto":
        cmd += ["--workers", workers]
    if src is not None:  # another npuconv tree (e.g. the code before a change): same interpreter, its sources
        cmd = ["env", f"PYTHONPATH={src}", *cmd]
    return cmd


def best(cmds: list[list[str]], repeats: int, prepare) -> list[dict]:
    """Best of ``repeats`` runs of each command, alternating them so none always runs on a hotter cache."""
    runs: list[list[dict]] = [[] for _ in cmds]
    for _ in range(repeats):
        for i, cmd in enumerate(cmds):
            prepare()
            runs[i].append(run_measured(cmd))
    return [min(r, key=lambda x: x["seconds"]) for r in runs]


def bench_convert(fmt: str, work: Path, scale: float, workers: str, repeats: int, compare_src: Path | None,
                  only: list[str] | None = None) -> list[dict]:
    source = work / f"{fmt}-x{scale:g}"
    if not (source / "config.json").exists():
        shutil.rmtree(source, ignore_errors=True)
        synthesize(fmt, source, scale)
    size = warm(source)
    largest = max_tensor_bytes(source)
    out_copy, out_conv = work / "out-copy", work / "out-convert"

    def clean() -> None:
        shutil.rmtree(out_copy, ignore_errors=True)
        shutil.rmtree(out_conv, ignore_errors=True)

    rows = []
    targets = TARGETS[fmt] + ([PEER] if fmt == "awq" and has_peer() else [])
    for target in [t for t in targets if only is None or t in only]:
        copy_cmd = [sys.executable, str(HERE / "copy_baseline.py"), str(source), str(out_copy)]
        if target == PEER:
            cmds = [copy_cmd, [sys.executable, str(HERE / "peer_ct.py"), str(source), str(out_conv)]]
        else:
            cmds = [copy_cmd, npuconv_cmd(source, out_conv, target, workers)]
            if compare_src is not None and target in COMPARED:
                cmds.append(npuconv_cmd(source, out_conv, target, workers, compare_src))
        results = best(cmds, repeats, clean)
        copy, conv = results[0], results[1]
        row = {
            "format": fmt, "target": target, "scale": scale, "workers": workers, "cores": usable_cores(),
            "input_bytes": size, "copy_seconds": copy["seconds"], "convert_seconds": conv["seconds"],
            "ratio": round(conv["seconds"] / copy["seconds"], 3),
            "convert_gb_per_s": round(size / conv["seconds"] / 1e9, 3),
            "copy_peak_rss_mb": round(copy["peak_rss_bytes"] / 1e6), "convert_peak_rss_mb": round(conv["peak_rss_bytes"] / 1e6),
            "largest_tensor_mb": round(largest / 1e6),
            "rss_budget_mb": round((2 * largest + 400e6) / 1e6),
        }
        if compare_src is not None and len(results) > 2:
            before = results[2]
            row.update({"before_seconds": before["seconds"], "before_ratio": round(before["seconds"] / copy["seconds"], 3),
                        "before_peak_rss_mb": round(before["peak_rss_bytes"] / 1e6), "before_workers": workers})
        if target == "float":  # the float target's floor is the copy of what it writes
            row.update(output_copy(work, out_conv, conv["seconds"], repeats))
        rows.append(row)
        print(json.dumps(row), flush=True)
    clean()
    return rows


def bench_checksums(fmt: str, work: Path, scale: float, compare_src: Path | None) -> dict:
    """Seconds of the shard checksum check (``checksums.py``) of a fresh npuconv-int4 output,
    with this tree and, given ``compare_src``, with that tree on its own output."""
    source = work / f"{fmt}-x{scale:g}"
    if not (source / "config.json").exists():
        synthesize(fmt, source, scale)
    out = work / "out-checksums"
    row = {"format": fmt, "cores": usable_cores()}
    for label, src in (("after", None), ("before", compare_src)):
        if label == "before" and src is None:
            continue
        shutil.rmtree(out, ignore_errors=True)
        subprocess.run(npuconv_cmd(source, out, "npu-int4", "auto", src), check=True)
        cmd = [sys.executable, str(HERE / "checksums.py"), str(out)]
        if src is not None:
            cmd = ["env", f"PYTHONPATH={src}", *cmd]
        result = run_measured(cmd)
        row.update({f"{label}_check_seconds": json.loads(result["stdout"])["seconds"],
                    f"{label}_check_peak_rss_mb": round(result["peak_rss_bytes"] / 1e6)})
    shutil.rmtree(out, ignore_errors=True)
    print(json.dumps(row), flush=True)
    return row


def output_copy(work: Path, converted: Path, convert_seconds: float, repeats: int) -> dict:
    """Copy of the float target's output files, measured right after it was converted."""
    out = work / "out-copy-output"
    best_run = None
    for _ in range(repeats):
        shutil.rmtree(out, ignore_errors=True)
        result = run_measured([sys.executable, str(HERE / "copy_baseline.py"), str(converted), str(out)])
        best_run = result if best_run is None or result["seconds"] < best_run["seconds"] else best_run
    shutil.rmtree(out, ignore_errors=True)
    output_bytes = sum(p.stat().st_size for p in converted.glob("*.safetensors"))
    return {"output_bytes": output_bytes, "output_copy_seconds": best_run["seconds"],
            "ratio_to_output_copy": round(convert_seconds / best_run["seconds"], 3)}


def has_peer() -> bool:
    try:
        import compressed_tensors.entrypoints.convert  # noqa: F401
    except Exception:  # not installed, or an incompatible torch/transformers
        return False
    return True


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def bench_startup(repeats: int = 5) -> list[dict]:
    """Wall time of ``npuconv --help``, ``--version`` and ``inspect`` of a small fixture (best of ``repeats``)."""
    fixture = HERE.parent / "tests" / "fixtures" / "gptq_v1_b4_g32_sym"
    rows = []
    for args in (["--help"], ["--version"], ["inspect", str(fixture)]):
        cmd = [sys.executable, "-m", "npuconv", *args]
        runs = [run_measured(cmd) for _ in range(repeats)]
        fastest = min(runs, key=lambda r: r["seconds"])
        rows.append({"command": "npuconv " + " ".join(args[:1]), "seconds": fastest["seconds"],
                     "peak_rss_mb": round(fastest["peak_rss_bytes"] / 1e6)})
        print(json.dumps(rows[-1]), flush=True)
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


def markdown(results: dict) -> str:
    """The results as Markdown tables (conversion vs copy, compute steps, verify), for RESULTS.md."""
    lines = ["| format | target | workers | input | convert s | copy s | ratio | GB/s | peak RSS MB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results["convert"]:
        lines.append(f"| {r['format']} | {r['target']} | {r['workers']} | {r['input_bytes'] / 1e9:.2f} GB | "
                     f"{r['convert_seconds']} | {r['copy_seconds']} | {r['ratio']} | {r['convert_gb_per_s']} | {r['convert_peak_rss_mb']} |")
    if results["compute"]:
        lines += ["", "| repack step | input MB | GB/s per core |", "|---|---|---|"]
        lines += [f"| {r['step']} | {r['input_mb']} | {r['gb_per_s_per_core']} |" for r in results["compute"]]
    if results["verify"]:
        v = results["verify"]
        lines += ["", f"verify: {v['verify_layers']} layers in {v['seconds']} s on {v['backend']} "
                      f"({'ok' if v['ok'] else 'FAIL'}), peak RSS {v['peak_rss_mb']} MB"]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--formats", nargs="+", choices=FORMATS, default=list(FORMATS))
    parser.add_argument("--work", type=Path, default=HERE / "_work")
    parser.add_argument("--workers", nargs="+", default=["auto"], help="npuconv --workers values ('auto': its default)")
    parser.add_argument("--compare-src", type=Path, help="also time the npuconv sources in this directory (same --workers)")
    parser.add_argument("--checksums", action="store_true", help="time the shard checksum check (first format; before/after with --compare-src)")
    parser.add_argument("--targets", nargs="+", help=f"only these targets (and/or {PEER})")
    parser.add_argument("--startup", action="store_true", help="time --help, --version and inspect")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--skip-compute", action="store_true")
    parser.add_argument("--verify-layers", default="*.layers.0.*", help="glob of layers verified on CPU ('' to skip)")
    parser.add_argument("--json", type=Path, help="write all results here")
    parser.add_argument("--keep", action="store_true", help="keep the synthesized inputs in --work")
    parser.add_argument("--markdown", action="store_true", help="also print the results as Markdown tables at the end")
    return parser


def main() -> None:
    args = build_parser().parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    results = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
               "convert": [], "compute": [], "verify": None, "startup": [], "checksums": None}
    import torch

    results["machine"]["torch"] = torch.__version__
    results["machine"]["cores"] = usable_cores()
    if args.startup:
        results["startup"] = bench_startup()
    if args.checksums:
        results["checksums"] = bench_checksums(args.formats[0], args.work, args.scale, args.compare_src)
    for fmt in args.formats:
        for workers in args.workers:
            results["convert"] += bench_convert(fmt, args.work, args.scale, workers, args.repeats, args.compare_src,
                                               args.targets)
        if not args.keep:
            shutil.rmtree(args.work / f"{fmt}-x{args.scale:g}", ignore_errors=True)
    if not args.skip_compute:
        results["compute"] = bench_compute()
    if args.verify_layers:
        results["verify"] = bench_verify(args.work, args.scale, args.verify_layers)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    if args.markdown:
        print(markdown(results))
    if not args.keep:
        shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()
