"""Reliability: a run killed with SIGKILL resumes to the identical matrix; bad input gives one line."""

import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

RUN = [
    "stream=permuted_mnist5k",
    "trainer.batch_size=8",
    "trainer.epochs=2",
    "deterministic=true",
    "logger=none",
    "trainer.progress=false",
    "verbose=false",
    "device=cpu",
]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _started(command: list[str], **popen: object) -> subprocess.Popen:
    """The uninterrupted reference run, started beside the run to be killed (the two share the 2 cores; the
    reference no longer waits for the kill and the resume), its output captured."""
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def _finished(process: subprocess.Popen) -> subprocess.CompletedProcess:
    out, err = process.communicate(timeout=600)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def _stopped(process: subprocess.Popen) -> None:
    """Where the test failed before the reference finished, the reference does not outlive it."""
    if process.poll() is None:
        process.kill()
    process.communicate()


def test_sigkill_then_resume_gives_identical_matrix(tmp_path):
    killed_dir, clean_dir = tmp_path / "killed", tmp_path / "clean"
    command = [sys.executable, "-m", "clbench", *RUN]
    reference = _started([*command, f"results_dir={clean_dir}"], env=_env(), cwd=tmp_path)
    try:
        _sigkill_then_resume(command, killed_dir, tmp_path)
        clean = _finished(reference)
    finally:
        _stopped(reference)
    assert clean.returncode == 0, clean.stderr
    (checkpoint,) = killed_dir.glob("permuted_mnist5k/finetune/*/checkpoint.pt")
    after = json.loads((checkpoint.parent / "result.json").read_text())
    reference_result = json.loads(next(clean_dir.glob("permuted_mnist5k/finetune/*/result.json")).read_text())
    assert after["status"] == "completed"
    assert after["acc_matrix"] == reference_result["acc_matrix"]


def _sigkill_then_resume(command: list[str], killed_dir: Path, tmp_path: Path) -> None:
    """Start the run, SIGKILL it once its first checkpoint is written, check what it left, resume it."""
    process = subprocess.Popen([*command, f"results_dir={killed_dir}"], env=_env(), cwd=tmp_path)
    deadline = time.time() + 300
    checkpoint = None
    while time.time() < deadline and process.poll() is None:
        found = list(killed_dir.glob("permuted_mnist5k/finetune/*/checkpoint.pt"))
        if found:
            checkpoint = found[0]
            break
        time.sleep(0.01)
    assert checkpoint is not None and process.poll() is None, "the run ended before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    interrupted = json.loads((checkpoint.parent / "result.json").read_text())
    assert interrupted["status"] == "running" and interrupted["tasks_completed"] < 5
    saved = torch.load(checkpoint, weights_only=False)
    assert 1 <= saved["next_task"] < 5

    resumed = subprocess.run(
        [*command, f"results_dir={killed_dir}"], env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout


BAD_INPUTS = [
    (["strategy=nope"], "unknown strategy 'nope': known strategy configs are"),
    (["stream=nope"], "unknown stream 'nope': known stream configs are"),
    (["model=vgg"], "unknown model 'vgg': known model configs are"),
    (["stream=split_digits", "stream.num_tasks=6"], "lower stream.num_tasks or stream.classes_per_task"),
    (["trainer.lr=-0.1"], "trainer.lr must be > 0, got -0.1"),
    (["trainer.optimizer=lion"], "unknown trainer.optimizer 'lion'"),
    (["stream=split_cifar100", "stream.root=/nonexistent"], "stream.download=true"),
    (["stream=split_digits", "stream.scenario=instance"], "unknown stream.scenario 'instance'"),
    (["stream=split_digits", "stream.val_fraction=1.5"], "stream.val_fraction must be >= 0 and < 1"),
    (["device=tpu"], "unknown device 'tpu'"),
    (["strategy=supsup", "stream=split_digits", "stream.scenario=class"], "pick a stream with stream.scenario=task"),
    (["strategy=supsup", "stream=split_digits", "strategy.density=1.5"], "strategy.density must be in (0, 1]"),
    (["stream=split_digits", "trainer.lr=1e30"], "training loss became nan in task 0"),
    # issue 25, through the CLI: a misspelled key (Hydra's own error, reworded) and one typed-schema error. Every
    # other type, range and key case is checked in-process in tests/test_schema.py (BAD), one subprocess less each.
    (["trainer.epoch=1"], "unknown key trainer.epoch: did you mean trainer.epochs?"),
    (["trainer.epochs=abc"], "trainer.epochs must be an integer, got 'abc'"),
]
if not torch.cuda.is_available():
    BAD_INPUTS.append((["device=cuda"], "no CUDA device is available here: use device=cpu"))


# Each way a bad input reaches main()'s one line runs through a fresh `python -m clbench`: a group name checked
# before Hydra, Hydra's composition error, the run's checks before training, a failure during training. The other
# cases take one of these paths, so they are checked in-process in main()'s order (about 4 s of start-up less each).
THROUGH_CLI = [["strategy=nope"], ["trainer.epoch=1"], ["trainer.lr=-0.1"], ["stream=split_digits", "trainer.lr=1e30"]]
IN_PROCESS = [(overrides, message) for overrides, message in BAD_INPUTS if overrides not in THROUGH_CLI]


@pytest.mark.parametrize(("overrides", "message"), IN_PROCESS, ids=[" ".join(o) for o, _ in IN_PROCESS])
def test_bad_input_is_one_clear_line_in_process(tmp_path, cli_error_line, overrides, message):
    assert message in cli_error_line(overrides, tmp_path)


@pytest.mark.parametrize("overrides", THROUGH_CLI, ids=[" ".join(o) for o in THROUGH_CLI])
def test_bad_input_is_one_clear_line(tmp_path, overrides):
    (message,) = [message for bad, message in BAD_INPUTS if bad == overrides]
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "clbench",
            *overrides,
            "logger=none",
            "trainer.progress=false",
            "verbose=false",
            f"results_dir={tmp_path}",
        ],
        env={k: v for k, v in _env().items() if k != "HYDRA_FULL_ERROR"},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("clbench: error: ") and message in lines[0]
    assert "Traceback" not in done.stderr


def test_nan_run_keeps_finished_tasks(run_tiny, tmp_path, monkeypatch):
    from strategies.finetune import Finetune

    original = Finetune.loss

    def nan_on_task_2(self, output, y, batch, task):
        loss = original(self, output, y, batch, task)
        return loss * float("nan") if task.id == 2 else loss

    monkeypatch.setattr(Finetune, "loss", nan_on_task_2)
    with pytest.raises(Exception, match="loss became nan in task 2 epoch 0"):
        run_tiny(["stream=split_digits"], tmp_path)
    result = json.loads(next(Path(tmp_path).glob("split_digits/finetune/*/result.json")).read_text())
    assert result["status"] == "failed" and "NonFiniteLossError" in result["error"]
    assert result["tasks_completed"] == 2 and len(result["acc_matrix"]) == 2


def _clbench(args: list[str], cwd: Path, **popen: object) -> subprocess.CompletedProcess:
    env = {k: v for k, v in _env().items() if k != "HYDRA_FULL_ERROR"}
    env["PYTHONPATH"] = os.pathsep.join([str(cwd), env.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, "-m", "clbench", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


QUIET = ["logger=none", "trainer.progress=false", "verbose=false", "stream=split_digits", "trainer.epochs=1"]


@pytest.mark.parametrize("kind", ["file", "under_a_file", "unwritable", "empty"])
def test_bad_results_dir_is_one_line_and_makes_nothing(tmp_path, kind, monkeypatch, capsys):
    """A results_dir that is a file, unwritable or empty stops before Hydra makes its folders (``''`` used to
    write into the current folder and ``/_hydra`` at the filesystem root). main() runs in-process: the check
    comes before Hydra, so nothing of this process is left changed (a regression would run Hydra here and fail)."""
    import clbench.__main__ as cli

    a_file = tmp_path / "a_file"
    a_file.write_text("")
    value = {"file": a_file, "under_a_file": a_file / "x", "unwritable": "/proc/clbench-results", "empty": ""}[kind]
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setattr(sys, "argv", ["clbench", *QUIET, f"results_dir={value}"])
    with pytest.raises(SystemExit) as exited:
        cli.main()
    err = capsys.readouterr().err
    assert exited.value.code == 2, err
    (line,) = [line for line in err.splitlines() if line.strip()]
    assert line.startswith("clbench: error: "), line
    assert "results_dir" in line and "set results_dir" in line
    assert list(work.iterdir()) == []  # no outputs/, _hydra/ or results in the current folder


def _run_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "split_digits" / "finetune" / "fixed"
    folder.mkdir(parents=True)
    return folder


def test_corrupt_result_json_names_the_file_and_resume_false(tmp_path, cli_error_line):
    folder = _run_folder(tmp_path)
    (folder / "result.json").write_text('{"status": "runn\x01ing"')
    line = cli_error_line([*QUIET, "run_id=fixed"], tmp_path)  # a user error: one line, exit 2
    assert str(folder / "result.json") in line and "resume=false" in line


def test_corrupt_checkpoint_names_the_file_and_resume_false_starts_afresh(tmp_path, run_tiny, cli_error_line):
    folder = _run_folder(tmp_path)
    (folder / "result.json").write_text('{"status": "running"}')
    (folder / "checkpoint.pt").write_bytes(b"not a checkpoint at all")
    line = cli_error_line([*QUIET, "run_id=fixed"], tmp_path)  # a user error: one line, exit 2
    assert str(folder / "checkpoint.pt") in line and "resume=false" in line
    result = run_tiny(["stream=split_digits", "run_id=fixed", "resume=false"], tmp_path)
    assert result["status"] == "completed"


def test_files_keep_the_users_umask(run_tiny, tmp_path):
    """result.json and checkpoint.pt were 0600 whatever the umask (mkstemp's mode)."""
    previous = os.umask(0o027)
    try:
        result = run_tiny(["stream=split_digits", "plots=false"], tmp_path)
    finally:
        os.umask(previous)
    for key in ("result", "checkpoint"):
        assert stat.S_IMODE(os.stat(result["paths"][key]).st_mode) == 0o640, key


def test_one_task_has_no_bwt_fwt_or_forgetting(run_tiny, tmp_path):
    from clbench.loggers.console import format_summary

    result = run_tiny(["stream=split_digits", "stream.num_tasks=1"], tmp_path)
    stored = json.loads(Path(result["paths"]["result"]).read_text())["metrics"]
    assert stored["acc"] > 0 and stored["bwt"] is None and stored["fwt"] is None and stored["forgetting"] is None
    summary = format_summary(result["metrics"])
    assert "BWT n/a" in summary and "FWT n/a" in summary and "forgetting n/a" in summary and "0.00" not in summary


def test_extra_results_clash_is_caught_before_training(run_tiny, tmp_path, monkeypatch):
    from clbench.runner import ConfigError
    from strategies.finetune import Finetune

    fitted: list[int] = []
    monkeypatch.setattr(Finetune, "extra_results", lambda self: {"metrics": {}, "mine": 1})
    monkeypatch.setattr(Finetune, "fit_task", lambda self, task, trainer: fitted.append(task.id))
    with pytest.raises(ConfigError, match=r"extra_results keys \['metrics'\] clash.*rename them"):
        run_tiny(["stream=split_digits"], tmp_path)
    assert fitted == []


def test_resumed_run_continues_the_same_wandb_run(run_tiny, tmp_path, interrupt_after_first_checkpoint):
    """Each offline W&B run of a resumed run carries the run id kept in the checkpoint, so `wandb sync`
    uploads one run instead of one per attempt."""
    from clbench.runner import RunInterrupted

    overrides = ["stream=split_digits", "stream.num_tasks=3", "logger=wandb", "logger.mode=offline"]
    interrupted = "interrupted during task 0; rerun the same command to resume"
    with interrupt_after_first_checkpoint(), pytest.raises(RunInterrupted, match=interrupted):
        run_tiny(overrides, tmp_path)
    result = run_tiny(overrides, tmp_path)
    assert result["status"] == "completed"
    offline = sorted((Path(result["paths"]["run_dir"]) / "wandb").glob("offline-run-*"))
    # offline-run-<date>_<time>-<run id>, and W&B appends -1 when both attempts start within the same second
    run_ids = {re.fullmatch(r"offline-run-\d{8}_\d{6}-([^-]+)(?:-\d+)?", path.name).group(1) for path in offline}
    assert len(offline) == 2 and len(run_ids) == 1, [path.name for path in offline]


def test_an_interrupted_logger_finish_never_leaves_the_result_completed(run_tiny, tmp_path, monkeypatch):
    from clbench.loggers.base import Logger

    def interrupted_finish(self, result):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(Logger, "finish", interrupted_finish)
        with pytest.raises(KeyboardInterrupt):
            run_tiny(["stream=split_digits"], tmp_path)
    (path,) = tmp_path.glob("split_digits/finetune/*/result.json")
    assert json.loads(path.read_text())["status"] == "running"
    assert run_tiny(["stream=split_digits"], tmp_path)["status"] == "completed"  # the rerun finishes it


def test_readme_strategy_interrupted_with_ctrl_c_resumes_to_the_uninterrupted_matrix(readme_strategy):
    """Item 4, as the README shows it: ``python -m clbench strategy=l2_prev`` from the user's folder (its
    ``./conf`` found without --config-dir), Ctrl-C after the first task, the same command again: one line and
    exit 130, then the same R as a run never interrupted (its ``anchor`` used to be lost: ACC 67.68 vs 61.38)."""
    run = [*RUN, "strategy=l2_prev", "stream.num_tasks=3", "trainer.epochs=1", "stream.train_per_task=2000"]
    env = {**_env(), "PYTHONPATH": str(readme_strategy)}
    command = [sys.executable, "-m", "clbench", *run]
    killed, clean_dir = readme_strategy / "killed", readme_strategy / "clean"
    reference = _started([*command, f"results_dir={clean_dir}"], cwd=readme_strategy, env=env)
    try:
        checkpoint = _ctrl_c_then_resume(command, killed, readme_strategy, env)
        clean = _finished(reference)
    finally:
        _stopped(reference)
    assert clean.returncode == 0, clean.stderr
    after = json.loads((checkpoint.parent / "result.json").read_text())
    reference_result = json.loads(next(clean_dir.glob("*/l2_prev/*/result.json")).read_text())
    assert after["status"] == "completed" and after["acc_matrix"] == reference_result["acc_matrix"]


def _ctrl_c_then_resume(command: list[str], killed: Path, cwd: Path, env: dict) -> Path:
    """Start the run, SIGINT it once its first checkpoint is written, check its one line and what it left, resume
    it; returns the checkpoint's path."""
    process = subprocess.Popen(
        [*command, f"results_dir={killed}"],
        cwd=cwd,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None and not list(killed.glob("*/l2_prev/*/checkpoint.pt")):
        time.sleep(0.005)
    assert process.poll() is None, "the run ended before it could be interrupted"
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 130, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("clbench: interrupted during task ") and "rerun the same" in lines[0]
    (checkpoint,) = killed.glob("*/l2_prev/*/checkpoint.pt")
    assert json.loads((checkpoint.parent / "result.json").read_text())["status"] == "running"
    assert not (checkpoint.parent / ".lock").exists()

    resumed = subprocess.run(
        [*command, f"results_dir={killed}"], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    assert resumed.returncode == 0 and "resuming" in resumed.stdout, resumed.stderr
    return checkpoint


def test_progress_is_one_line_per_task_when_stderr_is_not_a_terminal(tmp_path):
    done = _clbench(["logger=none", "verbose=false", "stream=split_digits", f"results_dir={tmp_path}"], tmp_path)
    assert done.returncode == 0, done.stderr
    progress = [line for line in done.stderr.splitlines() if line.startswith("task ")]
    assert "\r" not in done.stderr
    assert [line.split(":")[0] for line in progress] == [f"task {t} of 5" for t in range(5)]
