"""Plant each known bug in a scratch copy of the repository, run the checks, report which caught it.

Not part of the default test run (``pytest`` ignores this folder: no ``test_*.py`` here). Usage::

    python3 tests/mutation/run_mutations.py [--only NAME] [--json OUT.json]

Each mutation is a list of edits ``(function name, old text, new text)``: the edit is made inside the
body of ``def <function name>`` wherever that function lives under ``src/npuconv`` (so the script
survives modules being moved or renamed; a function that is gone or an ``old`` text that no longer
matches exactly once is reported as ``NOT APPLIED``, never silently skipped). The consistent pairs
change a convention on BOTH sides (writer and read-back, encoder and decoder, writer and kernel), so
npuconv stays consistent with itself: only a check that does not share the mutated code can see it.

A mutation is *caught independently* when at least one failing test is an independent check:
the spec decoders (tests/spec_decoders.py), the writing tools as oracles (msModelSlim,
compressed-tensors, fixtures' reference dequantizations made by GPTQModel / AutoAWQ / CT /
msModelSlim), or hand vectors written from the spec in the test. Exit code 1 when any mutation is
not caught independently (or not applied).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Mutation:
    name: str
    what: str
    # (function, old, new); "a|b": whichever of the functions holds ``old``; "?f": skipped if no f holds it
    edits: tuple[tuple[str, str, str], ...]
    tests: tuple[str, ...]  # pytest arguments: the files relevant to it (``-k`` narrows the spec-decoder cases)


MUTATIONS = [
    Mutation(
        "gptq-v1-zero-plus-one-dropped", "reader: GPTQ v1 zero points read as stored (the +1 dropped)",
        (("decode_zero_points", "unpack_zero_fields(add_one_per_field(qzeros, bits), bits, out_features)",
          "unpack_zero_fields(qzeros, bits, out_features)"),
         ("decode_zero_points", "+ 1) & 0b111", "+ 0) & 0b111")),
        ("tests/readers/test_gptq.py", "tests/test_spec_decoders.py", "-k", "not spec_decoder or gptq"),
    ),
    Mutation(
        "awq-forward-order", "reader: AWQ nibbles unpacked in the forward (pack) order instead of the reverse one",
        (("awq_unpack", "enumerate(AWQ_REVERSE_ORDER)", "enumerate(AWQ_ORDER)"),
         # the fused word path (issue 15): its two delta swaps applied in the other order = the forward shuffle
         ("awq_words_to_bitstream", "((8, 0x0000FF00), (4, 0x00F000F0))", "((4, 0x00F000F0), (8, 0x0000FF00))")),
        ("tests/readers/test_awq.py", "tests/test_spec_decoders.py", "-k", "not spec_decoder or awq"),
    ),
    Mutation(
        "int4pack-nibble-order", "pair: the odd element in the LOW nibble, in pack and unpack alike",
        (("pack_nibbles", "if data.is_contiguous() and", "if False and data.is_contiguous() and"),
         ("pack_nibbles", "nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)", "nibbles[..., 1::2] | (nibbles[..., 0::2] << 4)"),
         ("unpack_nibbles", "torch.stack((data & 0xF, data >> 4), dim=-1)", "torch.stack((data >> 4, data & 0xF), dim=-1)"),
         # the writer's fused path for already-packed 4-bit words (issue 15) packs with the same swap
         ("write_layer", "maybe_nz(words, ",
          "maybe_nz((((words & 0x0F0F0F0F) << 4) | ((words >> 4) & 0x0F0F0F0F)), ")),
        ("tests/test_spec_decoders.py", "tests/writers/test_modelslim_writer.py", "tests/test_layouts.py",
         "-k", "not spec_decoder or npu-int4 or w4a4 or w4a8 or mx or hand_vector"),
    ),
    Mutation(
        "nz-tile-order", "pair: NZ tiles stored row-tile-major ([R1, C1, 16, C0]) in nd_to_nz, nz_to_nd and the shape",
        (("nz_storage_shape", "(*batch, math.ceil(cols / c0), math.ceil(rows / 16), 16, c0)",
          "(*batch, math.ceil(rows / 16), math.ceil(cols / c0), 16, c0)"),
         ("nd_to_nz", "tiles.permute(*range(nb), nb + 2, nb, nb + 1, nb + 3)", "tiles.permute(*range(nb), nb, nb + 2, nb + 1, nb + 3)"),
         ("nz_to_nd", "*batch, c1, r1, _, c0 = storage.shape", "*batch, r1, c1, _, c0 = storage.shape"),
         ("nz_to_nd", "storage.permute(*range(nb), nb + 1, nb + 2, nb, nb + 3)", "storage.permute(*range(nb), nb, nb + 2, nb + 1, nb + 3)")),
        ("tests/test_spec_decoders.py", "tests/test_layouts.py", "-k", "not spec_decoder or nz or hand_vector"),
    ),
    Mutation(
        "int4-nz-c0-16", "pair: C0 of int4pack-ed int32 NZ 16 instead of 8 (writer and read-back share nz_c0)",
        (("nz_c0", "        return 8\n", "        return 16\n"),),
        ("tests/test_spec_decoders.py", "-k", "nz and npu-int4"),
    ),
    Mutation(
        "e8m0-bias", "pair: E8M0 bias 126 instead of 127 in every decoder (layouts.e8m0_decode; model.decode_e8m0 where it still exists), the encoder untouched",
        (("e8m0_decode", "scale.to(torch.int32) - 127", "scale.to(torch.int32) - 126"),
         # the canonical model's second decoder, before issue 14 made layouts.e8m0_decode the only one
         ("?decode_e8m0", "scale.to(torch.int32) - 127", "scale.to(torch.int32) - 126")),
        ("tests/readers/test_compressed_tensors.py", "tests/readers/test_modelslim.py", "tests/test_spec_decoders.py",
         "tests/kernels/test_emulated.py", "tests/schemes/test_scheme_offline_mx.py",
         "-k", "not spec_decoder or mx"),
    ),
    Mutation(
        "wqbmm-offset-sign", "triple: antiquant_offset = z - m in the writer, read back as m + offset, SUBTRACTED by the emulated kernel",
        (("write_layer|_finish", "group_scale_layout((midpoint - layer.zero_points()).to(layer.scale.dtype))",
          "group_scale_layout((layer.zero_points() - midpoint).to(layer.scale.dtype))"),
         ("read_layer", "zero = (midpoint - _to_group_layout(tensors[\"antiquant_offset\"], spec).float())",
          "zero = (midpoint + _to_group_layout(tensors[\"antiquant_offset\"], spec).float())"),
         ("npu_weight_quant_batchmatmul", "(w.to(torch.float32) + o.to(torch.float32))", "(w.to(torch.float32) - o.to(torch.float32))"),
         ("npu_weight_quant_batchmatmul", "t = w if o is None else w + o.to(torch.float32)", "t = w if o is None else w - o.to(torch.float32)")),
        ("tests/test_spec_decoders.py", "tests/kernels/test_emulated.py", "-k",
         "not spec_decoder or awq or asym or ms_w8a16"),
    ),
]

#: failing tests that are independent checks (do not run the mutated npuconv code on both sides)
INDEPENDENT = [
    (r"tests/test_spec_decoders\.py", "spec decoder vs the writing tool / OCP rule"),
    (r"tests/test_tool_references\.py", "writing library as oracle"),
    (r"test_modelslim_writer\.py::test_msmodelslim_", "msModelSlim reads what we write"),
    (r"tests/readers/test_\w+\.py::test_(fixture|gemm_fixture)\w*", "fixture vs the tool's own dequantization"),
    (r"tests/test_layouts\.py::test_(nd_to_nz_spans|nd_to_nz_hand|int4pack_hand|int4pack_second|e8m0_decode|fp4_table)", "hand vector from the spec"),
    (r"tests/kernels/test_emulated\.py::test_(quant_matmul_mx|dynamic_mx_quant|wqbmm_offset_is_added|wqbmm_per_group)", "kernel vs a hand/OCP reference"),
    (r"tests/schemes/test_scheme_offline_mx\.py::test_float_llama_to_mx", "stored MX vs the OCP rule"),
    (r"tests/moe/test_moe_fixtures\.py::test_float_target_is_the_tool_reference", "fixture vs the tool's own dequantization"),
]


def function_span(text: str, name: str) -> tuple[int, int] | None:
    """[start, end) of ``def name(...)``'s source: to the next line indented no deeper than the ``def``."""
    match = re.search(rf"^(?P<indent>[ \t]*)def {re.escape(name)}\(", text, re.M)
    if match is None:
        return None
    indent = len(match["indent"])
    end = len(text)
    body = text.index("\n", match.end()) + 1  # the lines after the one holding ``def``
    for line in re.finditer(r"^.*$", text[body:], re.M):
        s = line.group(0)
        if s.strip() and not s.startswith(" " * (indent + 1)) and not s.lstrip().startswith(")"):
            end = body + line.start()
            break
    return match.start(), end


def apply(root: Path, mutation: Mutation) -> list[str]:
    """Apply the edits under root/src; returns problems (empty when every edit applied exactly once)."""
    problems = []
    files = sorted((root / "src" / "npuconv").rglob("*.py"))
    for function, old, new in mutation.edits:
        optional = function.startswith("?")  # "?name": a function that a refactor may have merged away
        function = function.lstrip("?")
        hits = []
        for path in files:
            text = path.read_text()
            for name in function.split("|"):
                span = function_span(text, name)
                if span is not None and text[span[0]:span[1]].count(old) == 1:
                    hits.append((path, text, span))
        if optional and not hits:
            continue
        if len(hits) != 1:
            problems.append(f"{function}: {'no' if not hits else len(hits)} function bodies contain {old!r} once")
            continue
        path, text, (a, b) = hits[0]
        path.write_text(text[:a] + text[a:b].replace(old, new) + text[b:])
    return problems


def run_tests(root: Path, tests: tuple[str, ...]) -> tuple[list[str], str]:
    env = {**os.environ, "PYTHONPATH": str(root / "src"), "PYTHONDONTWRITEBYTECODE": "1"}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--tb=no", "-rf", *tests],
                          cwd=root, env=env, capture_output=True, text=True)
    failed = sorted({line.split()[1] for line in done.stdout.splitlines() if line.startswith("FAILED ")})
    return failed, done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr[-300:]


def classify(test: str) -> str | None:
    for pattern, kind in INDEPENDENT:
        if re.search(pattern, test):
            return kind
    return None


def scratch_copy() -> Path:
    root = Path(tempfile.mkdtemp(prefix="npuconv-mutation-"))
    for part in ("src", "tests", "pyproject.toml"):
        source = REPO / part
        (shutil.copytree if source.is_dir() else shutil.copy2)(source, root / part,
                                                               **({"ignore": shutil.ignore_patterns("__pycache__")} if source.is_dir() else {}))
    return root


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", help="run only this mutation (repeatable)")
    parser.add_argument("--json", type=Path, help="also write the results as JSON")
    args = parser.parse_args()
    results, ok = [], True
    for mutation in MUTATIONS:
        if args.only and mutation.name not in args.only:
            continue
        root = scratch_copy()
        started = time.perf_counter()
        try:
            problems = apply(root, mutation)
            failed, summary = ([], "") if problems else run_tests(root, mutation.tests)
        finally:
            shutil.rmtree(root, ignore_errors=True)
        independent = {t: classify(t) for t in failed if classify(t)}
        caught = bool(independent) and not problems
        ok &= caught
        results.append({"mutation": mutation.name, "what": mutation.what, "applied": not problems, "problems": problems,
                        "failed": failed, "independent": independent, "caught_independently": caught,
                        "summary": summary, "seconds": round(time.perf_counter() - started, 1)})
        print(flush=True)
        print(f"## {mutation.name}: {'CAUGHT' if caught else 'NOT APPLIED' if problems else 'MISSED'} "
              f"({len(failed)} failing, {len(independent)} independent; {results[-1]['seconds']} s)\n   {mutation.what}")
        for problem in problems:
            print(f"   ! {problem}")
        kinds: dict[str, list[str]] = {}
        for test, kind in independent.items():
            kinds.setdefault(kind, []).append(test)
        for kind, tests in sorted(kinds.items()):
            print(f"   - {kind}: {len(tests)} (e.g. {tests[0]})")
        shared = [t for t in failed if t not in independent]
        if shared:
            print(f"   - shared-code checks: {len(shared)} (e.g. {shared[0]})")
    print("\n| mutation | caught by an independent check | failing tests (independent) |\n|---|---|---|")
    for r in results:
        kinds = sorted(set(r["independent"].values()))
        print(f"| {r['mutation']} | {'yes: ' + '; '.join(kinds) if r['caught_independently'] else 'NO'} | "
              f"{len(r['failed'])} ({len(r['independent'])}) |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
