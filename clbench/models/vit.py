"""A small Vision Transformer (Dosovitskiy et al. 2021) for 28x28 / 32x32 images.

Small enough to pretrain and continue training on a CPU, and built like the foundation models that
pretrained-model continual learning studies (CLIP's image tower, ViT-B): patches, a class token, learned
position embeddings and pre-norm blocks of multi-head self-attention and an MLP. Each block's MLP keeps its two
linear layers as the attributes ``fc1`` and ``fc2`` (as timm and open_clip name them), so a method that works on
"the first layer of each MLP block" (SPU, Zhang et al. 2024) finds them by name: ``blocks.<i>.mlp.fc1``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clbench.models.heads import ContinualModel, MultiHead
from clbench.models.pretrained import apply_checkpoint
from clbench.schema import ConfigError

# ViT's initialisation (timm's and the original JAX code's): truncated normal of std 0.02 for the linear layers,
# the class token and the position embeddings
INIT_STD = 0.02


class PatchEmbedding(nn.Module):
    """Cut the image into non-overlapping ``patch_size`` squares and project each to ``dim`` (one strided conv)."""

    def __init__(self, channels: int, patch_size: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(channels, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # [B, patches, dim]


class Attention(nn.Module):
    """Multi-head self-attention: one ``qkv`` projection, scaled dot-product attention, an output ``proj``."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        batch, tokens, dim = x.shape
        q, k, v = self.qkv(x).view(batch, tokens, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # [B, heads, tokens, head_dim]
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))


class MLPBlock(nn.Module):
    """``fc1`` (dim -> hidden), GELU, ``fc2`` (hidden -> dim); SPU localises its updates to ``fc1``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """A pre-norm transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``."""

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLPBlock(dim, mlp_hidden)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(ContinualModel):
    """Patch embedding -> [class token; patches] + position embedding -> ``depth`` blocks -> LayerNorm -> heads.

    ``features(x)`` is the class token's final embedding (after the last LayerNorm), the vector ViT's classifier
    reads. ``patch_size`` must divide the image's height and width (7 or 14 for 28x28, 4 or 8 for 32x32).
    ``checkpoint`` loads the body from a file, ``freeze`` fixes parts of it (see
    :func:`clbench.models.pretrained.apply_checkpoint`).
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        head_sizes: Sequence[int],
        patch_size: int = 7,
        dim: int = 64,
        depth: int = 4,
        num_heads: int = 4,
        mlp_ratio: float = 2.0,
        checkpoint: str | None = None,
        freeze: Sequence[str] = (),
    ) -> None:
        super().__init__()
        channels, height, width = (int(s) for s in input_shape)
        if height % patch_size or width % patch_size:
            divisors = [p for p in range(2, min(height, width) + 1) if height % p == 0 and width % p == 0]
            raise ConfigError(
                f"model.patch_size={patch_size} does not divide the {height}x{width} images: use one of {divisors}"
            )
        if dim % num_heads:
            raise ConfigError(f"model.dim={dim} is not a multiple of model.num_heads={num_heads}: change either")
        self.patch_embed = PatchEmbedding(channels, patch_size, dim)
        num_patches = (height // patch_size) * (width // patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, dim))
        self.blocks = nn.Sequential(*(Block(dim, num_heads, round(dim * mlp_ratio)) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.heads = MultiHead(dim, head_sizes)
        self._init_weights()
        apply_checkpoint(self, checkpoint, freeze)

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.cls_token, std=INIT_STD)
        nn.init.trunc_normal_(self.pos_embed, std=INIT_STD)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=INIT_STD)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def features(self, x: Tensor) -> Tensor:
        patches = self.patch_embed(x)
        tokens = torch.cat([self.cls_token.expand(patches.shape[0], -1, -1), patches], dim=1) + self.pos_embed
        return self.norm(self.blocks(tokens))[:, 0]
