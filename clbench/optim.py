"""The trainer's optimizers (``trainer.optimizer``): its own plain SGD, and the ``torch.optim`` ones.

The SGD here is torch.optim.SGD's update, bit for bit, without its per-step machinery.

``torch.optim.SGD.step`` spends ~30 µs per call on wrappers (profiler records, step hooks, graph-break
guards) around an update that costs ~10 µs for a small MLP: at batch 10 (GPM's PMNIST protocol) that is a
few percent of every step. Constructing any ``torch.optim`` optimizer also imports ``torch._dynamo``
(~1 s of a short run's start-up). ``Trainer.fit`` therefore uses this class for ``trainer.optimizer=sgd``;
``Trainer.make_optimizer`` still returns real ``torch.optim`` optimizers (:func:`torch_optimizer`) for
strategies and bridges that need that API (Avalanche templates, lr schedulers), and for Adam / AdamW.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor


class SGD:
    """SGD with optional momentum and L2 weight decay, the update of ``torch.optim.SGD`` (dampening 0, no
    Nesterov): ``g += wd * p``; ``b = g`` on the first step, else ``b = momentum * b + g``; ``p -= lr * b``.
    Parameters whose gradient is None are skipped, as torch does. ``param_groups[0]["lr"]`` may be changed
    between steps (the trainer's lr schedule does)."""

    def __init__(self, params: Iterable[Tensor], lr: float, momentum: float = 0.0, weight_decay: float = 0.0) -> None:
        self.params = list(params)
        self.param_groups = [{"params": self.params, "lr": lr, "momentum": momentum, "weight_decay": weight_decay}]
        self.momentum_buffers: list[Tensor | None] = [None] * len(self.params)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for param in self.params:
            if set_to_none:
                param.grad = None
            elif param.grad is not None:
                param.grad.zero_()

    def step(self) -> None:
        if torch.is_grad_enabled():  # the trainer's closed-form steps already run without autograd
            with torch.no_grad():
                self._update()
        else:
            self._update()

    def _update(self) -> None:
        group = self.param_groups[0]
        lr, momentum, weight_decay = group["lr"], group["momentum"], group["weight_decay"]
        if momentum == 0 and weight_decay == 0:  # plain SGD: every parameter's update in one call
            params = [p for p in self.params if p.grad is not None]
            torch._foreach_add_(params, [p.grad for p in params], alpha=-lr)
            return
        for k, param in enumerate(self.params):
            grad = param.grad
            if grad is None:
                continue
            if weight_decay != 0:
                grad = grad.add(param, alpha=weight_decay)
            if momentum != 0:
                buffer = self.momentum_buffers[k]
                if buffer is None:
                    buffer = self.momentum_buffers[k] = torch.clone(grad).detach()
                else:
                    buffer.mul_(momentum).add_(grad)
                grad = buffer
            param.add_(grad, alpha=-lr)


OPTIMIZERS = ("sgd", "adam", "adamw")
FitOptimizer = SGD | torch.optim.Optimizer


def torch_optimizer(
    name: str, params: Iterable[Tensor], lr: float, momentum: float, weight_decay: float, capturable: bool = False
) -> torch.optim.Optimizer:
    """``trainer.optimizer`` ``name`` (one of :data:`OPTIMIZERS`) as a ``torch.optim`` optimizer. ``momentum``
    applies to SGD only. ``capturable`` (Adam / AdamW) keeps the step count on the device, so that a step
    recorded as a CUDA graph advances it on every replay."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, capturable=capturable)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, capturable=capturable)
