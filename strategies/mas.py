"""Memory Aware Synapses (Aljundi et al., ECCV 2018): importance = sensitivity of the output's norm."""

from __future__ import annotations

import torch
from torch import nn

from clbench.streams import Task
from strategies.regularization import ParamDict, QuadraticRegularizer


class MAS(QuadraticRegularizer):
    """loss = CE + lambda * sum_i Omega_i (theta_i - theta*_i)^2, theta* = the weights after the last task.

    Omega for a task = mean over its training batches b of | d/dtheta mean_{x in b} ||f(x)||_2^2 |, with
    f the task's output (its own head in the task scenario). Labels are not used, as in the paper. The
    absolute value is taken per batch, not per sample (one backward pass per batch, on the device); this
    is the estimate of Aljundi et al.'s and FACIL's / Avalanche's code and is at most the per-sample
    mean, equal to it where the samples' gradients share a sign. Importances of successive tasks are
    summed, or, with ``alpha`` set, averaged as ``alpha * old + (1 - alpha) * new`` (Avalanche's
    ``MAS(lambda_reg, alpha)``, default 0.5 there).
    """

    name = "mas"
    graph_safe = True  # its step hooks are recorded whole by trainer.cuda_graphs

    def __init__(
        self, mas_lambda: float = 1.0, alpha: float | None = None, importance_batch_size: int | None = None
    ) -> None:
        super().__init__(mas_lambda, importance_batch_size)
        if alpha is not None and not 0.0 <= alpha <= 1.0:
            raise ValueError(f"strategy.alpha must be in [0, 1] or null (sum importances), got {alpha}")
        self.alpha = alpha

    def estimate_importance(self, task: Task, params: dict[str, nn.Parameter]) -> ParamDict:
        assert self.model is not None
        self.model.eval()
        names, tensors = list(params), list(params.values())
        importance = [torch.zeros_like(p) for p in tensors]
        num_batches = 0
        for x, _ in self.task_batches(task):
            squared_norm = self.forward(x, task.id).pow(2).sum(dim=1).mean()
            grads = torch.autograd.grad(squared_norm, tensors, allow_unused=True)
            for acc, grad in zip(importance, grads, strict=True):
                if grad is not None:
                    acc.add_(grad.abs())
            num_batches += 1
        return {name: acc / max(1, num_batches) for name, acc in zip(names, importance, strict=True)}

    def consolidate(self, new_importance: ParamDict, new_anchor: ParamDict) -> None:
        if self.alpha is None:
            super().consolidate(new_importance, new_anchor)
            return
        for name, value in new_importance.items():
            old = self.importance.get(name)
            self.importance[name] = value if old is None else self.alpha * old + (1.0 - self.alpha) * value
        self.anchor.update(new_anchor)
