"""Elastic Weight Consolidation (Kirkpatrick et al., PNAS 2017): a Fisher-weighted pull towards old solutions."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

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
        for acc, g in zip(fisher, grads, strict=True):
            if g is not None:
                acc.add_(g.pow(2))
        num_batches += 1
    return {name: acc / max(1, num_batches) for name, acc in zip(names, fisher, strict=True)}


def per_sample_gradients(
    strategy: QuadraticRegularizer,
    task: Task,
    params: dict[str, nn.Parameter],
    objective: Callable[[Tensor, Tensor], Tensor],
) -> list[tuple[Tensor, ...]]:
    """For each consecutive batch of ``task``'s training set, the gradient of ``objective(output, y)`` for
    every sample on its own: a tuple (one entry per tensor of ``params``) of ``[batch, *shape]`` tensors.

    ``torch.func.vmap`` over ``torch.func.grad`` of a one-sample forward, so a batch costs one vectorised
    pass instead of |b| backward passes. ``objective`` sees a one-sample output ``[1, C]`` and target ``[1]``.
    The model must be in the mode the caller wants (eval: no dropout, batch-norm running statistics).
    """
    assert strategy.model is not None
    model, names = strategy.model, list(params)

    def one_sample(values: tuple[Tensor, ...], x: Tensor, y: Tensor) -> Tensor:
        swapped = dict(zip(names, values, strict=True))
        output = functional_call(model, swapped, (x.unsqueeze(0), strategy.head_ids(task.id)))
        return objective(output, y.unsqueeze(0))

    per_sample = vmap(grad(one_sample), in_dims=(None, 0, 0))
    values = tuple(p.detach() for p in params.values())
    return [per_sample(values, x, y) for x, y in strategy.task_batches(task)]


def sample_fisher_diagonal(strategy: QuadraticRegularizer, task: Task, params: dict[str, nn.Parameter]) -> ParamDict:
    """Diagonal empirical Fisher as Kirkpatrick et al. define it: F_i = mean over the task's training samples
    n of (d log p(y_n | x_n; theta) / d theta_i) ** 2, with y_n the true label (the *empirical* Fisher; the
    paper's supplement samples y from the model, most implementations and this one take the label). The
    square is taken per sample (``torch.func`` vmap), so F does not depend on the batch size."""
    assert strategy.model is not None
    strategy.model.eval()
    fisher = {name: torch.zeros_like(p) for name, p in params.items()}
    count = 0
    for grads in per_sample_gradients(strategy, task, params, lambda out, y: -F.cross_entropy(out, y)):
        for name, g in zip(params, grads, strict=True):
            fisher[name].add_(g.pow(2).sum(dim=0))
        count += grads[0].shape[0] if grads else 0
    return {name: value / max(1, count) for name, value in fisher.items()}


FISHERS = {"batch": batch_fisher_diagonal, "per_sample": sample_fisher_diagonal}


def fisher_estimate(name: str) -> Callable[[QuadraticRegularizer, Task, dict[str, nn.Parameter]], ParamDict]:
    """The Fisher estimator called ``name`` (``strategy.fisher``); a one-line error names the choices."""
    if name not in FISHERS:
        raise ValueError(f"strategy.fisher must be one of {', '.join(FISHERS)}, got {name!r}")
    return FISHERS[name]


class EWC(QuadraticRegularizer):
    """EWC: loss = CE + lambda * sum_k sum_i F_k,i (theta_i - theta*_k,i)^2 over the finished tasks k.

    Kirkpatrick et al. keep one penalty per old task. A sum of quadratics is one quadratic, so this
    class stores the summed Fisher F = sum_k F_k and the Fisher-weighted mean anchor
    m = sum_k F_k theta*_k / F: the loss differs from the per-task sum only by a constant and the
    gradient is identical, at the memory of one anchor.

    Scale of ``ewc_lambda``. The paper's penalty is (lambda_paper / 2) sum F (theta - theta*)^2 with the
    per-sample Fisher; this one has no 1/2 (Avalanche's convention), so:

    * ``fisher: per_sample`` (the paper's Fisher, :func:`sample_fisher_diagonal`):
      ``ewc_lambda = lambda_paper / 2``.
    * ``fisher: batch`` (the default, Avalanche's estimate, :func:`batch_fisher_diagonal`): the Fisher is
      about |b| times smaller, so ``ewc_lambda ~ lambda_paper * |b| / 2`` (|b| = importance_batch_size or
      the trainer's batch size), and ``ewc_lambda`` equals Avalanche's ``ewc_lambda``. It stays the default
      because the shipped strengths and results were tuned with it and it keeps Avalanche comparisons
      one-to-one; it is one backward pass per batch instead of a vectorised per-sample pass.
    """

    name = "ewc"
    strength_key = "ewc_lambda"
    population_safe = True  # a population member gives its solo run's R (tests/population)
    batchable = ("ewc_lambda",)  # numeric settings members of one population may differ in
    graph_safe = True  # its step hooks are recorded whole by trainer.cuda_graphs

    def __init__(
        self,
        ewc_lambda: float = 10.0,
        importance_batch_size: int | None = None,
        fisher: str = "batch",
        stable_penalty: bool = True,
    ) -> None:
        super().__init__(ewc_lambda, importance_batch_size, stable_penalty)
        self.fisher = fisher
        self._estimate = fisher_estimate(fisher)

    def estimate_importance(self, task: Task, params: dict[str, nn.Parameter]) -> ParamDict:
        return self._estimate(self, task, params)

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
