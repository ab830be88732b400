"""The real entry point, as a user types it (subprocesses, tiny settings)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
QUIET = ["logger=none", "trainer.progress=false", "trainer.epochs=1"]


def clbench(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "clbench", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def test_split_digits_run_prints_matrix_and_writes_result(tmp_path):
    done = clbench("strategy=finetune", "stream=split_digits", f"results_dir={tmp_path}", *QUIET, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "acc_matrix (%)" in done.stdout and "ACC " in done.stdout and "BWT " in done.stdout
    results = list(tmp_path.glob("split_digits/finetune/*/result.json"))
    assert len(results) == 1 and json.loads(results[0].read_text())["status"] == "completed"


def test_permuted_fashion_mnist_three_tasks(run_tiny, tmp_path):
    """Debian's full Fashion-MNIST, run in-process (the test above runs the entry point end to end)."""
    run_tiny(["stream=permuted_fashion_mnist", "stream.num_tasks=3", "stream.train_per_task=3000"], tmp_path)
    result = json.loads(next(tmp_path.glob("permuted_fashion_mnist/finetune/*/result.json")).read_text())
    assert len(result["acc_matrix"]) == 3 and result["metrics"]["acc"] > 30


def test_default_config_composes():
    done = clbench("--cfg", "job", cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert "permuted_mnist5k" in done.stdout and "_target_: strategies.finetune.Finetune" in done.stdout


def test_unknown_strategy_lists_the_known_ones(tmp_path, monkeypatch, capsys):
    """main() in-process: group names are checked before Hydra starts (tests/test_reliability.py runs the same
    path through a fresh ``python -m clbench``)."""
    import clbench.__main__ as cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["clbench", "strategy=nope", f"results_dir={tmp_path}"])
    with pytest.raises(SystemExit) as exited:
        cli.main()
    stderr = capsys.readouterr().err
    assert exited.value.code != 0
    assert "unknown strategy 'nope': known strategy configs are" in stderr and "finetune" in stderr


def test_missing_dataset_names_path_and_switch(tmp_path):
    done = clbench(
        "stream=split_cifar100", f"stream.root={tmp_path}/nodata", f"results_dir={tmp_path}", *QUIET, cwd=tmp_path
    )
    assert done.returncode != 0
    assert "cifar-100-python" in done.stderr and "stream.download=true" in done.stderr


def test_main_freezes_the_heap_after_a_finished_run_only(monkeypatch):
    """The exit's last garbage collection is skipped (gc.freeze) once the run is done, not before it and not
    when it fails (a failure leaves through sys.exit)."""
    import gc

    import clbench.__main__ as cli

    calls: list[str] = []
    monkeypatch.setattr(sys, "argv", ["clbench"])
    monkeypatch.setattr(gc, "freeze", lambda: calls.append("freeze"))
    monkeypatch.setattr(cli, "_hydra_main", lambda: calls.append("run"))
    cli.main()
    assert calls == ["run", "freeze"]

    def failing() -> None:
        calls.append("failed run")
        sys.exit(1)

    monkeypatch.setattr(cli, "_hydra_main", failing)
    with pytest.raises(SystemExit):
        cli.main()
    assert calls == ["run", "freeze", "failed run"]
