"""Shared machinery of the gradient-projection family: constrained layers, representation matrices,
the energy-threshold basis updates of GPM and TRGP, and projection of layer gradients.

A constrained layer is an ``nn.Linear`` or ``nn.Conv2d`` whose weight (and bias, if any) is kept from
interfering with old tasks. Its gradient is read as a matrix ``[out, d]``: the flattened weight, plus one
last column for the bias, whose input is the constant 1. Representation matrices use the same ``d`` rows
(layer inputs for linear layers, unfolded patches for convolutions, a row of ones for a bias), so a basis
of old inputs and a gradient matrix always meet in the same space.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

CONSTRAINED_TYPES = (nn.Linear, nn.Conv2d)


@dataclass
class ConstrainedLayer:
    """One projected layer: its dotted name in the model, the module, and its input dimension ``d``."""

    name: str
    module: nn.Linear | nn.Conv2d

    @property
    def has_bias(self) -> bool:
        return self.module.bias is not None

    @property
    def dim(self) -> int:
        """Rows of the representation matrix = columns of the gradient matrix."""
        return self.module.weight[0].numel() + int(self.has_bias)

    def params(self) -> list[nn.Parameter]:
        return [self.module.weight] + ([self.module.bias] if self.module.bias is not None else [])

    def weight_matrix(self, weight: Tensor | None = None, bias: Tensor | None = None) -> Tensor:
        """``[out, d]``: the weight (or a stand-in such as its gradient) with the bias as last column."""
        weight = self.module.weight if weight is None else weight
        flat = weight.reshape(weight.shape[0], -1)
        if not self.has_bias:
            return flat
        bias = self.module.bias if bias is None else bias
        return torch.cat([flat, bias.unsqueeze(1)], dim=1)

    def factor_inputs(self, inputs: Tensor) -> Tensor:
        """A step's layer inputs ``[N, in]`` as rows of the gradient's ``d`` columns: a constant 1 appended
        for the bias, so that ``out_grad^T`` times them is the ``[out, d]`` gradient matrix."""
        if not self.has_bias:
            return inputs
        return torch.cat([inputs, torch.ones_like(inputs[:, :1])], dim=1)

    def grad_matrix(self) -> Tensor | None:
        """The current gradient as ``[out, d]``; a view of ``weight.grad`` when there is no bias."""
        weight, bias = self.module.weight, self.module.bias
        if weight.grad is None:
            return None
        if bias is None:
            return weight.grad.view(weight.shape[0], -1)
        bias_grad = bias.grad if bias.grad is not None else torch.zeros_like(bias)
        return torch.cat([weight.grad.view(weight.shape[0], -1), bias_grad.unsqueeze(1)], dim=1)

    def set_grad_matrix(self, grad: Tensor) -> None:
        """Write an ``[out, d]`` gradient back into ``weight.grad`` (and ``bias.grad``)."""
        weight, bias = self.module.weight, self.module.bias
        cols = weight[0].numel()
        if weight.grad is None:
            weight.grad = torch.empty_like(weight)
        weight.grad.view(weight.shape[0], -1).copy_(grad[:, :cols])
        if bias is not None:
            if bias.grad is None:
                bias.grad = torch.empty_like(bias)
            bias.grad.copy_(grad[:, cols])

    def split(self, matrix: Tensor) -> dict[str, Tensor]:
        """Named weight (and bias) tensors from an ``[out, d]`` matrix."""
        weight = self.module.weight
        cols = weight[0].numel()
        out = {f"{self.name}.weight": matrix[:, :cols].reshape(weight.shape)}
        if self.has_bias:
            out[f"{self.name}.bias"] = matrix[:, cols]
        return out


def find_layers(model: nn.Module, names: Sequence[str] | None, include_heads: bool) -> list[ConstrainedLayer]:
    """Constrained layers in module order: ``names`` if given, else every linear / conv layer, heads
    included only when ``include_heads`` (a shared head is projected; per-task heads stay free)."""
    found = {n: m for n, m in model.named_modules() if isinstance(m, CONSTRAINED_TYPES)}
    if names is not None:
        missing = [n for n in names if n not in found]
        if missing:
            raise ValueError(
                f"strategy.layers names {missing}, which are not linear / conv layers of the model: "
                f"pick from {list(found)}"
            )
        return [ConstrainedLayer(n, found[n]) for n in found if n in set(names)]
    return [ConstrainedLayer(n, m) for n, m in found.items() if include_heads or not n.startswith("heads.")]


def per_layer(value: float | int | Sequence[float] | Sequence[int], count: int, key: str) -> list:
    """One value per constrained layer from a scalar or a list (config validation)."""
    if isinstance(value, (int, float)):
        return [value] * count
    values = list(value)
    if len(values) == 1:
        return values * count
    if len(values) != count:
        raise ValueError(
            f"strategy.{key} lists {len(values)} values for {count} projected layers: give one value or {count}"
        )
    return values


@torch.no_grad()
def representation_matrices(
    layers: Sequence[ConstrainedLayer],
    forward: Callable[[Tensor], Tensor],
    x: Tensor,
    num_samples: Sequence[int],
) -> list[Tensor]:
    """Per layer, the ``[d, n]`` matrix of its inputs on the first ``num_samples[l]`` examples of ``x``
    (GPM, Saha et al. 2021, Sec. 4): linear layers take the input vectors, convolutions every patch the
    kernel sees with the layer's own kernel size, stride, padding and dilation (``F.unfold``), and a bias
    adds a row of ones. Inputs are caught by forward hooks, so any model works."""
    captured: dict[int, Tensor] = {}
    handles = [
        layer.module.register_forward_hook(lambda _m, inputs, _o, i=i: captured.__setitem__(i, inputs[0].detach()))
        for i, layer in enumerate(layers)
    ]
    try:
        forward(x)
    finally:
        for handle in handles:
            handle.remove()
    mats = []
    for i, layer in enumerate(layers):
        inputs = captured[i][: num_samples[i]]
        module = layer.module
        if isinstance(module, nn.Conv2d):
            if isinstance(module.padding, str):
                raise ValueError(f"layer {layer.name}: string padding is not supported, give integers")
            patches = F.unfold(inputs, module.kernel_size, module.dilation, module.padding, module.stride)
            mat = patches.permute(1, 0, 2).reshape(patches.shape[1], -1)
        else:
            mat = inputs.reshape(-1, inputs.shape[-1]).T
        if layer.has_bias:
            mat = torch.cat([mat, torch.ones_like(mat[:1])], dim=0)
        mats.append(mat.double())
    return mats


def first_task_rank(singular_values: Tensor, threshold: float) -> int:
    """GPM Eq. 5 as the official code counts it: the number of leading singular values whose cumulative
    energy ratio stays below ``threshold``."""
    energy = singular_values.double() ** 2
    ratio = energy / energy.sum()
    return int((torch.cumsum(ratio, 0) < threshold).sum())


def residual_rank(captured_ratio: float, residual_energy_ratios: Tensor, threshold: float) -> int:
    """GPM Eq. 9: starting from the energy ``captured_ratio`` the old bases already hold, add residual
    directions (largest first) while the running total is below ``threshold``."""
    accumulated, rank = captured_ratio, 0
    for ratio in residual_energy_ratios.tolist():
        if accumulated >= threshold:
            break
        accumulated += ratio
        rank += 1
    return rank


def gpm_update(bases: Tensor | None, activation: Tensor, threshold: float) -> Tensor | None:
    """GPM's memory update for one layer (Algorithm 1): the first task keeps the top singular vectors
    of its representation; later tasks add the top singular vectors of the residual left after removing
    the old bases, just enough to reach ``threshold`` of the total energy. Returns ``[d, r]`` or None."""
    activation = activation.double()
    if bases is None or bases.shape[1] == 0:
        u, s, _ = torch.linalg.svd(activation, full_matrices=False)
        rank = first_task_rank(s, threshold)
        return u[:, :rank].float() if rank > 0 else None
    old = bases.double()
    total = float((activation**2).sum())
    residual = activation - old @ (old.T @ activation)
    u, s, _ = torch.linalg.svd(residual, full_matrices=False)
    energy = s**2
    rank = residual_rank((total - float(energy.sum())) / total, energy / total, threshold)
    if rank == 0:
        return bases
    stacked = torch.cat([old, u[:, :rank]], dim=1)
    return stacked[:, : stacked.shape[0]].float()


def trgp_update(
    bases: Tensor | None, activation: Tensor, threshold: float, skip_first_residual: bool = False
) -> tuple[Tensor | None, Tensor | None]:
    """TRGP's memory update for one layer (official code's ``get_space_and_grad``): old bases (energy of
    the new task's inputs along each) and new residual directions (their squared singular values) are
    ranked together and taken, largest first, until ``threshold`` of the total energy is reached. The
    chosen ones are the new task's own basis (used later for its trust region); the chosen residual
    directions also join the shared memory. Returns ``(memory [d, r], task basis [d, r_t])``.

    ``skip_first_residual`` reproduces the official code (``sel_index > r_pre``, an off-by-one: index
    ``r_pre`` is the first, largest, residual direction): that direction stays in the task's own basis but
    never enters the shared memory, so later tasks' gradients are not projected out of it. The default
    (False) adds every chosen residual direction, as the paper's text describes."""
    if bases is None or bases.shape[1] == 0:
        memory = gpm_update(None, activation, threshold)
        return memory, memory
    activation, old = activation.double(), bases.double()
    total = float((activation**2).sum())
    captured = ((old.T @ activation) ** 2).sum(dim=1)
    u, s, _ = torch.linalg.svd(activation - old @ (old.T @ activation), full_matrices=False)
    keep = s**2 > 1e-12 * total
    u, energy = u[:, keep], (s**2)[keep]
    candidates = torch.cat([old, u], dim=1)
    scores = torch.cat([captured, energy])
    order = torch.argsort(scores, descending=True)
    accumulated, rank = 0.0, 0
    for score in scores[order].tolist():
        if accumulated >= threshold * total or rank == activation.shape[0]:
            break
        accumulated += score
        rank += 1
    chosen = order[:rank]
    first_new = old.shape[1] + int(skip_first_residual)
    new = chosen[chosen >= first_new].sort().values
    memory = torch.cat([old, candidates[:, new]], dim=1)[:, : activation.shape[0]]
    return memory.float(), candidates[:, chosen].float()


class Projector:
    """Removes the span of orthonormal ``bases`` ([d, r]) from the rows of a gradient matrix.

    ``g - (g M) M^T`` when r is small next to d, else ``g - g (M M^T)`` with the square matrix formed
    once, as GPM's ``feature_mat``; both are the same projection.
    """

    def __init__(self, bases: Tensor) -> None:
        self.bases = bases
        dim, rank = bases.shape
        self.dense = bases @ bases.T if 2 * rank >= dim else None

    def _factors(self, grad: Tensor) -> tuple[Tensor, Tensor]:
        """Two matrices whose product is the part of ``grad`` inside the span: ``(g, M M^T)`` with the dense
        form, else ``(g M, M^T)``. One choice of form for every projection below."""
        if self.dense is not None:
            return grad, self.dense
        return grad @ self.bases, self.bases.T

    def component(self, grad: Tensor) -> Tensor:
        """The part of ``grad`` inside the span."""
        left, right = self._factors(grad)
        return left @ right

    def orthogonal(self, grad: Tensor) -> Tensor:
        """``grad`` minus its part inside the span, the subtraction fused into the last product."""
        return torch.addmm(grad, *self._factors(grad), alpha=-1)

    def remove_(self, grad: Tensor) -> Tensor:
        """In place: ``grad`` minus its part inside the span."""
        left, right = self._factors(grad)
        if left is grad:  # an in-place addmm must not read the matrix it writes
            return grad.sub_(grad @ right)
        return grad.addmm_(left, right, alpha=-1)

    def orthogonal_from_factors(self, out_grad: Tensor, inputs: Tensor) -> Tensor | None:
        """``(delta^T X)(I - M M^T)`` computed as ``delta^T (X - X M M^T)`` for a linear layer whose weight
        gradient is ``delta^T X`` (``out_grad`` [N, out], ``inputs`` [N, d]); None where that is not
        cheaper than projecting the formed gradient (large batches). Factors captured under bf16 autocast
        are projected in the bases' precision (fp32), as the formed gradient would be."""
        count, dim = inputs.shape
        rank, out = self.bases.shape[1], out_grad.shape[1]
        cost = 2 * count * dim * min(rank, dim) + out * count * dim
        if cost >= out * dim * min(2 * rank, dim):
            return None
        dtype = self.bases.dtype
        if inputs.dtype != dtype or out_grad.dtype != dtype:  # a no-op .to() still costs a call per step
            inputs, out_grad = inputs.to(dtype), out_grad.to(dtype)
        return out_grad.T @ self.orthogonal(inputs)
