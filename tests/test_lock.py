"""clbench.lock: one training per run folder; a dead holder's lock is taken over."""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import clbench.lock as lock_module
from clbench.lock import RunLock, RunLockedError

CLI = [sys.executable, "-m", "clbench"]
HOLD = """
import sys, time
from pathlib import Path
from clbench.lock import RunLock
lock = RunLock(Path(sys.argv[1])).acquire()
print("held", flush=True)
time.sleep(120)
"""


def _holder(run_dir) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None and process.stdout.readline().strip() == "held"
    return process


def test_second_holder_is_refused_with_one_line_naming_the_holder(tmp_path):
    holder = _holder(tmp_path)
    try:
        with pytest.raises(RunLockedError) as caught:
            RunLock(tmp_path).acquire()
        line = str(caught.value)
        assert f"pid {holder.pid}" in line and "wait for it to end" in line and "\n" not in line
    finally:
        holder.kill()
        holder.wait()


def test_a_dead_holders_lock_is_taken_over(tmp_path):
    holder = _holder(tmp_path)
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    assert (tmp_path / ".lock").exists()  # left behind by the killed holder
    with RunLock(tmp_path) as lock:
        assert f"pid {os.getpid()}" in lock.path.read_text()
    assert not (tmp_path / ".lock").exists()  # released on exit


def test_the_same_process_cannot_take_a_held_lock_twice(tmp_path):
    with RunLock(tmp_path), pytest.raises(RunLockedError):
        RunLock(tmp_path).acquire()
    with RunLock(tmp_path):  # released: free again
        pass


def test_a_second_identical_run_refuses_while_the_first_trains(tmp_path):
    """Two identical commands: the one that finds the run folder locked stops with one line, exit 2, before
    training, and leaves the holder's files alone."""
    run_dir = tmp_path / "split_digits" / "finetune" / "same"
    run_dir.mkdir(parents=True)
    holder = _holder(run_dir)  # stands for the first run, mid-training
    try:
        second = subprocess.run(
            [*CLI, "stream=split_digits", "logger=none", "run_id=same", "device=cpu", f"results_dir={tmp_path}"],
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
    finally:
        holder.kill()
        holder.wait()
    assert second.returncode == 2, second.stderr
    lines = [line for line in second.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and f"is in use by pid {holder.pid}" in lines[0]
    assert sorted(p.name for p in run_dir.iterdir()) == [".lock"]  # nothing written into the held folder


@pytest.fixture
def no_flock(monkeypatch):
    """A filesystem without flock (NFS without a lock daemon): flock fails with ENOLCK, as the kernel says there."""

    def refuse(handle, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(lock_module.fcntl, "flock", refuse)


def test_without_flock_a_pid_file_locks_the_folder_and_is_removed_on_release(tmp_path, no_flock, capsys):
    with RunLock(tmp_path) as lock:
        assert lock.path.read_text() == f"pid {os.getpid()} on {socket.gethostname()}\n"
        with pytest.raises(RunLockedError) as caught:  # we are alive: a second taker is refused
            RunLock(tmp_path).acquire()
        assert f"pid {os.getpid()}" in str(caught.value)
    assert not (tmp_path / ".lock").exists()
    assert "does not support flock" in capsys.readouterr().err


def test_without_flock_a_dead_local_holders_file_is_taken_over(tmp_path, no_flock):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer exists
    (tmp_path / ".lock").write_text(f"pid {dead.pid} on {socket.gethostname()}\n")
    with RunLock(tmp_path) as lock:
        assert f"pid {os.getpid()}" in lock.path.read_text()


def test_without_flock_another_hosts_file_is_refused_naming_the_file_to_delete(tmp_path, no_flock):
    (tmp_path / ".lock").write_text("pid 4242 on some-other-node\n")
    with pytest.raises(RunLockedError) as caught:
        RunLock(tmp_path).acquire()
    line = str(caught.value)
    assert "some-other-node" in line and f"delete {tmp_path / '.lock'}" in line and "\n" not in line
    assert (tmp_path / ".lock").exists()  # not ours to remove


def test_other_flock_errors_are_not_mistaken_for_a_missing_flock(tmp_path, monkeypatch):
    def broken(handle, operation):
        raise OSError(errno.EBADF, "Bad file descriptor")

    monkeypatch.setattr(lock_module.fcntl, "flock", broken)
    with pytest.raises(OSError) as caught:
        RunLock(tmp_path).acquire()
    assert caught.value.errno == errno.EBADF


def test_without_flock_the_lock_file_is_never_created_empty(tmp_path, no_flock, monkeypatch):
    """An empty lock file made by a probe looked stale to a second taker, which deleted the first holder's
    freshly linked file: both runs held the lock (3 in 300 trials of two racing processes)."""
    real_open, created = os.open, []

    def recording_open(path, flags, *args):
        if Path(path).name == ".lock" and flags & os.O_CREAT:
            created.append(path)
        return real_open(path, flags, *args)

    monkeypatch.setattr(lock_module.os, "open", recording_open)
    with RunLock(tmp_path) as lock:
        assert lock.path.read_text().startswith(f"pid {os.getpid()} ")
    assert created == []
