"""Models: head layout per scenario, mixed-task batches, fresh initialisation."""

import pytest
import torch

from clbench.models import MLP, AlexNet, ResNet18, reset_parameters


@pytest.mark.parametrize(("model_cls", "shape"), [(MLP, (1, 8, 8)), (AlexNet, (3, 32, 32)), (ResNet18, (3, 32, 32))])
def test_forward_shapes_per_head(model_cls, shape):
    model = model_cls(shape, [3, 5])
    x = torch.randn(4, *shape)
    assert model(x, 0).shape == (4, 3)
    assert model(x, 1).shape == (4, 5)


def test_mixed_batch_uses_each_samples_head():
    torch.manual_seed(0)
    model = MLP((1, 8, 8), [3, 5], hidden=[16])
    x = torch.randn(6, 1, 8, 8)
    task_ids = torch.tensor([0, 1, 1, 0, 1, 0])
    mixed = model(x, task_ids)
    assert mixed.shape == (6, 5)
    for k in range(6):
        own = model(x[k : k + 1], int(task_ids[k]))[0]
        assert torch.allclose(mixed[k, : own.numel()], own)
        assert torch.isinf(mixed[k, own.numel() :]).all()


def test_mlp_without_bias_has_no_bias():
    model = MLP((1, 28, 28), [10], hidden=[100, 100], bias=False)
    assert all("bias" not in name for name, _ in model.named_parameters())
    assert sum(p.numel() for p in model.parameters()) == 784 * 100 + 100 * 100 + 100 * 10


def test_reset_parameters_draws_new_weights():
    model = MLP((1, 8, 8), [2])
    before = [p.detach().clone() for p in model.parameters()]
    reset_parameters(model)
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_alexnet_fc_blocks_run_fc_bn_relu_dropout_as_gpm():
    """GPM's AlexNet (main_cifar100.py) runs fc -> bn -> relu -> drop; the heads then read ReLU outputs."""
    torch.manual_seed(0)
    model = AlexNet((3, 32, 32), [4], channels=[8, 8, 8], hidden=[16, 12])
    kinds = [type(m) for m in model.fc]
    block = [torch.nn.Linear, torch.nn.BatchNorm1d, torch.nn.ReLU, torch.nn.Dropout]
    assert kinds == block * 2
    model.eval()  # dropout off; batch-norm still normalises with batch statistics (no running stats)
    x = torch.randn(6, 3, 32, 32)
    h = model.conv(x)
    for k in (0, 4):
        linear = model.fc[k]
        h = torch.relu(torch.nn.functional.batch_norm(linear(h), None, None, training=True, eps=model.fc[k + 1].eps))
    assert torch.allclose(model.features(x), h, atol=1e-5)
    assert (model.features(x) >= 0).all()
