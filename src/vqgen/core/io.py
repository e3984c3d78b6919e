"""Atomic file writing: nothing on disk is ever left half-written."""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

from vqgen.core.errors import VqgenError

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_text", "cache_dir"]


def _target(path: Path) -> Path:
    """The regular file that writing ``path`` should replace: a symlink's target (written
    through, the link kept), never a directory, FIFO, device or socket."""
    target = Path(os.path.realpath(path)) if path.is_symlink() else path
    if target.exists() and not target.is_file():
        kind = ("a directory" if target.is_dir() else "a FIFO" if stat.S_ISFIFO(
            target.stat().st_mode) else "a device" if target.is_block_device()
            or target.is_char_device() else "not a regular file")
        shown = f"{path} (→ {target})" if target != path else f"{path}"
        raise VqgenError(f"refusing to write {shown}: it is {kind}; give a file path")
    return target


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path``.

    On any exception the temporary file is removed and ``path`` is untouched. A
    symlink is written through to its target; a directory, FIFO or device at ``path``
    is refused, and an OS error (no such folder, no permission, a full disk) becomes a
    :class:`VqgenError` that names the path.
    """
    shown = Path(path)
    path = _target(shown)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
    except OSError as exc:
        blocker = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
        why = (f"{blocker} is a file, not a folder" if blocker is not None
               else exc.strerror or exc)
        raise VqgenError(f"cannot write {shown}: {why}") from None
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise VqgenError(f"cannot write {shown}: {exc.strerror or exc}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically; returns the path."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def cache_dir() -> Path:
    """The folder for vqgen's caches (disposable: deleting it only costs time).

    ``$VQGEN_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/vqgen`` (an absolute path, as
    the XDG spec asks), else ``~/.cache/vqgen``. An empty variable counts as unset.
    Nothing is created here; writers make the folder they need.
    """
    if own := os.environ.get("VQGEN_CACHE_DIR"):
        return Path(own).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg and Path(xdg).is_absolute():
        return Path(xdg) / "vqgen"
    return Path.home() / ".cache" / "vqgen"
