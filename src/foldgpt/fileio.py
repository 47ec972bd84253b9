"""Atomic file writes: a folder or a file appears whole or not at all (a stopped run leaves no half-written output)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import FoldGPTError


@contextmanager
def atomic_dir(out: str | Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary folder next to `out`; move it into place only if the block succeeds."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise FoldGPTError(f"output folder {out} already exists; choose another --out or pass --overwrite")
    with staging_dir(out.parent, f".{out.name}.tmp-") as tmp:
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)


@contextmanager
def staging_dir(parent: str | Path, prefix: str = ".tmp-") -> Iterator[Path]:
    """A fresh temporary folder inside `parent` (created if missing), removed afterwards unless moved away."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    try:
        yield tmp
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write `text` to `path` through a temporary file in the same folder, then rename it into place."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | Path, obj) -> None:
    """`obj` as indented JSON (with a final newline), written atomically."""
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")
