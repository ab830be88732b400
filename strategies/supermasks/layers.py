"""Masked layers that supermask strategies swap into any clbench model, and the bit packing of masks.

A :class:`MaskedLinear` / :class:`MaskedConv2d` multiplies one weight tensor by a per-task binary mask.
A task's mask comes from its score tensor while the task trains (top-k with a straight-through gradient,
Ramanujan et al. 2020, "What's Hidden in a Randomly Weighted Neural Network?"), and from a cache once the
task is learned: the cache is filled once per task and never re-sorted. With no active task the layer
mixes the cached masks with weights ``alphas`` (SupSup's superposition, Wortsman et al. 2020), which is
what one-shot task inference differentiates. :class:`TaskBatchNorm` keeps one non-affine batch-norm per
task, as SupSup's ``MultitaskNonAffineBN``, so no task's normalisation moves under another's training.

Biases: SupSup, ExSSNeT and WSN mask weights only and their layers carry no bias (the official code builds
every layer with ``bias=False``). :func:`convert_model` refuses a model with biases for them rather than
dropping the biases silently, which would run a different network than the configuration (and the result
file) says: a one-line error naming ``model.bias=false`` where the model has that switch, else an unsupported
pair (a ViT, whose biases cannot be dropped: a comparison sweep records it as skipped); PackNet keeps them
(``biases="keep"``: trained on the first task, then frozen, as its paper).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clbench.strategy import UnsupportedScenarioError

SHARED = "shared"
BIASES = ("refuse", "keep")
NORMS = ("per_task", "keep")


def num_kept(numel: int, density: float) -> int:
    """How many of ``numel`` weights a top-k mask at ``density`` keeps (SupSup's ``GetSubnet`` rule)."""
    return numel - int((1.0 - density) * numel)


def top_k_mask(scores: Tensor, density: float) -> Tensor:
    """A 0/1 mask (dtype of ``scores``) with ones at the ``num_kept`` largest entries of ``scores``."""
    flat = scores.detach().flatten()
    mask = torch.zeros_like(flat)
    mask[flat.topk(num_kept(flat.numel(), density), sorted=False).indices] = 1.0
    return mask.view_as(scores)


class TopKMask(torch.autograd.Function):
    """Top-k supermask whose backward passes the gradient straight through to the scores
    (Ramanujan et al. 2020; SupSup's ``GetSubnet``)."""

    @staticmethod
    def forward(ctx, scores: Tensor, density: float) -> Tensor:  # type: ignore[override]
        return top_k_mask(scores, density)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return grad, None


def signed_constant_(weight: Tensor) -> None:
    """Re-draw ``weight`` as +-std with std = gain(relu) / sqrt(fan_in) (SupSup's ``signed_constant``);
    the signs come from a fresh Kaiming-uniform draw."""
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    fan_in = nn.init._calculate_correct_fan(weight, "fan_in")
    std = nn.init.calculate_gain("relu") / math.sqrt(fan_in)
    with torch.no_grad():
        weight.copy_(weight.sign() * std)


def pack_bits(mask: Tensor) -> Tensor:
    """Pack a bool tensor into uint8, 8 entries a byte (what a mask costs to store)."""
    flat = mask.flatten().to(torch.uint8)
    flat = F.pad(flat, (0, (-flat.numel()) % 8))
    powers = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8, device=flat.device)
    return (flat.view(-1, 8) * powers).sum(1, dtype=torch.uint8)


def unpack_bits(packed: Tensor, shape: Sequence[int]) -> Tensor:
    """Inverse of :func:`pack_bits`: the bool tensor of ``shape``."""
    shifts = torch.arange(7, -1, -1, device=packed.device, dtype=torch.uint8)
    bits = (packed.unsqueeze(1) >> shifts) & 1
    return bits.flatten()[: math.prod(shape)].view(*shape).bool()


class MaskedLayer(nn.Module):
    """Shared behaviour of :class:`MaskedLinear` and :class:`MaskedConv2d`.

    ``owners`` lists the tasks that use the layer: every task for the body and a shared head, one task
    for a per-task head. ``scores`` holds one tensor per owner (``per_task``), one for all (``shared``,
    WSN's single score per weight) or none (``none``, PackNet). ``masks`` maps a learned task to its
    cached float mask; ``used`` is the union of the cached masks, the weights no later task may change.
    """

    weight: nn.Parameter

    def _init_masking(
        self,
        owners: Sequence[int],
        density: float,
        scores: str,
        weight_init: str,
        train_weights: bool,
    ) -> None:
        if not 0.0 < density <= 1.0:
            raise ValueError(f"strategy.density must be in (0, 1], got {density}")
        self.owners = list(owners)
        self.density = float(density)
        if weight_init == "signed_constant":
            signed_constant_(self.weight.data)
        elif weight_init != "default":
            raise ValueError(f"unknown strategy.weight_init {weight_init!r}: use signed_constant or default")
        self.weight.requires_grad_(train_weights)
        self.scores = nn.ParameterDict()
        if scores in ("per_task", SHARED):
            keys = [str(t) for t in self.owners] if scores == "per_task" else [SHARED]
            for key in keys:
                score = torch.empty_like(self.weight)
                nn.init.kaiming_uniform_(score, a=math.sqrt(5))
                self.scores[key] = nn.Parameter(score)
        elif scores != "none":
            raise ValueError(f"unknown score layout {scores!r}")
        self.masks: dict[int, Tensor] = {}
        self.used = torch.zeros_like(self.weight, dtype=torch.bool)
        self.task: int | None = self.owners[0]
        self.alphas: Tensor | None = None
        self.train_mask: Tensor | None = None
        self._stacked: Tensor | None = None
        self._stacked_tasks: list[int] = []

    # -- which mask ----------------------------------------------------------------------------------
    def active_task(self) -> int | None:
        """The task whose mask applies; a per-task head always serves its own task."""
        return self.owners[0] if len(self.owners) == 1 else self.task

    def score(self, task: int) -> Tensor:
        return self.scores[SHARED] if SHARED in self.scores else self.scores[str(task)]

    def supermask(self) -> Tensor:
        """The mask for this forward pass: cached, mixed by ``alphas``, or top-k of the live scores."""
        task = self.active_task()
        if task is None:
            assert self.alphas is not None and self._stacked is not None, "set alphas before a mixed forward"
            shape = (-1,) + (1,) * self.weight.dim()
            return (self.alphas.view(shape) * self._stacked).sum(0)
        if task in self.masks:
            return self.masks[task]
        if self.train_mask is not None:
            return self.train_mask
        if not len(self.scores):
            return torch.ones_like(self.weight)
        return TopKMask.apply(self.score(task).abs(), self.density)

    def effective_weight(self) -> Tensor:
        return self.weight * self.supermask()

    # -- the cache -----------------------------------------------------------------------------------
    def set_mask(self, task: int, mask: Tensor) -> None:
        """Fix ``task``'s mask (a bool tensor) and refresh the union and the stack for mixing."""
        self.masks[task] = mask.to(self.weight.dtype).detach().clone()
        self.used = torch.zeros_like(self.used)
        for cached in self.masks.values():
            self.used |= cached.bool()
        tasks = sorted(self.masks)
        # Built here, not lazily in an inference-mode evaluation, so task inference can differentiate it.
        self._stacked = torch.stack([self.masks[t] for t in tasks])
        self._stacked_tasks = tasks

    def cache_mask(self, task: int) -> None:
        """Compute ``task``'s top-k mask from its scores once and keep it (after the task is learned)."""
        with torch.no_grad():
            self.set_mask(task, top_k_mask(self.score(task).abs(), self.density).bool())

    def drop_mask(self, task: int) -> None:
        """Forget ``task``'s cached mask (it trains again from its scores)."""
        if task in self.masks:
            remaining = {t: m.bool() for t, m in self.masks.items() if t != task}
            self.masks, self._stacked, self._stacked_tasks = {}, None, []
            self.used = torch.zeros_like(self.used)
            for t, m in remaining.items():
                self.set_mask(t, m)


class MaskedLinear(MaskedLayer):
    """``nn.Linear`` whose weight is multiplied by the active task's supermask; the source's bias (unmasked,
    shared by all tasks) only with ``bias=True``."""

    def __init__(
        self,
        source: nn.Linear,
        owners: Sequence[int],
        density: float,
        scores: str,
        weight_init: str,
        train_weights: bool,
        bias: bool = False,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = source.in_features, source.out_features
        self.weight = nn.Parameter(source.weight.detach().clone())
        self.bias = _copied_bias(source, bias)
        self._init_masking(owners, density, scores, weight_init, train_weights)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.effective_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, density={self.density}, owners={len(self.owners)}"


class MaskedConv2d(MaskedLayer):
    """``nn.Conv2d`` whose weight is multiplied by the active task's supermask; the source's bias (unmasked,
    shared by all tasks) only with ``bias=True``."""

    def __init__(
        self,
        source: nn.Conv2d,
        owners: Sequence[int],
        density: float,
        scores: str,
        weight_init: str,
        train_weights: bool,
        bias: bool = False,
    ) -> None:
        super().__init__()
        self.in_channels, self.out_channels = source.in_channels, source.out_channels
        self.stride, self.padding = source.stride, source.padding
        self.dilation, self.groups = source.dilation, source.groups
        self.weight = nn.Parameter(source.weight.detach().clone())
        self.bias = _copied_bias(source, bias)
        self._init_masking(owners, density, scores, weight_init, train_weights)

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.effective_weight(), self.bias, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, density={self.density}, owners={len(self.owners)}"


def _copied_bias(source: nn.Linear | nn.Conv2d, keep: bool) -> nn.Parameter | None:
    """A copy of ``source``'s bias where kept, else None."""
    if not keep or source.bias is None:
        return None
    return nn.Parameter(source.bias.detach().clone())


class TaskBatchNorm(nn.Module):
    """One non-affine batch-norm per task (SupSup's ``MultitaskNonAffineBN``); ``task=None`` mixes the
    learned tasks' outputs by ``alphas`` like the masked layers do."""

    def __init__(self, source: nn.BatchNorm1d | nn.BatchNorm2d, num_tasks: int) -> None:
        super().__init__()
        kind = type(source)
        self.norms = nn.ModuleList(
            kind(source.num_features, eps=source.eps, affine=False, track_running_stats=source.track_running_stats)
            for _ in range(num_tasks)
        )
        self.task: int | None = 0
        self.alphas: Tensor | None = None
        self.mixed_tasks: list[int] = []

    def forward(self, x: Tensor) -> Tensor:
        if self.task is not None:
            return self.norms[self.task](x)
        assert self.alphas is not None
        return sum(a * self.norms[t](x) for a, t in zip(self.alphas, self.mixed_tasks, strict=True))


def layer_density(weight: Tensor, density: float, rule: str) -> float:
    """Per-layer density: ``uniform`` (every layer ``density``) or the ER budget of SupSup / ExSSNeT,
    min(0.5, density * (fan_out + fan_in) / numel), where ``density`` is the ER scale."""
    if rule == "uniform":
        return density
    if rule == "er":
        return min(0.5, density * (weight.shape[0] + weight.shape[1]) / weight.numel())
    raise ValueError(f"unknown strategy.layer_density {rule!r}: use uniform or er")


def convert_model(
    model: nn.Module,
    num_tasks: int,
    task_heads: bool,
    density: float,
    density_rule: str,
    scores: str,
    weight_init: str,
    train_weights: bool,
    private_density: float | None = None,
    biases: str = "refuse",
    norms: str = "per_task",
) -> list[MaskedLayer]:
    """Swap every Linear / Conv2d of ``model`` for its masked version and (``norms="per_task"``) every
    batch-norm for a :class:`TaskBatchNorm`, in place; returns the masked layers in module order.

    With ``task_heads`` the layers of ``model.heads.heads[h]`` belong to task ``h`` alone; every other
    layer belongs to all tasks. ``private_density`` (if given) overrides the density of task-private
    layers (WSN and PackNet keep per-task classifiers dense). ``biases="refuse"`` stops with a one-line
    error naming the fix when a layer has a bias (the masked layers of SupSup / ExSSNeT / WSN have none);
    ``"keep"`` carries each bias over unmasked. ``norms="keep"`` leaves the model's batch-norms as they are.
    """
    if biases not in BIASES:
        raise ValueError(f"unknown bias handling {biases!r}: use one of {', '.join(BIASES)}")
    if norms not in NORMS:
        raise ValueError(f"unknown batch-norm handling {norms!r}: use one of {', '.join(NORMS)}")
    if biases == "refuse":
        with_bias = [
            name for name, m in model.named_modules() if isinstance(m, nn.Linear | nn.Conv2d) and m.bias is not None
        ]
        if with_bias:
            found = f"the model has biases ({with_bias[0]}, {len(with_bias)} layers)"
            if "bias" in inspect.signature(type(model)).parameters:  # the user can build it without them
                raise ValueError(
                    f"this supermask strategy's masked layers carry no bias, but {found}: set model.bias=false"
                )
            # no switch to drop them (a ViT, a pretrained body): the pair cannot run, a comparison sweep skips it
            raise UnsupportedScenarioError(
                f"this supermask strategy masks bias-free layers (as its paper's code builds them), and {found} "
                f"with no model.bias switch ({type(model).__name__}): use a model without biases, e.g. model=mlp "
                "model.bias=false"
            )
    head_owner: dict[int, int] = {}
    if task_heads:
        for h, head in enumerate(model.heads.heads):
            for module in head.modules():
                head_owner[id(module)] = h
    masked: list[MaskedLayer] = []
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, (nn.Linear, nn.Conv2d)):
                owners = [head_owner[id(child)]] if id(child) in head_owner else list(range(num_tasks))
                d = layer_density(child.weight, density, density_rule)
                if len(owners) == 1 and private_density is not None:
                    d = private_density
                cls = MaskedLinear if isinstance(child, nn.Linear) else MaskedConv2d
                layer = cls(child, owners, d, scores, weight_init, train_weights, biases == "keep")
                setattr(parent, child_name, layer.to(child.weight.device))
            elif norms == "per_task" and isinstance(child, (nn.BatchNorm1d, nn.BatchNorm2d)):
                setattr(parent, child_name, TaskBatchNorm(child, num_tasks).to(_device_of(model)))
    for module in model.modules():
        if isinstance(module, MaskedLayer):
            masked.append(module)
    return masked


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
