"""Source fingerprints, and the up-to-date check of an output against its source.

Every output's ``npuconv.json`` records ``source_fingerprint``:

* Hub source (``org/name[@revision]`` resolved to a commit of the Hub cache)::

      {"version": 1, "kind": "hub", "repo": "org/name", "commit": "<40 hex>"}

* Local directory: one record per file that conversion reads or copies — the weight shards, the
  ``*.safetensors.index.json`` files and every side file (config, tokenizer, …; hidden files and
  non-weight ``*.safetensors`` such as ``reference_dequant*`` are not inputs and are left out)::

      {"version": 1, "kind": "local",
       "files": [{"name": "model.safetensors", "size": 126184, "mtime_ns": 1700000000000000000,
                  "sha256": "…"}, …]}

  File names are relative to the model directory, so moving or copying the directory does not
  change the fingerprint (a copy that gets new mtimes costs one hash per file per check, see below).

An output is **up to date** for (source, target, options) when its ``npuconv.json`` has the
running ``npuconv_version``, the same ``target`` and ``options``, its shards and ``config.json``
are present, and the source matches the fingerprint:

* Hub: the revision asked for resolves to the recorded commit (a 40-hex revision is compared as
  is; a branch or tag is resolved with one Hub API call, or from the cache's ``refs/`` when
  offline — nothing is downloaded).
* Local: the same set of file names; for each file, a different size means changed; the same
  size and ``mtime_ns`` means unchanged (the quick check of make/rsync, no reading); the same
  size but a different ``mtime_ns`` means the file is hashed and its sha256 decides (outputs of a
  plain ``convert`` record no sha256, to avoid reading the input twice: for them a new mtime
  means changed). A file that
  is only touched is therefore not reconverted, but it is re-hashed at every check until the
  output is reconverted (the manifest is never rewritten by a check).

Not covered: the output's own bytes are not re-hashed by the check (``npuconv verify`` does
that), and a source modified *while* it is being converted is not detected.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import npuconv
from npuconv.io.checkpoint import Checkpoint
from npuconv.errors import NpuconvError
from npuconv.io.output import MANIFEST, sha256_file
from npuconv.io.source import looks_like_hub_id, split_repo_id

FINGERPRINT_VERSION = 1
_COMMIT = re.compile(r"[0-9a-f]{40}")


# ------------------------------------------------------------------------------ recording
def source_files(checkpoint: Checkpoint) -> list[Path]:
    """The files of a local checkpoint that conversion reads or copies, sorted by relative name."""
    files = {p.relative_to(checkpoint.root).as_posix(): p for p in checkpoint.weight_files}
    for index in checkpoint.root.glob("*.safetensors.index.json"):
        files[index.name] = index
    for path in checkpoint.side_files():
        files[path.relative_to(checkpoint.root).as_posix()] = path
    return [files[name] for name in sorted(files)]


def file_record(root: Path, path: Path, hash_files: bool = True) -> dict:
    """``{name, size, mtime_ns, sha256}`` of one source file (``mtime_ns`` None if it changed while hashed;
    ``sha256`` None when not hashing)."""
    before = path.stat()
    digest = sha256_file(path) if hash_files else None
    after = path.stat()
    stable = (before.st_size, before.st_mtime_ns) == (after.st_size, after.st_mtime_ns)
    return {
        "name": path.relative_to(root).as_posix(),
        "size": after.st_size,
        # a file written during hashing gets no mtime, so the next check hashes it again
        "mtime_ns": after.st_mtime_ns if stable else None,
        "sha256": digest,
    }


def source_fingerprint(checkpoint: Checkpoint, hash_files: bool = True) -> dict:
    """The ``source_fingerprint`` of ``npuconv.json`` for an opened source (see the module docstring).

    ``hash_files=False`` (plain ``convert``, which must not read the input twice) records names,
    sizes and mtimes only; ``zoo`` hashes, so a touched-but-unchanged source is still up to date.
    """
    is_hub = checkpoint.source_id != os.path.abspath(checkpoint.root)
    if is_hub and checkpoint.revision and _COMMIT.fullmatch(checkpoint.revision):
        return {"version": FINGERPRINT_VERSION, "kind": "hub", "repo": checkpoint.source_id, "commit": checkpoint.revision}
    return {
        "version": FINGERPRINT_VERSION,
        "kind": "local",
        "files": [file_record(checkpoint.root, path, hash_files) for path in source_files(checkpoint)],
    }


# ------------------------------------------------------------------------------ checking
def is_hub_id(source: str) -> bool:
    """True for a Hub id that is not an existing local path (the rule of ``open_source``)."""
    return looks_like_hub_id(source) and not Path(source).exists()


def resolve_hub_commit(repo_id: str, revision: str | None) -> str | None:
    """The commit a Hub revision points to now, without downloading; None if it cannot be told.

    A 40-hex revision is a commit already. Otherwise one Hub API call (``repo_info``), or, when
    offline or the Hub cannot be reached, the ``refs/<revision>`` file of the local Hub cache.
    """
    if revision and _COMMIT.fullmatch(revision):
        return revision
    from huggingface_hub import HfApi, constants

    offline_check = getattr(constants, "is_offline_mode", None)
    offline = offline_check() if callable(offline_check) else bool(getattr(constants, "HF_HUB_OFFLINE", False))
    if not offline:
        try:
            sha = HfApi().repo_info(repo_id, revision=revision, timeout=30).sha
            if sha:
                return sha
        except Exception:  # network or Hub error: fall back to what the cache knows
            pass
    from huggingface_hub.file_download import repo_folder_name

    ref = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model") / "refs" / (revision or "main")
    try:
        commit = ref.read_text(encoding="utf-8").strip()
    except OSError:
        return None
    return commit if _COMMIT.fullmatch(commit) else None


def source_difference(recorded: dict, source: str) -> str | None:
    """None if SOURCE (a local directory or a Hub id) still matches the RECORDED fingerprint, else why not."""
    kind = recorded.get("kind")
    if recorded.get("version") != FINGERPRINT_VERSION or kind not in ("hub", "local"):
        return "source fingerprint of an unknown version"
    if is_hub_id(source):
        repo_id, revision = split_repo_id(source)
        if kind != "hub" or recorded.get("repo") != repo_id:
            return f"source changed (now {repo_id})"
        commit = resolve_hub_commit(repo_id, revision or None)
        if commit is None:
            return f"cannot resolve {source} to a commit"
        if commit != recorded.get("commit"):
            return f"{repo_id} is at commit {commit[:12]} (converted from {str(recorded.get('commit'))[:12]})"
        return None
    if kind != "local":
        return f"source changed (was {recorded.get('repo')}@{str(recorded.get('commit'))[:12]})"
    try:
        checkpoint = Checkpoint(Path(source))
        current = {p.relative_to(checkpoint.root).as_posix(): p for p in source_files(checkpoint)}
    except (NpuconvError, OSError) as e:
        return f"source cannot be read ({e})"
    files = {f.get("name"): f for f in recorded.get("files") or [] if isinstance(f, dict)}
    added, removed = sorted(set(current) - set(files)), sorted(set(files) - set(current))
    if added or removed:
        what = [f"+{n}" for n in added] + [f"-{n}" for n in removed]
        return "source files added/removed: " + ", ".join(what[:5]) + (" …" if len(what) > 5 else "")
    for name in sorted(current):
        path, record = current[name], files[name]
        try:
            stat = path.stat()
            if stat.st_size != record.get("size"):
                return f"{name} changed (size)"
            if stat.st_mtime_ns != record.get("mtime_ns"):
                if record.get("sha256") is None:
                    return f"{name} modified (no recorded sha256 to compare)"
                if sha256_file(path) != record.get("sha256"):
                    return f"{name} changed (content)"
        except OSError as e:
            return f"{name} cannot be read ({e.strerror or e})"
    return None


@dataclass(frozen=True)
class Freshness:
    up_to_date: bool
    reason: str  # why it is (not) up to date, one line
    exists: bool  # OUT exists
    is_output: bool  # OUT is an npuconv output (has an npuconv.json), so replacing it is expected
    manifest: dict | None = None


def check_output(output: Path, source: str, target: str, options: dict) -> Freshness:
    """Is OUTPUT an up-to-date conversion of SOURCE into TARGET with OPTIONS (``manifest_options``)?"""
    output = Path(output)
    if not output.exists():
        return Freshness(False, "no output yet", exists=False, is_output=False)
    if not output.is_dir():
        return Freshness(False, "output path exists and is not a directory", exists=True, is_output=False)
    try:
        manifest = json.loads((output / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        manifest = None
    if not isinstance(manifest, dict) or "target" not in manifest:
        return Freshness(False, f"output exists and is not an npuconv output (no valid {MANIFEST})", exists=True, is_output=False)

    def stale(reason: str) -> Freshness:
        return Freshness(False, reason, exists=True, is_output=True, manifest=manifest)

    if manifest.get("npuconv_version") != npuconv.__version__:
        return stale(f"converted by npuconv {manifest.get('npuconv_version')}, this is {npuconv.__version__}")
    if manifest.get("target") != target:
        return stale(f"target changed ({manifest.get('target')} → {target})")
    recorded_options = manifest.get("options") or {}
    if recorded_options != options:
        changed = sorted(k for k in set(options) | set(recorded_options) if recorded_options.get(k) != options.get(k))
        return stale("options changed: " + ", ".join(changed))
    fingerprint = manifest.get("source_fingerprint")
    if not isinstance(fingerprint, dict):
        return stale("no source fingerprint recorded")
    shards = manifest.get("shards")
    needed = [*(shards if isinstance(shards, dict) else {}), "config.json"]
    missing = [name for name in needed if not (output / name).is_file()]
    if missing or not shards:
        return stale(f"output incomplete ({', '.join(missing) or 'no shards recorded'})")
    difference = source_difference(fingerprint, source)
    if difference:
        return stale(difference)
    return Freshness(True, "up to date", exists=True, is_output=True, manifest=manifest)
