"""Masked layers: exact top-k, straight-through gradient, cached masks, bit packing, model conversion."""

import math

import pytest
import torch
from torch import nn

from clbench.models import MLP, AlexNet, ResNet18
from strategies.supermasks.layers import (
    MaskedLayer,
    MaskedLinear,
    TaskBatchNorm,
    TopKMask,
    convert_model,
    layer_density,
    num_kept,
    pack_bits,
    top_k_mask,
    unpack_bits,
)


@pytest.mark.parametrize("density", [0.01, 0.05, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("shape", [(100, 784), (64, 3, 3, 3), (7,)])
def test_top_k_mask_keeps_exactly_k(density, shape):
    scores = torch.randn(shape)
    mask = top_k_mask(scores, density)
    k = num_kept(scores.numel(), density)
    assert int(mask.sum()) == k == scores.numel() - int((1 - density) * scores.numel())
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    if 0 < k < scores.numel():
        assert scores[mask.bool()].min() >= scores[~mask.bool()].max()


def test_top_k_mask_keeps_exactly_k_with_ties():
    assert int(top_k_mask(torch.zeros(1000), 0.05).sum()) == 50


def test_straight_through_gradient():
    scores = torch.randn(20, 30, requires_grad=True)
    upstream = torch.randn(20, 30)
    (TopKMask.apply(scores, 0.1) * upstream).sum().backward()
    assert torch.equal(scores.grad, upstream)


def test_pack_roundtrip_and_size():
    mask = torch.rand(13, 17) > 0.5
    packed = pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(13 * 17 / 8)
    assert torch.equal(unpack_bits(packed, mask.shape), mask)


def test_signed_constant_weights_and_fixed_without_training():
    layer = MaskedLinear(nn.Linear(50, 20), [0, 1], 0.1, "per_task", "signed_constant", train_weights=False)
    std = math.sqrt(2.0) / math.sqrt(50)
    assert torch.allclose(layer.weight.abs(), torch.full_like(layer.weight, std))
    assert not layer.weight.requires_grad
    assert [name for name, _ in layer.named_parameters()] == ["weight", "scores.0", "scores.1"]


def test_cached_mask_is_not_recomputed_from_scores():
    layer = MaskedLinear(nn.Linear(30, 10), [0, 1], 0.2, "per_task", "default", train_weights=False)
    layer.task = 0
    x = torch.randn(4, 30)
    layer.cache_mask(0)
    before = layer(x)
    with torch.no_grad():
        layer.scores["0"].normal_()
    assert torch.equal(layer(x), before)
    assert int(layer.masks[0].sum()) == num_kept(300, 0.2)


def test_mixture_with_one_hot_alphas_equals_the_task_mask():
    layer = MaskedLinear(nn.Linear(30, 10), [0, 1, 2], 0.3, "per_task", "signed_constant", train_weights=False)
    for t in range(3):
        layer.cache_mask(t)
    x = torch.randn(5, 30)
    layer.task = 1
    own = layer(x)
    layer.task, layer.alphas = None, torch.tensor([0.0, 1.0, 0.0])
    assert torch.allclose(layer(x), own)


@pytest.mark.parametrize(("model_cls", "shape"), [(MLP, (1, 8, 8)), (AlexNet, (3, 32, 32)), (ResNet18, (3, 32, 32))])
def test_convert_model_swaps_every_layer(model_cls, shape):
    model = model_cls(shape, [3, 5], **({"bias": False} if model_cls is MLP else {}))
    masked = convert_model(model, 2, True, 0.1, "uniform", "per_task", "signed_constant", False)
    assert not any(type(m) in (nn.Linear, nn.Conv2d) for m in model.modules())
    per_task = {id(n) for m in model.modules() if isinstance(m, TaskBatchNorm) for n in m.norms}
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d)]
    assert all(id(n) in per_task and not n.affine for n in norms)
    assert all(isinstance(m, MaskedLayer) for m in masked)
    heads = [m for m in masked if len(m.owners) == 1]
    assert [h.owners for h in heads] == [[0], [1]]
    assert any(isinstance(m, TaskBatchNorm) for m in model.modules()) == (model_cls is not MLP)
    assert model(torch.randn(4, *shape), 1).shape == (4, 5)


def test_er_density_budget():
    weight = torch.empty(100, 784)
    assert layer_density(weight, 0.1, "uniform") == 0.1
    assert layer_density(weight, 10.0, "er") == pytest.approx(10.0 * 884 / 78400)
    assert layer_density(torch.empty(4, 4), 10.0, "er") == 0.5


def test_a_model_with_biases_is_refused_with_the_fix_named():
    """Masked layers used to drop a model's biases silently (the MLP's default is bias: true)."""
    model = MLP((1, 8, 8), [3], hidden=[16], bias=True)
    with pytest.raises(ValueError, match=r"set model\.bias=false") as error:
        convert_model(model, 2, False, 0.5, "uniform", "per_task", "signed_constant", False)
    assert "\n" not in str(error.value)
    assert all(type(m) is not MaskedLinear for m in model.modules())  # refused before anything was swapped


def test_a_model_with_biases_and_no_bias_switch_is_an_unsupported_pair():
    """protocol=pretrained_fmnist (a ViT, whose Linear layers have biases and no model.bias switch) failed every
    supermask job of the comparison sweep with 'set model.bias=false', a key the ViT does not have; the pair is
    unsupported, so the sweep records it as skipped with its reason."""
    from clbench.models import ViT
    from clbench.strategy import UnsupportedScenarioError

    model = ViT((1, 28, 28), [2, 2])
    with pytest.raises(UnsupportedScenarioError, match=r"no model\.bias switch") as error:
        convert_model(model, 2, False, 0.5, "uniform", "per_task", "signed_constant", False)
    assert "\n" not in str(error.value) and "ViT" in str(error.value)
    assert all(type(m) is not MaskedLinear for m in model.modules())


def test_kept_biases_are_carried_over_and_used():
    torch.manual_seed(0)
    model = MLP((1, 8, 8), [3], hidden=[16], bias=True)
    x = torch.randn(5, 1, 8, 8)
    expected = model(x)
    convert_model(model, 2, False, 1.0, "uniform", "none", "default", True, biases="keep", norms="keep")
    layers = [m for m in model.modules() if isinstance(m, MaskedLayer)]
    assert all(isinstance(m.bias, nn.Parameter) for m in layers)
    assert torch.allclose(model(x), expected, atol=1e-6)  # dense mask, same weights and biases: same function


def test_kept_norms_stay_the_models_own():
    model = AlexNet((3, 32, 32), [2], channels=[4, 4, 4], hidden=[8, 8])
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d)]
    convert_model(model, 2, False, 1.0, "uniform", "none", "default", True, biases="keep", norms="keep")
    assert [m for m in model.modules() if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d)] == norms
    assert not any(isinstance(m, TaskBatchNorm) for m in model.modules())
