"""SupSup: GG zero forgetting, identical old-task logits, GNu task inference, storage report, resume."""

import pytest
import torch

from clbench.data import load_synthetic
from clbench.models import MLP
from clbench.streams import permuted_stream, split_stream
from clbench.trainer import Trainer
from strategies.supermasks.supsup import SupSup


def build(strategy, scenario="task", num_tasks=5, epochs=1, permuted=False):
    """A synthetic stream, an MLP converted by ``strategy`` and an attached trainer (no files, no CLI)."""
    torch.manual_seed(0)
    data = load_synthetic(num_classes=2 * num_tasks, shape=(1, 8, 8), train_per_class=40, test_per_class=10)
    if permuted:
        stream = permuted_stream(data, num_tasks, scenario=scenario)
    else:
        stream = split_stream(data, num_tasks, 2, scenario=scenario)
    strategy.setup(MLP(stream.input_shape, stream.head_sizes, hidden=[32, 32], bias=False), stream)
    trainer = Trainer(
        epochs=epochs, batch_size=16, lr=0.05, optimizer="sgd", momentum=0.9, weight_decay=1e-3, progress=False
    )
    trainer.attach(stream, 0)
    return stream, trainer


def learn(strategy, task, trainer):
    strategy.fit_task(task, trainer)
    strategy.after_task(task)


@torch.no_grad()
def logits_of(strategy, stream, task_id):
    strategy.model.eval()
    task = stream[task_id]
    return strategy.predict(stream.inputs("test", task.test_index, task.id), task_id)


def test_task_one_logits_identical_after_task_five():
    strategy = SupSup(density=0.1)
    stream, trainer = build(strategy)
    learn(strategy, stream[0], trainer)
    right_after = logits_of(strategy, stream, 0)
    for task in stream.tasks[1:]:
        learn(strategy, task, trainer)
    assert torch.equal(logits_of(strategy, stream, 0), right_after)


def test_only_the_current_tasks_scores_change_and_weights_never():
    strategy = SupSup(density=0.1)
    stream, trainer = build(strategy, num_tasks=3)
    weights = [layer.weight.detach().clone() for layer in strategy.layers]
    scores = {k: v.detach().clone() for k, v in strategy.model.named_parameters() if "scores" in k}
    learn(strategy, stream[1], trainer)
    changed = {k for k, v in strategy.model.named_parameters() if "scores" in k and not torch.equal(v, scores[k])}
    assert changed and all(k.endswith("scores.1") for k in changed)
    assert all(torch.equal(layer.weight, w) for layer, w in zip(strategy.layers, weights, strict=True))


def test_gnu_task_inference_beats_chance():
    for inference in ("oneshot", "binary"):
        torch.manual_seed(0)
        data = load_synthetic(num_classes=4, shape=(1, 10, 10), train_per_class=100, test_per_class=50)
        stream = permuted_stream(data, 3, scenario="domain")
        strategy = SupSup(density=0.3, inference=inference, inference_batch_size=50)
        strategy.setup(MLP(stream.input_shape, stream.head_sizes, hidden=[64], bias=False), stream)
        trainer = Trainer(epochs=5, batch_size=16, lr=0.01, optimizer="adam", progress=False)
        trainer.attach(stream, 0)
        for task in stream:
            learn(strategy, task, trainer)
        inferred = strategy.task_inference_accuracy()
        assert len(inferred["per_task"]) == 3
        assert inferred["accuracy"] > 60.0, inferred  # chance is 33 %


def test_gnu_evaluation_infers_one_task_per_inference_batch_of_one_tasks_samples():
    """Without task ids, SupSup infers one task per batch; the runner's row must then be what SupSup
    gives on each task's own test set in ``inference_batch_size`` pieces, whatever the evaluation's chunk
    size (here 15, which would otherwise mix tasks in a chunk) and whether batched evaluation is on."""
    strategy = SupSup(inference_batch_size=10)
    stream, trainer = build(strategy, scenario="domain", epochs=3)
    trainer.eval_batch_size = 15
    for task in stream.tasks:
        learn(strategy, task, trainer)
    expected = []
    with torch.no_grad():
        for task in stream.tasks:
            hits = 0
            for start in range(0, task.num_test, 10):
                index = task.test_index[start : start + 10]
                logits = strategy.predict(stream.inputs("test", index, task.id), None)
                hits += int((logits.argmax(1) == task.test_targets[start : start + 10]).sum())
            expected.append(100.0 * hits / task.num_test)
    assert trainer.evaluate(strategy, give_task_id=False) == pytest.approx(expected, abs=1e-9)


def test_resume_restores_masks_and_logits():
    strategy = SupSup(density=0.1)
    stream, trainer = build(strategy, num_tasks=3)
    for task in stream.tasks[:2]:
        learn(strategy, task, trainer)
    state = strategy.state_dict()
    expected = [logits_of(strategy, stream, t) for t in range(2)]
    fresh = SupSup(density=0.1)
    build(fresh, num_tasks=3)
    fresh.load_state_dict(state)
    assert fresh.learned == [0, 1]
    assert all(torch.equal(logits_of(fresh, stream, t), e) for t, e in enumerate(expected))


def test_end_to_end_gg_zero_forgetting_and_storage(run_tiny):
    result = run_tiny(
        [
            "strategy=supsup",
            "stream=split_fashion_mnist",
            "stream.train_per_task=300",
            "model.hidden=[32]",
            "model.bias=false",
        ]
    )
    assert result["metrics"]["bwt"] == 0.0 and result["metrics"]["forgetting"] == 0.0
    storage = result["mask_storage"]
    bits = 784 * 32 + 32 * 2
    assert storage["mask_bits_per_task"] == [bits] * 5
    assert storage["mask_bytes_per_task_packed"] == [784 * 32 // 8 + 64 // 8] * 5
    assert "task_inference" not in result


def test_end_to_end_gnu_reports_task_inference(run_tiny):
    result = run_tiny(
        [
            "strategy=supsup",
            "stream=synthetic",
            "stream.scenario=domain",
            "stream.num_tasks=3",
            "model.hidden=[32]",
            "model.bias=false",
            "strategy.inference_batch_size=50",
            "strategy.inference=binary",
        ]
    )
    inferred = result["task_inference"]
    assert inferred["method"] == "binary" and len(inferred["per_task"]) == 3
    assert 0.0 <= inferred["accuracy"] <= 100.0


@pytest.mark.parametrize(
    ("preset", "strategy_name"),
    [
        ("supsup_splitcifar100_gg", "supsup"),
        ("exssnet_splitmnist", "exssnet"),
        ("exssnet_splitcifar100", "exssnet"),
        ("wsn_cifar100", "wsn"),
        ("packnet_cifar100", "packnet"),
    ],
)
def test_supermask_presets_compose(preset, strategy_name, tmp_path):
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from clbench.__main__ import CONFIG_DIR

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"experiment={preset}", f"results_dir={tmp_path}"])
    assert instantiate(cfg.strategy).name == strategy_name
    model = instantiate(cfg.model, input_shape=[3, 32, 32], head_sizes=[5, 5])
    assert model(torch.zeros(2, 3, 32, 32), 0).shape == (2, 5)


@pytest.mark.parametrize("strategy_name", ["supsup", "exssnet", "wsn"])
def test_default_protocol_settings_set_up_without_biases(strategy_name, compose_cfg):
    """The default protocol's MLP has biases, which the masked layers refuse: each strategy's settings for the
    protocol drop them, so `python -m clbench strategy=<name>` runs as is and records which settings it used."""
    from hydra.utils import instantiate

    cfg = compose_cfg([f"strategy={strategy_name}", "stream.train_per_task=50"])
    assert cfg.strategy_settings == f"default/{strategy_name}" and cfg.model.bias is False
    stream = instantiate(cfg.stream)
    model = instantiate(cfg.model, input_shape=list(stream.input_shape), head_sizes=stream.head_sizes)
    strategy = instantiate(cfg.strategy)
    strategy.setup(model, stream)
    assert strategy.layers and all(layer.bias is None for layer in strategy.layers)
