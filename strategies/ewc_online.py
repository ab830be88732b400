"""Online EWC (Schwarz et al., "Progress & Compress", ICML 2018): one decayed Fisher, one anchor."""

from __future__ import annotations

from torch import nn

from clbench.streams import Task
from strategies.ewc import batch_fisher_diagonal
from strategies.regularization import ParamDict, QuadraticRegularizer


class OnlineEWC(QuadraticRegularizer):
    """loss = CE + lambda * sum_i F_i (theta_i - theta*_i)^2 with F <- gamma * F + F_t after task t and
    theta* the weights after the last task only.

    ``gamma`` < 1 lets old tasks' importance fade so the network keeps plasticity over long streams
    (gamma = 1 with one anchor is Huszár's 2018 correction of multi-penalty EWC). Fisher variant and
    normalisation as in :func:`strategies.ewc.batch_fisher_diagonal`; equals Avalanche's
    ``EWC(mode="online", decay_factor=gamma)``.
    """

    name = "ewc_online"
    graph_safe = True  # its step hooks are recorded whole by trainer.cuda_graphs

    def __init__(self, ewc_lambda: float = 10.0, gamma: float = 1.0, importance_batch_size: int | None = None) -> None:
        super().__init__(ewc_lambda, importance_batch_size)
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"strategy.gamma must be in [0, 1], got {gamma}")
        self.gamma = float(gamma)

    def estimate_importance(self, task: Task, params: dict[str, nn.Parameter]) -> ParamDict:
        return batch_fisher_diagonal(self, task, params)

    def consolidate(self, new_importance: ParamDict, new_anchor: ParamDict) -> None:
        for name, fisher in new_importance.items():
            old = self.importance.get(name)
            self.importance[name] = fisher if old is None else self.gamma * old + fisher
        self.anchor.update(new_anchor)
