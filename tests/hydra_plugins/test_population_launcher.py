"""``hydra/launcher=population`` from the command line, as a user sweeps: grouping, files, W&B, Ctrl-C, resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import compose_config, run_config

QUIET = ["logger=none", "trainer.progress=false", "trainer.epochs=1", "verbose=false", "plots=false"]
EXACT = ["cpu_threads=1", "deterministic=true"]


def clbench(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true"}
    return subprocess.run(
        [sys.executable, "-m", "clbench", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


def population_sweep(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    """``python -m clbench -m hydra/launcher=population <overrides>`` with quiet settings, results in ``tmp_path``."""
    return clbench("-m", "hydra/launcher=population", *overrides, *QUIET, f"results_dir={tmp_path}", cwd=tmp_path)


def answer_ctrl_c() -> None:
    """In the child before it starts: SIGINT's default disposition. A test run started in the background by a
    non-interactive shell has SIGINT ignored, which its children inherit, and Python then never turns SIGINT
    into KeyboardInterrupt (as a command started that way should not answer a terminal's Ctrl-C)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def survivors(marker: str, wait_s: float = 10.0) -> list[int]:
    """Processes whose command line holds ``marker``, once they have had ``wait_s`` to end."""
    deadline = time.monotonic() + wait_s
    while True:
        found = []
        for proc in Path("/proc").iterdir():
            try:
                if proc.name.isdigit() and marker in (proc / "cmdline").read_bytes().decode(errors="replace"):
                    found.append(int(proc.name))
            except OSError:
                continue
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def index_of(results: Path) -> dict:
    (index,) = results.glob("_hydra/sweeps/*/index.json")
    return json.loads(index.read_text())


def results_by_seed(results: Path, strategy: str = "finetune") -> dict[int, dict]:
    found = {}
    for path in results.glob(f"*/{strategy}/*/result.json"):
        result = json.loads(path.read_text())
        found[result["seed"]] = result
    return found


def test_a_seed_sweep_runs_as_one_population_with_every_solo_file(tmp_path):
    """Two strategies x 2 seeds: two populations; each job has its folder, job.json, result, checkpoint and W&B
    run (its own final accuracy table), and each member's R is its solo run's."""
    done = clbench(
        "-m", "hydra/launcher=population", "strategy=finetune,ewc", "seed=0,1", "stream.num_tasks=3",
        "logger=wandb", *[q for q in QUIET if q != "logger=none"], *EXACT, f"results_dir={tmp_path}", cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("clbench: population of 2 jobs") == 2
    index = index_of(tmp_path)
    assert index["counts"] == {"completed": 4}
    for job in index["jobs"]:
        result = json.loads(Path(job["result"]).read_text())
        run_dir = Path(result["paths"]["run_dir"])
        assert (run_dir / "checkpoint.pt").exists()
        assert (Path(job["job_dir"]) / ".hydra" / "overrides.yaml").exists() if "job_dir" in job else True
        (offline,) = (run_dir / "wandb").glob("offline-run-*")
        assert list(offline.glob("*.wandb")), f"no W&B data file in {offline}"
        tables = [t for t in (offline / "files" / "media" / "table").rglob("*.table.json") if "final" in str(t)]
        final = [t for t in tables if "acc_matrix" in str(t)]
        logged = [row[1:] for row in json.loads(final[0].read_text())["data"]]
        assert logged == result["acc_matrix"], "a member's W&B run holds another member's matrix"
        solo_overrides = [
            *QUIET,
            *EXACT,
            "stream.num_tasks=3",
            f"strategy={result['strategy']}",
            f"seed={result['seed']}",
        ]
        solo = run_config(solo_overrides, tmp_path / "solo", tiny=False)
        assert solo["acc_matrix"] == result["acc_matrix"]


@pytest.mark.slow  # the grouping's note is also checked in-process (test_jobs_that_differ_...)
def test_a_strategy_without_the_declaration_runs_its_jobs_one_by_one(tmp_path):
    done = population_sweep(tmp_path, "strategy=wsn", "seed=0,1", "stream.num_tasks=2")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "strategy 'wsn' does not declare population_safe; its 2 jobs run as solo runs" in done.stdout
    assert "population of" not in done.stdout
    assert index_of(tmp_path)["counts"] == {"completed": 2}


@pytest.mark.slow  # the member's failure itself is checked in-process (tests/population/test_coordinator.py)
def test_a_failing_member_fails_its_job_and_the_sweep(tmp_path):
    """lr is batchable: the 4 jobs are one population; the diverging one fails, the others complete."""
    done = population_sweep(tmp_path, "trainer.lr=0.05,0.1,1e30,0.2", "stream.num_tasks=2")
    assert done.returncode == 1, done.stderr[-3000:]
    assert "clbench: population of 4 jobs" in done.stdout
    assert index_of(tmp_path)["counts"] == {"completed": 3, "failed": 1}
    assert "training loss became nan" in done.stderr


@pytest.mark.parametrize(
    "setting, line",
    [
        ("hydra.launcher.max_members=1", "hydra.launcher.max_members must be >= 2"),
        ("hydra.launcher.workers=0", "hydra.launcher.workers must be auto or an integer >= 1, got 0"),
    ],
)
def test_a_bad_launcher_setting_is_one_line_and_exit_2(tmp_path, setting, line):
    done = population_sweep(tmp_path, setting, "seed=0,1")
    assert done.returncode == 2, done.stderr[-3000:]
    assert line in done.stderr
    assert "Traceback" not in done.stderr
    assert not list(tmp_path.glob("*/finetune/*/result.json"))


@pytest.mark.parametrize(
    "how, workers",
    [
        (signal.SIGINT, "2"),
        pytest.param(signal.SIGINT, "1", marks=pytest.mark.slow),  # the launcher's own process
        pytest.param(signal.SIGKILL, "2", marks=pytest.mark.slow),
    ],
)
def test_an_interrupted_population_resumes_to_its_solo_results(tmp_path, how, workers):
    """Ctrl-C (exit 130, every member unwound through its runner) or kill -9 once a checkpoint is on disk; the same
    command then finishes every member, and each member's R is its uninterrupted solo run's. With worker processes
    the signal reaches the launcher alone (as from ``kill``): it interrupts its workers, and a killed launcher's
    workers die with it."""
    args = [
        "-m", "hydra/launcher=population", "seed=0,1,2", *QUIET, "stream.num_tasks=4", "trainer.epochs=2", *EXACT,
        f"hydra.launcher.workers={workers}", f"results_dir={tmp_path}",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "clbench", *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=answer_ctrl_c,
    )
    deadline = time.monotonic() + 300
    while not list(tmp_path.glob("*/finetune/*/checkpoint.pt")):
        assert process.poll() is None, process.communicate()[1].decode()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    process.send_signal(how)
    _, stderr = process.communicate(timeout=120)
    if how == signal.SIGINT:
        assert process.returncode == 130, stderr.decode()[-3000:]
        assert "Traceback" not in stderr.decode()
        assert not list(tmp_path.glob("*/finetune/*/.lock*")), "a member's run lock was left behind"
    else:
        assert process.returncode == -signal.SIGKILL
        assert not survivors(str(tmp_path), wait_s=2.0), "a population worker outlived its killed launcher"
    interrupted = results_by_seed(tmp_path)
    assert interrupted and all(r["status"] == "running" for r in interrupted.values())
    again = clbench(*args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    finished = results_by_seed(tmp_path)
    assert sorted(finished) == [0, 1, 2]
    for seed, result in finished.items():
        solo = run_config([*QUIET, *EXACT, "stream.num_tasks=4", "trainer.epochs=2", f"seed={seed}"], tmp_path / "solo")
        assert result["status"] == "completed"
        assert result["acc_matrix"] == solo["acc_matrix"]


def test_jobs_that_differ_in_more_than_seed_and_batchable_values_are_not_grouped(tmp_path):
    from clbench.population.grouping import group_jobs

    configs = [
        compose_config(overrides, tmp_path)
        for overrides in (
            ["seed=0"],
            ["seed=1", "trainer.lr=0.05"],  # lr: batchable
            ["seed=2", "trainer.optimizer=adam"],  # another optimizer: another population
            ["seed=3", "strategy=ewc"],
            ["seed=4", "strategy=ewc", "strategy.ewc_lambda=100"],  # EWC declares ewc_lambda batchable
            ["seed=5", "strategy=ewc", "strategy.fisher=per_sample"],  # not numeric: another population
            ["seed=6", "strategy=packnet"],
            ["seed=7", "strategy=packnet"],
        )
    ]
    grouping = group_jobs(configs, ["lr", "momentum", "weight_decay"], max_members=64)
    assert sorted(map(sorted, grouping.populations)) == [[0, 1], [3, 4]]
    assert grouping.solo == [2, 5, 6, 7]
    assert len(grouping.notes) == 1 and "'packnet' does not declare population_safe" in grouping.notes[0]
    split = group_jobs([configs[0]] * 5, [], max_members=2)
    assert split.populations == [[0, 1], [2, 3]] and split.solo == [4]
