"""Small helpers shared by the library's modules."""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_write", "FolderLock", "FolderLocked", "release_cuda_memory"]


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # not every platform can open a directory
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    """The process's umask (os.umask can only be read by setting it, so set it back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[Any]], None], *, binary: bool = True) -> Path:
    """Write a file atomically: ``write(f)`` into a temp file in the same folder, fsync, then os.replace.

    A crash or an exception mid-write leaves the previous file at ``path`` untouched and no temp file behind.
    The file gets the mode an ordinary ``open(path, "w")`` would give (0666 under the umask), not the temp
    file's private 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        if hasattr(os, "fchmod"):  # not on Windows, where mkstemp's mode is not private anyway
            os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def release_cuda_memory() -> None:
    """Free what a throw-away model left on the GPU (collected, then returned by the caching allocator)."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class FolderLocked(RuntimeError):
    """Another process holds a :class:`FolderLock` on the folder; ``owner`` (and the message) names it."""

    def __init__(self, message: str, owner: str) -> None:
        super().__init__(message)
        self.owner = owner


class FolderLock:
    """An exclusive lock on a folder, held by this process while a run writes into it.

    The lock is an ``flock`` on the file ``folder/name``, which holds the owner's pid and host for the message of
    anyone refused. The kernel drops an ``flock`` when its process ends in any way (a crash, SIGKILL, a power
    cut's reboot), so a dead run never leaves the folder locked; the file itself is removed on :meth:`release`.
    Within one process the lock is re-entrant (a count per folder), so that a process may hold several objects
    for one run (a Trainer made, then resumed, in one script).
    Where ``fcntl`` is missing (Windows) the lock does nothing.

    Raises:
        FolderLocked: on :meth:`acquire`, while another process holds the lock.
    """

    _held: dict[Path, list[Any]] = {}  # folder -> [open lock file, count], this process's locks

    def __init__(self, folder: str | os.PathLike[str], name: str = ".fastnca.lock") -> None:
        self.folder = Path(folder)
        self.path = self.folder / name
        self.held = False

    @staticmethod
    def owner(path: Path) -> str:
        """The holder's 'pid N on host H' as its lock file says, or '' when unreadable."""
        try:
            return path.read_text().strip()
        except OSError:
            return ""

    def acquire(self) -> FolderLock:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not on POSIX
            return self
        if self.held:
            return self
        key = self.folder.resolve()
        if key in self._held:
            self._held[key][1] += 1
            self.held = True
            return self
        while True:
            f = open(self.path, "a+")  # noqa: SIM115 - kept open while the lock is held
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                f.close()
                who = self.owner(self.path) or "owner unknown"
                raise FolderLocked(f"{self.folder} is in use by another fastnca train ({who})", who) from None
            # the holder before us may have removed the file between our open and our lock: lock the current one
            try:
                same = os.path.samestat(os.fstat(f.fileno()), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            f.close()
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on host {socket.gethostname()}\n")
        f.flush()
        self._held[key] = [f, 1]
        self.held = True
        return self

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        key = self.folder.resolve()
        entry = self._held.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] > 0:
            return
        del self._held[key]
        f = entry[0]
        try:
            self.path.unlink(missing_ok=True)  # while still locked: a waiting process re-checks the file it locked
        except OSError:
            pass
        f.close()

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()
