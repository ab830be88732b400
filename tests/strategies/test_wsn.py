"""WSN: weights used by earlier tasks stay bit-identical, old logits unchanged, end to end."""

import torch

from strategies.supermasks.layers import num_kept
from strategies.supermasks.wsn import WSN


def test_used_weights_frozen_and_task_one_logits_identical(masked_setup):
    strategy = WSN(density=0.5)
    stream, trainer = masked_setup(strategy, optimizer="adam", lr=0.01, momentum=0.0)
    x = stream.inputs("test", stream[0].test_index, 0)
    right_after = None
    for task in stream:
        before = [layer.weight.detach().clone() for layer in strategy.layers]
        used = [layer.used.clone() for layer in strategy.layers]
        strategy.fit_task(task, trainer)
        strategy.after_task(task)
        for layer, old, frozen in zip(strategy.layers, before, used, strict=True):
            assert torch.equal(layer.weight[frozen], old[frozen])
        strategy.model.eval()
        with torch.no_grad():
            logits = strategy.predict(x, 0)
        right_after = logits if right_after is None else right_after
        assert torch.equal(logits, right_after)


def test_masks_keep_top_c_and_heads_dense(masked_setup):
    strategy = WSN(density=0.3)
    stream, trainer = masked_setup(strategy, num_tasks=2, optimizer="adam", lr=0.01, momentum=0.0)
    strategy.fit_task(stream[0], trainer)
    strategy.after_task(stream[0])
    for layer in strategy.task_layers(0):
        expected = layer.weight.numel() if len(layer.owners) == 1 else num_kept(layer.weight.numel(), 0.3)
        assert int(layer.masks[0].sum()) == expected


def test_end_to_end_zero_forgetting(run_tiny):
    result = run_tiny(
        [
            "strategy=wsn",
            "stream=synthetic",
            "model.hidden=[32]",
            "model.bias=false",
            "trainer.optimizer=adam",
            "trainer.lr=0.001",
        ]
    )
    assert result["metrics"]["bwt"] == 0.0 and result["metrics"]["forgetting"] == 0.0
    assert result["metrics"]["acc"] > 60.0
