"""Resolve MODEL (a local directory or a Hugging Face repo id ``org/name[@revision]``) to a Checkpoint.

Hub repos are fetched with ``huggingface_hub.snapshot_download`` restricted to safetensors, JSON,
tokenizer and other small text files, into the regular Hub cache; ``HF_HUB_OFFLINE=1`` makes it
use the cache only. Revisions must be branch/tag names or commit hashes (:func:`check_revision`),
and the snapshot they resolve to must lie inside the cache (refs files are not trusted as paths).
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from npuconv.io.checkpoint import Checkpoint
from npuconv.errors import InputError

HUB_PATTERNS = [
    "*.safetensors",
    "*.safetensors.index.json",
    "*.json",
    "*.txt",
    "*.model",
    "*.tiktoken",
    "*.jinja",
    "*.py",
    "*.md",
    "*.yaml",
]
log = logging.getLogger(__name__)
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+(@[\w.\-/]+)?$")


def looks_like_hub_id(text: str) -> bool:
    """``org/name[@revision]`` syntax (a path starting with ``.`` or ``/`` never is one)."""
    return not text.startswith((".", "/")) and bool(_REPO_ID.match(text))


def split_repo_id(model: str) -> tuple[str, str | None]:
    """``"org/name@rev"`` → ``("org/name", "rev")``."""
    repo, _, revision = model.partition("@")
    return repo, revision or None


_REF_COMPONENT = re.compile(r"[A-Za-z0-9_\-][A-Za-z0-9_.\-]*")


def check_revision(revision: str) -> None:
    """A revision is a branch or tag name (``main``, ``v1.0``, ``refs/pr/3``) or a commit hash.

    Accepted: ``/``-separated components of letters, digits, ``_ - .``, none empty, none
    starting with ``.`` and none ending with ``.lock`` or ``.``, no ``..`` anywhere (git's
    ``check-ref-format`` rules, restricted to the characters Hub repos use). Anything else —
    ``../x``, absolute paths, backslashes — is refused: a revision must never name a path.
    """
    parts = revision.split("/")
    if ".." in revision or not all(_REF_COMPONENT.fullmatch(p) and not p.endswith((".lock", ".")) for p in parts):
        raise InputError(
            f"revision {revision!r} is not a branch, tag or commit hash (letters, digits, '_-.' and '/'-separated "
            "names; no '..', no component starting with '.')"
        )


def check_repo_name(repo_id: str) -> None:
    """Hub repo ids: ``org/name``, no ``..`` or ``--`` (huggingface_hub's own rule), no component ``.``."""
    if ".." in repo_id or "--" in repo_id or any(p in (".", "") for p in repo_id.split("/")):
        raise InputError(f"{repo_id}: not a valid Hugging Face repo id (no '..', '--' or empty parts)")


def open_source(model: str | Path, revision: str | None = None) -> Checkpoint:
    """A Checkpoint for a local directory, or for a Hub repo id downloaded into the cache.

    ``revision`` (a branch, tag or commit, as ``hf download --revision``) is the same as
    ``MODEL@revision``; giving both with different values, or a revision for a local directory,
    is an :class:`InputError`.
    """
    path = Path(model)
    text = str(model)
    if path.exists():
        if revision:
            raise InputError(f"--revision {revision}: {text} is a local directory; a revision applies to Hub repo ids")
        return Checkpoint(path)
    if not looks_like_hub_id(text):
        raise InputError(f"{text}: no such directory (and not a Hugging Face repo id like org/name[@revision])")
    repo_id, at_revision = split_repo_id(text)
    if revision and at_revision and revision != at_revision:
        raise InputError(f"{text}: names revision {at_revision!r} but --revision says {revision!r}; give one")
    revision = revision or at_revision
    check_repo_name(repo_id)
    if revision is not None:
        check_revision(revision)
    local = _download(repo_id, revision)
    _check_in_cache(local, repo_id)
    log.info("%s@%s: Hub cache snapshot %s", repo_id, revision or "main", local)
    return Checkpoint(local, source_id=repo_id, revision=_commit_of(local) or revision)


def _download(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=HUB_PATTERNS))
    except LocalEntryNotFoundError:
        cached = cached_revisions(repo_id)
        if cached:
            raise InputError(
                f"{repo_id}: revision {revision or 'main'!r} is not in the local Hugging Face cache "
                f"(cached: {', '.join(cached)}) and the Hub cannot be reached "
                "(download it once online, or unset HF_HUB_OFFLINE)"
            ) from None
        raise InputError(
            f"{repo_id}: not in the local Hugging Face cache and the Hub cannot be reached "
            "(download it once online, or unset HF_HUB_OFFLINE)"
        ) from None
    except HfHubHTTPError as e:
        raise InputError(f"{repo_id}: Hugging Face Hub error: {str(e).splitlines()[0]}") from None
    except (OSError, ValueError) as e:
        raise InputError(f"{repo_id}: cannot download: {str(e).splitlines()[0] if str(e) else e}") from None


def _check_in_cache(local: Path, repo_id: str) -> None:
    """The resolved snapshot lies inside the Hub cache (never a directory elsewhere, whatever refs say)."""
    from huggingface_hub import constants

    cache = Path(os.path.realpath(constants.HF_HUB_CACHE))
    real = Path(os.path.realpath(local))
    if cache not in real.parents:
        raise InputError(f"{repo_id}: the Hub cache resolves it to {local}, outside the cache {cache}; refusing to read it")


def cached_revisions(repo_id: str) -> list[str]:
    """Revisions of a model repo in the local Hub cache: branch/tag names (``refs/``), then the
    commits of ``snapshots/`` that no ref names; empty when the repo is not cached at all."""
    from huggingface_hub import constants

    repo = Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}"
    refs = repo / "refs"
    names = {p.relative_to(refs).as_posix(): p.read_text().strip() for p in refs.rglob("*") if p.is_file()} if refs.is_dir() else {}
    snapshots = repo / "snapshots"
    commits = sorted(p.name for p in snapshots.iterdir() if p.is_dir()) if snapshots.is_dir() else []
    return [*sorted(names), *(c for c in commits if c not in names.values())]


def _commit_of(snapshot_dir: Path) -> str | None:
    """The commit hash of a Hub cache snapshot directory (its name), if it looks like one."""
    name = snapshot_dir.name
    return name if snapshot_dir.parent.name == "snapshots" and re.fullmatch(r"[0-9a-f]{40}", name) else None
