"""Sweeps through Hydra's launchers, for real on CPU, plus composition of the cluster presets."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from clbench.__main__ import check_group_choices

QUIET = ["stream=split_digits", "logger=none", "trainer.progress=false", "trainer.epochs=1", "verbose=false"]


def clbench(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "clbench", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


def _index(results: Path) -> dict:
    indexes = list(results.glob("_hydra/sweeps/*/index.json"))
    assert len(indexes) == 1, "expected one sweep index"
    return json.loads(indexes[0].read_text())


# joblib's two loky workers and submitit's two processes each import torch and clbench afresh, about 30 s each
# here: slow (run by `pytest -m slow`, and in CI); tests/test_cluster.py's slow 2x2 sweep also runs submitit_local
SLOW = pytest.mark.slow


@pytest.mark.parametrize(
    "launcher", ["basic", pytest.param("joblib", marks=SLOW), pytest.param("submitit_local", marks=SLOW)]
)
def test_two_job_sweep_writes_results_and_index(tmp_path, launcher):
    extra = [] if launcher == "basic" else [f"hydra/launcher={launcher}"]
    if launcher == "joblib":
        extra.append("hydra.launcher.n_jobs=2")
    sweep = ["-m", *extra, "strategy=finetune,joint", f"results_dir={tmp_path}", *QUIET]
    done = clbench(*sweep, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    index = _index(tmp_path)
    assert index["counts"] == {"completed": 2}
    for job in index["jobs"]:
        assert json.loads(Path(job["result"]).read_text())["status"] == "completed"
    assert {p.parent.parent.name for p in tmp_path.glob("split_digits/*/*/result.json")} == {"finetune", "joint"}
    if launcher == "basic":  # the same sweep again (one launcher is enough): both runs are read back, none trains
        again = clbench(*sweep, cwd=tmp_path)
        assert again.returncode == 0, again.stderr[-2000:]
        assert again.stdout.count("is already completed") == 2
        assert len(list(tmp_path.glob("split_digits/*/*/result.json"))) == 2


TOUCHY = """
from pathlib import Path

from strategies.finetune import Finetune


class Touchy(Finetune):
    \"\"\"Fine-tune that edits its own config file when built: what a user editing conf/ mid-sweep does.\"\"\"

    name = "touchy"

    def __init__(self, note: str = "") -> None:
        super().__init__()
        path = Path("conf/strategy/touchy.yaml")
        if "edited" not in path.read_text():
            path.write_text(path.read_text() + "# edited\\n")
"""


def test_a_config_file_edited_while_a_sweep_runs_is_named_by_the_jobs_after_it(tmp_path):
    """Hydra composes each job from the files when the job starts: a file edited mid-sweep silently reached the
    later jobs (a sweep here once split into 12 folders that way, its index listing 8 of 19 jobs)."""
    (tmp_path / "conf" / "strategy").mkdir(parents=True)
    (tmp_path / "touchy.py").write_text(TOUCHY)
    (tmp_path / "conf" / "strategy" / "touchy.yaml").write_text("_target_: touchy.Touchy\nnote: ''\n")
    done = clbench("-m", "strategy=touchy", "seed=0,1", "results_dir=results", *QUIET, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    jobs = _index(tmp_path / "results")["jobs"]
    assert "config_files_changed" not in jobs[0]
    (changed,) = jobs[1]["config_files_changed"]
    assert changed.endswith("conf/strategy/touchy.yaml")
    assert "job 1: config files changed since the sweep started" in done.stderr
    from clbench.report import collect

    (note,) = collect([tmp_path / "results"]).notes
    assert "job 1" in note and "touchy.yaml" in note


def test_failing_job_is_isolated_and_fails_the_sweep(tmp_path):
    # the failing job comes first: the job after it still runs
    done = clbench("-m", "trainer.lr=1e30,0.1", f"results_dir={tmp_path}", *QUIET, cwd=tmp_path)
    assert done.returncode == 1, done.stderr[-2000:]  # the other job ran, but the sweep is not a success
    index = _index(tmp_path)
    assert index["counts"] == {"completed": 1, "failed": 1}
    statuses = sorted(json.loads(p.read_text())["status"] for p in tmp_path.glob("split_digits/finetune/*/result.json"))
    assert statuses == ["completed", "failed"]
    assert "training loss became nan" in done.stderr
    assert "job 0 failed: trainer.lr=1e+30" in done.stderr


def test_a_sweep_whose_every_job_refused_bad_input_exits_2(tmp_path):
    """cpu_threads=0 applies to every job: each refuses it before training with its one line, and the sweep
    exits with bad input's code, as a single run would (one bad job among good ones still gives 1, above)."""
    done = clbench("-m", "seed=0,1", "cpu_threads=0", f"results_dir={tmp_path}", *QUIET, cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "cpu_threads must be >= 1" in done.stderr and "Traceback" not in done.stderr
    assert _index(tmp_path)["counts"] == {"failed": 2}
    assert all(job["user_error"] for job in _index(tmp_path)["jobs"])


def test_unsupported_pair_is_skipped_with_its_reason_and_the_sweep_succeeds(tmp_path):
    """GPM supports the task and domain scenarios; in a class-incremental comparison it is skipped, not failed."""
    done = clbench(
        "-m", "strategy=finetune,gpm", "stream.scenario=class", f"results_dir={tmp_path}", *QUIET, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr[-2000:]
    index = _index(tmp_path)
    assert index["counts"] == {"completed": 1, "skipped": 1}
    skipped = [job for job in index["jobs"] if job["status"] == "skipped"]
    assert "strategy=gpm" in skipped[0]["overrides"]
    assert "supports the task/domain scenario(s), not 'class'" in skipped[0]["reason"]
    assert not list(tmp_path.glob("split_digits/gpm/*/result.json"))


def test_job_that_left_no_record_is_listed_missing(tmp_path):
    from clbench.sweeps import read_jobs

    (tmp_path / "0").mkdir()
    (tmp_path / "0" / "job.json").write_text(json.dumps({"job_num": 0, "status": "completed"}))
    (tmp_path / "1").mkdir()  # killed before it could write job.json
    (tmp_path / "2").mkdir()
    (tmp_path / "2" / "job.json").write_text("{not json")
    assert [job["status"] for job in read_jobs(tmp_path)] == ["completed", "missing", "unreadable"]


@pytest.mark.parametrize(
    "preset",
    ["launcher=submitit_slurm", "launcher=ray", "launcher=joblib", "launcher=submitit_local", "sweeper=optuna"],
)
def test_scale_out_presets_compose(preset):
    """In-process, as Hydra composes them for ``python -m clbench hydra/<preset>`` (tests/test_cli.py prints a
    composed config through the CLI once)."""
    from hydra import compose, initialize_config_dir

    from clbench.__main__ import CONFIG_DIR, register_resolvers

    register_resolvers()
    group = preset.split("=")[0]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"hydra/{preset}"], return_hydra_config=True)
    assert cfg.hydra[group]._target_.startswith("hydra_plugins.")


def test_sweeps_started_in_the_same_second_get_their_own_folders(monkeypatch):
    """Two sweeps started within one second (a script starting one per protocol) shared
    ``_hydra/sweeps/<second>``, so their job folders 0, 1, ... and index.json overwrote each other: the folder
    name carries microseconds. Two processes are two resolutions of Hydra's ``now`` at different instants."""
    import datetime as real_datetime

    import hydra.core.utils as hydra_utils
    from hydra import compose, initialize_config_dir

    from clbench.__main__ import CONFIG_DIR, register_resolvers

    register_resolvers()
    folders = []
    for microsecond in (1, 2):  # the same second, as two processes would see it

        class Clock(real_datetime.datetime):
            instant = real_datetime.datetime(2026, 11, 30, 17, 0, 0, microsecond)

            @classmethod
            def now(cls, tz=None):
                return cls.instant

        monkeypatch.setattr(hydra_utils, "datetime", Clock)
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            cfg = compose(config_name="config", overrides=["results_dir=/r"], return_hydra_config=True)
        folders.append((str(cfg.hydra.sweep.dir), str(cfg.hydra.run.dir)))
    assert folders[0][0] != folders[1][0] and folders[0][1] != folders[1][1]
    assert folders[0][0].startswith("/r/_hydra/sweeps/2026-11-30_17-00-00")


def test_unknown_group_choice_lists_known_names(tmp_path, monkeypatch, capsys):
    """main() in-process: group names are checked before Hydra starts (tests/test_reliability.py runs this path
    through a fresh ``python -m clbench``)."""
    import clbench.__main__ as cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["clbench", "strategy=finetune,nope"])
    with pytest.raises(SystemExit) as exited:
        cli.main()
    assert exited.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "clbench: error: unknown strategy 'nope': known strategy configs are "
        + ", ".join(sorted(p.stem for p in (Path(__file__).parent.parent / "conf" / "strategy").glob("*.yaml")))
    ]


def test_group_check_respects_extra_config_dirs(tmp_path):
    (tmp_path / "strategy").mkdir()
    (tmp_path / "strategy" / "mine.yaml").write_text("_target_: x.Y\n")
    assert check_group_choices(["--config-dir", str(tmp_path), "strategy=mine"]) is None
    assert "unknown model" in check_group_choices(["model=vgg"])


def test_auto_device_pins_each_job_to_its_own_gpu(monkeypatch):
    import torch

    from clbench.runner import select_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert [select_device("auto", job).index for job in range(6)] == [0, 1, 2, 3, 0, 1]
    assert select_device("cuda:2", 5).index == 2  # an explicit choice is never moved


def test_a_pinned_gpu_becomes_the_current_device(monkeypatch):
    """Job k's tensors live on cuda:k; CUDA-graph capture and its streams use the current device, which
    stayed cuda:0 before ``activate_device``."""
    import torch

    from clbench.runner import activate_device

    chosen = []
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    activate_device(torch.device("cuda", 3))
    activate_device(torch.device("cpu"))
    assert chosen == [torch.device("cuda", 3)]


def test_run_activates_the_device_it_selected(monkeypatch, run_tiny):
    import torch

    import clbench.runner

    activated = []
    monkeypatch.setattr(clbench.runner, "activate_device", activated.append)
    run_tiny(["stream=split_digits"])
    assert activated == [torch.device("cpu")]


def test_a_job_lost_with_its_worker_is_recorded_failed_unless_it_wrote_its_own_record(tmp_path):
    """A population worker killed before a job returned: the job gets a failed job.json (so the index lists it and
    the sweep exits 1), even when it never started and has no folder; a job that finished keeps its own."""
    from omegaconf import OmegaConf

    from clbench.sweeps import read_jobs, write_lost_job

    def config(num: int):
        return OmegaConf.create(
            {"hydra": {"sweep": {"dir": str(tmp_path), "subdir": "${hydra.job.num}"}, "job": {"num": num}}}
        )

    (tmp_path / "1").mkdir()
    (tmp_path / "1" / "job.json").write_text(json.dumps({"job_num": 1, "status": "completed"}))
    write_lost_job(config(0), ["seed=0"], "its population worker ended")
    write_lost_job(config(1), ["seed=1"], "its population worker ended")
    jobs = read_jobs(tmp_path)
    assert [(j["job_num"], j["status"]) for j in jobs] == [(0, "failed"), (1, "completed")]
    assert jobs[0]["overrides"] == ["seed=0"] and "worker ended" in jobs[0]["error"]
