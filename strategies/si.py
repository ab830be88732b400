"""Synaptic Intelligence (Zenke, Poole & Ganguli, ICML 2017): importance from each weight's share of the
loss decrease along the training path."""

from __future__ import annotations

import torch
from torch import nn

from clbench.streams import Task
from strategies.regularization import ParamDict, QuadraticRegularizer


class SI(QuadraticRegularizer):
    """loss = CE + c * sum_i Omega_i (theta_i - theta*_i)^2, theta* = the weights after the last task.

    During task mu, after every optimizer step, ``omega_i += -g_i * delta_i`` where delta is the step's
    weight change and g the gradient of the *task* loss at the weights before the step (Zenke et al. use
    the unregularised gradient; the penalty's own gradient 2 c Omega (theta - theta*) is subtracted from
    ``.grad`` analytically, so no second backward pass). After the task,
    ``Omega += max(0, omega / (Delta^2 + xi))`` with Delta the task's total weight change. A negative
    path integral (the loss rose along the path, e.g. from too large steps) is clipped to zero because it
    would otherwise reward leaving the anchor. Avalanche's ``SynapticIntelligence(si_lambda=2c, eps=xi)``
    is the same up to two choices of its own: it uses the regularised gradient and clips Omega at 1e-3.
    """

    name = "si"
    strength_key = "c"
    population_safe = True  # a population member gives its solo run's R (tests/population)
    batchable = ("c", "xi")  # numeric settings members of one population may differ in
    graph_safe = True  # its step hooks are recorded whole by trainer.cuda_graphs

    def __init__(self, c: float = 0.1, xi: float = 1e-3, stable_penalty: bool = True) -> None:
        super().__init__(c, stable_penalty=stable_penalty)
        if xi <= 0:
            raise ValueError(f"strategy.xi must be > 0 (it damps Omega where weights barely moved), got {xi}")
        self.xi = float(xi)
        self.path_integral: ParamDict = {}
        self.task_start: ParamDict = {}
        self._task_grad: ParamDict = {}
        self._before_step: ParamDict = {}

    def before_fit(self, task: Task) -> None:
        self.task_start = {name: p.detach().clone() for name, p in self._trained.items()}
        self.path_integral = {name: torch.zeros_like(p) for name, p in self._trained.items()}

    @torch.no_grad()
    def after_backward(self, task: Task) -> None:
        for name, p in self._trained.items():
            if p.grad is None:
                continue
            grad = p.grad
            if name in self._effective:
                grad = grad - 2.0 * self.strength * self._effective[name] * (p - self.anchor[name])
            self._task_grad[name] = grad.clone()
            self._before_step[name] = p.detach().clone()

    @torch.no_grad()
    def after_step(self, task: Task) -> None:
        for name, grad in self._task_grad.items():
            self.path_integral[name].sub_(grad * (self._trained[name] - self._before_step[name]))
        self._task_grad.clear()

    def estimate_importance(self, task: Task, params: dict[str, nn.Parameter]) -> ParamDict:
        return {
            name: (self.path_integral[name] / ((p.detach() - self.task_start[name]).pow(2) + self.xi)).clamp_min(0.0)
            for name, p in params.items()
            if name in self.path_integral
        }
