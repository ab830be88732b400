"""torchvision / open_clip wrappers: a file saved from the library loads by its own key names."""

import importlib.util

import pytest
import torch
import torchvision
from torch import nn

from clbench.models.torchvision_nets import OpenCLIPImage, TorchvisionResNet18, TorchvisionViT
from clbench.schema import ConfigError


def test_a_torchvision_resnet18_file_loads_and_gives_the_libraries_features(tmp_path):
    torch.manual_seed(0)
    source = torchvision.models.resnet18(weights=None).eval()
    torch.save(source.state_dict(), tmp_path / "resnet18.pt")
    model = TorchvisionResNet18([1, 28, 28], [2, 3], checkpoint=str(tmp_path / "resnet18.pt")).eval()
    source.fc = nn.Identity()
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(model.features(x), source(x.expand(-1, 3, -1, -1)), atol=1e-6)
    assert model(x, 1).shape == (4, 3)


def test_a_torchvision_vit_file_loads_and_gives_the_libraries_class_token(tmp_path):
    torch.manual_seed(0)
    dims = {"image_size": 28, "patch_size": 7, "num_layers": 2, "num_heads": 2, "hidden_dim": 16, "mlp_dim": 32}
    source = torchvision.models.VisionTransformer(**dims, num_classes=7).eval()
    torch.save(source.state_dict(), tmp_path / "vit.pt")
    model = TorchvisionViT([1, 28, 28], [2], **dims, checkpoint=str(tmp_path / "vit.pt")).eval()
    source.heads = nn.Identity()
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(model.features(x), source(x.expand(-1, 3, -1, -1)), atol=1e-6)
    # a file of another size is one line naming the mismatch
    other = torchvision.models.VisionTransformer(**{**dims, "hidden_dim": 32}).state_dict()
    torch.save(other, tmp_path / "other.pt")
    with pytest.raises(ConfigError, match=r"does not fit TorchvisionViT: .*shape mismatches"):
        TorchvisionViT([1, 28, 28], [2], **dims, checkpoint=str(tmp_path / "other.pt"))


@pytest.mark.skipif(importlib.util.find_spec("open_clip") is not None, reason="open_clip is installed here")
def test_open_clip_without_its_package_names_the_fix():
    with pytest.raises(ConfigError, match=r"pip install open_clip_torch \(and its weights"):
        OpenCLIPImage([3, 32, 32], [2])
