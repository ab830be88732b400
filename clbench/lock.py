"""One training per run folder: a lock file that the kernel releases when its holder exits.

Two identical commands started together compute the same run folder. Without a lock both would train
into it and overwrite each other's checkpoint and result. The lock is ``fcntl.flock`` on ``<run
dir>/.lock``: the kernel drops it when the process ends, however it ends (SIGKILL included), so a dead
holder's lock is simply taken over; the file keeps the holder's pid and host for the message.

Some shared filesystems (NFS without a lock daemon, Lustre or CIFS mounted without flock) refuse ``flock``
with ``ENOLCK`` / ``ENOSYS`` / ``EOPNOTSUPP``. There the lock falls back to the lock file's existence: it is
made as a hard link to a file that already holds the holder's pid and host (atomic, NFS included). A file left
by a dead process of this host is taken over (its pid no longer exists); one left by another host cannot be
checked from here, so the message names the file to delete once that run is known to be gone. One line on
stderr says the fallback is in use.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import sys
from pathlib import Path
from types import TracebackType

LOCK_NAME = ".lock"
# flock unsupported by the filesystem (not "held by someone else", which is EWOULDBLOCK)
NO_FLOCK = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL}


class RunLockedError(RuntimeError):
    """Another live process is training into the same run folder."""


class RunLock:
    """``with RunLock(run_dir):`` holds the run folder's lock, or raises :class:`RunLockedError` at once
    (it never waits: a second identical command refuses with one line instead of training twice)."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self._handle: int | None = None
        self._flock = True  # False: the O_EXCL fallback holds the lock

    def acquire(self) -> RunLock:
        """Take the lock; a lock file left by a dead process is taken over."""
        if not _flock_works(self.path.parent):
            return self._acquire_exclusive_file()
        while True:
            handle = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(handle, 200, 0).decode(errors="replace").strip() or "another process"
                os.close(handle)
                raise RunLockedError(self._in_use(holder)) from None
            except OSError:
                os.close(handle)
                raise
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
        self._handle, self._flock = handle, True
        return self

    def _in_use(self, holder: str) -> str:
        return (
            f"{self.path.parent} is in use by {holder}, training the same run: wait for it to end, "
            "or give this run another results_dir / run_id"
        )

    def _acquire_exclusive_file(self) -> RunLock:
        """The fallback where the filesystem has no flock: the file's existence is the lock."""
        print(f"clbench: {self.path.parent} does not support flock; locking it with a pid file", file=sys.stderr)
        me = socket.gethostname()
        mine = f"pid {os.getpid()} on {me}\n"
        staged = self.path.with_name(f"{LOCK_NAME}.{me}.{os.getpid()}")
        staged.write_text(mine)
        try:
            while True:
                try:
                    os.link(staged, self.path)  # atomic, also over NFS: the lock file appears with its holder in it
                    break
                except FileExistsError:
                    pass
                try:
                    holder = self.path.read_text(errors="replace").strip()
                except FileNotFoundError:
                    continue  # released meanwhile
                pid, _, host = holder.removeprefix("pid ").partition(" on ")
                if not holder or (host == me and pid.isdigit() and not _alive(int(pid))):
                    # empty: never a live lock (a holder's file appears with its content, and flock is probed on
                    # the folder, not by creating this file); or left by a dead process of this host
                    self.path.unlink(missing_ok=True)
                    continue
                if host != me:
                    raise RunLockedError(
                        f"{self.path.parent} is in use by {holder} (this filesystem has no flock): wait for it "
                        f"to end, or delete {self.path} if that run is gone"
                    ) from None
                raise RunLockedError(self._in_use(holder)) from None
        finally:
            staged.unlink(missing_ok=True)
        self._handle, self._flock = os.open(self.path, os.O_RDONLY), False
        return self

    def release(self) -> None:
        """Remove the lock file and drop the lock (in that order, so nobody locks a file about to vanish)."""
        if self._handle is None:
            return
        if not self._flock:
            self.path.unlink(missing_ok=True)
            os.close(self._handle)
            self._handle = None
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


def _flock_works(folder: Path) -> bool:
    """Whether the filesystem under ``folder`` supports flock, probed on the folder itself: probing by opening
    the lock file would create an empty one, which a fallback taker could not tell from a stale file (two runs
    could then both hold the lock)."""
    handle = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(handle, fcntl.LOCK_UN)
    except BlockingIOError:
        return True  # someone holds the folder exclusively: flock works
    except OSError as error:
        if error.errno in NO_FLOCK:
            return False
        raise
    finally:
        os.close(handle)
    return True


def _alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host (signal 0 checks without sending anything)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True
