"""One training per run folder: a lock file that the kernel releases when its holder exits.

Two identical commands started together compute the same run folder. Without a lock both would train
into it and overwrite each other's checkpoint and result. The lock is ``fcntl.flock`` on ``<run
dir>/.lock``: the kernel drops it when the process ends, however it ends (SIGKILL included), so a dead
holder's lock is simply taken over; the file keeps the holder's pid and host for the message.
"""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path
from types import TracebackType

LOCK_NAME = ".lock"


class RunLockedError(RuntimeError):
    """Another live process is training into the same run folder."""


class RunLock:
    """``with RunLock(run_dir):`` holds the run folder's lock, or raises :class:`RunLockedError` at once
    (it never waits: a second identical command refuses with one line instead of training twice)."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self._handle: int | None = None

    def acquire(self) -> RunLock:
        """Take the lock; a lock file left by a dead process is taken over."""
        while True:
            handle = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(handle, 200, 0).decode(errors="replace").strip() or "another process"
                os.close(handle)
                raise RunLockedError(
                    f"{self.path.parent} is in use by {holder}, training the same run: wait for it to end, "
                    "or give this run another results_dir / run_id"
                ) from None
            # the holder may have removed the file between our open and our lock: lock the file that is there
            try:
                same = os.fstat(handle).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(handle)
        os.ftruncate(handle, 0)
        os.pwrite(handle, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self._handle = handle
        return self

    def release(self) -> None:
        """Remove the lock file and drop the lock (in that order, so nobody locks a file about to vanish)."""
        if self._handle is None:
            return
        self.path.unlink(missing_ok=True)
        fcntl.flock(self._handle, fcntl.LOCK_UN)
        os.close(self._handle)
        self._handle = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.release()
