"""Elastic Weight Consolidation (Kirkpatrick et al., PNAS 2017): a Fisher-weighted pull towards old solutions."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from clbench.streams import Task
from strategies.regularization import ParamDict, QuadraticRegularizer


def batch_fisher_diagonal(strategy: QuadraticRegularizer, task: Task, params: dict[str, nn.Parameter]) -> ParamDict:
    """Diagonal empirical Fisher of ``task`` from mini-batch gradients, for the parameters in ``params``.

    Variant and normalisation: for each consecutive batch b of the task's training set (batch size =
    ``importance_batch_size`` or the trainer's), g_b = grad of the batch-mean log-likelihood of the *true*
    labels (empirical, not sampled from the model), and F = mean over batches of g_b ** 2. Squaring a
    batch-mean gradient estimates (per-sample empirical Fisher) / |b| + (mean gradient) ** 2, so values
    are about |b| times smaller than the per-sample Fisher; lambda has to be read with that scale. It is
    the estimate Avalanche's EWCPlugin uses, so the same lambda means the same thing in both. Dropout is
    off (eval mode) while estimating.
    """
    assert strategy.model is not None
    strategy.model.eval()
    names, tensors = list(params), list(params.values())
    fisher = [torch.zeros_like(p) for p in tensors]
    num_batches = 0
    for x, y in strategy.task_batches(task):
        log_likelihood = -F.cross_entropy(strategy.forward(x, task.id), y)
        grads = torch.autograd.grad(log_likelihood, tensors, allow_unused=True)
        for acc, grad in zip(fisher, grads, strict=True):
            if grad is not None:
                acc.add_(grad.pow(2))
        num_batches += 1
    return {name: acc / max(1, num_batches) for name, acc in zip(names, fisher, strict=True)}


class EWC(QuadraticRegularizer):
    """EWC: loss = CE + lambda * sum_k sum_i F_k,i (theta_i - theta*_k,i)^2 over the finished tasks k.

    Kirkpatrick et al. keep one penalty per old task. A sum of quadratics is one quadratic, so this
    class stores the summed Fisher F = sum_k F_k and the Fisher-weighted mean anchor
    m = sum_k F_k theta*_k / F: the loss differs from the per-task sum only by a constant and the
    gradient is identical, at the memory of one anchor. The penalty has no 1/2 factor (Avalanche's
    convention), so ``ewc_lambda`` here equals Avalanche's ``ewc_lambda``. See
    :func:`batch_fisher_diagonal` for the Fisher variant.
    """

    name = "ewc"
    graph_safe = True  # its step hooks are recorded whole by trainer.cuda_graphs

    def __init__(self, ewc_lambda: float = 10.0, importance_batch_size: int | None = None) -> None:
        super().__init__(ewc_lambda, importance_batch_size)

    def estimate_importance(self, task: Task, params: dict[str, nn.Parameter]) -> ParamDict:
        return batch_fisher_diagonal(self, task, params)

    def consolidate(self, new_importance: ParamDict, new_anchor: ParamDict) -> None:
        for name, fisher in new_importance.items():
            if name not in self.importance:
                self.importance[name], self.anchor[name] = fisher, new_anchor[name]
                continue
            total = self.importance[name] + fisher
            weighted = self.importance[name] * self.anchor[name] + fisher * new_anchor[name]
            # where no task has any Fisher mass the anchor is irrelevant; keep the newest weights there
            self.anchor[name] = torch.where(total > 0, weighted / total.clamp_min(1e-30), new_anchor[name])
            self.importance[name] = total
