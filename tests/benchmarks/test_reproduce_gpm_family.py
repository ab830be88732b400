"""benchmarks/reproduce_gpm_family.py: the table reads CUBER's diagnostics in result.json's current form."""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from types import ModuleType

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture
def script(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # the script imports its sibling cuber_backward_transfer
    return importlib.import_module("reproduce_gpm_family")


def write_result(root: Path, strategy: str, seed: int, **extra: object) -> None:
    folder = root / "permuted_fashion_mnist" / strategy / f"seed{seed}"
    folder.mkdir(parents=True)
    result = {
        "status": "completed",
        "strategy": strategy,
        "seed": seed,
        "metrics": {"acc": 75.0, "bwt": -0.5},
        "timings": {"total_s": 10.0},
        "paths": {"result": str(folder / "result.json")},
        **extra,
    }
    (folder / "result.json").write_text(json.dumps(result))


# Three tasks, two projected layers, as CUBER's extra_results writes them: regimes decided at each task's start,
# free ranks per layer, and each regime-3 task's test accuracy before and after the task.
CUBER_REGIMES = [
    {"task": 0, "regimes": [[], []], "correlation": [[], []], "free_rank": [0, 0], "regime3_accuracy": []},
    {
        "task": 1,
        "regimes": [[3], [1]],
        "correlation": [[0.4], [None]],
        "free_rank": [4, 0],
        "regime3_accuracy": [{"task": 0, "before": 80.0, "after": 81.5, "change": 1.5}],
    },
    {
        "task": 2,
        "regimes": [[2, 3], [1, 1]],
        "correlation": [[-0.2, 0.3], [None, None]],
        "free_rank": [2, 0],
        "regime3_accuracy": [{"task": 1, "before": 70.0, "after": 69.5, "change": -0.5}],
    },
]
TRGP_ACC = [[80.0, 10.0, 10.0], [79.0, 70.0, 10.0], [78.0, 71.0, 60.0]]


def test_table_summarises_cuber_regimes_in_the_current_result_format(script: ModuleType, tmp_path: Path) -> None:
    write_result(tmp_path, "cuber", 0, cuber_regimes=CUBER_REGIMES)
    write_result(tmp_path, "trgp", 0, acc_matrix=TRGP_ACC)
    # a seed the table was not asked for must not enter the counts
    write_result(tmp_path, "cuber", 7, cuber_regimes=CUBER_REGIMES)
    text = script.write_table(tmp_path, tmp_path / "table.md", [0], ["python -m clbench ..."])

    # counted by hand from CUBER_REGIMES (seed 0 only): regime 1 in three (layer, old task) cells, 2 in one, 3 in two
    assert "regime 1 3, regime 2 1, regime 3 2" in text
    assert "mean over tasks 1.. and seeds: 3.0, 0.0" in text  # layer 0: (4 + 2) / 2
    assert "2 cases, mean +0.50, 1 positive" in text  # (1.5 - 0.5) / 2
    # the same (t, j) cells under TRGP: R[1][0] - R[0][0] = -1, R[2][1] - R[1][1] = +1
    assert "same seeds: 2 cases, mean +0.00, 1 positive" in text
    assert "entered regime 3" not in text  # the old start / end reading, which counted nothing
    assert (tmp_path / "table.md").read_text() == text


def test_table_without_cuber_runs_has_no_regime_section(script: ModuleType, tmp_path: Path) -> None:
    write_result(tmp_path, "gpm", 0)
    text = script.write_table(tmp_path, tmp_path / "table.md", [0], [])
    assert "| gpm | 1/1 | 75.00 (one seed, no sd) |" in text
    assert "cuber_regimes" not in text
