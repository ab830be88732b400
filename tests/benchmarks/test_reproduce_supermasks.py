"""benchmarks/reproduce_supermasks.py: ``--table-only`` rebuilds the table from finished runs, running none."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture
def script(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    return importlib.import_module("reproduce_supermasks")


def write_result(results_dir: Path, label: str, run: str, status: str, acc: float) -> None:
    folder = results_dir / label.replace("|", "__") / "split_fashion_mnist" / "supsup" / run
    folder.mkdir(parents=True)
    result = {
        "status": status,
        "metrics": {"acc": acc, "bwt": 0.0, "forgetting": 0.0},
        "timings": {"total_s": 12.0},
        "started_at": "2026-11-30T11:40:13+00:00",
        "provenance": {"git": {"commit": "37d0837855cb", "dirty": False}},
    }
    (folder / "result.json").write_text(json.dumps(result))


def test_finished_result_takes_the_completed_run_beside_an_interrupted_one(script: ModuleType, tmp_path: Path) -> None:
    label = "supsup|split_fashion_mnist|0"
    assert script.finished_result(label, tmp_path) is None
    write_result(tmp_path, label, "seed0-a", "running", 10.0)
    assert script.finished_result(label, tmp_path) is None
    write_result(tmp_path, label, "seed0-b", "completed", 99.0)
    assert script.finished_result(label, tmp_path)["metrics"]["acc"] == 99.0


def test_table_only_writes_the_finished_runs_and_runs_nothing(tmp_path: Path) -> None:
    write_result(tmp_path, "supsup|split_fashion_mnist|0", "seed0-b", "completed", 99.0)
    output = tmp_path / "table.md"
    command = [sys.executable, str(BENCHMARKS / "reproduce_supermasks.py"), "--table-only"]
    done = subprocess.run(
        [*command, "--results-dir", str(tmp_path), "--output", str(output)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    text = output.read_text()
    assert "**Status: INCOMPLETE** (1 of 24 runs finished" in text
    assert "Runs made 2026-11-30 to 2026-11-30 by clbench commit 37d0837." in text
    assert "| supsup | split_fashion_mnist | 0 | 99.00 | 0.0 | 0.0 |" in text
    assert "- supsup|split_fashion_mnist|0: 12" in text
    assert "- wsn|split_fashion_mnist|0: failed" in text
    assert list((tmp_path / "logs").glob("*.log")) == []  # every run writes its log: none ran
