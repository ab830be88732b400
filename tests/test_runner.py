"""End-to-end runs of the real runner on composed configs (the configs a user gets)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from clbench.runner import ConfigError, select_device
from clbench.strategy import UnsupportedScenarioError


def test_result_file_is_self_describing(run_tiny, tmp_path):
    result = run_tiny(["stream=split_digits", "strategy=finetune"])
    path = Path(result["paths"]["result"])
    assert path == tmp_path / "results" / "split_digits" / "finetune" / result["run_id"] / "result.json"
    saved = json.loads(path.read_text())
    assert saved["status"] == "completed" and saved["units"] == "percent"
    assert np.array(saved["acc_matrix"]).shape == (5, 5)
    assert len(saved["random_init_acc"]) == 5
    assert set(saved["metrics"]) >= {"acc", "bwt", "fwt", "forgetting"}
    assert saved["config"]["stream"]["name"] == "split_digits"
    assert saved["config"]["trainer"]["epochs"] == 1
    assert len(saved["timings"]["fit_s"]) == 5 and saved["versions"]["torch"]
    timings = saved["timings"]
    assert timings["random_init_eval_s"] > 0  # the random-init row is evaluation time too, reported apart
    assert sum(timings["fit_s"]) + sum(timings["eval_s"]) + timings["random_init_eval_s"] < timings["total_s"]
    assert len(saved["learning_curves"]) == 5 and len(saved["learning_curves"][0][0]) == 1
    assert (path.parent / "acc_matrix.png").stat().st_size > 0
    assert (path.parent / "checkpoint.pt").exists()
    assert saved["metrics"]["acc"] == pytest.approx(np.mean(saved["acc_matrix"][-1]))


def test_plots_false_writes_no_figure_and_keeps_the_run_id(run_tiny, tmp_path):
    drawn = run_tiny(["stream=split_digits"], tmp_path / "a")
    bare = run_tiny(["stream=split_digits", "plots=false"], tmp_path / "b")
    assert bare["run_id"] == drawn["run_id"]  # a cosmetic switch is not part of the experiment's identity
    folder = Path(bare["paths"]["result"]).parent
    assert "heatmap" not in bare["paths"] and not list(folder.glob("*.png"))
    assert bare["acc_matrix"] == drawn["acc_matrix"] and bare["metrics"] == drawn["metrics"]


def test_finetune_forgets_on_permuted_mnist5k(run_tiny):
    result = run_tiny(["strategy=finetune", "trainer.epochs=3"])
    assert result["metrics"]["bwt"] < -1.0
    assert result["metrics"]["forgetting"] > 1.0


def test_independent_has_exactly_zero_transfer_and_gives_intransigence(run_tiny, tmp_path):
    results = tmp_path / "shared"
    independent = run_tiny(["strategy=independent", "trainer.epochs=3"], results)
    assert independent["metrics"]["bwt"] == 0.0
    assert independent["metrics"]["fwt"] == 0.0
    assert independent["metrics"]["forgetting"] == 0.0
    assert independent["metrics"]["intransigence_single_task"] == 0.0
    finetune = run_tiny(["strategy=finetune", "trainer.epochs=3"], results)
    diagonal = np.diag(np.array(independent["acc_matrix"]))
    expected = float(np.mean(diagonal - np.diag(np.array(finetune["acc_matrix"]))))
    assert finetune["metrics"]["intransigence_single_task"] == pytest.approx(expected)
    # Chaudhry et al.'s intransigence needs the joint reference (a*_k = R_joint[k][k]), not run yet here
    assert "intransigence" not in finetune["metrics"]
    joint = run_tiny(["strategy=joint"], results)  # the reference matches on stream and seed, 1 epoch is enough
    assert joint["metrics"]["intransigence"] == 0.0
    later = run_tiny(["strategy=finetune"], results)
    joint_diagonal = np.diag(np.array(joint["acc_matrix"]))
    assert later["metrics"]["intransigence"] == pytest.approx(
        float(np.mean(joint_diagonal - np.diag(np.array(later["acc_matrix"]))))
    )
    other_seed = run_tiny(["strategy=finetune", "seed=1", "trainer.epochs=3"], results)
    assert "intransigence_single_task" not in other_seed["metrics"] and "intransigence" not in other_seed["metrics"]
    # another network (no biases, as SupSup's) is not compared against these references: the report would not
    # either, so the figure would depend on which runs finished first
    other_model = run_tiny(["strategy=finetune", "model.bias=false"], results)
    assert "intransigence_single_task" not in other_model["metrics"] and "intransigence" not in other_model["metrics"]
    # L2M: expert-relative metrics only with the expert's run; transfer ones always
    assert {"l2m_relative_performance", "l2m_sample_efficiency", "l2m_relative_final_performance"} <= set(
        finetune["metrics"]
    )
    assert "l2m_relative_performance" not in other_seed["metrics"]
    assert "l2m_backward_transfer_contrast" in other_seed["metrics"]
    assert independent["metrics"]["l2m_relative_performance"] == pytest.approx(1.0)
    curves = finetune["train_acc_curves"]
    assert len(curves) == 5 and all(0.0 <= acc <= 100.0 for task in curves for fit in task for acc in fit)


def test_joint_beats_finetune(run_tiny):
    finetune = run_tiny(["strategy=finetune", "trainer.epochs=3"])
    joint = run_tiny(["strategy=joint", "trainer.epochs=3"])
    assert joint["metrics"]["acc"] > finetune["metrics"]["acc"] + 2.0


def test_joint_in_task_scenario_trains_every_seen_head(run_tiny):
    result = run_tiny(["stream=split_digits", "strategy=joint", "trainer.epochs=3"])
    final = np.array(result["acc_matrix"])[-1]
    assert (final > 80).all()


@pytest.mark.parametrize("scenario", ["task", "domain", "class"])
def test_every_scenario_runs(run_tiny, scenario):
    result = run_tiny(["stream=split_digits", f"stream.scenario={scenario}"])
    assert result["status"] == "completed" and result["scenario"] == scenario


def test_rotated_and_synthetic_streams_run(run_tiny):
    assert (
        run_tiny(
            [
                "stream=synthetic",
                "model=alexnet",
                "stream.dataset.shape=[3,32,32]",
                "stream.num_tasks=2",
                "stream.dataset.train_per_class=8",
                "stream.dataset.test_per_class=4",
            ]
        )["status"]
        == "completed"
    )
    rotated = run_tiny(
        [
            "stream=rotated_mnist",
            "stream.dataset._target_=clbench.data.load_mnist5k",
            "~stream.dataset.root",
            "~stream.dataset.download",
            "stream.num_tasks=3",
        ]
    )
    assert rotated["status"] == "completed" and len(rotated["acc_matrix"]) == 3


def test_same_seed_same_matrix(run_tiny, tmp_path):
    first = run_tiny(["stream=split_digits", "resume=false"], tmp_path / "a")
    second = run_tiny(["stream=split_digits", "resume=false"], tmp_path / "b")
    assert first["acc_matrix"] == second["acc_matrix"]
    assert first["run_id"] == second["run_id"]


def test_completed_run_is_not_repeated(run_tiny, tmp_path, capsys):
    first = run_tiny(["stream=split_digits"], tmp_path / "r")
    second = run_tiny(["stream=split_digits"], tmp_path / "r")
    assert second["finished_at"] == first["finished_at"]
    assert "already completed" in capsys.readouterr().out


@pytest.mark.parametrize("scenario", ["task", "class"])
def test_resume_from_checkpoint_gives_identical_matrix(run_tiny, tmp_path, monkeypatch, scenario):
    overrides = ["stream=split_digits", "deterministic=true", f"stream.scenario={scenario}"]
    full = run_tiny(overrides, tmp_path / "full")

    from strategies.finetune import Finetune

    original = Finetune.fit_task

    def crash_on_task_3(self, task, trainer):
        if task.id == 3:
            raise RuntimeError("simulated crash")
        original(self, task, trainer)

    monkeypatch.setattr(Finetune, "fit_task", crash_on_task_3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_tiny(overrides, tmp_path / "resumed")
    run_dir = next((tmp_path / "resumed").glob("split_digits/finetune/*"))
    failed = json.loads((run_dir / "result.json").read_text())
    assert failed["status"] == "failed" and "simulated crash" in failed["error"]
    assert len(failed["acc_matrix"]) == 3
    monkeypatch.setattr(Finetune, "fit_task", original)
    resumed = run_tiny(overrides, tmp_path / "resumed")
    assert resumed["status"] == "completed"
    assert resumed["acc_matrix"] == full["acc_matrix"]
    assert resumed.get("acc_matrix_taw") == full.get("acc_matrix_taw")  # the class scenario's TAw rows too
    torch.use_deterministic_algorithms(False)


def test_scenario_mismatch_is_an_error_before_training(run_tiny, monkeypatch):
    from strategies.finetune import Finetune

    monkeypatch.setattr(Finetune, "scenarios", ("task",))
    with pytest.raises(UnsupportedScenarioError, match=r"stream\.scenario=task"):
        run_tiny(["stream=permuted_mnist5k"])


def test_cuda_request_without_cuda_names_the_fix():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ConfigError, match="device=cpu"):
        select_device("cuda")
    assert select_device("auto").type == "cpu"


def test_the_evaluation_cache_changes_neither_results_nor_the_run_id(run_tiny, tmp_path):
    cached = run_tiny(["stream=split_digits"], tmp_path / "a")
    uncached = run_tiny(["stream=split_digits", "trainer.eval_cache_mb=0"], tmp_path / "b")
    assert uncached["run_id"] == cached["run_id"]
    assert uncached["acc_matrix"] == cached["acc_matrix"]


def test_cuda_graph_switches_are_not_part_of_the_run_id(run_tiny, tmp_path):
    """Recorded steps train as eager ones (tests/test_graphs.py on a GPU), so a resume may switch them."""
    default = run_tiny(["stream=split_digits"], tmp_path / "a")
    switches = ["trainer.cuda_graphs=false", "trainer.graph_warmup_steps=5"]
    eager = run_tiny(["stream=split_digits", *switches], tmp_path / "b")
    assert eager["run_id"] == default["run_id"]


def test_result_timings_say_how_many_steps_were_replayed_as_cuda_graphs(run_tiny):
    """On the CPU every step is eager: one zero per task (a GPU run of tests/test_graphs.py counts them)."""
    result = run_tiny(["stream=split_digits"])
    assert result["timings"]["graph_replays"] == [0] * len(result["acc_matrix"])


def test_class_scenario_stores_task_aware_matrix_beside_task_agnostic(run_tiny, tmp_path):
    """TAw reads each task on its own classes: never below TAg, and far above it on forgotten tasks."""
    result = run_tiny(["stream=split_digits", "stream.scenario=class", "strategy=finetune"])
    assert result["protocol"] == "default" and result["strategy_settings"] is None
    tag, taw = np.array(result["acc_matrix"]), np.array(result["acc_matrix_taw"])
    assert tag.shape == taw.shape == (5, 5)
    assert (taw >= tag - 1e-9).all()
    # after the last task, fine-tuning predicts only the newest classes: old tasks are ~0 TAg but two-way TAw
    assert tag[-1, :-2].max() < 5.0 and taw[-1, :-2].min() > 50.0
    assert result["metrics_taw"]["acc"] == pytest.approx(taw[-1].mean())
    assert len(result["random_init_acc_taw"]) == 5
    saved = json.loads(Path(result["paths"]["result"]).read_text())
    assert saved["acc_matrix_taw"] == result["acc_matrix_taw"]


def test_task_aware_accuracy_is_the_argmax_over_the_task_classes(run_tiny):
    """Checked by hand against the model's own logits for one task of a trained class-scenario run."""
    from clbench.strategy import Strategy

    captured = {}
    original = Strategy.after_task

    def keep(self, task):
        captured["strategy"], captured["task"] = self, task
        original(self, task)

    Strategy.after_task = keep
    try:
        run_tiny(["stream=split_digits", "stream.scenario=class", "strategy=finetune", "stream.num_tasks=2"])
    finally:
        Strategy.after_task = original
    strategy = captured["strategy"]
    stream = strategy.stream
    task = stream.tasks[0]
    strategy.model.eval()
    with torch.no_grad():
        logits = strategy.predict(stream.inputs("test", task.test_index, task.id), None)
    classes = sorted(set(task.test_targets.tolist()))
    assert classes == [0, 1]
    expected = (logits[:, classes].argmax(1) == task.test_targets).double().mean() * 100
    from clbench.trainer import Trainer

    trainer = Trainer(epochs=1, progress=False)
    trainer.attach(stream, 0)
    got = trainer.evaluator.accuracy(strategy, task, "test", give_task_id=False, task_aware=True)
    assert float(got) == pytest.approx(float(expected))
    plain = trainer.evaluator.accuracy(strategy, task, "test", give_task_id=False)
    assert float(plain) == pytest.approx(float((logits.argmax(1) == task.test_targets).double().mean() * 100))


def test_task_scenario_has_one_matrix(run_tiny):
    result = run_tiny(["stream=split_digits", "strategy=finetune", "stream.num_tasks=2"])
    assert "acc_matrix_taw" not in result and "metrics_taw" not in result


def test_a_strategy_without_training_curves_still_gets_its_l2m_metrics():
    """The Avalanche bridge trains outside trainer.fit, so each task's curve is empty; every such run failed at
    the end with 'a learning curve must be a non-empty list' once L2M normalised curves."""
    from clbench.l2m import summarize_l2m
    from clbench.runner import flat_curves

    empty = [[[]], [[]], [[]]]
    assert flat_curves(empty) is None
    assert flat_curves([[[50.0, 60.0]], [[40.0], [70.0]]]) == [[50.0, 60.0], [40.0, 70.0]]
    matrix = np.array([[80.0, 10.0, 12.0], [70.0, 85.0, 11.0], [60.0, 75.0, 90.0]])
    metrics = summarize_l2m(matrix, [10.0, 10.0, 10.0], curves=flat_curves(empty))
    assert all(np.isfinite(v) for v in metrics.values() if isinstance(v, float))


def test_a_failure_after_the_last_task_marks_the_run_failed_and_a_rerun_completes_it(
    run_tiny, tmp_path, monkeypatch, capsys
):
    """An Avalanche-bridge run that failed in its end-of-run metrics stayed 'running' forever in result.json."""
    import clbench.runner as runner_module

    def broken(*args, **kwargs):
        raise ValueError("simulated metric failure")

    with monkeypatch.context() as patch:
        patch.setattr(runner_module, "summarize_l2m", broken)
        with pytest.raises(ValueError, match="simulated metric failure"):
            run_tiny(["stream=split_digits", "stream.num_tasks=2"], tmp_path / "r")
    path = next((tmp_path / "r").glob("split_digits/finetune/*/result.json"))
    failed = json.loads(path.read_text())
    assert failed["status"] == "failed" and "simulated metric failure" in failed["error"]
    assert failed["tasks_completed"] == 2
    capsys.readouterr()
    done = run_tiny(["stream=split_digits", "stream.num_tasks=2"], tmp_path / "r")
    assert done["status"] == "completed"
    assert "resuming" in capsys.readouterr().out  # after the last task: nothing is trained again
    assert len(done["timings"]["fit_s"]) == 2


def test_the_two_class_scenario_rows_come_from_one_pass_and_match_the_plain_row(run_tiny, monkeypatch):
    """TAg and TAw are read from the same logits (the model ran twice per row before); the TAg row equals the
    plain batched row of R."""
    from clbench.strategy import Strategy

    captured = {}
    original = Strategy.after_task

    def keep(self, task):
        captured["strategy"] = self
        original(self, task)

    monkeypatch.setattr(Strategy, "after_task", keep)
    run_tiny(["stream=split_digits", "stream.scenario=class", "stream.num_tasks=3"])
    strategy = captured["strategy"]
    from clbench.trainer import Trainer

    trainer = Trainer(epochs=1, progress=False)
    trainer.attach(strategy.stream, 0)
    calls = []
    predict = strategy.predict
    monkeypatch.setattr(strategy, "predict", lambda x, t: calls.append(len(x)) or predict(x, t))
    agnostic, aware = trainer.evaluator.rows_with_task_aware(strategy, False)
    assert sum(calls) == sum(task.num_test for task in strategy.stream.evaluation_tasks)  # each sample once
    assert agnostic == pytest.approx(trainer.evaluate(strategy, False), abs=1e-9)
    assert all(w >= a for w, a in zip(aware, agnostic, strict=True)) and aware != agnostic
