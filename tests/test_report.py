"""The comparison report: aggregation over seeds, problem files kept out of the table, formats, plots."""

import json
import statistics
from pathlib import Path

import pytest

from clbench import report


def _result(folder: Path, strategy: str, seed: int, acc: float, bwt: float, status: str = "completed", **extra) -> Path:
    run_dir = folder / "stream_a" / strategy / f"seed{seed}"
    run_dir.mkdir(parents=True)
    payload = {
        "status": status,
        "stream": "stream_a",
        "strategy": strategy,
        "scenario": "task",
        "seed": seed,
        "acc_matrix": [[acc, 10.0], [acc + bwt, acc]],
        "metrics": {"acc": acc, "bwt": bwt, "fwt": 1.0, "forgetting": -bwt},
        "config": {"model": {"_target_": "clbench.models.MLP"}, **extra.pop("config", {})},
        **extra,
    }
    if status != "completed":
        payload.pop("metrics")
    (run_dir / "result.json").write_text(json.dumps(payload))
    return run_dir / "result.json"


@pytest.fixture
def results(tmp_path):
    for seed, (acc, bwt) in enumerate([(80.0, -4.0), (84.0, -2.0), (88.0, -6.0)]):
        _result(tmp_path, "finetune", seed, acc, bwt)
    _result(tmp_path, "gpm", 0, 90.0, -1.0, config={"reference": "gpm_pmnist"})
    _result(tmp_path, "gpm", 1, 92.0, -0.5, config={"reference": "gpm_pmnist"})
    _result(tmp_path, "ewc", 0, 0.0, 0.0, status="failed", error="NonFiniteLossError: loss became nan")
    broken = tmp_path / "stream_a" / "lwf" / "seed0"
    broken.mkdir(parents=True)
    (broken / "result.json").write_text('{"status": "compl')
    return tmp_path


def test_mean_and_sample_sd_over_seeds(results):
    found = report.collect([results])
    table = report.summary_table(report.runs_frame(found.completed), published=report.published_table())
    finetune = table[table["strategy"] == "finetune"].iloc[0]
    assert finetune["n"] == 3
    assert finetune["ACC"] == f"{statistics.mean([80, 84, 88]):.2f} ± {statistics.stdev([80, 84, 88]):.2f}"
    assert finetune["BWT"] == f"{statistics.mean([-4, -2, -6]):.2f} ± {statistics.stdev([-4, -2, -6]):.2f}"
    gpm = table[table["strategy"] == "gpm"].iloc[0]
    assert gpm["ACC"] == "91.00 ± 1.41" and gpm["published ACC"] == "93.91" and gpm["published BWT"] == "-3.00"
    assert finetune["published ACC"] == ""


def test_failed_and_malformed_files_are_listed_not_tabled(results, capsys):
    found = report.collect([results])
    statuses = sorted(problem["status"] for problem in found.problems)
    assert statuses == ["failed", "unreadable"]
    assert report.main([str(results), "--no-plots"]) == 0
    out = capsys.readouterr().out
    assert "| stream_a | finetune | 3 |" in out
    assert "failed:" in out and "NonFiniteLossError" in out and "unreadable:" in out
    assert "| stream_a | ewc" not in out and "lwf |" not in out


@pytest.mark.parametrize(
    ("fmt", "marker"), [("latex", "\\begin{tabular}"), ("csv", "stream,strategy,n"), ("html", "<table")]
)
def test_formats(results, capsys, fmt, marker):
    assert report.main([str(results), "--no-plots", "--format", fmt]) == 0
    assert marker in capsys.readouterr().out


def test_by_and_metrics_choose_rows_and_columns(results, capsys):
    assert report.main([str(results), "--no-plots", "--by", "strategy", "--metrics", "acc"]) == 0
    header = capsys.readouterr().out.splitlines()[0]
    assert header.startswith("| strategy | n | ACC |") and "| BWT |" not in header and "FWT" not in header


def test_unknown_grouping_key_is_one_line_error(results, capsys):
    assert report.main([str(results), "--no-plots", "--by", "colour"]) == 2
    assert "--by colour" in capsys.readouterr().err


def test_plots_are_written(results, tmp_path):
    assert report.main([str(results), "--plots", str(tmp_path / "plots")]) == 0
    for name in ("acc_matrices.png", "acc_over_tasks.png", "bwt_vs_fwt.png"):
        assert (tmp_path / "plots" / name).stat().st_size > 1000


def test_report_logs_its_table_to_wandb_offline(results, tmp_path):
    assert report.main([str(results), "--plots", str(tmp_path / "plots"), "--wandb", "offline"]) == 0
    tables = list((tmp_path / "plots" / "wandb").rglob("summary_*.table.json"))
    assert tables, "the report's table was not logged"
    logged = json.loads(tables[0].read_text())
    assert "ACC" in logged["columns"] and len(logged["data"]) == 2


def test_l2m_columns_on_request(results, capsys):
    run = next(results.glob("stream_a/gpm/seed0/result.json"))
    payload = json.loads(run.read_text())
    payload["metrics"]["l2m_performance_maintenance"] = -1.5
    run.write_text(json.dumps(payload))
    assert report.main([str(results), "--no-plots"]) == 0
    assert "l2m_" not in capsys.readouterr().out.splitlines()[0]
    assert report.main([str(results), "--no-plots", "--l2m"]) == 0
    header = capsys.readouterr().out.splitlines()[0]
    assert "| Forgetting | l2m_performance_maintenance |" in header and "| ACC |" in header


def test_ibcl_runs_get_a_pareto_front_plot(results, tmp_path):
    final = [[95.0, 60.0, 80.0], [70.0, 90.0, 85.0], [65.0, 55.0, 70.0], [90.0, 70.0, 60.0]]
    _result(
        results,
        "ibcl",
        0,
        85.0,
        1.0,
        run_id="seed0-abc",
        tasks=[{"name": f"t{k}"} for k in range(3)],
        ibcl={
            "preferences": [[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4], [0.5, 0.4, 0.1]],
            "pareto_front": {"final_acc": final, "non_dominated": [True, True, False, True], "indices": [0, 1, 3]},
        },
    )
    assert report.main([str(results), "--plots", str(tmp_path / "plots")]) == 0
    written = list((tmp_path / "plots").glob("ibcl_pareto_*.png"))
    assert [p.name for p in written] == ["ibcl_pareto_stream_a_seed0-abc.png"]
    assert written[0].stat().st_size > 10_000
    # runs of other strategies get no Pareto plot
    assert report.write_pareto_plots([{"stream": "s", "metrics": {}}], tmp_path / "none") == []
