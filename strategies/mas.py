"""Memory Aware Synapses (Aljundi et al., ECCV 2018): importance = sensitivity of the output's norm."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from clbench.streams import Task
from strategies.ewc import per_sample_gradients
from strategies.regularization import ParamDict, QuadraticRegularizer


def squared_norm(output: Tensor) -> Tensor:
    """Mean over the batch of ||f(x)||_2^2: the paper's Eq. 3 and the official code (a summed MSE to zero)."""
    return output.pow(2).sum(dim=1).mean()


def plain_norm(output: Tensor) -> Tensor:
    """Mean over the batch of ||f(x)||_2: FACIL's MAS (gradients 1 / (2 ||f||) times the squared norm's, so
    lambda means something else there; Avalanche 0.6 takes the squared norm, as the paper)."""
    return output.norm(p=2, dim=1).mean()


OUTPUT_NORMS: dict[str, Callable[[Tensor], Tensor]] = {"squared": squared_norm, "l2": plain_norm}
MAGNITUDES = ("batch", "per_sample")


class MAS(QuadraticRegularizer):
    """loss = CE + lambda * sum_i Omega_i (theta_i - theta*_i)^2, theta* = the weights after the last task.

    Omega for a task is the mean gradient magnitude of the output's norm, f the task's output (its own
    head in the task scenario); labels are not used, as in the paper. ``output_norm``: ``squared``
    (default; the paper's Eq. 3, ||f(x)||^2, the official code, Avalanche 0.6) or ``l2`` (||f(x)||, FACIL).

    ``magnitude`` says where the absolute value is taken:

    * ``batch`` (default): Omega = mean over the training batches b of | d/dtheta mean_{x in b} N(f(x)) |,
      one backward pass per batch. This is what the official code computes (it sums the squared outputs
      over a batch, takes |grad| and divides by the number of samples; its paper runs use batch size 1
      only to mimic online deployment), as do FACIL and Avalanche. It is at most the per-sample value,
      equal where the samples' gradients share a sign, and its scale depends on the batch size.
    * ``per_sample``: the paper's Eq. 4, Omega = mean over samples x of | d N(f(x)) / dtheta |, one
      vectorised pass per batch (``torch.func`` vmap). No cancellation between samples, so Omega is
      larger and independent of the batch size; lambda then needs to be smaller for the same strength.

    Importances of successive tasks are summed (the official code's accumulation), or, with ``alpha``
    set, averaged as ``alpha * old + (1 - alpha) * new`` (Avalanche's ``MAS(lambda_reg, alpha)``,
    default 0.5 there). The penalty has the official code's scale (its gradient 2 lambda Omega (theta -
    theta*) is what the official optimizer adds). The paper's lambda = 1 was set for SGD at lr 0.0008;
    see :mod:`strategies.regularization` for why lr 0.1 needs ``stable_penalty`` with it.
    """

    name = "mas"
    strength_key = "mas_lambda"
    population_safe = True  # a population member gives its solo run's R (tests/population)
    batchable = ("mas_lambda", "alpha")  # numeric settings members of one population may differ in
    graph_safe = True  # its step hooks are recorded whole by trainer.cuda_graphs

    def __init__(
        self,
        mas_lambda: float = 1.0,
        alpha: float | None = None,
        importance_batch_size: int | None = None,
        magnitude: str = "batch",
        output_norm: str = "squared",
        stable_penalty: bool = True,
    ) -> None:
        super().__init__(mas_lambda, importance_batch_size, stable_penalty)
        if alpha is not None and not 0.0 <= alpha <= 1.0:
            raise ValueError(f"strategy.alpha must be in [0, 1] or null (sum importances), got {alpha}")
        if magnitude not in MAGNITUDES:
            raise ValueError(f"strategy.magnitude must be one of {', '.join(MAGNITUDES)}, got {magnitude!r}")
        if output_norm not in OUTPUT_NORMS:
            raise ValueError(f"strategy.output_norm must be one of {', '.join(OUTPUT_NORMS)}, got {output_norm!r}")
        self.alpha = alpha
        self.magnitude = magnitude
        self.output_norm = output_norm
        self._norm = OUTPUT_NORMS[output_norm]

    def estimate_importance(self, task: Task, params: dict[str, nn.Parameter]) -> ParamDict:
        assert self.model is not None
        self.model.eval()
        if self.magnitude == "per_sample":
            return self._per_sample_importance(task, params)
        names, tensors = list(params), list(params.values())
        importance = [torch.zeros_like(p) for p in tensors]
        num_batches = 0
        for x, _ in self.task_batches(task):
            grads = torch.autograd.grad(self._norm(self.forward(x, task.id)), tensors, allow_unused=True)
            for acc, g in zip(importance, grads, strict=True):
                if g is not None:
                    acc.add_(g.abs())
            num_batches += 1
        return {name: acc / max(1, num_batches) for name, acc in zip(names, importance, strict=True)}

    def _per_sample_importance(self, task: Task, params: dict[str, nn.Parameter]) -> ParamDict:
        """Eq. 4: the mean over samples of each sample's own gradient magnitude."""
        importance = {name: torch.zeros_like(p) for name, p in params.items()}
        count = 0
        for grads in per_sample_gradients(self, task, params, lambda out, _: self._norm(out)):
            for name, g in zip(params, grads, strict=True):
                importance[name].add_(g.abs().sum(dim=0))
            count += grads[0].shape[0] if grads else 0
        return {name: value / max(1, count) for name, value in importance.items()}

    def consolidate(self, new_importance: ParamDict, new_anchor: ParamDict) -> None:
        if self.alpha is None:
            super().consolidate(new_importance, new_anchor)
            return
        for name, value in new_importance.items():
            old = self.importance.get(name)
            self.importance[name] = value if old is None else self.alpha * old + (1.0 - self.alpha) * value
        self.anchor.update(new_anchor)
