"""Resolve MODEL (a local directory or a Hugging Face repo id ``org/name[@revision]``) to a Checkpoint.

Hub repos are fetched with ``huggingface_hub.snapshot_download`` restricted to safetensors, JSON,
tokenizer and other small text files, into the regular Hub cache; ``HF_HUB_OFFLINE=1`` makes it
use the cache only.
"""

from __future__ import annotations

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
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+(@[\w.\-/]+)?$")


def looks_like_hub_id(text: str) -> bool:
    """``org/name[@revision]`` syntax (a path starting with ``.`` or ``/`` never is one)."""
    return not text.startswith((".", "/")) and bool(_REPO_ID.match(text))


def split_repo_id(model: str) -> tuple[str, str | None]:
    """``"org/name@rev"`` → ``("org/name", "rev")``."""
    repo, _, revision = model.partition("@")
    return repo, revision or None


def open_source(model: str | Path) -> Checkpoint:
    """A Checkpoint for a local directory, or for a Hub repo id downloaded into the cache."""
    path = Path(model)
    if path.exists():
        return Checkpoint(path)
    text = str(model)
    if not looks_like_hub_id(text):
        raise InputError(f"{text}: no such directory (and not a Hugging Face repo id like org/name[@revision])")
    repo_id, revision = split_repo_id(text)
    local = _download(repo_id, revision)
    return Checkpoint(local, source_id=repo_id, revision=_commit_of(local) or revision)


def _download(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=HUB_PATTERNS))
    except LocalEntryNotFoundError:
        raise InputError(
            f"{repo_id}: not in the local Hugging Face cache and the Hub cannot be reached "
            "(download it once online, or unset HF_HUB_OFFLINE)"
        ) from None
    except HfHubHTTPError as e:
        raise InputError(f"{repo_id}: Hugging Face Hub error: {str(e).splitlines()[0]}") from None
    except (OSError, ValueError) as e:
        raise InputError(f"{repo_id}: cannot download: {str(e).splitlines()[0] if str(e) else e}") from None


def _commit_of(snapshot_dir: Path) -> str | None:
    """The commit hash of a Hub cache snapshot directory (its name), if it looks like one."""
    name = snapshot_dir.name
    return name if snapshot_dir.parent.name == "snapshots" and re.fullmatch(r"[0-9a-f]{40}", name) else None
