"""Online EWC (Schwarz et al., "Progress & Compress", ICML 2018): one decayed Fisher, one anchor."""

from __future__ import annotations

from torch import nn

from clbench.streams import Task
from strategies.ewc import fisher_estimate
from strategies.regularization import ParamDict, QuadraticRegularizer


class OnlineEWC(QuadraticRegularizer):
    """loss = CE + lambda * sum_i F_i (theta_i - theta*_i)^2 with F <- gamma * F + F_t after task t and
    theta* the weights after the last task only.

    ``gamma`` < 1 lets old tasks' importance fade so the network keeps plasticity over long streams
    (gamma = 1 with one anchor is Huszár's 2018 correction of multi-penalty EWC). Fisher variant
    (``fisher: batch | per_sample``) and the scale of lambda as in :class:`strategies.ewc.EWC`; with the
    batch Fisher it equals Avalanche's ``EWC(mode="online", decay_factor=gamma)``.
    """

    name = "ewc_online"
    strength_key = "ewc_lambda"
    population_safe = True  # a population member gives its solo run's R (tests/population)
    batchable = ("ewc_lambda", "gamma")  # numeric settings members of one population may differ in
    graph_safe = True  # its step hooks are recorded whole by trainer.cuda_graphs

    def __init__(
        self,
        ewc_lambda: float = 10.0,
        gamma: float = 1.0,
        importance_batch_size: int | None = None,
        fisher: str = "batch",
        stable_penalty: bool = True,
    ) -> None:
        super().__init__(ewc_lambda, importance_batch_size, stable_penalty)
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"strategy.gamma must be in [0, 1], got {gamma}")
        self.gamma = float(gamma)
        self.fisher = fisher
        self._estimate = fisher_estimate(fisher)

    def estimate_importance(self, task: Task, params: dict[str, nn.Parameter]) -> ParamDict:
        return self._estimate(self, task, params)

    def consolidate(self, new_importance: ParamDict, new_anchor: ParamDict) -> None:
        for name, fisher in new_importance.items():
            old = self.importance.get(name)
            self.importance[name] = fisher if old is None else self.gamma * old + fisher
        self.anchor.update(new_anchor)
