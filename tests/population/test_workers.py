"""Worker processes of a population sweep: the layout, the plan, results across the pipe, a dead worker, Ctrl-C."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
from hydra.errors import HydraException

from clbench.population import workers
from clbench.population.workers import Layout, Unit, choose_layout, plan, run_in_workers


def test_auto_gives_cpu_jobs_one_single_threaded_worker_per_core_and_gpu_jobs_this_process(monkeypatch):
    monkeypatch.setattr(workers, "uses_gpu", lambda device: device.startswith("cuda"))
    assert choose_layout("auto", ["cpu"] * 10, jobs=10, cores=2) == Layout(2, 1)
    assert choose_layout("auto", ["cpu"] * 10, jobs=10, cores=8) == Layout(8, 1)
    assert choose_layout("auto", ["cpu"] * 3, jobs=3, cores=8) == Layout(3, 2)  # no idle worker; spare cores to threads
    assert choose_layout("auto", ["cpu"], jobs=1, cores=8) == Layout(1, None)
    assert choose_layout("auto", ["cpu", "cuda"], jobs=2, cores=8) == Layout(1, None)
    assert choose_layout(1, ["cpu"] * 4, jobs=4, cores=4) == Layout(1, None)
    assert choose_layout(3, ["cpu"] * 4, jobs=4, cores=2) == Layout(3, 1)


def test_more_than_one_worker_for_gpu_jobs_is_refused_in_one_line(monkeypatch):
    monkeypatch.setattr(workers, "uses_gpu", lambda device: device != "cpu")
    with pytest.raises(HydraException, match=r"set hydra\.launcher\.workers=1"):
        choose_layout(2, ["auto", "auto"], jobs=2, cores=4)


@pytest.mark.parametrize("bad", [0, -1, "two", 1.5, True, None])
def test_a_bad_workers_setting_names_the_fix(bad):
    with pytest.raises(HydraException, match=r"hydra\.launcher\.workers must be auto or an integer >= 1"):
        workers.check_setting(bad)


def test_the_plan_deals_each_population_out_and_balances_solo_jobs():
    plans = plan([list(range(10)), [10, 11, 12]], solo=[13, 14, 15], workers=2)
    assert [u.positions for u in plans[0]] == [(0, 2, 4, 6, 8), (10, 12), (14,)]
    assert [u.positions for u in plans[1]] == [(1, 3, 5, 7, 9), (11,), (13,), (15,)]
    assert all(u.population for p in plans for u in p[:2]) and not plans[0][2].population
    every = sorted(position for p in plans for u in p for position in u.positions)
    assert every == list(range(16))
    assert plan([[0, 1]], solo=[2], workers=1) == [[Unit((0, 1), True), Unit((2,), False)]]


def _echo(unit: Unit) -> list[tuple[int, object]]:
    return [(p, {"job": p, "pid": os.getpid()}) for p in unit.positions]


def test_every_job_comes_back_from_its_worker_process():
    plans = plan([[0, 1, 2, 3]], solo=[4], workers=2)
    ends = run_in_workers(plans, _echo, threads=1)
    returned = {p: r for end in ends for p, r in end.returns.items()}
    assert sorted(returned) == [0, 1, 2, 3, 4]
    assert {r["job"] for r in returned.values()} == {0, 1, 2, 3, 4}
    pids = {r["pid"] for r in returned.values()}
    assert len(pids) == 2 and os.getpid() not in pids
    assert [end.exitcode for end in ends] == [0, 0]


def test_a_worker_that_dies_leaves_its_remaining_jobs_unreturned():
    def dies_at_3(unit: Unit) -> list[tuple[int, object]]:
        if 3 in unit.positions:
            os._exit(9)  # as a worker killed mid-job
        return _echo(unit)

    plans = [[Unit((0,), False), Unit((2,), False)], [Unit((1,), False), Unit((3,), False), Unit((5,), False)]]
    ends = run_in_workers(plans, dies_at_3, threads=None)
    assert sorted(ends[0].returns) == [0, 2] and ends[0].exitcode == 0
    assert sorted(ends[1].returns) == [1] and ends[1].exitcode == 9


def test_an_error_that_does_not_pickle_crosses_as_its_text():
    class Unpicklable(Exception):
        def __reduce__(self):
            raise TypeError("no")

    class Returned:
        _return_value = Unpicklable("member diverged")

    sent = workers.sendable(Returned())
    assert isinstance(sent._return_value, RuntimeError) and "member diverged" in str(sent._return_value)


def test_ctrl_c_interrupts_each_worker_once_and_is_raised_after_they_end(tmp_path: Path):
    """SIGINT reaches the launcher (here, sent to it alone); it interrupts every worker, which unwinds (writes its
    file), and raises KeyboardInterrupt only once both have ended."""

    def slow(unit: Unit) -> list[tuple[int, object]]:
        try:
            time.sleep(60)
        except KeyboardInterrupt:
            (tmp_path / f"unwound-{unit.positions[0]}").write_text(str(os.getpid()))
            raise
        return _echo(unit)

    # a process started in the background by a non-interactive shell inherits SIGINT ignored: take Python's own
    # handler for the test, as a process started from a terminal has it
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    timer = threading.Timer(1.5, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    started = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt):
            run_in_workers([[Unit((0,), False)], [Unit((1,), False)]], slow, threads=None)
    finally:
        timer.cancel()
        signal.signal(signal.SIGINT, previous)
    assert time.monotonic() - started < 30
    assert sorted(p.name for p in tmp_path.iterdir()) == ["unwound-0", "unwound-1"]


def test_cpu_threads_that_oversubscribe_the_workers_get_one_line():
    from clbench.population.workers import oversubscription_note

    note = oversubscription_note(Layout(2, 1), [2, None], cores=2)
    assert note is not None and "asks for 4 threads on 2 cores" in note and "set cpu_threads=1" in note
    assert oversubscription_note(Layout(2, 1), [1, None], cores=2) is None
    assert oversubscription_note(Layout(2, 1), [None, None], cores=2) is None  # the workers set 1 thread each
    assert oversubscription_note(Layout(1, None), [8], cores=2) is None  # one process: the user's choice


def test_each_population_is_announced_with_the_workers_it_was_dealt_to():
    from clbench.population.workers import population_lines

    plans = plan([[0, 1, 2, 3], [4]], solo=[5], workers=2)
    assert population_lines([[0, 1, 2, 3], [4]], plans, offset=10) == [
        "clbench: population of 4 jobs: #10, #11, #12, #13 (dealt to 2 worker processes)",
        "clbench: population of 1 jobs: #14",
    ]


def test_a_job_counts_as_on_a_gpu_as_its_run_picks_its_device():
    import torch

    assert not workers.uses_gpu("cpu")
    assert workers.uses_gpu("auto") == torch.cuda.is_available()
    # settings the run refuses keep the jobs in the launcher's process, where each says why in one line
    assert workers.uses_gpu("bogus")
    if not torch.cuda.is_available():
        assert workers.uses_gpu("cuda")
