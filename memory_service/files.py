"""Write a file or a folder whole or not at all: write a temporary one beside it, then
rename it into place. A crash leaves the previous version (or nothing), never half of one.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def atomic_write(
    path: str | os.PathLike, write: Callable[[Path], object], durable: bool = False
) -> None:
    """Create or replace file `path`: `write(tmp)` writes the temporary file `tmp` beside it
    (readable by its owner only), which then takes `path`'s place. Missing parent folders
    are created; when `write` fails, `path` stays as it was. `durable`: the file and the
    rename are fsynced before this returns (they survive a power loss)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        if durable:
            fsync_path(tmp)
        os.replace(tmp, path)
        if durable:
            fsync_path(path.parent)
    finally:
        Path(tmp).unlink(missing_ok=True)


def fsync_path(path: str | os.PathLike) -> None:
    """fsync a file or a folder (a folder: the names in it, e.g. after a rename)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_dir(path: str | os.PathLike, write: Callable[[Path], object]) -> None:
    """Create or replace folder `path`: `write(tmp)` fills the temporary folder `tmp` beside
    it (readable by others, like a folder made with mkdir), which then takes `path`'s place;
    a previous folder is moved aside first and removed after. Missing parent folders are
    created; when `write` fails, `path` stays as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private
    try:
        write(tmp)
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
