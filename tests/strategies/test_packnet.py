"""PackNet: disjoint ownership, pruned fraction, frozen weights, old logits unchanged, end to end."""

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
