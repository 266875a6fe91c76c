"""Writing files so that a reader sees the old file or the complete new one, never a part: the one temporary-file-
and-rename writer every stage uses (results parts and range files, model weights, release files, the cross-match
table), and the one inter-process lock (store commits, results compaction, release transactions)."""
from __future__ import annotations

import contextlib
import fcntl
import os
import uuid
from collections.abc import Iterator
from pathlib import Path


class WriteError(OSError):
    """A file could not be written (full disk, I/O error): ``str()`` is one line that says what is unchanged,
    ``strerror`` the operating system's reason (e.g. "No space left on device") and ``errno`` its number."""

    def __init__(self, message: str, reason: str = "", errno: int | None = None) -> None:
        super().__init__(errno, reason or message)
        self.message = message

    def __str__(self) -> str:
        return self.message

    def __reduce__(self) -> tuple[type, tuple[str, str, int | None]]:  # raised in Dask tasks, pickled to the client
        return type(self), (self.message, self.strerror, self.errno)


def error_line(error: BaseException) -> str:
    """One line for an OS or icechunk error: its ``strerror``, else the innermost cause of icechunk's multi-line
    report (e.g. "No space left on device (os error 28)"), else its first line."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    causes = [line.removeprefix("`->").strip() for line in lines if line.startswith("`->")]
    return causes[-1] if causes else (lines[0].removeprefix("x ").strip() if lines else type(error).__name__)


def fsync_dir(folder: Path) -> None:
    """Make a folder's entries (a rename into it) durable."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_error(error: OSError, what: str, consequence: str) -> WriteError:
    """The one-line :class:`WriteError` of an OS error (e.g. ``No space left on device``)."""
    where = f" ({error.filename})" if error.filename else ""
    reason = error_line(error)
    return WriteError(f"cannot write {what}: {reason}{where}; {consequence}", reason, error.errno)


@contextlib.contextmanager
def atomic_write(path: str | Path, durable: bool = True) -> Iterator[Path]:
    """Yield a hidden temporary path beside ``path`` to write; it replaces ``path`` only when the block succeeds, so
    ``path`` is either the old file or the complete new one (``durable``: fsynced before the rename). Parent folders
    are created. :class:`WriteError` on an OS error (e.g. a full disk), ``ValueError`` when ``path`` is a folder."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder, not a file")
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield temporary
        if durable:
            with open(temporary, "rb") as handle:
                os.fsync(handle.fileno())
        os.replace(temporary, path)
    except OSError as error:
        raise write_error(error, str(path), f"{path.name} is unchanged") from error
    finally:
        temporary.unlink(missing_ok=True)


def write_durably(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically and durably (the file and the rename are on disk when it returns)."""
    with atomic_write(path) as temporary:
        temporary.write_text(text)
    fsync_dir(path.parent)


class ExclusiveLock:
    """An exclusive ``flock`` on a lock file, between processes (needs working ``flock`` on the file system: local
    disks; Lustre mounted with ``-o flock``). Use as a context manager, or ``acquire``/``release``."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._handle = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a")  # noqa: SIM115 - kept open while the lock is held
        fcntl.flock(handle, fcntl.LOCK_EX)
        self._handle = handle

    def release(self) -> None:
        if self._handle is not None:
            fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None

    def __enter__(self) -> ExclusiveLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
