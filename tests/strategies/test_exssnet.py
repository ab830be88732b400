"""ExSSNeT: exclusive weight updates never touch earlier tasks' weights; KKT choice; end to end."""

import pytest
import torch

from strategies.supermasks.base import choose_by_variant
from strategies.supermasks.exssnet import ExSSNeT, knn_accuracy


def test_exclusive_update_leaves_earlier_masks_weights_bit_identical(masked_setup):
    strategy = ExSSNeT(density=0.3, knn="best", knn_k=5)
    stream, trainer = masked_setup(strategy)
    for task in stream:
        before = [layer.weight.detach().clone() for layer in strategy.layers]
        used_before = [layer.used.clone() for layer in strategy.layers]
        strategy.fit_task(task, trainer)
        strategy.after_task(task)
        moved = 0
        for layer, old, used in zip(strategy.layers, before, used_before, strict=True):
            assert torch.equal(layer.weight[used], old[used])
            own = layer.masks.get(task.id)
            if own is not None:
                exclusive = own.bool() & ~used
                assert torch.equal(layer.weight[~exclusive], old[~exclusive])
                moved += int((layer.weight != old).sum())
        assert moved > 0, "the weight phase trained nothing"


def test_task_one_logits_identical_after_task_five(masked_setup):
    strategy = ExSSNeT(density=0.3, knn="always", knn_k=5)
    stream, trainer = masked_setup(strategy)
    x = stream.inputs("test", stream[0].test_index, 0)
    strategy.fit_task(stream[0], trainer)
    strategy.after_task(stream[0])
    strategy.model.eval()
    with torch.no_grad():
        right_after = strategy.predict(x, 0)
    for task in stream.tasks[1:]:
        strategy.fit_task(task, trainer)
        strategy.after_task(task)
    strategy.model.eval()
    with torch.no_grad():
        assert torch.equal(strategy.predict(x, 0), right_after)
    assert [c["task"] for c in strategy.transfers] == [1, 2, 3, 4]
    assert all(len(c["from_tasks"]) == 1 for c in strategy.transfers)


def test_kkt_copies_the_chosen_tasks_scores(masked_setup):
    strategy = ExSSNeT(density=0.3, knn="always", knn_k=5, weight_epochs=0)
    stream, trainer = masked_setup(strategy, num_tasks=2)
    strategy.fit_task(stream[0], trainer)
    strategy.after_task(stream[0])
    strategy.transfer_scores(stream[1])
    body = [layer for layer in strategy.layers if len(layer.owners) > 1]
    assert all(torch.equal(layer.scores["1"], layer.scores["0"]) for layer in body)


def test_choose_by_variant():
    accs = [0.4, 0.7, 0.6]
    assert choose_by_variant(accs, 0.5, "best") == [1]
    assert choose_by_variant(accs, 0.5, "all") == [1, 2]
    assert choose_by_variant(accs, 0.9, "best") == []
    assert choose_by_variant(accs, 0.9, "always") == [1]
    with pytest.raises(ValueError, match="knn"):
        choose_by_variant(accs, 0.5, "nearest")


def test_knn_accuracy_on_separated_clusters():
    torch.manual_seed(0)
    x = torch.cat([torch.randn(50, 4), torch.randn(50, 4) + 10])
    y = torch.cat([torch.zeros(50), torch.ones(50)]).long()
    order = torch.randperm(100)
    x, y = x[order], y[order]
    assert knn_accuracy(x[:70], y[:70], x[70:], y[70:], k=5) == 1.0


def test_end_to_end_zero_forgetting(run_tiny):
    result = run_tiny(
        [
            "strategy=exssnet",
            "stream=synthetic",
            "strategy.knn=all",
            "strategy.knn_k=10",
            "strategy.density=0.05",
            "model.hidden=[32]",
            "model.bias=false",
        ]
    )
    assert result["metrics"]["bwt"] == 0.0 and result["metrics"]["forgetting"] == 0.0
    assert result["knn_transfer"]["variant"] == "all" and len(result["knn_transfer"]["choices"]) == 4
