"""Other libraries' image networks as clbench bodies: torchvision's ResNet-18 and Vision Transformer, open_clip's
image encoders. Their weights come from local files only (``model.checkpoint``, or open_clip's cache folder);
nothing is downloaded unless ``model.download=true`` asks for it.

Each wrapper keeps the library's network as ``net`` without its classifier, so a file saved from the library
(``torch.save(torchvision.models.resnet18(weights=...).state_dict(), PATH)``) loads by its own key names
(:meth:`adapt_state_dict` adds the ``net.`` prefix and drops the library's classifier), and clbench's heads
sit on the network's pooled features. Inputs with one channel are repeated to three, and ``image_size`` resizes
them (bilinear) to what the weights were trained on. clbench normalises inputs with the stream dataset's own
statistics, not ImageNet's: a difference for ImageNet weights, stated here rather than hidden.

SPU-style localisation by the name ``fc1`` finds clbench's ViT only: torchvision names a block's first MLP layer
``mlp.0``, open_clip ``mlp.c_fc``.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clbench.models.heads import ContinualModel, MultiHead
from clbench.models.pretrained import apply_checkpoint
from clbench.schema import ConfigError

NET_PREFIX = "net."
RGB = 3


class _Wrapped(ContinualModel):
    """The input adaptation and key mapping the wrappers share."""

    net: nn.Module
    image_size: int | None
    classifier_prefixes: tuple[str, ...] = ()

    def _prepare(self, x: Tensor) -> Tensor:
        if x.shape[1] == 1:
            x = x.expand(-1, RGB, -1, -1)
        if self.image_size is not None and tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        return x

    def _finish(
        self, input_shape: Sequence[int], head_sizes: Sequence[int], checkpoint: str | None, freeze: Sequence[str]
    ) -> None:
        with torch.no_grad():
            width = self.features(torch.zeros(2, *input_shape)).shape[1]
        self.heads = MultiHead(width, head_sizes)
        apply_checkpoint(self, checkpoint, freeze)

    def adapt_state_dict(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """A file saved from the library itself (no ``net.`` prefix) loads by the library's names; its classifier
        is left out (clbench's heads replace it)."""
        if any(key.startswith(NET_PREFIX) for key in state):
            return state
        return {NET_PREFIX + k: v for k, v in state.items() if not k.startswith(self.classifier_prefixes)}


class TorchvisionResNet18(_Wrapped):
    """torchvision's ResNet-18 (He et al. 2016; 64 base filters, 7x7 stem, max-pool, batch-norm with running
    statistics) with its ``fc`` replaced by clbench's heads on the 512 pooled features."""

    classifier_prefixes = ("fc.",)

    def __init__(
        self,
        input_shape: Sequence[int],
        head_sizes: Sequence[int],
        image_size: int | None = None,
        checkpoint: str | None = None,
        freeze: Sequence[str] = (),
    ) -> None:
        super().__init__()
        from torchvision.models import resnet18

        self.image_size = image_size
        self.net = resnet18(weights=None)
        self.net.fc = nn.Identity()
        self._finish(_checked_shape(input_shape), head_sizes, checkpoint, freeze)

    def features(self, x: Tensor) -> Tensor:
        return self.net(self._prepare(x))


class TorchvisionViT(_Wrapped):
    """torchvision's ``VisionTransformer`` (defaults: ViT-B/16 at 224x224) with its ``heads`` replaced by clbench's
    heads on the class token after the encoder's final LayerNorm. ``image_size`` must be the one the weights were
    made for (their position embeddings fix it); smaller settings make a CPU-sized network of the same design."""

    classifier_prefixes = ("heads.",)

    def __init__(
        self,
        input_shape: Sequence[int],
        head_sizes: Sequence[int],
        image_size: int = 224,
        patch_size: int = 16,
        num_layers: int = 12,
        num_heads: int = 12,
        hidden_dim: int = 768,
        mlp_dim: int = 3072,
        checkpoint: str | None = None,
        freeze: Sequence[str] = (),
    ) -> None:
        super().__init__()
        from torchvision.models import VisionTransformer

        if image_size % patch_size:
            raise ConfigError(f"model.image_size={image_size} is not a multiple of model.patch_size={patch_size}")
        self.image_size = image_size
        self.net = VisionTransformer(image_size, patch_size, num_layers, num_heads, hidden_dim, mlp_dim)
        self.net.heads = nn.Identity()
        self._finish(_checked_shape(input_shape), head_sizes, checkpoint, freeze)

    def features(self, x: Tensor) -> Tensor:
        return self.net(self._prepare(x))


class OpenCLIPImage(_Wrapped):
    """The image tower of an open_clip model (``model_name``, e.g. ``ViT-B-32``) with the ``pretrained`` weights
    tag (e.g. ``laion2b_s34b_b79k``) from ``cache_dir``; clbench's heads read its embedding. Needs the
    ``open_clip_torch`` package; the weights are fetched only with ``download=true``."""

    def __init__(
        self,
        input_shape: Sequence[int],
        head_sizes: Sequence[int],
        model_name: str = "ViT-B-32",
        pretrained: str | None = None,
        cache_dir: str | None = None,
        download: bool = False,
        image_size: int = 224,
        checkpoint: str | None = None,
        freeze: Sequence[str] = (),
    ) -> None:
        super().__init__()
        self.image_size = image_size
        with _hub_offline(not download):
            try:
                import open_clip
            except ImportError:
                raise ConfigError(
                    "model=open_clip needs the open_clip package: pip install open_clip_torch (and its weights in "
                    "model.cache_dir, or model.download=true once on a machine with internet access)"
                ) from None
            try:
                clip = open_clip.create_model(model_name, pretrained=pretrained, cache_dir=cache_dir)
            except Exception as error:  # unknown names, missing files: open_clip raises several kinds
                raise ConfigError(
                    f"open_clip {model_name} with pretrained={pretrained} could not be made from {cache_dir} "
                    f"({type(error).__name__}: {error}); put the weights there or set model.download=true"
                ) from None
        self.net = clip.visual
        self._finish(_checked_shape(input_shape), head_sizes, checkpoint, freeze)

    def features(self, x: Tensor) -> Tensor:
        return self.net(self._prepare(x))


def _checked_shape(input_shape: Sequence[int]) -> list[int]:
    """The stream's input shape, which ``_prepare`` adapts to three channels and ``image_size``."""
    channels, height, width = (int(s) for s in input_shape)
    if channels not in (1, RGB):
        raise ConfigError(f"torchvision / open_clip bodies take 1- or 3-channel images, got {channels} channels")
    return [channels, height, width]


@contextlib.contextmanager
def _hub_offline(offline: bool) -> Iterator[None]:
    """Keep the Hugging Face hub (where open_clip fetches weights) offline while ``offline``: its environment
    switch, and its constant when the hub was imported before (it reads the switch at import)."""
    if not offline:
        yield
        return
    previous = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    constants = sys.modules.get("huggingface_hub.constants")
    before = getattr(constants, "HF_HUB_OFFLINE", None)
    if constants is not None:
        constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = previous
        if constants is not None:
            constants.HF_HUB_OFFLINE = before
