"""The report's control-set columns (clbench/control.py): shown when any run has a control set, absent otherwise."""

import json

import numpy as np
import pytest

from clbench import report
from tests.test_report import _matrix, _result, _row, _summary

CONTROL_CHANGE = {"finetune": [-12.0, -10.0, -14.0], "spu": [-1.0, -0.5, -1.5]}


@pytest.fixture
def control_results(tmp_path):
    for strategy, changes in CONTROL_CHANGE.items():
        for seed, change in enumerate(changes):
            path = _result(tmp_path, strategy, seed, _matrix(80.0 + seed))
            result = json.loads(path.read_text())
            result["metrics"].update(control_acc_final=90.0 + change, control_change=change)
            result.update(control_acc_before=90.0, control_acc=[95.0, 90.0 + change])
            path.write_text(json.dumps(result))
    _result(tmp_path, "lwf", 0, _matrix(81.0))  # a run without a control set
    return tmp_path


def test_control_change_is_summarised_per_group(control_results):
    table = _summary(control_results).table
    for strategy, changes in CONTROL_CHANGE.items():
        row = _row(table, strategy=strategy)
        assert row["control_change_mean"] == pytest.approx(np.mean(changes))
        assert row["control_change_sd"] == pytest.approx(np.std(changes, ddof=1))
        assert row["control_acc_final_mean"] == pytest.approx(90.0 + np.mean(changes))
    assert np.isnan(_row(table, strategy="lwf")["control_change_mean"])


def test_markdown_has_a_control_column_only_when_a_run_has_one(control_results, tmp_path, capsys):
    assert report.main([str(control_results), "--no-plots", "--format", "md"]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = lines[0].split(" | ")
    assert "Control change" in header and "Control acc" in header
    cell = header.index("Control change")
    assert next(line for line in lines if "| spu |" in line).split(" | ")[cell].startswith("-1.00 [")
    assert next(line for line in lines if "| lwf |" in line).split(" | ")[cell] == "–"

    plain = tmp_path / "plain"
    _result(plain, "finetune", 0, _matrix(80.0))
    assert report.main([str(plain), "--no-plots", "--format", "md"]) == 0
    assert "Control" not in capsys.readouterr().out.splitlines()[0]
