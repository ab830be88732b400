"""PackNet: disjoint ownership, pruned fraction, frozen weights, old logits unchanged, end to end."""

import pytest
import torch

from strategies.supermasks.packnet import PackNet


def test_prune_retrain_freeze(masked_setup):
    strategy = PackNet(prune=0.5)
    stream, trainer = masked_setup(strategy)
    x = stream.inputs("test", stream[0].test_index, 0)
    right_after = None
    for task in stream:
        shared = [layer for layer in strategy.layers if len(layer.owners) > 1]
        free_before = [int((strategy.owner[layer] == 0).sum()) for layer in shared]
        before = [layer.weight.detach().clone() for layer in strategy.layers]
        owned = [strategy.owner[layer] > 0 for layer in strategy.layers]
        strategy.fit_task(task, trainer)
        strategy.after_task(task)
        for layer, old, frozen in zip(strategy.layers, before, owned, strict=True):
            assert torch.equal(layer.weight[frozen], old[frozen])
        for layer, free in zip(shared, free_before, strict=True):
            assert int((strategy.owner[layer] == task.id + 1).sum()) == free - int(0.5 * free)
            assert bool((layer.weight[strategy.owner[layer] == 0] == 0).all())
        strategy.model.eval()
        with torch.no_grad():
            logits = strategy.predict(x, 0)
        right_after = logits if right_after is None else right_after
        assert torch.equal(logits, right_after)


def test_end_to_end_zero_forgetting_and_owner_map(run_tiny):
    result = run_tiny(["strategy=packnet", "stream=synthetic", "model.hidden=[32]", "strategy.retrain_epochs=1"])
    assert result["metrics"]["bwt"] == 0.0 and result["metrics"]["forgetting"] == 0.0
    assert result["mask_storage"]["owner_map_bits"] > 0


def _packnet_on(model, **kwargs):
    """PackNet set up on a 3-task synthetic split stream (task scenario) with ``model``, plus a trainer."""
    from clbench.data import load_synthetic
    from clbench.streams import split_stream
    from clbench.trainer import Trainer

    torch.manual_seed(0)
    data = load_synthetic(num_classes=6, shape=(3, 32, 32), train_per_class=20, test_per_class=5)
    stream = split_stream(data, 3, 2)
    strategy = PackNet(prune=0.5, **kwargs)
    strategy.setup(model(stream), stream)
    trainer = Trainer(epochs=1, batch_size=16, lr=0.05, momentum=0.9, weight_decay=1e-3, progress=False)
    trainer.attach(stream, 0)
    return strategy, stream, trainer


def test_biases_and_batch_norm_train_on_the_first_task_then_freeze():
    """PackNet's paper and code train biases and batch-norm with task 1 and freeze them; clbench used to drop
    the biases and swap the batch-norms for per-task non-affine ones."""
    from clbench.models import AlexNet
    from strategies.supermasks.layers import TaskBatchNorm

    def model(stream):
        alexnet = AlexNet(stream.input_shape, stream.head_sizes, channels=[4, 4, 4], hidden=[8, 8])
        alexnet.fc[0].bias = torch.nn.Parameter(torch.zeros(8))  # one shared layer with a bias
        return alexnet

    strategy, stream, trainer = _packnet_on(model)
    assert not any(isinstance(m, TaskBatchNorm) for m in strategy.model.modules())
    norms = strategy.kept_norms
    assert norms and all(norm.affine for norm in norms)
    shared = [p for norm in norms for p in norm.parameters()] + [strategy.model.fc[0].bias]
    initial = [p.detach().clone() for p in shared]
    strategy.fit_task(stream[0], trainer)
    strategy.after_task(stream[0])
    after_first = [p.detach().clone() for p in shared]
    assert all(not torch.equal(a, b) for a, b in zip(initial, after_first, strict=True))
    x = stream.inputs("test", stream[0].test_index, 0)
    strategy.model.eval()
    with torch.no_grad():
        first = strategy.predict(x, 0)
    for task in stream.tasks[1:]:
        head_bias = strategy.model.heads.heads[task.id].bias
        before = None if head_bias is None else head_bias.detach().clone()
        strategy.fit_task(task, trainer)
        strategy.after_task(task)
        assert before is None or not torch.equal(head_bias, before)  # a task's own head trains with it
    assert all(torch.equal(p, q) for p, q in zip(shared, after_first, strict=True))
    strategy.model.eval()
    with torch.no_grad():
        assert torch.equal(strategy.predict(x, 0), first)


def test_per_task_norms_mode_refuses_biases_and_swaps_norms():
    from clbench.models import MLP

    with pytest.raises(ValueError, match=r"set model\.bias=false"):
        _packnet_on(lambda s: MLP(s.input_shape, s.head_sizes, hidden=[8], bias=True), shared_params="per_task_norms")
    with pytest.raises(ValueError, match=r"strategy\.shared_params"):
        PackNet(shared_params="never")
