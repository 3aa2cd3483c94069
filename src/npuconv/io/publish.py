"""Publishing an output directory: never half written, never over someone else's files.

Rules (the README's "Output safety" paragraph states them for users):

* **Build aside.** A run builds OUT in ``.OUT.npuconv-tmp-XXXXXXXX/build`` (a hidden sibling of
  OUT). The container first gets ``owner.json`` — pid, host, process start time — and only
  then the ``build`` directory, so everything a run writes is marked as its own. ``build`` is made
  with ``mkdir`` (mode ``0777 & ~umask``: 0755 under umask 022), so the published OUT is readable
  by other users as any directory the user creates.
* **One run per OUT.** An exclusive ``flock`` on ``.OUT.npuconv-lock`` is held for the whole run
  (taken without waiting: a second run exits 2 at once). Every check on OUT is repeated under the
  lock. The lock file is removed when the run ends (unlink while holding the lock; a run that
  locked a file that was unlinked meanwhile locks again).
* **Publish without replacing anything.** A fresh OUT is published with
  ``renameat2(RENAME_NOREPLACE)``: if anything appeared at OUT meanwhile, the run fails with
  exit 2 and that thing is untouched. ``--force`` swaps with ``renameat2(RENAME_EXCHANGE)``: OUT is
  at every instant either the complete previous output or the complete new one; the swapped-out
  directory is checked again (same inode as the one found replaceable) and swapped back if it is
  not. Where ``renameat2`` is missing (not Linux, old glibc, or a filesystem without rename
  flags, e.g. NFS) a portable fallback is used, with weaker guarantees: a fresh OUT is published
  with ``rename``, which replaces an *empty* directory created at OUT meanwhile (no data lost)
  and fails on anything else; ``--force`` renames the previous output to ``…-tmp-*/old`` and the
  build onto OUT, so OUT is briefly absent — if the run dies in that moment, the next run to OUT
  puts the previous output back.
* **``--force`` replaces only a whole npuconv output.** OUT must hold an ``npuconv.json`` whose
  ``files`` lists every file of the directory (``files`` is written by every conversion: shards,
  index, config, copied side files, extra files and the manifest itself). A directory holding
  anything else — or an ``npuconv.json`` without that list — is refused and left untouched.
* **Cleanup of one's own leftovers only.** A run removes the ``.OUT.npuconv-tmp-*`` containers of
  earlier runs to the same OUT whose ``owner.json`` names this host and a process that is gone
  (pid not running, or running with another start time). A directory without a readable
  ``owner.json``, or owned by a live process or another host, is never touched.
* **Signals.** Taking the lock, creating the container, publishing and cleaning up run inside
  :func:`npuconv.interrupts.deferred`: a signal there takes effect when the step is complete.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

from npuconv import interrupts
from npuconv.errors import OutputError

MANIFEST = "npuconv.json"
FILES_KEY = "files"  # npuconv.json: every file of the output, relative POSIX paths (the manifest included)
TMP_INFIX = ".npuconv-tmp-"
LOCK_SUFFIX = ".npuconv-lock"
OWNER = "owner.json"
BUILD = "build"
OLD = "old"  # fallback swap only: the previous output while OUT is absent

_AT_FDCWD = -100
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2


# ------------------------------------------------------------------------------- names and checks
def lock_path(target: Path) -> Path:
    return target.with_name(f".{target.name}{LOCK_SUFFIX}")


def container_prefix(target: Path) -> str:
    return f".{target.name}{TMP_INFIX}"


def output_files(directory: Path) -> list[str]:
    """Every non-directory entry under ``directory`` (symlinks not followed), relative POSIX paths, sorted."""
    found = []
    for root, dirs, files in os.walk(directory, followlinks=False):
        rel_root = Path(root).relative_to(directory)
        for name in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            found.append((rel_root / name).as_posix())
    return sorted(found)


def check_target(target: Path, force: bool) -> None:
    """Raise :class:`OutputError` unless OUT may be written: absent, or (``--force``) a whole npuconv output."""
    if not os.path.lexists(target):
        return
    if target.is_symlink():
        raise OutputError(f"{target}: is a symbolic link; npuconv never writes through or over one")
    if not target.is_dir():
        raise OutputError(f"{target}: exists and is not a directory")
    if not force:
        raise OutputError(f"{target}: already exists (use --force to replace an earlier npuconv output)")
    check_replaceable(target)


def check_replaceable(target: Path) -> None:
    """OUT is empty, or, as a whole, an npuconv output: every file is listed in its manifest's ``files``."""
    refuse = f"{target}: exists and is not an npuconv output"
    if not any(os.scandir(target)):
        return  # an empty directory: replacing it loses nothing
    manifest_path = target / MANIFEST
    if manifest_path.is_symlink() or not manifest_path.is_file():
        raise OutputError(f"{refuse} (no {MANIFEST}); refusing to replace it")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        raise OutputError(f"{refuse} ({MANIFEST} is not valid JSON); refusing to replace it") from None
    listed = manifest.get(FILES_KEY) if isinstance(manifest, dict) else None
    if not isinstance(listed, list) or not all(isinstance(f, str) for f in listed):
        raise OutputError(
            f"{refuse} as a whole ({MANIFEST} lists no '{FILES_KEY}': written by hand or by an older npuconv); "
            "refusing to replace it — remove it yourself if it is yours to delete"
        )
    allowed = set(listed) | {MANIFEST}
    for rel in output_files(target):
        if rel not in allowed or not (target / rel).is_file() or (target / rel).is_symlink():
            raise OutputError(f"{refuse} as a whole: '{rel}' is not a file npuconv wrote; refusing to replace it")
    for root, dirs, files in os.walk(target):
        if not dirs and not files and Path(root) != target:
            rel = Path(root).relative_to(target).as_posix()
            raise OutputError(f"{refuse} as a whole: directory '{rel}' is not npuconv's; refusing to replace it")


# ----------------------------------------------------------------------------------------- lock
class OutputLock:
    """Exclusive, non-waiting ``flock`` on ``.OUT.npuconv-lock``; the file is removed on release."""

    def __init__(self, target: Path):
        self.path = lock_path(target)
        self.target = target
        self._fd: int | None = None

    def acquire(self) -> None:
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as e:
                raise OutputError(f"{self.target.parent}: cannot create the output directory: {e.strerror or e}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise OutputError(
                    f"{self.target}: another npuconv run is writing this output (it holds {self.path.name}); "
                    "nothing was changed"
                ) from None
            except OSError:  # no flock on this filesystem: rely on the no-replace publish alone
                pass
            if _same_file(fd, self.path):
                self._fd = fd
                os.ftruncate(fd, 0)
                os.write(fd, json.dumps(_owner()).encode())
                return
            os.close(fd)  # unlinked by its previous holder between our open and flock: lock the new file

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        finally:
            os.close(self._fd)
            self._fd = None


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


# ---------------------------------------------------------------------------------------- owner
def _process_start(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot (``/proc/PID/stat`` field 22), None if unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    try:
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (IndexError, ValueError):
        return None


def _owner() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "start": _process_start(os.getpid()), "created": time.time()}


def _owner_gone(owner: object) -> bool:
    """True only if ``owner`` (an ``owner.json``) names this host and a process that no longer runs."""
    if not isinstance(owner, dict) or owner.get("host") != socket.gethostname():
        return False
    pid, start = owner.get("pid"), owner.get("start")
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return start is not None and _process_start(pid) not in (None, start)  # pid reused by another process


def remove_abandoned(target: Path) -> list[Path]:
    """Remove the temporary containers of dead earlier runs to ``target`` (see module rules); returns them.

    A container holding ``old`` while OUT is absent (a fallback swap cut short) gets its previous
    output put back at OUT first. Call with the lock held.
    """
    removed = []
    prefix = container_prefix(target)
    for entry in sorted(target.parent.glob(f"{_glob_escape(prefix)}*")):
        if entry.is_symlink() or not entry.is_dir():
            continue
        try:
            owner = json.loads((entry / OWNER).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError, RecursionError):
            continue
        if not _owner_gone(owner):
            continue
        old = entry / OLD
        if old.is_dir() and not os.path.lexists(target):
            _rename(old, target, RENAME_NOREPLACE)
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
    return removed


def _glob_escape(text: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in text)


# --------------------------------------------------------------------------------------- rename
def _libc_renameat2():
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_RENAMEAT2 = _libc_renameat2()


def renameat2(src: Path, dst: Path, flags: int) -> bool:
    """Linux ``renameat2``; False where it (or the flag, on this filesystem) is not supported."""
    if _RENAMEAT2 is None:
        return False
    if _RENAMEAT2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(dst))


def _rename(src: Path, dst: Path, flags: int) -> None:
    """``RENAME_NOREPLACE`` (fallback: ``rename``, which only replaces an empty directory)."""
    if not renameat2(src, dst, flags):
        os.rename(src, dst)


# -------------------------------------------------------------------------------------- publish
class AtomicDirectory:
    """Context manager: lock OUT, build it aside, publish it by an atomic rename on success.

    ``with AtomicDirectory(out, force) as build:`` — write the output into ``build``. On success
    it is published at OUT (see module rules); on any exception or signal nothing is published,
    the container is removed and OUT is as it was.
    """

    def __init__(self, target: Path, force: bool = False):
        self.target = Path(os.path.abspath(target))
        self.force = force
        self.container: Path | None = None
        self._lock = OutputLock(self.target)
        self._checked: tuple[int, int] | None = None  # (dev, ino) of the OUT found replaceable
        self.published: Path | None = None  # OUT, once the new output is in place

    def __enter__(self) -> Path:
        try:
            with interrupts.deferred():
                check_target(self.target, self.force)
                try:
                    self.target.parent.mkdir(parents=True, exist_ok=True)
                except OSError as e:
                    raise OutputError(f"{self.target.parent}: cannot create the output directory: {e.strerror or e}") from None
                self._lock.acquire()
                remove_abandoned(self.target)
                check_target(self.target, self.force)  # again, under the lock
                self._checked = _identity(self.target)
                self.container = self._make_container()
        except BaseException:
            self._cleanup()
            raise
        return self.container / BUILD

    def _make_container(self) -> Path:
        parent = self.target.parent
        try:
            container = Path(tempfile.mkdtemp(prefix=container_prefix(self.target), dir=parent))
            self.container = container
            (container / OWNER).write_text(json.dumps(_owner()), encoding="utf-8")
            os.mkdir(container / BUILD)  # 0777 & ~umask, like any directory the user makes
        except OSError as e:
            raise OutputError(f"{parent}: cannot create the output directory: {e.strerror or e}") from None
        return container

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            try:
                if exc_type is None:
                    interrupts.check()  # a signal that something swallowed: never publish after it
                    with interrupts.deferred():
                        self._publish()
            finally:
                self._cleanup()
        except interrupts.Interrupted as e:
            e.published = self.published  # a signal during publishing takes effect once OUT is complete
            raise

    def _publish(self) -> None:
        assert self.container is not None
        build = self.container / BUILD
        try:
            _fsync_dir(build)
            if self._checked is None:
                self._publish_fresh(build)
            else:
                self._swap(build)
            self.published = self.target
            _fsync_dir(self.target.parent)
        except OSError as e:
            raise OutputError(f"{self.target}: cannot publish the output: {e.strerror or e}") from None

    def _publish_fresh(self, build: Path) -> None:
        try:
            _rename(build, self.target, RENAME_NOREPLACE)
        except OSError as e:
            if e.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
                raise OutputError(
                    f"{self.target}: something was created there while converting; it was left untouched "
                    "and nothing was published"
                ) from None
            raise

    def _swap(self, build: Path) -> None:
        """Exchange the build with the previous output (checked again once swapped out)."""
        check_replaceable(self.target)
        if renameat2(build, self.target, RENAME_EXCHANGE):
            if _identity(build) != self._checked:  # OUT was replaced by something else meanwhile: undo
                renameat2(build, self.target, RENAME_EXCHANGE)
                raise OutputError(f"{self.target}: was replaced by something else while converting; it was left untouched")
            return
        old = self.container / OLD  # portable fallback: OUT is absent between these two renames
        os.rename(self.target, old)
        if _identity(old) != self._checked:
            _rename(old, self.target, RENAME_NOREPLACE)
            raise OutputError(f"{self.target}: was replaced by something else while converting; it was left untouched")
        try:
            os.rename(build, self.target)
        except BaseException:
            os.rename(old, self.target)
            raise

    def _cleanup(self) -> None:
        with interrupts.deferred():
            try:
                if self.container is not None:
                    shutil.rmtree(self.container, ignore_errors=True)
                    self.container = None
            finally:
                self._lock.release()


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return None
    return info.st_dev, info.st_ino


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
