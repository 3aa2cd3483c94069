"""Command-line interface: parsing, progress and output formatting only; the work is in the library.

Exit codes: 0 ok, 1 verification failed, 2 bad input or usage, 3 internal error; a signal exits
128 + its number after cleaning up: 130 Ctrl-C (SIGINT), 129 SIGHUP, 143 SIGTERM (see
:mod:`npuconv.interrupts`). A closed stdout (``| head``, ``>&-``) drops the rest of the output
silently; the exit code stays the command's own.
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import math
import os
import signal
import sys
import traceback

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

import npuconv
from npuconv import interrupts
from npuconv.errors import NpuconvError

class _Console(Console):
    """A rich Console that, when its reader goes away (``| head``), drops the rest of the output
    and lets the command finish with its own exit code (rich's default: exit 1 on the spot)."""

    def on_broken_pipe(self) -> None:
        self.quiet = True
        if not self.stderr:
            _silence_stdout()


stdout = _Console(highlight=False, width=None if sys.stdout.isatty() else 160)
stderr = _Console(stderr=True, highlight=False)

EXIT_INTERNAL = 3
EXIT_INTERRUPTED = 130


def human_bytes(n: int | float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n} B"  # pragma: no cover


def emit_json(value: object) -> None:
    try:
        click.echo(json.dumps(value, indent=2, sort_keys=True, default=str))
    except BrokenPipeError:  # the reader went away: the rest of the output is dropped
        _silence_stdout()


class _StderrHandler(logging.StreamHandler):
    """Log lines to whatever ``sys.stderr`` is when they are emitted (not the one at setup)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def _remember(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    """Record ``--debug`` / ``--verbose`` wherever they were given (``ctx.meta`` is shared by the
    whole command chain; :func:`handle_errors` applies them when the command starts)."""
    if value:
        ctx.meta[f"npuconv.{param.name}"] = True


def _configure_logging(meta: dict) -> None:
    """npuconv's log lines on stderr: DEBUG with ``--debug``, INFO with ``-v``, else warnings only."""
    logger = logging.getLogger("npuconv")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("npuconv: %(message)s"))
        logger.addHandler(handler)
    level = logging.DEBUG if meta.get("npuconv.debug") else logging.INFO if meta.get("npuconv.verbose") else logging.WARNING
    logger.setLevel(level)


def global_options(func):
    """``--debug`` and ``-v/--verbose``, accepted before or after the subcommand name."""
    func = click.option("--debug", is_flag=True, expose_value=False, is_eager=True, callback=_remember,
                        help="Show full tracebacks on errors (and debug log lines).")(func)
    return click.option("-v", "--verbose", is_flag=True, expose_value=False, is_eager=True, callback=_remember,
                        help="Log what npuconv is doing on stderr (source, format, per-layer steps).")(func)


def handle_errors(func):
    """Turn library errors into one-line messages and exit codes (``--debug`` shows tracebacks)."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        ctx = click.get_current_context()
        debug = bool(ctx.meta.get("npuconv.debug"))
        _configure_logging(ctx.meta)
        as_json = kwargs.get("as_json", False)
        try:
            return func(*args, **kwargs)
        except NpuconvError as e:
            if debug:
                traceback.print_exc()
            _fail(str(e), e.exit_code, as_json)
        except interrupts.Interrupted as e:
            _fail(interrupts.message(e), e.exit_code, as_json)
        except KeyboardInterrupt:  # the library used without npuconv.interrupts.install()
            _fail("interrupted; nothing was published at the output path", EXIT_INTERRUPTED, as_json)
        except click.exceptions.Exit:
            raise
        except Exception as e:  # a bug: keep it to one line unless --debug
            if isinstance(e, OSError) and e.errno == errno.EPIPE:
                _silence_stdout()  # the reader went away (| head): nothing more to say, no traceback
                sys.exit(0)
            if debug:
                traceback.print_exc()
            _fail(f"internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback)", EXIT_INTERNAL, as_json)

    return wrapper


def _silence_stdout() -> None:
    """Point fd 1 at /dev/null, so that nothing (not even the flush at exit) writes to a closed pipe."""
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    os.close(null)


def _fail(message: str, code: int, as_json: bool) -> None:
    message = " ".join(message.split())
    if as_json:
        emit_json({"ok": False, "error": message, "exit_code": code})
    else:
        stderr.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
    sys.exit(code)


def progress_bar(total: int, description: str, enabled: bool, unit: str = "B"):
    """A tqdm counter of bytes (``unit="B"``, scaled: kB, MB, …) or of whole items such as layers,
    or None when disabled (quiet, JSON, or not a terminal)."""
    if not enabled or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    scaled = unit == "B"
    return tqdm(total=total, desc=description, unit=unit, unit_scale=scaled, unit_divisor=1000, leave=False)


class LayerProgress:
    """A ``(done, total)`` callback drawing a layer counter, opened on the first call; closed on exit."""

    def __init__(self, description: str, enabled: bool) -> None:
        self.description, self.enabled, self.bar = description, enabled, None

    def __enter__(self):
        return self.update

    def update(self, done: int, total: int) -> None:
        if self.bar is None:
            self.bar = progress_bar(total, self.description, self.enabled, unit="layer")
            if self.bar is None:
                self.enabled = False
                return
        self.bar.update(done - self.bar.n)

    def __exit__(self, *_exc) -> None:
        if self.bar is not None:
            self.bar.close()


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(npuconv.__version__, prog_name="npuconv")
@global_options
def cli() -> None:
    """Convert quantized LLM checkpoints (GPTQ, AWQ, compressed-tensors, msModelSlim) into
    Ascend NPU-ready checkpoints, and verify them against the source.

    \b
    Examples:
      npuconv inspect ./Qwen2-7B-GPTQ-Int4
      npuconv convert ./Qwen2-7B-GPTQ-Int4 ./qwen-npu
      npuconv verify ./qwen-npu
      npuconv docs                          # the guides, shipped with npuconv
    """


# ------------------------------------------------------------------------------------- inspect
REVISION_HELP = "Hub revision of MODEL: branch, tag or commit (same as MODEL@REV)."


@cli.command("inspect")
@global_options
@click.argument("model")
@click.option("--revision", default=None, metavar="REV", help=REVISION_HELP)
@click.option("--layers", "show_layers", is_flag=True, help="Print a per-layer table.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (for scripts).")
@click.option("-q", "--quiet", is_flag=True, help="Print only the format line.")
@handle_errors
def inspect_command(model: str, revision: str | None, show_layers: bool, as_json: bool, quiet: bool) -> None:
    """Detect a checkpoint's format and show its quantization.

    MODEL is a local directory or a Hugging Face repo id (org/name[@revision]).

    \b
    Examples:
      npuconv inspect ./llama-gptq
      npuconv inspect ./llama-gptq --layers
      npuconv inspect TheBloke/Llama-2-7B-GPTQ@main --json | jq .layers[0]
    """
    from npuconv.inspect import inspect_checkpoint
    from npuconv.io.source import open_source

    report = inspect_checkpoint(open_source(model, revision))
    if as_json:
        emit_json(report)
        return
    if quiet:
        click.echo(report["format"])
        return
    _print_inspect(report, show_layers)


def _print_inspect(report: dict, show_layers: bool) -> None:
    fmt = report["format"]
    detected = report.get("checkpoint_format")
    if detected and detected != fmt:
        fmt += f" ({detected})"
    stdout.print(f"[bold]{report['model']}[/]")
    depth = report.get("num_hidden_layers")
    rows = [
        ("format", fmt),
        ("model type", f"{report.get('model_type')} ({depth} layer{'' if depth == 1 else 's'})"),
        ("weights", f"{human_bytes(report['size_bytes'])} in {len(report['files'])} file(s), {report['num_tensors']} tensors"),
    ]
    if report.get("moe_experts"):
        rows.append(("MoE experts", str(report["moe_experts"])))
    for key, value in rows:
        stdout.print(f"  {key:<12} {value}")
    declared = report.get("declared_checkpoint_format")
    if detected and declared and detected != declared:
        stdout.print(
            f"  [bold yellow]note:[/] config declares checkpoint_format={declared!r} but the zero points are "
            f"{detected!r}; npuconv uses {detected!r}"
        )
    table = Table(title="quantized linears by scheme", title_justify="left")
    for column in ("scheme", "layers", "bits", "group size", "symmetric", "act-order"):
        table.add_column(column)
    by_scheme: dict[str, list[dict]] = {}
    for layer in report["layers"]:
        by_scheme.setdefault(layer["scheme"], []).append(layer)
    for scheme, layers in by_scheme.items():
        table.add_row(
            scheme,
            str(len(layers)),
            _distinct(l["bits"] for l in layers),
            _distinct("per-channel" if l["group_size"] == -1 else l["group_size"] for l in layers),
            _distinct(l["symmetric"] for l in layers),
            _distinct(l["act_order"] for l in layers),
        )
    if report["layers"]:
        stdout.print(table)
    else:
        stdout.print("  no quantized linears (plain float checkpoint)")
    _print_destinations(report.get("destinations") or [])
    if show_layers and report["layers"]:
        detail = Table(title="layers", title_justify="left")
        moe = any(l.get("experts") for l in report["layers"])  # stacked MoE experts: an "experts" column
        for column in ("name", "scheme", *(("experts",) if moe else ()), "shape", "group", "sym", "act-order", "source", "bytes"):
            detail.add_column(column)
        for l in report["layers"]:
            detail.add_row(
                l["name"], l["scheme"], *((str(l.get("experts") or "-"),) if moe else ()), "×".join(map(str, l["shape"])),
                "ch" if l["group_size"] == -1 else str(l["group_size"]),
                str(l["symmetric"]), str(l["act_order"]), l["source_scheme"], human_bytes(l["bytes"]),
            )
        stdout.print(detail)
    for warning in report["warnings"]:
        stderr.print(f"[yellow]warning:[/] {escape(warning)}", soft_wrap=True)


def _print_destinations(rows: list[dict]) -> None:
    """Where the checkpoint can go: each target, whether it converts, and who serves the result."""
    if not rows:
        return
    table = Table(title="where it can go (npuconv convert --to TARGET)", title_justify="left")
    for column in ("target", "convertible", "served by"):
        table.add_column(column)
    for row in rows:
        if not row["convertible"]:
            served = "-"
        elif row["engines"] is None:
            served = "not tested"
        else:
            served = ", ".join(row["engines"]) or "[red]no engine[/]"
        table.add_row(row["target"], "yes" if row["convertible"] else escape(f"no: {row['reason']}"), served)
    stdout.print(table)


def _distinct(values) -> str:
    return ", ".join(sorted({str(v) for v in values}))


# ------------------------------------------------------------------------------------- convert
def _target_help() -> str:
    from npuconv.registry import target_names

    return (
        "Target layout: " + ", ".join(target_names()) + ". Default npu: each layer to its natural NPU "
        "target (mixed-precision models in one output). Layouts: `npuconv docs layouts`."
    )


DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


@cli.command("convert")
@global_options
@click.argument("model")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--to", "target", default="npu", show_default=True, help=_target_help())
@click.option("--revision", default=None, metavar="REV", help=REVISION_HELP)
@click.option("--dtype", type=click.Choice(sorted(DTYPES)), default=None, help="float target: output dtype (default bfloat16).")
@click.option("--nz/--no-nz", default=None, help="Write weights as FRACTAL_NZ tiles (default: what the engines cast to NZ).")
@click.option("--mx-layout", type=click.Choice(["vllm-ascend", "sglang"]), default="vllm-ascend", show_default=True,
              help="MX targets: contiguous [K,N] (vLLM-Ascend) or the [N,K] storage that sglang views.")
@click.option("--max-shard-size", default="5GB", show_default=True, help="Largest output shard (e.g. 500MB, 5GB).")
@click.option("--workers", default=None, type=click.IntRange(0, 64),
              help="Threads that read and repack layers ahead of the writer (0: none; default: one per core, at most 16). "
                   "Memory stays about twice the largest tensor whatever the number.")
@click.option("--force", is_flag=True, help="Replace OUT if it is empty or, as a whole, an earlier npuconv output (every file listed in its npuconv.json); one atomic swap at the end.")
@click.option("--dry-run", is_flag=True, help="Print the plan (layers, layouts, shards, bytes) and write nothing.")
@click.option("--allow-unservable", is_flag=True,
              help="Write layer types that no serving engine loads (e.g. msModelSlim W4A16); by default they are "
                   "refused before anything is written, naming a target that is served.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar, no summary.")
@handle_errors
def convert_command(model, out, target, revision, dtype, nz, mx_layout, max_shard_size, workers, force, dry_run,
                    allow_unservable, as_json, quiet) -> None:
    """Convert MODEL into OUT in the layout of TARGET (default npu).

    MODEL is a local directory or a Hugging Face repo id (org/name[@revision]). OUT is built in a
    temporary sibling directory and appears only when complete; MODEL is never modified.

    --to npu gives every layer its natural NPU target (4-bit weight-only → npu-int4, W8A8 →
    npu-w8a8, W4A8 → npu-w4a8, MX → npu-mxfp8/4, …), so a mixed-precision model (e.g. W8A8
    attention + W4A8 MLP) becomes one NPU-ready output; the plan (--dry-run) shows each choice.

    \b
    Examples:
      npuconv convert ./qwen-w8a8-w4a8 ./qwen-npu          # every layer to its NPU target
      npuconv convert ./llama-gptq ./llama-npu --to npu-int4
      npuconv convert ./llama-gptq ./llama-fp32 --to float --dtype float32
      npuconv convert org/model@main ./out --to modelslim --dry-run --json
    """
    import torch

    from npuconv.convert import ConvertOptions, convert
    from npuconv.io.output import parse_size
    from npuconv.registry import target_class
    from npuconv.writers import WriterOptions

    target_class(target)  # validate the target before any I/O
    options = ConvertOptions(
        target=target,
        writer=WriterOptions(dtype=getattr(torch, dtype) if dtype else None, nz=nz, mx_layout=mx_layout),
        max_shard_bytes=parse_size(max_shard_size),
        force=force,
        dry_run=dry_run,
        workers=workers,
        revision=revision,
        allow_unservable=allow_unservable,
    )
    bar = None

    def on_progress(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = progress_bar(total, f"convert → {target}", enabled=not (quiet or as_json))
            if bar is None:
                return
        bar.update(done - bar.n)

    try:
        report = convert(model, out, options, on_progress)
    finally:
        if bar is not None:
            bar.close()
    if as_json:
        emit_json({"ok": True, **report})
        return
    for warning in report.get("warnings", report["plan"]["warnings"]):
        stderr.print(f"[yellow]warning:[/] {escape(warning)}", soft_wrap=True)
    if quiet:
        return
    plan = report["plan"]
    if dry_run:
        _print_plan(plan)
        return
    seconds = report["seconds"]
    rate = f", {human_bytes(report['bytes_in'] / seconds)}/s of input" if seconds else ""
    stdout.print(
        f"[green]converted[/] {len(plan['layers'])} quantized layers ({plan['source_format']} → {_targets_text(plan)}) "
        f"into {out}: {human_bytes(report['bytes_out'])} in {len(plan['shards'])} shard(s), "
        f"{seconds:.1f} s{rate}"
    )


def _targets_text(plan: dict) -> str:
    """``npu-int4``, or for a per-layer choice ``npu: 4 npu-w8a8, 3 npu-w4a8``."""
    counts = plan.get("layer_targets") or {}
    if list(counts) in ([], [plan["target"]]):
        return plan["target"]
    return f"{plan['target']}: " + ", ".join(f"{n} {name}" for name, n in counts.items())


def _print_plan(plan: dict) -> None:
    stdout.print(f"[bold]plan[/] {plan['source']} ({plan['source_format']}) → {_targets_text(plan)}")
    table = Table(show_header=True)
    for column in ("layer", "scheme", "target", "kernel", "tensors"):
        table.add_column(column)
    for layer in plan["layers"]:
        tensors = ", ".join(
            f"{role}:{t.get('layout', 'nd')}" for role, t in layer.get("tensors", {}).items()
        )
        table.add_row(layer["name"], layer["scheme"], layer.get("target", plan["target"]), layer.get("kernel", ""), tensors)
    stdout.print(table)
    for shard in plan["shards"]:
        stdout.print(f"  {shard['file']}: {shard['tensors']} tensors, {human_bytes(shard['bytes'])}")
    stdout.print(f"  total {human_bytes(plan['total_bytes'])}; nothing written (--dry-run)")


# ------------------------------------------------------------------------------------- verify
class FiniteFloat(click.FloatRange):
    """``click.FloatRange`` that also refuses nan and ±inf (nan passes every range comparison)."""

    name = "finite float"

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


@cli.command("verify")
@global_options
@click.argument("out")
@click.option("--source", default=None, help="Source checkpoint to compare with (default: the one recorded in npuconv.json).")
@click.option("--layers", "layer_glob", default=None, help="Only layers whose name matches this glob (e.g. '*.mlp.*').")
@click.option("--tokens", default=16, show_default=True, type=click.IntRange(1, 65536), help="Random activation rows per layer.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0, 2**64 - 1), help="Seed of the random activations (0 to 2**64-1).")
@click.option("--device", type=click.Choice(["cpu", "cuda", "npu"]), default=None, help="Where kernels run (default: npu, else cuda, else cpu).")
@click.option("--skip-checksum", is_flag=True, help="Do not check shard sha256 against npuconv.json.")
@click.option("--max-rel-l2", type=FiniteFloat(0, None, min_open=True), default=None,
              help="Override the per-scheme relative L2 threshold (a finite number > 0).")
@click.option("--min-cosine", type=FiniteFloat(-1, 1), default=0.9999, show_default=True,
              help="Minimum cosine similarity (-1 to 1).")
@click.option(
    "--reference", type=click.Choice(["npuconv", "tool", "auto"]), default="npuconv", show_default=True,
    help="Whose dequantization of the source the kernels are compared with: npuconv's reader, the library "
         "that wrote the source (compressed-tensors, msmodelslim; must be installed), or the tool when present.",
)
@click.option("--model", "whole_model", is_flag=True,
              help="Whole-model parity instead of per-layer: run OUT end to end (transformers) against the source.")
@click.option("--prompts", "prompts_file", default=None, type=click.Path(dir_okay=False),
              help="--model: prompts file, one prompt per line (default: a few built-in prompts).")
@click.option("--new-tokens", default=8, show_default=True, type=click.IntRange(0, 4096),
              help="--model: tokens to greedy-decode from both models.")
@click.option("--min-top1", type=click.FloatRange(0, 1), default=None, help="--model: override the minimum top-1 agreement.")
@click.option("--max-kl", type=click.FloatRange(0), default=None, help="--model: override the maximum mean KL(ref||out).")
@click.option("--max-logit-diff", type=click.FloatRange(0), default=None,
              help="--model: override the maximum |Δlogit|, as a multiple of the RMS of the reference logits.")
@click.option("--stream", is_flag=True, help="--model: load the reference layer by layer even when it fits in memory.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("-q", "--quiet", is_flag=True, help="Print only the summary line.")
@handle_errors
def verify_command(out, source, layer_glob, tokens, seed, device, skip_checksum, max_rel_l2, min_cosine, reference, whole_model,
                   prompts_file, new_tokens, min_top1, max_kl, max_logit_diff, stream, as_json, quiet) -> None:
    """Check OUT numerically: NPU kernels on the converted tensors vs the dequantized source.

    OUT is an npuconv output (its source comes from npuconv.json, or --source) or any supported
    checkpoint (then each layer is run through the kernel its scheme maps to and compared with
    its own dequantization). Uses torch_npu's real kernels when an NPU is present, otherwise an
    emulation of the same ops on CUDA or CPU; the report says which ran.

    With --model (needs pip install 'npuconv[model]'), OUT runs as a whole model instead: built by
    transformers from OUT's config.json, converted layers on their NPU kernels, every other tensor
    from OUT, against the source model with its quantized layers dequantized in float32. It
    compares the logits of a few prompts at every position (top-1 agreement, max |Δlogit|, mean
    KL), greedy-decodes --new-tokens from both, and reports structural problems (a tensor missing
    or unused, a bias the config drops, shapes the config does not match). This catches what the
    per-layer check cannot: wrongly named or dropped copied tensors, config.json edits, tied or
    untied embeddings. Limits depend on the kernels' activation quantization (see the report).

    Exit code 0 if every layer passes, 1 if any fails, 2 on bad input.

    \b
    Examples:
      npuconv verify ./llama-npu
      npuconv verify ./llama-npu --layers '*.self_attn.*' --tokens 64 --json
      npuconv verify ./some-gptq-model          # check a source checkpoint itself
      npuconv verify ./llama-npu --model --prompts prompts.txt --new-tokens 16
      npuconv verify ./llama-npu --reference tool   # against compressed-tensors' own dequantization
    """
    from npuconv.errors import InputError

    if whole_model:
        ctx = click.get_current_context()
        per_layer = [f"--{name.replace('_', '-')}" for name in ("layer_glob", "tokens", "max_rel_l2", "min_cosine", "reference")
                     if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE]
        if per_layer:
            raise InputError(f"{per_layer[0].replace('--layer-glob', '--layers')} is a per-layer option; --model checks the whole model")
        _verify_model(out, source, seed, device, skip_checksum, prompts_file, new_tokens, min_top1, max_kl,
                      max_logit_diff, stream, as_json, quiet)
        return
    model_only = [name for name, value in (("--prompts", prompts_file), ("--min-top1", min_top1), ("--max-kl", max_kl),
                                           ("--max-logit-diff", max_logit_diff), ("--stream", stream or None)) if value is not None]
    if model_only:
        raise InputError(f"{model_only[0]} needs --model")
    from npuconv.verify import VerifyOptions, verify

    options = VerifyOptions(
        source=source, layers=layer_glob, tokens=tokens, seed=seed, device=device,
        skip_checksum=skip_checksum, max_rel_l2=max_rel_l2, min_cosine=min_cosine, reference=reference,
    )
    report = _run_check("verify", verify, out, options, quiet or as_json)
    try:
        if as_json:
            emit_json(report)
        else:
            if not quiet:
                _print_verify(report)
            status = "[green]PASS[/]" if report["ok"] else "[bold red]FAIL[/]"
            skipped = f", {report['skipped']} skipped" if report["skipped"] else ""
            stdout.print(
                f"{status} {report['passed']}/{report['passed'] + report['failed']} layers{skipped} "
                f"({report['mode']} vs {report['source']}, reference {report['reference']}, backend {report['backend']}, "
                f"{report['activation_dtype']} activations, {report['seconds']:.1f} s)"
            )
            if not report["ok"]:
                stderr.print(f"[bold red]error:[/] {escape(report['error'])}", soft_wrap=True)
    finally:  # also when the report cannot be printed (closed stdout): the verdict's exit code stays
        if not report["ok"]:
            sys.exit(report["exit_code"])


def _run_check(description: str, check, out, options, silent: bool) -> dict:
    """``check(out, options, on_progress)`` with a layer counter; a checksum mismatch gets the CLI's advice."""
    from npuconv.errors import VerificationFailed
    from npuconv.io.digests import ChecksumMismatch

    with LayerProgress(description, enabled=not silent) as on_progress:
        try:
            return check(out, options, on_progress)
        except ChecksumMismatch as e:
            raise VerificationFailed(f"{e}; use --skip-checksum to run the numeric checks anyway") from None


def _verify_model(out, source, seed, device, skip_checksum, prompts_file, new_tokens, min_top1, max_kl, max_logit_diff,
                  stream, as_json, quiet) -> None:
    from npuconv.parity import ParityOptions, check_model, load_prompts, parity_summary

    options = ParityOptions(
        source=source, prompts=load_prompts(prompts_file) if prompts_file else None, new_tokens=new_tokens, seed=seed,
        device=device, skip_checksum=skip_checksum, stream=stream, min_top1=min_top1, max_kl=max_kl,
        max_logit_diff=max_logit_diff,
    )
    report = _run_check("verify --model", check_model, out, options, quiet or as_json)
    if as_json:
        emit_json(report)
    else:
        if not quiet:
            _print_model(report)
        status = "[green]PASS[/]" if report["ok"] else "[bold red]FAIL[/]"
        stdout.print(
            f"{status} whole model ({report['architecture']}, {report['family']} limits, backend {report['backend']}, "
            f"{report['activation_dtype']} vs float32 reference, {report['seconds']:.1f} s): {escape(parity_summary(report))}",
            soft_wrap=True,
        )
    if not report["ok"]:
        sys.exit(1)


def _print_model(report: dict) -> None:
    stdout.print(f"prompts: {escape(report['prompts']['from'])} ({report['prompts']['tokens']} tokens)", soft_wrap=True)
    for problem in report["problems"]:
        stdout.print(f"[bold red]problem:[/] {escape(problem)}", soft_wrap=True)
    if "metrics" not in report:
        return
    table = Table(title="logits per prompt", title_justify="left")
    for column in ("prompt", "tokens", "top-1", "max |Δlogit|", "mean KL"):
        table.add_column(column)
    for i, p in enumerate(report["metrics"]["per_prompt"]):
        table.add_row(str(i), str(p["tokens"]), f"{p['top1_agreement']:.4f}", _num(p["max_logit_diff"], ".3g"), _num(p["mean_kl"], ".3g"))
    stdout.print(table)
    decode = report["decode"]
    first = decode["first_divergence"]
    where = "no divergence" if first is None else (
        f"first divergence at prompt {first['prompt']}, step {first['step']}: reference {first['ref_token']}, "
        f"converted {first['out_token']} (reference top-1 margin {first['ref_margin']:.3g})"
    )
    stdout.print(f"greedy decode of {decode['new_tokens']} tokens: {where}; reference layers {report['reference_layers']}")


def _print_verify(report: dict) -> None:
    table = Table(title="per-layer error (worst first)", title_justify="left")
    for column in ("layer", "scheme", "kernel", "layout", "max abs", "rel L2", "cosine", "limit", "result"):
        table.add_column(column)
    for r in report["layers"]:
        layout = "-" if r["layout_exact"] is None else ("exact" if r["layout_exact"] else "[red]DIFF[/]")
        result = {"pass": "[green]ok[/]", "fail": "[bold red]FAIL[/]", "skip": f"[yellow]{r['note']}[/]"}[r["status"]]
        table.add_row(
            r["name"], r["scheme"], r["kernel"], layout, _num(r["max_abs"], ".3g"), _num(r["rel_l2"], ".2e"),
            _num(r["cosine"], ".6f"), _num(r["threshold"], ".0e"), result,
        )
    stdout.print(table)


def _num(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


# ------------------------------------------------------------------------------------- docs
@cli.command("docs")
@global_options
@click.argument("topic", required=False)
@click.option("--path", "show_path", is_flag=True, help="Print where the page is instead of its text.")
@handle_errors
def docs_command(topic: str | None, show_path: bool) -> None:
    """Show the documentation shipped with npuconv (works offline, without a checkout).

    Without TOPIC, list the topics.

    \b
    Examples:
      npuconv docs
      npuconv docs ci | less
      npuconv docs layouts --path
    """
    from npuconv.userdocs import doc_path, topics

    if topic is None:
        for name, title in topics().items():
            click.echo(f"{name:<28} {title}")
        return
    path = doc_path(topic)
    click.echo(str(path) if show_path else path.read_text(encoding="utf-8"))


# ------------------------------------------------------------------------------------- zoo
ZOO_STYLE = {
    "converted": "green", "skipped": "cyan", "failed": "bold red", "verify-failed": "bold red",
    "not-run": "yellow", "would-convert": "green", "would-skip": "cyan",
}


class _ZooGroup(click.Group):
    """``npuconv zoo ZOO_FILE [OPTIONS]`` runs a zoo file (the ``run`` command); ``npuconv zoo merge …``
    and the other subcommands are named. A zoo file literally named like a subcommand: ``./merge``."""

    def resolve_command(self, ctx, args):
        if args and args[0] not in self.commands:
            return "run", self.commands["run"], args
        return super().resolve_command(ctx, args)


@cli.group("zoo", cls=_ZooGroup, context_settings={"ignore_unknown_options": True})
def zoo_group() -> None:
    """Convert every checkpoint listed in a zoo file (TOML), skipping outputs that are up to date.

    \b
    npuconv zoo ZOO_FILE [OPTIONS]       run the zoo (same as: npuconv zoo run ZOO_FILE)
    npuconv zoo merge REPORT... [OPTIONS] combine the JSON reports of --shard jobs

    See `npuconv zoo run --help` and the CI guide: `npuconv docs ci`.
    """


def _report_outputs(func):
    """``--report``, ``--junit`` and ``--markdown``: where to write the report, and in which forms."""
    func = click.option("--markdown", "markdown_path", default=None, type=click.Path(dir_okay=False),
                        help="Write a Markdown summary to this file (a PR comment, or $GITHUB_STEP_SUMMARY).")(func)
    func = click.option("--junit", "junit_path", default=None, type=click.Path(dir_okay=False),
                        help="Write JUnit XML to this file: one testcase per entry (GitLab, GitHub, Jenkins test reports).")(func)
    return click.option("--report", "report_path", default=None, type=click.Path(dir_okay=False),
                        help="Write the JSON report to this file.")(func)


@zoo_group.command("run")
@global_options
@click.argument("zoo_file")
@click.option("--force", is_flag=True, help="Reconvert every entry, even if up to date (a directory that is not an npuconv output is never replaced).")
@click.option("--fail-fast", is_flag=True, help="Start no further entry after the first failure.")
@click.option("-j", "--jobs", default=1, show_default=True, type=click.IntRange(1, 1024), help="Entries converted in parallel, one process each.")
@click.option("--shard", "shard_text", default=None, metavar="I/N", help="Run only shard I of N (e.g. 2/4) of the entries.")
@click.option("--shard-by", type=click.Choice(["index", "hash"]), default="index", show_default=True,
              help="Shard by position in the file (index mod N) or by a hash of the output path (stable when entries are added).")
@click.option("--dry-run", is_flag=True, help="Show what would be converted or skipped; write nothing.")
@_report_outputs
@click.option("--heartbeat", default=30.0, show_default=True, type=click.FloatRange(0), metavar="SECONDS",
              help="Every SECONDS, a progress line for each entry still running (0: none).")
@click.option("--json", "as_json", is_flag=True, help="Print the JSON report.")
@click.option("-q", "--quiet", is_flag=True, help="No progress; print only the summary line (and failed entries).")
@handle_errors
def zoo_command(zoo_file, force, fail_fast, jobs, shard_text, shard_by, dry_run, report_path, junit_path, markdown_path,
                heartbeat, as_json, quiet) -> None:
    """Convert every checkpoint listed in ZOO_FILE (TOML), skipping outputs that are up to date.

    An output is up to date when its npuconv.json records the same source (Hub commit, or the
    size/mtime/sha256 of each local file), target, options and npuconv version. Every entry runs
    even if some fail (unless --fail-fast). The file format and the report: `npuconv docs ci`.

    Exit code: 0 if every entry was converted or skipped (and verified, where asked), 1 if an
    entry failed verification and none failed otherwise, 2 if an entry failed on bad input or
    the zoo file is invalid (then nothing runs), 3 if an entry hit an internal error.

    \b
    Examples:
      npuconv zoo zoo.toml
      npuconv zoo zoo.toml --jobs 4 --report zoo-report.json --junit zoo.xml
      npuconv zoo zoo.toml --shard 2/4 --json
      npuconv zoo zoo.toml --dry-run
    """

    from npuconv.zoo import ZooOptions, load_zoo, parse_shard, run_zoo, select_shard

    outputs = (report_path, junit_path, markdown_path)
    try:
        shard = parse_shard(shard_text) if shard_text else None
        entries = load_zoo(zoo_file)
    except NpuconvError as e:
        _write_reports(*outputs, {"ok": False, "error": " ".join(str(e).split()), "exit_code": e.exit_code})
        raise
    selected = select_shard(entries, shard, shard_by)
    options = ZooOptions(force=force, fail_fast=fail_fast, jobs=jobs, dry_run=dry_run, shard=shard, shard_by=shard_by,
                         heartbeat=heartbeat)
    show_progress = not (quiet or as_json)
    if show_progress:
        part = f", shard {shard_text} by {shard_by}" if shard else ""
        stderr.print(f"zoo {zoo_file}: {len(selected)} of {len(entries)} entries{part}, jobs {jobs}{' (dry run)' if dry_run else ''}")
    finished = 0

    def on_event(kind: str, entry, result) -> None:
        nonlocal finished
        if not show_progress:
            return
        if kind == "start":
            stderr.print(f"  [dim]start[/]  {escape(entry.name)}", soft_wrap=True)
            return
        if kind == "running":
            done, total = result["done"], result["total"]
            part = f", {100 * done / total:.0f}% ({human_bytes(done)} of {human_bytes(total)})" if total else ""
            stderr.print(f"  [dim]running[/] {escape(entry.name)}: {result['seconds']:.0f} s{part}", soft_wrap=True)
            return
        finished += 1
        style = ZOO_STYLE.get(result["status"], "")
        detail = result["error"] or result["reason"]
        stderr.print(
            f"  [{style}]{result['status']}[/] {escape(entry.name)} ({result['seconds']:.2f} s) "
            f"{finished}/{len(selected)}{': ' + escape(detail) if detail else ''}",
            soft_wrap=True,
        )

    try:
        report = run_zoo(selected, options, on_event, zoo_file=zoo_file, zoo_entries=len(entries))
    except (KeyboardInterrupt, interrupts.Interrupted) as e:
        code = getattr(e, "exit_code", EXIT_INTERRUPTED)
        _fail(f"{e or 'interrupted'}; entries in progress published nothing, finished entries are in place", code, as_json)
    _finish_zoo(report, outputs, as_json, quiet)


@zoo_group.command("merge")
@global_options
@click.argument("reports", nargs=-1, required=True, type=click.Path(dir_okay=False))
@_report_outputs
@click.option("--json", "as_json", is_flag=True, help="Print the merged JSON report.")
@click.option("-q", "--quiet", is_flag=True, help="Print only the summary line (and failed entries).")
@handle_errors
def zoo_merge_command(reports, report_path, junit_path, markdown_path, as_json, quiet) -> None:
    """Combine the JSON reports of `npuconv zoo --shard I/N --report FILE` jobs into one.

    Entries come out in zoo-file order, totals are recomputed, and the exit code is the worst
    of all shards (as one `npuconv zoo` run over the whole file would give). A report of a job
    whose zoo file was invalid makes the merged report fail with that error.

    \b
    Examples:
      npuconv zoo merge zoo-report-*.json --report zoo-report.json
      npuconv zoo merge zoo-report-*.json --markdown "$GITHUB_STEP_SUMMARY" --junit zoo.xml
    """
    from npuconv.zoo_report import merge_reports, read_report

    merged = merge_reports([read_report(path) for path in reports], list(reports))
    _finish_zoo(merged, (report_path, junit_path, markdown_path), as_json, quiet)


def _finish_zoo(report: dict, outputs: tuple, as_json: bool, quiet: bool) -> None:
    """Write the report files, print the table (or JSON) and the summary, exit with the report's code."""
    from npuconv.zoo_report import summary_line

    _write_reports(*outputs, report)
    try:
        if as_json:
            emit_json(report)
        else:
            for error in report.get("errors") or []:
                stderr.print(f"[bold red]error:[/] {escape(error)}", soft_wrap=True)
            if not quiet and report["entries"]:
                _print_zoo(report)
            elif quiet:
                for r in report["entries"]:
                    if r["error"]:
                        stderr.print(f"[bold red]{r['status']}:[/] {escape(r['name'])}: {escape(r['error'])}", soft_wrap=True)
            totals = report["totals"]
            status, _, counts = summary_line(report).partition(" ")
            style = "green" if report["ok"] else "bold red"
            stdout.print(
                f"[{style}]{status}[/] {escape(counts)}; {human_bytes(totals['bytes_in'])} in, "
                f"{human_bytes(totals['bytes_out'])} out, {totals['seconds']:.1f} s",
                soft_wrap=True,
            )
    finally:  # also when the report cannot be printed (closed stdout)
        if report["exit_code"]:
            sys.exit(report["exit_code"])

def _print_zoo(report: dict) -> None:
    from npuconv.zoo_report import verify_text

    table = Table(title="zoo", title_justify="left")
    for column in ("#", "name", "target", "status", "time", "in", "out", "peak RSS", "verify", "detail"):
        table.add_column(column)
    for r in report["entries"]:
        style = ZOO_STYLE.get(r["status"], "")
        table.add_row(
            str(r["index"] + 1), escape(r["name"]), r["target"], f"[{style}]{r['status']}[/]", f"{r['seconds']:.2f} s",
            human_bytes(r["bytes_in"]) if r["bytes_in"] else "-", human_bytes(r["bytes_out"]) if r["bytes_out"] else "-",
            human_bytes(r["peak_rss_bytes"]) if r["peak_rss_bytes"] else "-", escape(verify_text(r)),
            escape(r["error"] or r["reason"]),
        )
    stdout.print(table)
    for r in report["entries"]:
        for warning in r.get("warnings") or []:
            stderr.print(f"[yellow]warning:[/] {escape(r['name'])}: {escape(warning)}", soft_wrap=True)


def _write_reports(report_path: str | None, junit_path: str | None, markdown_path: str | None, report: dict) -> None:
    """The report as JSON (``--report``), JUnit XML (``--junit``) and Markdown (``--markdown``), each atomically."""
    from npuconv.zoo_report import junit_xml, markdown_summary

    if report_path:
        _write_report(report_path, report)
    if junit_path:
        _write_text(junit_path, junit_xml(report), "--junit")
    if markdown_path:
        _write_text(markdown_path, markdown_summary(report), "--markdown")


def _write_report(path: str, report: dict) -> None:
    """Write the JSON report atomically (a temporary sibling renamed into place)."""
    _write_text(path, json.dumps(report, indent=2, sort_keys=True, default=str) + "\n", "--report")


def _write_text(path: str, text: str, option: str) -> None:
    """Write a text file atomically (a temporary sibling renamed into place); a path that is not a
    regular file (``/dev/stdout``, a pipe) is written in place."""
    import os
    from pathlib import Path

    from npuconv.errors import OutputError

    target = Path(path)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        if target.exists() and not target.is_file():
            with open(target, "a", encoding="utf-8") as f:
                f.write(text)
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, target)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"{option} {path}: cannot write: {e.strerror or e}") from None


def main() -> None:
    """The CLI proper; ``npuconv.__main__.main`` (the console script) installs signal handling first."""
    from npuconv.memory import tune_allocator

    tune_allocator()
    if hasattr(signal, "SIGXFSZ"):
        # over a file-size limit, fail the write with EFBIG (clean error + cleanup) instead of dying
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        cli(prog_name="npuconv")
    finally:
        interrupts.finish()
        try:
            sys.stdout.flush()
        except (OSError, ValueError):  # a closed pipe: let the exit flush find /dev/null instead
            _silence_stdout()
