"""The comparison report: grouping by identity, duplicate seeds, intervals and tests against scipy, post-hoc
intransigence, machine-readable output, failed jobs, formats and plots."""

import io
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats as scipy_stats

from clbench import metrics, report

FINETUNE_ACC = [80.0, 84.0, 88.0]
GPM_ACC = [90.0, 93.0, 94.0]


def _matrix(acc: float, bwt: float = -4.0) -> list[list[float]]:
    """A 2-task R whose ACC is ``acc`` and BWT ``bwt``."""
    first = acc + 0.5 * (acc - (acc + bwt))
    return [[first - bwt, 10.0], [first, 2 * acc - first]]


def _result(
    folder: Path,
    strategy: str,
    seed: int,
    acc_matrix: list[list[float]] | None = None,
    *,
    scenario: str = "task",
    epochs: int = 1,
    status: str = "completed",
    protocol: str | None = None,
    run: str | None = None,
    source: str = "abc",
    finished: str = "2026-01-01T00:00:00",
    **extra,
) -> Path:
    matrix = acc_matrix or _matrix(80.0)
    run_dir = folder / "stream_a" / strategy / (run or f"seed{seed}-{scenario}-e{epochs}")
    run_dir.mkdir(parents=True, exist_ok=True)
    config = {
        "stream": {
            "name": "stream_a",
            "scenario": scenario,
            "num_tasks": len(matrix),
            "seed": seed,
            "root": str(folder),
        },
        "model": {"_target_": "clbench.models.MLP", "hidden": [100, 100]},
        "trainer": {"epochs": epochs, "lr": 0.1, "progress": False},
        "strategy": {"_target_": f"strategies.{strategy}.Cls"},
        "seed": seed,
        "protocol_name": protocol,
    }
    payload = {
        "status": status,
        "stream": "stream_a",
        "strategy": strategy,
        "scenario": scenario,
        "seed": seed,
        "protocol": protocol,
        "acc_matrix": matrix,
        "random_init_acc": [10.0] * len(matrix),
        "metrics": metrics.summarize(matrix, [10.0] * len(matrix)),
        "joint_reference_acc": None,
        "config": config,
        "provenance": {"strategy_source": {"digest": source}},
        "timings": {"fit_s": [1.0, 2.0], "eval_s": [0.5, 0.5], "random_init_eval_s": 0.25},
        "cost": {"train_flops": 2.0e9, "peak_memory_bytes": 3 * 2**20, "kept_bytes": 4096},
        "finished_at": finished,
        **extra,
    }
    if status != "completed":
        payload.pop("metrics")
        payload["error"] = "NonFiniteLossError: loss became nan"
    (run_dir / "result.json").write_text(json.dumps(payload))
    return run_dir / "result.json"


@pytest.fixture
def results(tmp_path):
    for seed, acc in enumerate(FINETUNE_ACC):
        _result(tmp_path, "finetune", seed, _matrix(acc))
    for seed, acc in enumerate(GPM_ACC):
        _result(tmp_path, "gpm", seed, _matrix(acc, bwt=-1.0))
    return tmp_path


def _summary(folder: Path, **options) -> report.Report:
    found = report.collect([folder])
    runs = [report.to_run(r) for r in found.completed]
    report.add_reference_metrics(runs)
    return report.summarize(runs, report.Options(**options))


def _row(table: pd.DataFrame, **where) -> pd.Series:
    mask = np.ones(len(table), dtype=bool)
    for key, value in where.items():
        mask &= table[key] == value
    assert mask.sum() == 1, f"{mask.sum()} rows match {where}"
    return table[mask].iloc[0]


def test_mixed_scenarios_and_epochs_never_share_a_row(results):
    for seed, acc in enumerate([50.0, 52.0]):
        _result(results, "finetune", seed, _matrix(acc), scenario="class")
        _result(results, "finetune", seed, _matrix(acc + 10), epochs=3)
    table = _summary(results).table
    assert len(table) == 4  # finetune task/1 epoch, task/3 epochs, class/1 epoch, and gpm
    assert "trainer.epochs" in table.columns and "scenario" in table.columns
    assert _row(table, strategy="finetune", scenario="task", **{"trainer.epochs": 1})["n"] == 3
    assert _row(table, strategy="finetune", scenario="class")["acc_mean"] == pytest.approx(51.0)
    assert _row(table, strategy="finetune", **{"trainer.epochs": 3})["acc_mean"] == pytest.approx(61.0)
    # --ignore pools over a key on purpose
    pooled = _summary(results, ignore=["trainer.epochs"]).table
    assert _row(pooled, strategy="finetune", scenario="task")["n"] == 5
    assert "trainer.epochs" not in pooled.columns


def test_a_seed_run_twice_counts_once_the_newest(results, capsys):
    _result(results, "finetune", 0, _matrix(99.0), run="seed0-again", finished="2026-02-01T00:00:00")
    summary = _summary(results)
    finetune = _row(summary.table, strategy="finetune")
    assert finetune["n"] == 3 and finetune["acc_mean"] == pytest.approx(np.mean([99.0, 84.0, 88.0]))
    assert any("seed 0" in note and "counted once" in note and "seed0-again" in note for note in summary.notes)
    assert report.main([str(results), "--no-plots"]) == 0
    assert "counted once" in capsys.readouterr().err


def test_by_any_dotted_key_and_unknown_keys(results, capsys):
    _result(results, "finetune", 0, _matrix(70.0), epochs=3)
    assert report.main([str(results), "--no-plots", "--by", "trainer.epochs,strategy", "--format", "csv"]) == 0
    table = pd.read_csv(io.StringIO(capsys.readouterr().out))
    assert list(table.columns[:2]) == ["trainer.epochs", "strategy"] and len(table) == 3
    assert report.main([str(results), "--no-plots", "--by", "colour"]) == 2
    assert "colour is not a config key" in capsys.readouterr().err


def test_intervals_and_tests_match_scipy(results):
    table = _summary(results, baseline="finetune").table
    finetune, gpm = _row(table, strategy="finetune"), _row(table, strategy="gpm")
    low, high = scipy_stats.t.interval(
        0.95, 2, loc=np.mean(FINETUNE_ACC), scale=np.std(FINETUNE_ACC, ddof=1) / math.sqrt(3)
    )
    assert finetune["acc_ci_low"] == pytest.approx(low) and finetune["acc_ci_high"] == pytest.approx(high)
    assert finetune["acc_n"] == 3 and finetune["acc_sd"] == pytest.approx(4.0)
    assert gpm["acc_diff_vs_baseline"] == pytest.approx(np.mean(np.subtract(GPM_ACC, FINETUNE_ACC)))
    assert gpm["acc_p_t"] == pytest.approx(scipy_stats.ttest_rel(GPM_ACC, FINETUNE_ACC).pvalue)
    assert gpm["acc_p_wilcoxon"] == pytest.approx(scipy_stats.wilcoxon(np.subtract(GPM_ACC, FINETUNE_ACC)).pvalue)
    assert gpm["acc_p_permutation"] == pytest.approx(0.25)  # 3 positive differences: 2 of 8 sign flips
    assert gpm["acc_p_holm"] == pytest.approx(gpm["acc_p_t"])  # one comparison: Holm leaves it
    assert gpm["acc_significant"] == float(gpm["acc_p_t"] < 0.05)
    assert gpm["acc_rank_mean"] == 1.0 and finetune["acc_rank_mean"] == 2.0
    assert math.isnan(finetune.get("acc_p_t", math.nan))  # the baseline is not tested against itself


def test_holm_runs_across_the_table(results):
    for seed, acc in enumerate([82.0, 83.0, 91.0]):
        _result(results, "ewc", seed, _matrix(acc))
    table = _summary(results, baseline="finetune").table
    raw = [_row(table, strategy=s)["acc_p_t"] for s in ("ewc", "gpm")]
    expected = report.stats.holm(raw)
    assert [_row(table, strategy=s)["acc_p_holm"] for s in ("ewc", "gpm")] == pytest.approx(expected)


def test_bootstrap_interval_on_request(results):
    finetune = _row(_summary(results, ci="bootstrap").table, strategy="finetune")
    expected = report.stats.mean_interval(FINETUNE_ACC, method="bootstrap")
    assert finetune["acc_ci_low"] == pytest.approx(expected.low)
    assert finetune["acc_ci_high"] == pytest.approx(expected.high)


@pytest.mark.parametrize("fmt", ["csv", "json"])
def test_machine_readable_output_has_numeric_columns(results, capsys, fmt):
    _result(results, "ewc", 0, status="failed")
    assert report.main([str(results), "--no-plots", "--baseline", "finetune", "--format", fmt]) == 0
    captured = capsys.readouterr()
    table = pd.read_csv(io.StringIO(captured.out)) if fmt == "csv" else pd.read_json(io.StringIO(captured.out))
    for column in ("acc_mean", "acc_ci_low", "acc_ci_high", "acc_n", "acc_p_vs_baseline", "acc_p_holm", "train_flops"):
        assert pd.api.types.is_numeric_dtype(table[column]), column
    assert set(table["strategy"]) == {"finetune", "gpm"}
    assert "failed:" in captured.err and "failed" not in captured.out  # notes and problems go to stderr


def test_failed_missing_and_skipped_sweep_jobs_are_listed(results, capsys):
    _result(results, "lwf", 0, status="failed")
    sweep = results / "_hydra" / "sweeps" / "2026-01-01_00-00-00"
    sweep.mkdir(parents=True)
    jobs = [
        {"job_num": 0, "overrides": ["strategy=finetune"], "status": "completed", "result": str(results / "gone.json")},
        # recorded relative to the folder the sweep ran in: found under the results folder holding the sweep
        {"job_num": 4, "status": "completed", "result": "elsewhere/stream_a/finetune/seed0-task-e1/result.json"},
        {"job_num": 1, "overrides": ["strategy=ewc"], "status": "failed", "error": "ValueError: lambda"},
        {"job_num": 2, "job_dir": str(sweep / "2"), "status": "missing"},
        {"job_num": 3, "overrides": ["strategy=joint"], "status": "skipped", "reason": "scenario class"},
    ]
    (sweep / "index.json").write_text(json.dumps({"jobs": jobs}))
    found = report.collect([results])
    statuses = sorted(p["status"] for p in found.problems)
    assert statuses == ["failed", "failed", "missing", "missing", "skipped"]
    assert len(found.unsuccessful()) == 4
    assert report.main([str(results), "--no-plots"]) == 0
    out = capsys.readouterr().out
    assert "strategy=ewc" in out and "ValueError: lambda" in out and "skipped" in out and "gone.json" in out
    assert report.main([str(results), "--no-plots", "--strict"]) == 1


def test_a_folder_that_does_not_exist_is_an_error(tmp_path, capsys):
    assert report.main([str(tmp_path / "nowhere"), "--no-plots"]) == 2
    err = capsys.readouterr().err
    assert "no such folder" in err and len(err.strip().splitlines()) == 1


def test_intransigence_is_computed_post_hoc_from_a_joint_run(results):
    joint = [[95.0, 10.0], [93.0, 97.0]]
    expert = [[96.0, 10.0], [96.0, 98.0]]
    for seed in range(3):  # written after the others: at run time no reference existed
        _result(results, "joint", seed, joint)
        _result(results, "independent", seed, expert, train_acc_curves=[[[50.0, 90.0]], [[60.0, 95.0]]])
    table = _summary(results).table
    finetune = _row(table, strategy="finetune")
    expected = np.mean([metrics.intransigence(_matrix(acc), [95.0, 97.0]) for acc in FINETUNE_ACC])
    assert finetune["intransigence_mean"] == pytest.approx(expected)
    single = np.mean([metrics.intransigence(_matrix(acc), [96.0, 98.0]) for acc in FINETUNE_ACC])
    assert finetune["intransigence_single_task_mean"] == pytest.approx(single)
    assert _row(table, strategy="joint")["intransigence_mean"] == 0.0


def test_an_old_single_task_intransigence_is_relabelled(tmp_path):
    path = _result(tmp_path, "finetune", 0)
    old = json.loads(path.read_text())
    old.pop("joint_reference_acc")
    old["metrics"]["intransigence"] = 3.0
    path.write_text(json.dumps(old))
    table = _summary(tmp_path).table
    assert table.loc[0, "intransigence_single_task_mean"] == 3.0 and "intransigence_mean" not in table


def test_mixed_code_versions_are_flagged(results, capsys):
    _result(results, "gpm", 3, _matrix(91.0), source="other")
    summary = _summary(results)
    assert _row(summary.table, strategy="gpm")["code_versions"] == 2
    assert any("mixes 2 versions" in note for note in summary.notes)
    assert report.main([str(results), "--no-plots"]) == 0
    assert "| 4† |" in capsys.readouterr().out


def test_markdown_leaderboard_has_intervals_marks_and_cost(results, capsys):
    assert report.main([str(results), "--no-plots", "--baseline", "finetune", "--format", "md"]) == 0
    out = capsys.readouterr().out
    header = out.splitlines()[0]
    for column in ("| n |", "| ACC |", "Δ ACC vs finetune", "p (Holm, t)", "rank", "train FLOPs", "peak memory"):
        assert column in header, column
    gpm_line = next(line for line in out.splitlines() if "| gpm |" in line)
    p = scipy_stats.ttest_rel(GPM_ACC, FINETUNE_ACC).pvalue
    assert f"{np.mean(GPM_ACC):.2f} [" in gpm_line and f"{p:.3g}" in gpm_line
    assert ("+8.33*" in gpm_line) == (p < 0.05)
    assert "2 GFLOP" in gpm_line and "3 MiB" in gpm_line and "4 KiB" in gpm_line and "3.0 s" in gpm_line
    assert "Holm-corrected" in out and "Student-t" in out


def test_permutation_test_with_three_seeds_says_it_cannot_be_significant(results, capsys):
    assert report.main([str(results), "--no-plots", "--baseline", "finetune", "--test", "permutation"]) == 0
    assert "cannot go below p = 0.25" in capsys.readouterr().err


def test_published_numbers_by_protocol_and_strategy(tmp_path):
    for seed in range(2):
        _result(tmp_path, "gpm", seed, _matrix(90.0 + seed), protocol="gpm_pmnist")
    table = report.add_published(_summary(tmp_path).table, report.published_table())
    assert table.loc[0, "published_acc"] == 93.91 and table.loc[0, "published_bwt"] == -3.0


@pytest.mark.parametrize(("fmt", "marker"), [("latex", "\\begin{tabular}"), ("html", "<table")])
def test_other_formats(results, capsys, fmt, marker):
    assert report.main([str(results), "--no-plots", "--format", fmt]) == 0
    assert marker in capsys.readouterr().out


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
    run = next(results.glob("stream_a/gpm/seed0*/result.json"))
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
    assert report.write_pareto_plots([{"stream": "s", "metrics": {}}], tmp_path / "none") == []


def test_runs_frame_has_one_row_per_run_for_scripts(results):
    frame = report.runs_frame(report.collect([results]).completed)
    assert len(frame) == 6 and {"strategy", "seed", "acc", "bwt", "stream.order_seed"} <= set(frame.columns)
    assert sorted(frame[frame["strategy"] == "gpm"]["acc"]) == GPM_ACC


def test_an_unknown_compared_metric_is_one_line_error(results, capsys):
    assert report.main([str(results), "--no-plots", "--baseline", "finetune", "--compare", "accuracy"]) == 2
    err = capsys.readouterr().err
    assert "--compare accuracy" in err and len(err.strip().splitlines()) == 1


def test_matrix_taw_reads_class_runs_with_the_task_given(tmp_path, capsys):
    """The runner stores a task-aware R beside the task-agnostic one in the class scenario; --matrix taw reports
    it, and runs of other scenarios keep their one matrix."""
    for seed in range(2):
        tag, taw = _matrix(40.0 + seed), _matrix(90.0 + seed)
        taw_metrics = metrics.summarize(taw, [50.0, 50.0])
        _result(tmp_path, "finetune", seed, tag, scenario="class", acc_matrix_taw=taw, metrics_taw=taw_metrics)
        _result(tmp_path, "finetune", seed, _matrix(70.0), scenario="task")
    read = {}
    for matrix in ("tag", "taw"):
        assert report.main([str(tmp_path), "--no-plots", "--format", "csv", "--matrix", matrix]) == 0
        table = pd.read_csv(io.StringIO(capsys.readouterr().out))
        read[matrix] = dict(zip(table["scenario"], table["acc_mean"], strict=True))
    assert read["tag"]["class"] == pytest.approx(40.5) and read["taw"]["class"] == pytest.approx(90.5)
    assert read["tag"]["task"] == read["taw"]["task"] == pytest.approx(70.0)


def test_a_model_key_set_by_a_strategys_settings_still_pairs_with_the_baseline(tmp_path, capsys):
    """SupSup's settings on the default protocol run the MLP without biases (conf/settings/default/supsup.yaml):
    it stays comparable with fine-tune on that protocol (Δ and rank were blank), but not on a protocol that
    has no such setting."""
    for protocol in ("default", "no_such_protocol"):
        folder = tmp_path / protocol
        for seed, acc in enumerate(FINETUNE_ACC):
            _result(folder, "finetune", seed, _matrix(acc), protocol=protocol)
        for seed, acc in enumerate(GPM_ACC):
            path = _result(folder, "supsup", seed, _matrix(acc), protocol=protocol)
            payload = json.loads(path.read_text())
            payload["config"]["model"]["bias"] = False
            path.write_text(json.dumps(payload))
        assert report.main([str(folder), "--no-plots", "--format", "csv", "--baseline", "finetune"]) == 0
        table = pd.read_csv(io.StringIO(capsys.readouterr().out))
        supsup = table[table["strategy"] == "supsup"].iloc[0]
        if protocol == "default":
            assert supsup["acc_diff_vs_baseline"] == pytest.approx(np.mean(GPM_ACC) - np.mean(FINETUNE_ACC))
        else:  # no comparable baseline: no difference at all
            assert math.isnan(supsup.get("acc_diff_vs_baseline", math.nan))


def test_a_job_repaired_by_a_relaunch_is_not_listed(results):
    """Relaunching a sweep resumes its failed jobs; the first sweep's failure then no longer counts (the default
    leaderboard's first sweep listed 9 Avalanche failures that the relaunch had completed)."""
    done = _result(results, "ewc", 0)
    for name, status in (("2026-01-01_00-00-00", "failed"), ("2026-01-02_00-00-00", "completed")):
        sweep = results / "_hydra" / "sweeps" / name
        sweep.mkdir(parents=True)
        job = {"job_num": 0, "overrides": ["strategy=ewc", "seed=0"], "status": status, "error": "boom"}
        if status == "completed":
            job["result"] = str(done)
        skipped = {"job_num": 1, "overrides": ["strategy=gpm", "seed=0"], "status": "skipped", "reason": "class"}
        (sweep / "index.json").write_text(json.dumps({"jobs": [job, skipped]}))
    found = report.collect([results])
    assert [p["status"] for p in found.problems] == ["skipped"]  # listed once, not once per sweep
    assert not found.unsuccessful()


def _never_hashed(*args):
    raise AssertionError("the report hashed a checkpoint file")


def test_runs_before_and_after_new_weights_saved_into_one_checkpoint_file_are_two_groups(
    run_tiny, tmp_path, monkeypatch
):
    """The same command run, new weights saved into its model.checkpoint file, and run again: two experiments (two
    run ids), which the report put in one group by the file's path (one seed "run more than once", the first
    run's result dropped). Each run records what the file held; the report groups by that and reads no file."""
    import torch

    from clbench import results
    from clbench.models import MLP

    body, results_dir = tmp_path / "mlp.pt", tmp_path / "results"
    overrides = ["stream.num_tasks=2", "stream.train_per_task=256", "plots=false", f"model.checkpoint={body}"]
    runs, identities = [], []
    for weights_seed in (1, 2):
        torch.manual_seed(weights_seed)
        torch.save(MLP((1, 28, 28), [10], hidden=[100, 100]).state_dict(), body)
        runs.append(run_tiny(overrides, results_dir))
        identities.append(results.checkpoint_identity(str(body)))  # what the file held while it ran
    assert [run["status"] for run in runs] == ["completed"] * 2 and identities[0] != identities[1]
    monkeypatch.setattr(results, "_sha256", _never_hashed)  # the file may hold other weights by now
    monkeypatch.setattr(results, "_cached_sha256", _never_hashed)
    summary = _summary(results_dir)
    assert len(summary.table) == 2 and list(summary.table["n"]) == [1, 1]
    assert not any("counted once" in note for note in summary.notes)
    assert sorted(summary.table["model.checkpoint"]) == sorted(identities)  # the column that tells them apart
    for run, identity in zip(runs, identities, strict=True):
        assert run["config"]["model"]["checkpoint"] == str(body) and run["model_checkpoint_identity"] == identity


def test_results_without_a_recorded_checkpoint_identity_group_by_its_path(tmp_path, monkeypatch):
    """Results written before runs recorded the identity: grouped by the checkpoint's path as before (never by
    hashing the file now), a pretraining cache file by its pretrain:<hash> (its run id's), so seeds run before and
    after still form one group."""
    from clbench import results

    monkeypatch.setattr(results, "_sha256", _never_hashed)
    monkeypatch.setattr(results, "_cached_sha256", _never_hashed)

    def with_checkpoint(path: Path, checkpoint: str, recorded: str | None = None) -> None:
        payload = json.loads(path.read_text())
        payload["config"]["model"]["checkpoint"] = checkpoint
        if recorded is not None:
            payload["model_checkpoint_identity"] = recorded
        path.write_text(json.dumps(payload))

    for seed, checkpoint in enumerate(["/gone/body.pt", "/gone/body.pt", "/gone/other.pt"]):
        with_checkpoint(_result(tmp_path / "user", "finetune", seed), checkpoint)
    table = _summary(tmp_path / "user").table
    assert sorted(table["n"]) == [1, 2] and set(table["model.checkpoint"]) == {"/gone/body.pt", "/gone/other.pt"}

    cache = "results/{}/_pretrained/ab12cd34/checkpoint.pt"
    for seed in (0, 1):  # recorded nothing
        with_checkpoint(_result(tmp_path / "pretrained", "finetune", seed), cache.format("old"))
    with_checkpoint(_result(tmp_path / "pretrained", "finetune", 2), cache.format("new"), "pretrain:ab12cd34")
    (row,) = _summary(tmp_path / "pretrained").table.to_dict("records")
    assert row["n"] == 3
