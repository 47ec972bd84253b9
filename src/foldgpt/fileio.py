"""Writing outputs safely: a folder or a file appears whole or not at all, two runs never write the same output, and
what a stopped or killed run leaves is removed by the next one.

- `check_output`: what can be known about an output location before any work starts (it exists, it is a file, it
  is the current folder, its parent is a file or not writable, it holds an input).
- `output_lock`: a lock file `.OUT.lock` beside the output, held while a run works towards it (released and removed
  at the end), so a second run with the same output fails at once.
- `atomic_dir` / `write_text_atomic`: the output is written into `.OUT.tmp-<pid>-<random>` beside it and renamed
  into place; a run killed with SIGKILL leaves that staging entry behind, and the next run for the same output
  removes it (its process is gone). The teacher cache in the system temporary folder is named the same way.
- A full disk while writing gives one line (FoldGPTError) and removes the staging folder.

Folders and files are created with the user's umask (as `mkdir` and `open` do), not private 0700 / 0600 modes.
"""

from __future__ import annotations

import errno
import functools
import inspect
import json
import logging
import os
import re
import secrets
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import FoldGPTError
from .signals import note_written, signals_held

try:
    import fcntl
except ImportError:  # not POSIX: no lock, the checks before and at the final rename still apply
    fcntl = None

log = logging.getLogger(__name__)

TEACHER_PREFIX = "foldgpt-teacher-"  # the teacher cache's folders in the system temporary folder


# ---- early checks ----------------------------------------------------------------------------------------------
def check_output(out: str | Path, overwrite: bool = False, *, option: str = "--out", file: bool = False,
                 inputs: Iterable[str | Path] = ()) -> Path:
    """Fail with one line, before any work, if `out` (a folder, or a file with `file`) cannot be written: it
    exists (without `overwrite`), it is of the other kind, it is the current folder or one above it, something on
    its way is a file, its nearest existing folder is not writable, or it is or holds one of `inputs`.
    `option` names the command-line option in the messages."""
    out = Path(out)
    kind = "file" if file else "folder"
    resolved = out.resolve()
    cwd = Path.cwd().resolve()
    if out.name in ("", ".", "..") or resolved == cwd or resolved in cwd.parents:
        raise FoldGPTError(f"{option} {out} is the current folder or one above it; name a new {kind} for the output")
    if out.exists():
        if file and out.is_dir():
            raise FoldGPTError(f"{option} {out} is a folder; give a file path, e.g. {out / 'results.json'}")
        if not file and not out.is_dir():
            raise FoldGPTError(f"{option} {out} is a file, not a folder; choose another {option}")
        if not overwrite:
            raise FoldGPTError(f"output {kind} {out} already exists; choose another {option} or pass --overwrite")
    ancestor = resolved.parent
    while not ancestor.exists() and not ancestor.is_symlink() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise FoldGPTError(f"{option} {out} is under {ancestor}, which is a file, not a folder; "
                           f"choose another {option}")
    try:  # the one sure test of a writable place (permissions, read-only or pseudo file systems, even as root)
        fd, probe = tempfile.mkstemp(prefix=".foldgpt-probe-", dir=ancestor)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise FoldGPTError(f"cannot write in {ancestor} ({exc.strerror or exc}: permission denied or read-only); "
                           f"choose another {option}") from None
    for given in inputs:
        path = Path(given)
        if path.exists() and (path.resolve() == resolved or resolved in path.resolve().parents):
            raise FoldGPTError(f"{option} {out} would replace the input {given}; choose another {option}")
    return out


def input_paths(value) -> list[str | Path]:
    """The paths among an argument's values (a path, a list of paths; anything else: none)."""
    if isinstance(value, (str, Path)):
        return [value]
    if isinstance(value, (list, tuple)):
        return [v for v in value if isinstance(v, (str, Path))]
    return []


def holds_output(option: str = "--out", inputs: tuple[str, ...] = ()):
    """Decorator for a function with `out` and `overwrite` parameters that writes the folder `out`: before the
    function runs, check_output (the parameters named in `inputs` are inputs the output must not replace), then
    hold the output's lock for the whole call. Stale entries of killed runs (staging folders, teacher caches) are
    removed at the start. Under torch.distributed only rank 0 writes, so only rank 0 takes the lock."""

    def decorate(fn):
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            given = bound.arguments
            out = check_output(given["out"], given["overwrite"], option=option,
                               inputs=[p for name in inputs for p in input_paths(given.get(name))])
            clean_stale(tempfile.gettempdir(), TEACHER_PREFIX)
            if _rank() != 0:
                return fn(*args, **kwargs)
            with output_lock(out):
                return fn(*args, **kwargs)

        return wrapper

    return decorate


def _rank() -> int:
    dist = sys.modules.get("torch.distributed")  # imported by whoever started a process group; never here
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return 0


# ---- what killed runs leave ------------------------------------------------------------------------------------
def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists on this machine (a zombie, dead but not yet reaped, counts as gone)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    except (OverflowError, OSError):
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[:1] != ["Z"]


def _staged_name(prefix: str) -> str:
    return f"{prefix}{os.getpid()}-{secrets.token_hex(4)}"


def _owner_pid(name: str, prefix: str) -> int | None:
    """The process id in a name made by _staged_name(prefix), or None if it is not such a name."""
    m = re.fullmatch(re.escape(prefix) + r"(\d+)-.*", name)
    return int(m[1]) if m else None


def clean_stale(parent: str | Path, prefix: str) -> list[Path]:
    """Remove the entries `{prefix}{pid}-...` of `parent` whose process is gone (left by kill -9); return them."""
    removed = []
    try:
        entries = list(Path(parent).iterdir())
    except OSError:
        return removed
    for p in entries:
        pid = _owner_pid(p.name, prefix)
        if pid is None or pid_alive(pid):
            continue
        with signals_held():
            _remove(p)
        if p.exists() or p.is_symlink():  # not ours to remove (another user's)
            continue
        removed.append(p)
        log.info("removed %s, left by an earlier run that was stopped (process %d is gone)", p, pid)
    return removed


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        try:
            p.unlink()
        except OSError:
            pass


def _clean_output(out: Path) -> None:
    """What killed runs left beside `out`: staging entries, and the previous output moved aside by a run with
    --overwrite that was killed between its two renames (put back if `out` is missing, else removed)."""
    clean_stale(out.parent, f".{out.name}.tmp-")
    moved_aside = f".{out.name}.old-"  # atomic_dir's name for it: the prefix and the process id
    for p in list(out.parent.iterdir()) if out.parent.is_dir() else []:
        pid = _owner_pid(f"{p.name}-", moved_aside)
        if pid is None or pid_alive(pid):
            continue
        with signals_held():
            if out.exists() or out.is_symlink():
                _remove(p)
            else:
                os.replace(p, out)
                log.warning("restored %s from %s (a run replacing it was stopped)", out, p.name)


# ---- the output lock -------------------------------------------------------------------------------------------
_held: dict[str, int] = {}  # outputs this process holds the lock of (resolved path -> nesting depth)


def lock_path(out: str | Path) -> Path:
    out = Path(out)
    return out.parent / f".{out.name}.lock"


@contextmanager
def output_lock(out: str | Path) -> Iterator[None]:
    """Hold the lock of output `out` (`.OUT.lock` beside it, created with missing parent folders) inside the
    block; another process asking for it fails at once with one line. Re-entrant within a process. On entry,
    what killed runs left beside `out` is cleaned; on exit the lock file is removed, and so are the parent folders
    this created if nothing ended up in them."""
    out = Path(out)
    key = str(out.resolve())
    if key in _held:
        _held[key] += 1
        try:
            yield
        finally:
            _held[key] -= 1
        return
    created = _make_parents(out.parent)
    lock = lock_path(out)
    fd = None
    try:
        fd = _acquire(lock, out)
        _held[key] = 1
        _clean_output(out)
        yield
    finally:
        _held.pop(key, None)
        with signals_held():
            if fd is not None:
                try:
                    lock.unlink()
                except OSError:
                    pass
                os.close(fd)
            for folder in reversed(created):
                try:
                    folder.rmdir()
                except OSError:
                    break


def _make_parents(folder: Path) -> list[Path]:
    """Create `folder` and its missing parents; return those created, outermost first."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    created = []
    for f in reversed(missing):
        try:
            f.mkdir()
        except FileExistsError:
            continue
        except OSError as exc:
            for c in reversed(created):
                c.rmdir()
            raise FoldGPTError(f"cannot create the folder {f}: {exc.strerror}; choose another output location") \
                from None
        created.append(f)
    return created


def _acquire(lock: Path, out: Path) -> int | None:
    """Open and lock `lock` without waiting; return its descriptor (None where locks are not supported)."""
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            if disk_full(exc):
                raise FoldGPTError(f"no space left on the device holding {out.parent}; free some space or choose "
                                   "another output location") from None
            raise FoldGPTError(f"cannot write in {out.parent} ({exc.strerror}); choose another output location") \
                from None
        if fcntl is None:
            return fd
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):  # no locks on this file system
                log.debug("no lock on %s: %s", lock, exc)
                return fd
            holder = _read_pid(fd)
            os.close(fd)
            who = f"another foldgpt run (process {holder})" if holder else "another foldgpt run"
            raise FoldGPTError(f"{who} is writing {out} (it holds {lock.name}); wait for it to finish or choose "
                               "another output location") from None
        try:  # the lock file may have been removed by the run that held it just before: lock the new one
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            return fd
        os.close(fd)


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode().strip()
        return int(text) if text else None
    except (OSError, ValueError):
        return None


# ---- full disk -------------------------------------------------------------------------------------------------
def disk_full(exc: BaseException | None) -> bool:
    """Whether `exc` (or what caused it) says the disk or the quota is full; safetensors reports it as text."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(exc)
        if "No space left on device" in text or "Disk quota exceeded" in text or "(os error 28)" in text:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def disk_full_error(path: str | Path) -> FoldGPTError:
    return FoldGPTError(f"no space left on the device while writing {path}; nothing was written: free some space "
                        "or choose another output location, and run the command again")


# ---- atomic writes ---------------------------------------------------------------------------------------------
@contextmanager
def atomic_dir(out: str | Path, overwrite: bool) -> Iterator[Path]:
    """Yield a staging folder next to `out`; move it into place only if the block succeeds. The output's lock
    is held meanwhile; `out` appearing during the block (written by another program) fails without --overwrite."""
    out = check_output(out, overwrite)
    with output_lock(out), staging_dir(out.parent, f".{out.name}.tmp-") as tmp:
        try:
            yield tmp
        except Exception as exc:
            if disk_full(exc):
                raise disk_full_error(out) from None
            raise
        with signals_held():  # the renames below finish even when a signal comes
            apply_umask(tmp)
            if out.exists() and not overwrite:
                raise FoldGPTError(f"{out} appeared while this run was writing it (another program created it); "
                                   "nothing was replaced: choose another output location or pass --overwrite")
            if out.exists():
                old = out.with_name(f".{out.name}.old-{os.getpid()}")
                os.replace(out, old)
                os.replace(tmp, out)
                _remove(old)
            else:
                os.replace(tmp, out)
            note_written(out)


def current_umask() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(folder: Path) -> None:
    """Give `folder` and what it holds the modes `mkdir` and `open` give under the user's umask (0777 / 0666 minus
    it): some writers (safetensors) create private 0600 files."""
    mask = current_umask()
    for root, _, files in os.walk(folder):
        for path, mode in [(Path(root), 0o777 & ~mask), *((Path(root) / f, 0o666 & ~mask) for f in files)]:
            if not path.is_symlink() and path.stat().st_mode & 0o777 != mode:
                os.chmod(path, mode)


@contextmanager
def staging_dir(parent: str | Path, prefix: str = ".tmp-") -> Iterator[Path]:
    """A fresh folder `{prefix}{pid}-{random}` inside `parent` (created if missing), removed afterwards unless moved
    away. Entries of the same prefix whose process is gone (killed runs) are removed first."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    clean_stale(parent, prefix)
    while True:
        tmp = parent / _staged_name(prefix)
        try:
            tmp.mkdir()  # the umask applies (tempfile.mkdtemp would make it 0700)
            break
        except FileExistsError:
            continue
    try:
        yield tmp
    finally:
        with signals_held():
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write `text` to `path` through a temporary file `.NAME.tmp-<pid>-<random>` in the same folder, then rename
    it into place (the umask applies to the file)."""
    path = Path(path)
    prefix = f".{path.name}.tmp-"
    clean_stale(path.parent, prefix)
    tmp = path.parent / _staged_name(prefix)
    try:
        with open(tmp, "x", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, Exception) and disk_full(exc):
            raise disk_full_error(path) from None
        raise


def write_json_atomic(path: str | Path, obj) -> None:
    """`obj` as indented JSON (with a final newline), written atomically."""
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")
