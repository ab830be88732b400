"""The trainer's lean SGD must give torch.optim.SGD's parameters bit for bit."""

from __future__ import annotations

import pytest
import torch

from clbench.optim import SGD, torch_optimizer


def _params(seed: int) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=generator)) for shape in [(7, 5), (5,), (3, 7)]]


@pytest.mark.parametrize(("momentum", "weight_decay"), [(0.0, 0.0), (0.9, 0.0), (0.0, 5e-4), (0.9, 5e-4)])
def test_updates_equal_torch_sgd_bit_for_bit(momentum, weight_decay):
    ours, theirs = _params(0), _params(0)
    lean = SGD(ours, lr=0.1, momentum=momentum, weight_decay=weight_decay)
    reference = torch.optim.SGD(theirs, lr=0.1, momentum=momentum, weight_decay=weight_decay, foreach=False)
    generator = torch.Generator().manual_seed(1)
    for step in range(12):
        grads = [torch.randn(p.shape, generator=generator) for p in ours]
        for k, (a, b, g) in enumerate(zip(ours, theirs, grads, strict=True)):
            skipped = step % 4 == 1 and k == 1  # a parameter without a gradient this step is left alone
            a.grad, b.grad = (None, None) if skipped else (g.clone(), g.clone())
        if step == 6:  # the trainer's lr schedule writes the group's lr
            lean.param_groups[0]["lr"] = reference.param_groups[0]["lr"] = 0.03
        lean.step()
        reference.step()
        for a, b in zip(ours, theirs, strict=True):
            assert torch.equal(a, b)


def test_zero_grad_clears_or_zeroes():
    params = _params(0)
    optimizer = SGD(params, lr=0.1)
    for p in params:
        p.grad = torch.ones_like(p)
    optimizer.zero_grad(set_to_none=False)
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in params)
    optimizer.zero_grad()
    assert all(p.grad is None for p in params)


def test_torch_optimizers_take_the_trainers_settings():
    params = _params(0)
    sgd = torch_optimizer("sgd", params, lr=0.1, momentum=0.9, weight_decay=1e-4)
    assert type(sgd) is torch.optim.SGD and sgd.defaults["momentum"] == 0.9 and sgd.defaults["weight_decay"] == 1e-4
    for name, kind in (("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW)):
        made = torch_optimizer(name, params, lr=1e-3, momentum=0.9, weight_decay=0.0, capturable=True)
        assert type(made) is kind and made.defaults["lr"] == 1e-3 and made.defaults["capturable"] is True
