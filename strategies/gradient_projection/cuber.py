"""CUBER: Continual learning with Backward knowledge transfer (Lin, Yang, Fan & Zhang, "Beyond
Not-Forgetting: Continual Learning with Backward Knowledge Transfer", NeurIPS 2022). No official code
exists; this follows the paper and builds on TRGP's code, as the authors did."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from clbench.strategy import Batch
from clbench.streams import Task
from clbench.trainer import Trainer
from strategies.gradient_projection.projection import Projector
from strategies.gradient_projection.trgp import TRGP


@dataclass
class Regime3:
    """One (layer, old task) pair allowed to update inside the old task's subspace.

    ``old_grad_in_basis`` is the old task's stored end-of-training gradient expressed in its basis
    (``g_j U_j``), ``start`` the layer's weight matrix when the new task began, ``active`` a 0-d float
    on the device that drops to 0 (for the rest of the task) when the correlation check fails.
    """

    task: int
    basis: Tensor
    old_grad_in_basis: Tensor
    start: Tensor
    active: Tensor


def correlation(grad: Tensor, old_grad: Tensor, basis: Tensor) -> Tensor:
    """Cosine between two gradient matrices' components inside ``basis`` (a 0-d tensor)."""
    a, b = grad @ basis, old_grad @ basis
    return (a * b).sum() / (torch.linalg.norm(a) * torch.linalg.norm(b) + 1e-12)


def span_basis(bases: Sequence[Tensor]) -> Tensor:
    """An orthonormal basis of the union of the spans of ``bases`` (they may overlap)."""
    u, s, _ = torch.linalg.svd(torch.cat(list(bases), dim=1).double(), full_matrices=False)
    return u[:, s > 1e-6 * s[0]].to(bases[0].dtype)


class CUBER(TRGP):
    """TRGP's trust regions split by gradient correlation, so positively correlated old tasks get
    updated by the new one (backward transfer) without replaying their data.

    Per layer and old task j, at the start of task t (CUBER Sec. 4):

    - regime 1, insufficient projection (``||g_t U_j|| <= eps1 ||g_t||`` or not among the ``top_k``):
      the update is projected out of j's subspace, as GPM;
    - regime 2, sufficient projection without positive correlation: projected out, plus TRGP's scaled
      weight projection;
    - regime 3, sufficient projection with positive correlation (cosine between the new task's gradient
      and j's stored end-of-training gradient, both inside j's subspace, above ``eps2``): the update may
      move inside j's subspace, a first-order descent step for task j too. ``lam`` weighs the penalty
      ``||(W - W_start) U_j||^2`` that keeps the move local, where that first-order view holds.
      Every step the correlation is checked again on the gradient about to be applied; once it fails,
      j drops to regime 2 for the rest of the task.

    At most ``top_k`` (2) old tasks per layer are in regimes 2-3, and they all carry scaling matrices,
    as in the regime bookkeeping of TRGP's released code. Old tasks' gradients are computed once, at the
    end of their own training (``grad_samples`` examples, their own scaled weights); no data is replayed.
    The regime-3 flags live on the device, so the step never waits for the host. With every old task in
    regime 1 (e.g. ``eps1=1``) the update is exactly GPM's.
    """

    name = "cuber"
    graph_safe = True  # its step hooks are recorded whole by trainer.cuda_graphs

    def __init__(
        self,
        threshold: float | Sequence[float] = 0.97,
        threshold_increment: float = 0.0,
        num_samples: int | Sequence[int] = 300,
        layers: Sequence[str] | None = None,
        project_head: bool | None = None,
        freeze_batchnorm: bool = True,
        eps1: float = 0.5,
        eps2: float = 0.01,
        lam: float = 1.0,
        top_k: int = 2,
        grad_samples: int = 300,
        task_id_at_test: bool = True,
    ) -> None:
        super().__init__(
            threshold,
            threshold_increment,
            num_samples,
            layers,
            project_head,
            freeze_batchnorm,
            trust_threshold=eps1,
            top_k=top_k,
            grad_samples=grad_samples,
            task_id_at_test=task_id_at_test,
        )
        if lam < 0:
            raise ValueError(f"strategy.lam must be >= 0, got {lam}")
        self.eps2 = eps2
        self.lam = lam
        self.task_grads: list[list[Tensor]] = []
        self.regime3: list[list[Regime3]] = []
        self.union: list[Projector | None] = []
        self.regime_log: list[dict[str, list[list[int]]]] = []

    # -- lifecycle -----------------------------------------------------------------------------------
    def fit_task(self, task: Task, trainer: Trainer) -> None:
        self.refresh_projectors()
        self.regime3 = [[] for _ in self.layers]
        self.union = [None for _ in self.layers]
        if task.id == 0:
            self.current_trust = [[] for _ in self.layers]
        else:
            grads = self.task_gradients(task)
            self.current_trust = self.select_trust_regions(grads)
            for i, (grad, trusted) in enumerate(zip(grads, self.current_trust, strict=True)):
                for j in trusted:
                    basis, old_grad = self.task_bases[j][i], self.task_grads[j][i]
                    if float(correlation(grad, old_grad, basis)) > self.eps2:
                        self.regime3[i].append(
                            Regime3(
                                task=j,
                                basis=basis,
                                old_grad_in_basis=old_grad @ basis,
                                start=self.layers[i].weight_matrix().detach().clone(),
                                active=torch.ones((), device=self.device),
                            )
                        )
                members = self.regime3[i]
                if len(members) == 2:
                    self.union[i] = Projector(span_basis([m.basis for m in members]))
        self.scales = [
            [torch.nn.Parameter(torch.eye(self.task_bases[j][i].shape[1], device=self.device)) for j in trusted]
            for i, trusted in enumerate(self.current_trust)
        ]
        # W moves inside regime-3 subspaces, so there W U_j is read live from the weight.
        self.train_pairs = [
            [
                (u, q, None if j in {m.task for m in self.regime3[i]} else wu)
                for (u, q, wu), j in zip(pairs, trusted, strict=True)
            ]
            for i, (pairs, trusted) in enumerate(
                zip(self.current_pairs(frozen=trainer.weight_decay == 0), self.current_trust, strict=True)
            )
        ]
        self.regime_log.append({"start": self.regimes()})
        trainer.fit(self, [task])

    def after_task(self, task: Task) -> None:
        self.regime_log[-1]["end"] = self.regimes()
        super().after_task(task)
        self.task_grads.append([g.detach() for g in self.task_gradients(task, self.stored_pairs(task.id))])
        self.regime3 = [[] for _ in self.layers]

    def regimes(self) -> list[list[int]]:
        """``[layer][old task]``: the regime (1, 2 or 3) each old task ended the current task in."""
        count = len(self.task_bases)
        table = []
        for i, trusted in enumerate(self.current_trust):
            row = [1] * count
            for j in trusted:
                row[j] = 2
            for member in self.regime3[i]:
                row[member.task] = 3 if float(member.active) > 0 else 2
            table.append(row)
        return table

    # -- training step -------------------------------------------------------------------------------
    def loss(self, output: Tensor, y: Tensor, batch: Batch, task: Task) -> Tensor:
        loss = F.cross_entropy(output, y)
        if self.lam == 0:
            return loss
        for layer, members in zip(self.layers, self.regime3, strict=True):
            if members:
                weight = layer.weight_matrix()
                for m in members:
                    loss = loss + self.lam * m.active * ((weight - m.start) @ m.basis).square().sum()
        return loss

    def after_backward(self, task: Task) -> None:
        for i, (layer, projector) in enumerate(zip(self.layers, self.projectors, strict=True)):
            members = self.regime3[i] if self.regime3 else []
            if projector is None or not members:
                continue
            grad = layer.grad_matrix()
            if grad is None:
                continue
            insides = [grad @ m.basis for m in members]
            for m, inside in zip(members, insides, strict=True):
                cosine = (inside * m.old_grad_in_basis).sum() / (
                    torch.linalg.norm(inside) * torch.linalg.norm(m.old_grad_in_basis) + 1e-12
                )
                m.active.mul_((cosine > self.eps2).to(m.active.dtype))
            kept = self.kept_component(i, grad, insides)
            # Whatever reaches W besides delta^T X (penalty, live W U_j) lies inside span(M), so the
            # orthogonal part is still delta^T X projected.
            orthogonal = self.orthogonal_gradient(i)
            if orthogonal is None:
                orthogonal = grad - projector.component(grad)
            layer.set_grad_matrix(orthogonal + kept)
        for i, (layer, projector) in enumerate(zip(self.layers, self.projectors, strict=True)):
            if projector is None or (self.regime3 and self.regime3[i]):
                continue
            fast = self.orthogonal_gradient(i)
            grad = layer.grad_matrix()
            if grad is None:
                continue
            if fast is not None:
                layer.set_grad_matrix(fast)
            elif layer.has_bias:
                layer.set_grad_matrix(projector.remove_(grad))
            else:
                projector.remove_(grad)
        self.clear_factors()

    def kept_component(self, i: int, grad: Tensor, insides: list[Tensor]) -> Tensor:
        """The part of ``grad`` inside the union of the still-active regime-3 subspaces of layer ``i``
        (``insides[k]`` is ``grad U_k``), chosen by device-side flags (no host read)."""
        members = self.regime3[i]
        singles = [inside @ m.basis.T for m, inside in zip(members, insides, strict=True)]
        if len(members) == 1:
            return members[0].active * singles[0]
        a, b = members[0].active, members[1].active
        return a * b * self.union[i].component(grad) + a * (1 - b) * singles[0] + (1 - a) * b * singles[1]

    def extra_results(self) -> dict[str, Any]:
        """Per task, the regime of each (layer, old task) when the task started and when it ended
        (``cuber_regimes[t]["start"][layer][j]``; 3 turning into 2 is the per-step recheck)."""
        return {**super().extra_results(), "cuber_regimes": self.regime_log}

    # -- persistence ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "task_grads": self.task_grads, "regime_log": self.regime_log}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.task_grads = list(state["task_grads"])
        self.regime_log = list(state.get("regime_log", []))
