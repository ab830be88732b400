"""EWC and online EWC: the quadratic penalty, the batch Fisher, the merged anchor, gamma decay, resume."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from clbench.data import load_synthetic
from clbench.models import MLP
from clbench.streams import Stream, split_stream
from clbench.trainer import Trainer
from strategies.ewc import EWC
from strategies.ewc_online import OnlineEWC
from strategies.regularization import named_subset, quadratic_penalty


def tiny_stream(scenario: str = "domain") -> Stream:
    data = load_synthetic(num_classes=4, shape=(1, 6, 6), train_per_class=24, test_per_class=4, seed=0)
    return split_stream(data, num_tasks=2, classes_per_task=2, scenario=scenario)


def trained(strategy, scenario: str = "domain", tasks: int = 1):
    torch.manual_seed(0)
    stream = tiny_stream(scenario)
    model = MLP(stream.input_shape, stream.head_sizes, hidden=[8])
    strategy.setup(model, stream)
    trainer = Trainer(epochs=1, batch_size=16, lr=0.1, progress=False)
    trainer.attach(stream, 0)
    for task in stream.tasks[:tasks]:
        strategy.fit_task(task, trainer)
        strategy.after_task(task)
    return strategy, stream, trainer


def test_penalty_is_zero_at_the_anchor_and_quadratic_in_the_distance():
    ewc, stream, _ = trained(EWC(ewc_lambda=1.0))
    ewc._trained = named_subset(ewc.model, ewc.parameters(stream[1]))
    assert ewc.penalty().item() == 0.0  # the weights are still the anchor
    direction = {name: torch.randn_like(p) for name, p in ewc._trained.items()}

    def penalty_at(scale: float) -> float:
        with torch.no_grad():
            for name, p in ewc._trained.items():
                p.copy_(ewc.anchor[name] + scale * direction[name])
        return ewc.penalty().item()

    one, two = penalty_at(1.0), penalty_at(2.0)
    assert one > 0
    assert two == pytest.approx(4.0 * one, rel=1e-5)
    assert penalty_at(0.0) == 0.0


def test_fisher_is_the_mean_squared_batch_gradient_of_the_true_label_log_likelihood():
    ewc, stream, _ = trained(EWC(ewc_lambda=1.0))
    task = stream[0]
    params = named_subset(ewc.model, ewc.parameters(task))
    expected = {name: torch.zeros_like(p) for name, p in params.items()}
    batches = list(zip(task.train_index.split(16), task.train_targets.split(16), strict=True))
    for positions, targets in batches:
        ewc.model.zero_grad()
        F.cross_entropy(ewc.model(stream.inputs("train", positions, 0)), targets).backward()
        for name, p in params.items():
            expected[name] += p.grad**2 / len(batches)
    fisher = ewc.estimate_importance(task, params)
    for name in params:
        torch.testing.assert_close(fisher[name], expected[name])


def test_importance_covers_only_the_trained_parameters():
    ewc, _, _ = trained(EWC(ewc_lambda=1.0), scenario="task")
    names = set(ewc.importance)
    assert any(name.startswith("heads.heads.0.") for name in names)
    assert not any(name.startswith("heads.heads.1.") for name in names)  # task 1's head was not trained yet


def test_merged_anchor_gives_the_gradient_of_the_per_task_penalties():
    ewc, stream, _ = trained(EWC(ewc_lambda=1.0), tasks=2)
    # the slow way: one penalty per task with its own Fisher and anchor (Kirkpatrick et al.)
    first, _, _ = trained(EWC(ewc_lambda=1.0), tasks=1)
    params = named_subset(ewc.model, ewc.parameters(stream[1]))
    per_task = [
        (first.importance, first.anchor),
        (ewc.estimate_importance(stream[1], params), {n: p.detach().clone() for n, p in params.items()}),
    ]
    torch.manual_seed(1)
    with torch.no_grad():
        for p in params.values():
            p.add_(0.3 * torch.randn_like(p))
    ewc._trained = params
    merged = torch.autograd.grad(ewc.penalty(), list(params.values()))
    separate = torch.autograd.grad(
        sum(quadratic_penalty(params, anchor, fisher) for fisher, anchor in per_task), list(params.values())
    )
    for a, b in zip(merged, separate, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_online_ewc_decays_the_fisher_and_keeps_one_anchor():
    online, stream, _ = trained(OnlineEWC(ewc_lambda=1.0, gamma=0.5), tasks=1)
    first = {name: f.clone() for name, f in online.importance.items()}
    trainer = Trainer(epochs=1, batch_size=16, lr=0.1, progress=False)
    trainer.attach(stream, 0)
    online.fit_task(stream[1], trainer)
    params = named_subset(online.model, online.parameters(stream[1]))
    second = online.estimate_importance(stream[1], params)
    online.after_task(stream[1])
    for name, p in params.items():
        torch.testing.assert_close(online.importance[name], 0.5 * first[name] + second[name])
        torch.testing.assert_close(online.anchor[name], p.detach())


def test_state_dict_restores_the_penalty():
    ewc, stream, _ = trained(EWC(ewc_lambda=3.0))
    with torch.no_grad():
        for p in ewc.model.parameters():
            p.add_(0.1)
    ewc._trained = named_subset(ewc.model, ewc.parameters(stream[1]))
    copy = EWC(ewc_lambda=3.0)
    copy.setup(MLP(stream.input_shape, stream.head_sizes, hidden=[8]), stream)
    copy.load_state_dict(ewc.state_dict())
    copy._trained = named_subset(copy.model, copy.parameters(stream[1]))
    assert copy.penalty().item() == pytest.approx(ewc.penalty().item())


@pytest.mark.parametrize("strategy", ["ewc", "ewc_online"])
def test_end_to_end_on_split_digits(run_tiny, strategy):
    result = run_tiny([f"strategy={strategy}", "stream=split_digits"])
    assert result["status"] == "completed"
    assert result["strategy"] == strategy
    assert result["metrics"]["acc"] > 70.0


def test_per_sample_fisher_is_the_mean_of_each_samples_squared_gradient():
    # the paper's empirical Fisher: square each sample's own gradient, then average (batch size 16 here, so
    # the batch estimate would be about 16 times smaller: the test would fail on it)
    ewc, stream, _ = trained(EWC(ewc_lambda=1.0, fisher="per_sample"))
    task = stream[0]
    params = named_subset(ewc.model, ewc.parameters(task))
    expected = {name: torch.zeros_like(p) for name, p in params.items()}
    for position, target in zip(task.train_index.split(1), task.train_targets.split(1), strict=True):
        ewc.model.zero_grad()
        F.cross_entropy(ewc.model(stream.inputs("train", position, 0)), target).backward()
        for name, p in params.items():
            expected[name] += p.grad**2 / task.num_train
    fisher = ewc.estimate_importance(task, params)
    for name in params:
        torch.testing.assert_close(fisher[name], expected[name], rtol=1e-4, atol=1e-8)


def test_unknown_fisher_stops_with_the_choices():
    with pytest.raises(ValueError, match=r"strategy\.fisher must be one of batch, per_sample"):
        EWC(fisher="sampled")
    with pytest.raises(ValueError, match=r"strategy\.fisher"):
        OnlineEWC(fisher="exact")
