"""FrozenPositions: under momentum and weight decay only the trainable positions move; the rest stay bit for bit."""

import torch
from torch import nn

from clbench.frozen import FrozenPositions


def test_only_trainable_positions_move_under_momentum_and_weight_decay():
    torch.manual_seed(0)
    layer = nn.Linear(6, 4)
    before = layer.weight.detach().clone()
    trainable = torch.rand(4, 6) > 0.5
    guard = FrozenPositions.of([(layer.weight, trainable)])
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.5, momentum=0.9, weight_decay=0.1)
    storage = layer.weight.data_ptr()
    for _ in range(3):
        optimizer.zero_grad()
        layer(torch.randn(8, 6)).square().sum().backward()
        guard.mask_gradients()
        assert torch.all(layer.weight.grad[~trainable] == 0)
        optimizer.step()
        guard.restore()
    assert torch.equal(layer.weight[~trainable], before[~trainable])  # bit for bit, despite momentum and decay
    assert torch.all(layer.weight[trainable] != before[trainable])
    assert layer.weight.data_ptr() == storage  # written back in place: the optimizer keeps the same tensor
