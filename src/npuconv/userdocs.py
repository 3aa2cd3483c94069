"""The user documentation shipped inside the package (``npuconv/docs``, the repository's ``docs/``).

Help texts and warnings point to ``npuconv docs TOPIC`` rather than to repository paths, so a
pip-installed user (no checkout, maybe no network) can read what they refer to.
"""

from __future__ import annotations

from pathlib import Path

from npuconv.errors import InputError

DOCS_DIR = Path(__file__).resolve().parent / "docs"


def topics() -> dict[str, str]:
    """Topic name (path under the docs directory without ``.md``) → the page's first heading."""
    out = {}
    for path in sorted(DOCS_DIR.rglob("*.md")):
        first = next((line for line in path.read_text(encoding="utf-8").splitlines() if line.startswith("#")), "")
        out[path.relative_to(DOCS_DIR).with_suffix("").as_posix()] = first.lstrip("# ").strip()
    return out


def doc_path(topic: str) -> Path:
    """The file of a topic (``ci``, ``layouts``, ``research/torch_npu_ops``, …); unknown: :class:`InputError`."""
    known = topics()
    name = topic.removesuffix(".md").removeprefix("docs/")
    if name not in known:
        raise InputError(f"no documentation topic {topic!r} (topics: {', '.join(known)})")
    return DOCS_DIR / f"{name}.md"
