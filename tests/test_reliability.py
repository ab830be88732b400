"""Reliability: a run killed with SIGKILL resumes to the identical matrix; bad input gives one line."""

import json
import os
import signal
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


def test_sigkill_then_resume_gives_identical_matrix(tmp_path):
    killed_dir, clean_dir = tmp_path / "killed", tmp_path / "clean"
    command = [sys.executable, "-m", "clbench", *RUN]
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
    clean = subprocess.run(
        [*command, f"results_dir={clean_dir}"], env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert clean.returncode == 0, clean.stderr
    after = json.loads((checkpoint.parent / "result.json").read_text())
    reference = json.loads(next(clean_dir.glob("permuted_mnist5k/finetune/*/result.json")).read_text())
    assert after["status"] == "completed"
    assert after["acc_matrix"] == reference["acc_matrix"]


BAD_INPUTS = [
    (["strategy=nope"], "unknown strategy 'nope': known strategy configs are"),
    (["stream=nope"], "unknown stream 'nope': known stream configs are"),
    (["model=vgg"], "unknown model 'vgg': known model configs are"),
    (["stream=split_digits", "stream.num_tasks=6"], "lower stream.num_tasks or stream.classes_per_task"),
    (["trainer.lr=-0.1"], "trainer.lr must be positive"),
    (["trainer.optimizer=lion"], "unknown trainer.optimizer 'lion'"),
    (["stream=split_cifar100", "stream.root=/nonexistent"], "stream.download=true"),
    (["stream=split_digits", "stream.scenario=instance"], "unknown stream.scenario 'instance'"),
    (["stream=split_digits", "stream.val_fraction=1.5"], "stream.val_fraction must be in [0, 1)"),
    (["device=tpu"], "unknown device 'tpu'"),
    (["strategy=supsup", "stream=split_digits", "stream.scenario=class"], "pick a stream with stream.scenario=task"),
    (["strategy=supsup", "stream=split_digits", "strategy.density=1.5"], "strategy.density must be in (0, 1]"),
    (["stream=split_digits", "trainer.lr=1e30"], "training loss became nan in task 0"),
]
if not torch.cuda.is_available():
    BAD_INPUTS.append((["device=cuda"], "no CUDA device is available here: use device=cpu"))


@pytest.mark.parametrize(("overrides", "message"), BAD_INPUTS, ids=[" ".join(o) for o, _ in BAD_INPUTS])
def test_bad_input_is_one_clear_line(tmp_path, overrides, message):
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
