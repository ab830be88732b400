"""The small Vision Transformer: shapes, the names SPU localises to, seeding, and bad patch sizes."""

import pytest
import torch
from torch import nn

from clbench.models import ViT
from clbench.schema import ConfigError


@pytest.mark.parametrize(("shape", "patch_size"), [((1, 28, 28), 7), ((3, 32, 32), 4), ((1, 28, 28), 14)])
def test_forward_and_feature_shapes(shape, patch_size):
    model = ViT(shape, [3, 5], patch_size=patch_size, dim=32, depth=2, num_heads=4)
    x = torch.randn(6, *shape)
    assert model.features(x).shape == (6, 32)
    assert model(x, 0).shape == (6, 3)
    assert model(x, 1).shape == (6, 5)
    assert model.pos_embed.shape == (1, (shape[1] // patch_size) * (shape[2] // patch_size) + 1, 32)


def test_each_mlp_block_names_its_layers_fc1_and_fc2():
    model = ViT((1, 28, 28), [2], dim=16, depth=3, num_heads=2, mlp_ratio=2.0)
    modules = dict(model.named_modules())
    fc1 = sorted(name for name in modules if name.endswith("fc1"))
    assert fc1 == ["blocks.0.mlp.fc1", "blocks.1.mlp.fc1", "blocks.2.mlp.fc1"]
    for name in fc1:
        first, second = modules[name], modules[name.replace("fc1", "fc2")]
        assert isinstance(first, nn.Linear) and (first.in_features, first.out_features) == (16, 32)
        assert isinstance(second, nn.Linear) and (second.in_features, second.out_features) == (32, 16)


def test_features_are_the_class_token_after_the_final_layernorm():
    """features(x) is position 0 (the class token) of the last block's output, through the final LayerNorm."""
    torch.manual_seed(0)
    model = ViT((1, 28, 28), [2], dim=32, depth=2, num_heads=4)
    seen = []
    model.blocks.register_forward_hook(lambda module, inputs, output: seen.append(output))
    features = model.features(torch.randn(4, 1, 28, 28))
    (tokens,) = seen
    assert tokens.shape == (4, 17, 32)
    assert torch.equal(features, model.norm(tokens[:, 0]))
    assert not torch.allclose(features, model.norm(tokens[:, 1]))


def test_same_seed_same_weights_other_seed_other_weights():
    def build(seed):
        torch.manual_seed(seed)
        return ViT((1, 28, 28), [2, 2], dim=16, depth=2, num_heads=2)

    a, b, c = build(0).state_dict(), build(0).state_dict(), build(1).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["pos_embed"], c["pos_embed"])
    assert not torch.equal(a["blocks.0.mlp.fc1.weight"], c["blocks.0.mlp.fc1.weight"])


def test_attention_mixes_tokens():
    """The class token's features depend on the patches (the attention reads them): two images that differ in
    one corner patch only give different features."""
    torch.manual_seed(0)
    model = ViT((1, 28, 28), [2], dim=16, depth=1, num_heads=2)
    x = torch.randn(1, 1, 28, 28)
    y = x.clone()
    y[..., :7, :7] += 1.0
    assert not torch.allclose(model.features(x), model.features(y))


@pytest.mark.parametrize(("kwargs", "fix"), [({"patch_size": 5}, "patch_size=5"), ({"dim": 30}, "dim=30")])
def test_bad_geometry_is_one_config_error(kwargs, fix):
    with pytest.raises(ConfigError, match=fix):
        ViT((1, 28, 28), [2], **{"num_heads": 4, **kwargs})
