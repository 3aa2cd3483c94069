"""The documentation stays true: every documented command parses with today's CLI, benchmark commands
exist, known-stale statements do not come back, and what help texts and warnings point to ships
with the package (``npuconv docs TOPIC``)."""

from __future__ import annotations

import ast
import importlib.util
import re
import shlex
import subprocess
import sys
from pathlib import Path

import click
import pytest

from npuconv.cli import cli
from npuconv.userdocs import DOCS_DIR, doc_path, topics
from npuconv.registry import target_names

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md", ROOT / "benchmarks" / "RESULTS.md"]
CI_VARIABLES = re.compile(r"\$\{\{[^}]*\}\}")


def code_lines(page: Path) -> list[str]:
    """Lines inside fenced code blocks, with YAML-folded and backslash continuations joined."""
    lines, inside = [], False
    for raw in page.read_text(encoding="utf-8").splitlines():
        if raw.lstrip().startswith("```"):
            inside = not inside
            continue
        if not inside:
            continue
        line = raw.strip()
        if lines and (lines[-1].endswith("\\") or (line.startswith("--") and lines[-1].split()[:1] in (["npuconv"], ["python"]))):
            lines[-1] = lines[-1].rstrip("\\").rstrip() + " " + line
        else:
            lines.append(line)
    return lines


def commands(prefix: str) -> list[tuple[str, str]]:
    """(page, command line) for every documented invocation starting with ``prefix``."""
    found = []
    for page in PAGES:
        for line in code_lines(page):
            line = re.sub(r"^(run:|- )\s*", "", line)
            for part in line.split("&&"):
                part = part.split(" | ")[0].strip()
                if part.startswith(prefix):
                    found.append((page.name, CI_VARIABLES.sub("1", part)))
    return found


NPUCONV = commands("npuconv ")


def test_the_pages_document_commands():
    assert len(NPUCONV) > 20
    assert {line.split()[1] for _, line in NPUCONV} >= {"inspect", "convert", "verify", "zoo"}


@pytest.mark.parametrize("page,line", NPUCONV, ids=[f"{p}:{l[:60]}" for p, l in NPUCONV])
def test_documented_npuconv_command_parses(page, line, monkeypatch):
    """Parsed by the real CLI (options, choices, types) with the command bodies replaced by no-ops."""
    def leaves(group):
        for command in group.commands.values():
            yield from leaves(command) if isinstance(command, click.Group) else [command]

    ran = []
    for command in leaves(cli):
        monkeypatch.setattr(command, "callback", lambda *a, _name=command.name, **k: ran.append(_name))
    args = shlex.split(line, comments=True)[1:]
    try:
        cli.main(args=args, prog_name="npuconv", standalone_mode=False)
    except click.ClickException as e:
        pytest.fail(f"{page}: `{line}`: {e.format_message()}")
    assert ran, f"{page}: `{line}` ran no command"


def load_benchmark(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return module


BENCH = [(p, l) for p, l in commands("python benchmarks/run.py")] + [(p, l) for p, l in commands("python3 benchmarks/run.py")]


@pytest.mark.parametrize("page,line", BENCH, ids=[l for _, l in BENCH])
def test_documented_benchmark_command_parses(page, line):
    parser = load_benchmark("run").build_parser()
    try:
        parser.parse_args(shlex.split(line, comments=True)[2:])
    except SystemExit:
        pytest.fail(f"{page}: `{line}` is not accepted by benchmarks/run.py")


def test_benchmark_markdown_output():
    run = load_benchmark("run")
    text = run.markdown({
        "convert": [{"format": "gptq-sym", "target": "npu-int4", "workers": 1, "input_bytes": 4e9, "convert_seconds": 16.0,
                     "copy_seconds": 5.0, "ratio": 3.2, "convert_gb_per_s": 0.25, "convert_peak_rss_mb": 700}],
        "compute": [{"step": "gptq unpack", "input_mb": 22.5, "gb_per_s_per_core": 1.5}],
        "verify": {"verify_layers": 7, "seconds": 3.0, "backend": "emulated-cpu", "ok": True, "peak_rss_mb": 500},
    })
    assert "| gptq-sym | npu-int4 | 1 | 4.00 GB | 16.0 | 5.0 | 3.2 | 0.25 | 700 |" in text
    assert "| gptq unpack | 22.5 | 1.5 |" in text and "verify: 7 layers" in text


@pytest.mark.parametrize("script", ["run.py", "compute.py", "synth.py", "startup.py"])
def test_benchmark_help_only_prints_help(script):
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--help"], capture_output=True, text=True,
                            timeout=60, env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0 and result.stdout.startswith("usage:"), result.stderr
    assert "gb_per_s" not in result.stdout  # compute.py did not run its benchmark


# ------------------------------------------------------------------------------------ stale statements
STALE = [
    ("docs/schemes.md", "copies the float model unchanged (as before)"),  # float → npu-mxfp8 is wired
    ("docs/schemes.md", "Wiring still needed"),
    ("docs/modelslim.md", "does not check OUT's bytes"),  # verify pairs a modelslim output with its source
    ("docs/ci.md", "jq -s"),  # npuconv zoo merge does it
]


@pytest.mark.parametrize("page,text", STALE)
def test_stale_statement_is_gone(page, text):
    assert text not in (ROOT / page).read_text(encoding="utf-8")


def test_ci_guide_lists_every_target():
    row = next(line for line in (ROOT / "docs/ci.md").read_text().splitlines() if line.startswith("| `target` |"))
    assert set(re.findall(r"`([a-z0-9-]+)`", row)) - {"target"} == {"npu", *target_names()}


def test_ci_guide_says_plain_convert_records_no_sha256(tmp_path):
    import json

    from conftest import FIXTURES
    from npuconv.convert import ConvertOptions, convert

    convert(FIXTURES / "gptq_v1_b4_g32_sym", tmp_path / "out", ConvertOptions("npu-int4"))
    files = json.loads((tmp_path / "out" / "npuconv.json").read_text())["source_fingerprint"]["files"]
    assert all(f["sha256"] is None for f in files)  # what the guide must say
    assert 'records `"sha256": null`' in " ".join((ROOT / "docs/ci.md").read_text().split())


def test_no_page_cites_files_outside_the_repository():
    for path in [*ROOT.glob("*.md"), *(ROOT / "docs").rglob("*.md"), *(ROOT / "src").rglob("*.py"), *(ROOT / "tests").rglob("*.py"),
                 *(ROOT / "tests" / "fixtures").glob("*.md"), *(ROOT / "benchmarks").glob("*")]:
        if path.is_file() and path.name != "test_docs.py":
            assert "shared/research" not in path.read_text(encoding="utf-8", errors="replace"), path
    for note in ("torch_npu_ops", "npu_loaders", "checkpoint_formats"):
        assert (ROOT / "docs" / "research" / f"{note}.md").is_file()


def test_relative_links_of_the_pages_resolve():
    for page in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]:
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", page.read_text(encoding="utf-8")):
            if "://" not in target:
                assert (page.parent / target).exists(), f"{page.name}: link {target}"


# ------------------------------------------------------------------------------------ docs a pip user can reach
def test_docs_ship_inside_the_package():
    assert DOCS_DIR.is_dir() and (DOCS_DIR / "ci.md").read_text() == (ROOT / "docs" / "ci.md").read_text()
    assert {"ci", "layouts", "modelslim", "schemes", "research/torch_npu_ops"} <= set(topics())
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert '"docs/*.md"' in pyproject and '"docs/research/*.md"' in pyproject


def test_npuconv_docs_command():
    from click.testing import CliRunner

    listing = CliRunner().invoke(cli, ["docs"])
    assert listing.exit_code == 0 and "ci " in listing.output and "npuconv in CI" in listing.output
    page = CliRunner().invoke(cli, ["docs", "layouts"])
    assert page.exit_code == 0 and page.output.startswith("# npuconv output layouts")
    missing = CliRunner().invoke(cli, ["docs", "nothing"])
    assert missing.exit_code == 2 and "no documentation topic 'nothing' (topics: " in missing.output and " ci," in missing.output


def user_strings() -> list[tuple[str, str]]:
    """String literals of the package that are not docstrings (help texts, messages, warnings)."""
    out = []
    for path in (ROOT / "src" / "npuconv").rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                      if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                      and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                out.append((path.name, node.value))
    return out


def test_messages_point_to_shipped_docs_not_repository_paths():
    for name, text in user_strings():
        assert not re.search(r"\bdocs/\w+\.md", text), f"{name}: {text!r}"
    for command in cli.commands.values():
        assert not re.search(r"\bdocs/\w+\.md", command.help or ""), command.name
    mentioned = {m for _, text in user_strings() for m in re.findall(r"npuconv docs ([\w/]+)", text)}
    mentioned |= {m for c in cli.commands.values() for m in re.findall(r"npuconv docs ([\w/]+)", c.help or "")}
    assert mentioned and all(doc_path(topic).is_file() for topic in mentioned)
