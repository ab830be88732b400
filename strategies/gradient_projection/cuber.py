"""CUBER: Continual learning with Backward knowledge transfer (Lin, Yang, Fan & Zhang, "Beyond
Not-Forgetting: Continual Learning with Backward Knowledge Transfer", NeurIPS 2022, arXiv 2211.00789).
No official code exists; the paper builds on TRGP (same authors), and so does this module.

Source note: the paper's full text (Sec. 3-4, Algorithm 1, its equations and hyper-parameter tables) could not be
read where this was written. Searched: arXiv 2211.00789, the NeurIPS 2022 proceedings and ACM pages, OpenReview
(id diV1PpaP33), paper mirrors (ar5iv, Hugging Face papers, arxivlens, aitopics), and code for "CUBER" /
LYang-666 / senlin; every reachable page holds the abstract only, and no CUBER code is public. What is used:
the abstract (its two notions "sufficient projection" and "positive correlation", judged layer-wise before
the new task; positively correlated old tasks' models are then modified), TRGP's paper and official code
(LYang-666/TRGP; its PMNIST script already carries ``eplison_1`` / ``eplison_2``, a ``'3'`` regime label and an
unused ``grad_list`` memory slot, and decides its regimes once, before the epoch loop) and the issue tracker's
description (the penalty ``lam * ||(W - W_{t-1}) U_j||^2``). No equation number of the CUBER paper is cited
below for that reason; TRGP's section and equation numbers are those trgp.py cites.

What each part implements ("learn task t"):

- Layer-wise task correlation, decided ONCE per task, before training: the new task's gradient ``g_t`` at
  ``W_{t-1}`` (the model before the task, plain weights, eval mode) on ``grad_samples`` training examples is
  projected onto each old task j's own input subspace ``U_j`` (TRGP's per-task basis, TRGP Sec. 4.1).
  "Sufficient projection": ``||g_t U_j|| > eps1 ||g_t||`` (TRGP's trust-region test, Sec. 4.1); at most
  ``top_k`` old tasks per layer qualify (the largest projections, as TRGP's code). "Positive correlation": the
  cosine between ``g_t U_j`` and the old task's stored gradient ``g_j U_j`` exceeds ``eps2``.
- Regime 1 (no sufficient projection): the update is projected out of ``U_j`` (GPM).
- Regime 2 (sufficient projection, no positive correlation): projected out, plus TRGP's scaled weight
  projection ``W + W U_j (Q_j - I) U_j^T`` with ``Q_j`` learned for the new task (TRGP Eq. 7).
- Regime 3 (sufficient projection and positive correlation): the scaled weight projection as in regime 2 (a
  CHOICE, below), and the update may also move W inside j's subspace (the first-order argument: a step along
  ``-g_t`` there lowers task j's loss when the two gradients correlate positively); the loss gains
  ``lam * ||(W - W_{t-1}) U_j||^2``, which keeps the move small, where the first-order argument holds. Regimes
  and penalty hold for the whole task.

Where the paper could not be checked or leaves a choice, we chose (CHOICE):

- CHOICE ``eps2`` = 0.01 (the value of ``eplison_2`` in TRGP's PMNIST code); ``eps1`` = 0.5 (0.2 on PMNIST) as
  TRGP; ``lam`` = 1.0; ``grad_samples`` = 300 (the official code's sample for every gradient / representation).
  The correlation test is a cosine (scale-free), not a raw inner product.
- CHOICE the old task's gradient ``g_j`` is computed once, at the end of its own training, on
  ``grad_samples`` of its training examples through its own stored scaled weights, and kept as the full
  ``[out, d]`` matrix per layer (no data is replayed; it goes stale if task j's model moves later).
- CHOICE the free component (issue 21): a regime-3 update moves W only inside
  ``F = span(U_j : j in regime 3)`` with everything protected for other old tasks removed, restricted to the
  memory ``M`` (so the update is ``g (I - M M^T) + g F F^T``). Protected for a regime-1 / regime-2 old task s:
  its own basis ``U_s`` and, with ``protect_scaled_reads`` (default), the bases ``U_k`` its own stored scaled
  projections read (``W U_k`` enters task s's outputs). So a regime-1 or regime-2 task's outputs are
  unchanged by the update; regime-2 pairs of the new task read ``W U_k`` live where the layer moves. The
  correlation is still judged inside ``U_j``, not inside the (smaller) ``F``.
- CHOICE the penalty is added to every minibatch's loss and its gradient enters the update only through F.
  Under SGD it pulls the move back with time constant ``1 / (2 lam lr)`` steps (50 at lr 0.01, lam 1), so the
  move at the end of the task follows the last minibatch gradients; benchmarks/results/
  cuber_backward_transfer_analysis.md measures what that does to regime-3 tasks.
- CHOICE regime-3 pairs get TRGP's scaled weight projection too (``scale_backward``, default true), as regime 2.
  The move of W inside ``U_j`` is then learned jointly with the new task's ``Q_j``, while task j is evaluated
  without that ``Q_j``; with ``scale_backward=false`` ``Q_j`` stays I for regime-3 pairs (an ablation; see
  benchmarks/results/cuber_backward_transfer_analysis.md).
- CHOICE an optional safety check, off by default (``recheck_per_epoch``): after every epoch but the last,
  the correlation of each trusted pair is recomputed from ``grad_samples`` examples at the current weights;
  pairs move between regimes 2 and 3 both ways (not absorbing). It needs a fit per epoch, so it refuses
  a trainer with a validation-driven schedule.

Diagnostics (``extra_results()["cuber_regimes"]``, one entry per task): each (layer, old task)'s regime, the
correlations, each layer's free rank, the test-accuracy change of each regime-3 task during the task
(``R[t][j] - R[t-1][j]``, measured by the strategy with the runner's evaluation), the norm of the move inside
each free subspace and, per regime-3 task, the first-order change of its loss that move predicts from its
stored gradient (negative: the move descends task j's loss, the backward transfer the method aims at).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from clbench.strategy import Batch
from clbench.streams import Task
from clbench.trainer import Trainer
from strategies.gradient_projection.projection import Projector
from strategies.gradient_projection.trgp import TRGP


def correlation(grad: Tensor, old_grad: Tensor, basis: Tensor) -> float:
    """Cosine between two gradient matrices' components inside ``basis`` (positive correlation test)."""
    a, b = grad @ basis, old_grad @ basis
    return float((a * b).sum() / (torch.linalg.norm(a) * torch.linalg.norm(b) + 1e-12))


def orthonormal_span(columns: Tensor, tolerance: float = 1e-6, absolute: bool = False) -> Tensor:
    """An orthonormal basis (float64) of the span of ``columns`` ``[d, n]``. Directions whose singular value
    is below ``tolerance`` (times the largest one unless ``absolute``) are noise and dropped."""
    if columns.shape[1] == 0:
        return columns.double()
    u, s, _ = torch.linalg.svd(columns.double(), full_matrices=False)
    if s.numel() == 0 or float(s[0]) == 0.0:
        return u[:, :0]
    return u[:, s > (tolerance if absolute else tolerance * s[0])]


def free_subspace(memory: Tensor, backward: Sequence[Tensor], protected: Sequence[Tensor]) -> Tensor:
    """Orthonormal ``[d, f]`` basis of the span of the regime-3 bases ``backward``, restricted to the
    memory's span and with the span of ``protected`` removed (empty ``[d, 0]`` if nothing is left)."""
    mem = memory.double()
    stacked = torch.cat([b.double() for b in backward], dim=1)
    inside = mem @ (mem.T @ stacked)
    if protected:
        guard = orthonormal_span(torch.cat([p.double() for p in protected], dim=1))
        inside = inside - guard @ (guard.T @ inside)
        inside = inside - guard @ (guard.T @ inside)  # second pass: orthogonal to working precision
    # the regime-3 bases have unit columns: what is left of a direction below 1e-3 of its length is the float32
    # rounding of a direction that lies in the protected span, not a free direction
    return orthonormal_span(inside, 1e-3, absolute=True)


class CUBER(TRGP):
    """TRGP's trust regions split by gradient correlation, so positively correlated old tasks get
    updated by the new one (backward transfer) without replaying their data.

    See the module docstring for the regimes, what the paper fixes and what we chose. With every old task
    in regime 1 (e.g. ``eps1=1``) the update is exactly GPM's; with none in regime 3 (``eps2`` above 1)
    it is TRGP's.
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
        protect_scaled_reads: bool = True,
        recheck_per_epoch: bool = False,
        scale_backward: bool = True,
        skip_first_residual: bool = False,
        third_task_previous_only: bool = False,
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
            skip_first_residual=skip_first_residual,
            third_task_previous_only=third_task_previous_only,
        )
        if lam < 0:
            raise ValueError(f"strategy.lam must be >= 0, got {lam}")
        self.eps2 = eps2
        self.lam = lam
        self.protect_scaled_reads = protect_scaled_reads
        self.recheck_per_epoch = recheck_per_epoch
        self.scale_backward = scale_backward
        self.task_grads: list[list[Tensor]] = []
        self.backward: list[list[int]] = []  # per layer, the old tasks in regime 3 for the current task
        self.free: list[Projector | None] = []  # per layer, the free subspace's projector (None: nothing moves)
        self.free_ranks: list[int] = []
        self.start_weights: list[Tensor | None] = []
        self.correlations: list[list[float | None]] = []
        self.regime_log: list[dict[str, Any]] = []

    # -- regimes -------------------------------------------------------------------------------------
    def decide_regimes(self, grads: Sequence[Tensor], trust: Sequence[Sequence[int]]) -> None:
        """Regime 3 for the trusted (layer, old task) pairs whose gradient correlation exceeds ``eps2``."""
        count = len(self.task_bases)
        self.correlations = [[None] * count for _ in self.layers]
        self.backward = [[] for _ in self.layers]
        for i, (grad, trusted) in enumerate(zip(grads, trust, strict=True)):
            for j in trusted:
                cosine = correlation(grad, self.task_grads[j][i], self.task_bases[j][i])
                self.correlations[i][j] = cosine
                if cosine > self.eps2:
                    self.backward[i].append(j)

    def protected_bases(self, i: int) -> list[Tensor]:
        """Layer ``i``'s subspaces that regime-1 / regime-2 old tasks' outputs read: their own bases and,
        with ``protect_scaled_reads``, the bases of their stored scaled weight projections."""
        bases = []
        for s, own in enumerate(self.task_bases):
            if s in self.backward[i]:
                continue
            if own[i] is not None:
                bases.append(own[i])
            if self.protect_scaled_reads:
                bases.extend(self.task_bases[k][i] for k in self.trust[s][i] if self.task_bases[k][i] is not None)
        return bases

    def build_free_subspaces(self) -> None:
        """Per layer, the projector onto the free subspace of the regime-3 pairs (None where none or empty)."""
        self.free, self.free_ranks = [], []
        for i, members in enumerate(self.backward):
            memory = self.bases[i]
            if not members or memory is None:
                self.free.append(None)
                self.free_ranks.append(0)
                continue
            basis = free_subspace(memory, [self.task_bases[j][i] for j in members], self.protected_bases(i))
            self.free_ranks.append(int(basis.shape[1]))
            self.free.append(Projector(basis.to(memory.dtype)) if basis.shape[1] > 0 else None)

    def regimes(self) -> list[list[int]]:
        """``[layer][old task]``: 1, 2 or 3 for the current task."""
        table = []
        for i, trusted in enumerate(self.current_trust):
            row = [1] * len(self.task_bases)
            for j in trusted:
                row[j] = 3 if j in self.backward[i] else 2
            table.append(row)
        return table

    def prepare_pairs(self, trainer: Trainer) -> None:
        """The scaled weight projections the training forward uses: ``W U_j`` frozen where W cannot move
        inside ``U_j`` (no weight decay, no free subspace in the layer), else read live. Without
        ``scale_backward`` a regime-3 pair's ``Q_j`` is not trained and is I (no scaled projection), also when a
        recheck promotes a pair whose ``Q_j`` was learnt in regime 2 during the epochs before."""
        with torch.no_grad():
            for i, trusted in enumerate(self.current_trust):
                for j, q in zip(trusted, self.scales[i], strict=True):
                    learns = self.scale_backward or j not in self.backward[i]
                    q.requires_grad_(learns)
                    if not learns:
                        q.copy_(torch.eye(q.shape[0], device=q.device, dtype=q.dtype))
        frozen = self.current_pairs(frozen=trainer.weight_decay == 0)
        self.train_pairs = [
            [(u, q, None) for u, q, _ in pairs] if self.free[i] is not None else pairs for i, pairs in enumerate(frozen)
        ]

    # -- lifecycle -----------------------------------------------------------------------------------
    def fit_task(self, task: Task, trainer: Trainer) -> None:
        self.check_optimizer(trainer)  # TRGP's fit_task, which this replaces, says it; CUBER projects the same way
        if self.recheck_per_epoch and trainer.validates:
            raise ValueError(
                "strategy.recheck_per_epoch needs one fit per epoch and cannot run with trainer.lr_patience / "
                "trainer.restore_best: set strategy.recheck_per_epoch=false or turn the trainer's schedule off"
            )
        self.refresh_projectors()
        if task.id == 0:
            self.current_trust = [[] for _ in self.layers]
            self.backward = [[] for _ in self.layers]
            self.correlations = [[] for _ in self.layers]
        else:
            grads = self.task_gradients(task)
            self.current_trust = self.select_trust_regions(grads)
            self.decide_regimes(grads, self.current_trust)
        self.build_free_subspaces()
        self.start_weights = [
            layer.weight_matrix().detach().clone() if members else None
            for layer, members in zip(self.layers, self.backward, strict=True)
        ]
        self.scales = [
            [torch.nn.Parameter(torch.eye(self.task_bases[j][i].shape[1], device=self.device)) for j in trusted]
            for i, trusted in enumerate(self.current_trust)
        ]
        self.prepare_pairs(trainer)
        watched = sorted({j for members in self.backward for j in members})
        log: dict[str, Any] = {
            "task": task.id,
            "regimes": self.regimes(),
            "correlation": [list(row) for row in self.correlations],
            "free_rank": list(self.free_ranks),
        }
        before = self.test_accuracies(trainer, watched)
        if self.recheck_per_epoch:
            log["rechecks"] = []
            for epoch in range(trainer.epochs):
                trainer.fit(self, [task], epochs=1)
                if epoch + 1 < trainer.epochs:
                    self.recheck(task, trainer)
                    log["rechecks"].append({"regimes": self.regimes(), "free_rank": list(self.free_ranks)})
        else:
            trainer.fit(self, [task])
        after = self.test_accuracies(trainer, watched)
        log["regime3_accuracy"] = [
            {"task": j, "before": b, "after": a, "change": a - b}
            for j, b, a in zip(watched, before, after, strict=True)
        ]
        log.update(self.move_diagnostics(watched))
        self.regime_log.append(log)

    @torch.no_grad()
    def move_diagnostics(self, watched: Sequence[int]) -> dict[str, Any]:
        """What the task's move inside the free subspaces did, from data the strategy keeps: per layer the
        norm of ``(W - W_{t-1}) F F^T``, and per regime-3 task j the first-order change of its loss that
        move predicts, ``sum_layers <g_j, (W - W_{t-1}) F F^T>`` with j's stored gradient (negative: the
        move is a descent direction for j, the paper's backward-transfer condition; positive: it hurts j)."""
        moves: list[Tensor | None] = []
        for layer, free, start in zip(self.layers, self.free, self.start_weights, strict=True):
            if free is None or start is None:
                moves.append(None)
                continue
            moves.append(free.component((layer.weight_matrix().detach() - start).to(free.bases.dtype)))
        first_order = []
        for j in watched:
            change = sum(
                float((self.task_grads[j][i].to(move.dtype) * move).sum())
                for i, move in enumerate(moves)
                if move is not None and j in self.backward[i]
            )
            first_order.append({"task": j, "change": change})
        return {
            "free_move": [0.0 if move is None else float(torch.linalg.norm(move)) for move in moves],
            "regime3_first_order": first_order,
        }

    def recheck(self, task: Task, trainer: Trainer) -> None:
        """The optional safety check: regimes 2 / 3 of the trusted pairs from a fresh gradient at the current
        weights (through the current scaled projections); a pair can be promoted as well as demoted."""
        grads = self.task_gradients(task, self.train_pairs)
        self.decide_regimes(grads, self.current_trust)
        self.build_free_subspaces()
        for i, (layer, members) in enumerate(zip(self.layers, self.backward, strict=True)):
            if members and self.start_weights[i] is None:
                self.start_weights[i] = layer.weight_matrix().detach().clone()
        self.prepare_pairs(trainer)

    @torch.no_grad()
    def test_accuracies(self, trainer: Trainer, task_ids: Sequence[int]) -> list[float]:
        """Test accuracy (percent) of the given old tasks, as the runner's evaluation computes a row of R."""
        if not task_ids:
            return []
        assert self.stream is not None
        give_task_id = self.stream.scenario == "task" or self.uses_task_oracle
        for module in self.eval_modules():
            module.eval()
        try:
            with trainer.autocast(evaluation=True):
                return [
                    float(trainer.accuracy(self, self.stream.evaluation_tasks[j], "test", give_task_id))
                    for j in task_ids
                ]
        finally:
            for module in self.eval_modules():
                module.train()

    def after_task(self, task: Task) -> None:
        super().after_task(task)
        self.task_grads.append([g.detach() for g in self.task_gradients(task, self.stored_pairs(task.id))])
        self.backward = [[] for _ in self.layers]
        self.free = [None for _ in self.layers]
        self.start_weights = [None for _ in self.layers]

    # -- training step -------------------------------------------------------------------------------
    def loss(self, output: Tensor, y: Tensor, batch: Batch, task: Task) -> Tensor:
        loss = F.cross_entropy(output, y)
        if self.lam == 0:
            return loss
        for i, members in enumerate(self.backward):
            start = self.start_weights[i] if self.start_weights else None
            if not members or start is None:
                continue
            moved = self.layers[i].weight_matrix() - start
            for j in members:
                loss = loss + self.lam * (moved @ self.task_bases[j][i]).square().sum()
        return loss

    def after_backward(self, task: Task) -> None:
        """Layers with a free subspace: ``g (I - M M^T) + g F F^T``; every other layer: GPM's projection.
        Whatever reaches W besides ``delta^T X`` (the penalty, live ``W U_j`` reads) lies inside span(M), so
        the orthogonal part is still ``delta^T X`` projected (from the captured factors where available)."""
        for i, (layer, projector, free) in enumerate(zip(self.layers, self.projectors, self.free, strict=True)):
            if projector is None or free is None:
                continue
            grad = layer.grad_matrix()
            if grad is None:
                continue
            orthogonal = self.orthogonal_gradient(i)
            if orthogonal is None:
                orthogonal = projector.orthogonal(grad)
            layer.set_grad_matrix(orthogonal + free.component(grad))
            self.projected_in_step.add(i)
        super().after_backward(task)

    def extra_results(self) -> dict[str, Any]:
        """``cuber_regimes[t]``: task t's regimes ``[layer][old task]`` (1 / 2 / 3, decided at its start), the
        correlations of trusted pairs, each layer's free rank, and each regime-3 task's test accuracy
        before and after task t (``change`` = ``R[t][j] - R[t-1][j]``)."""
        return {**super().extra_results(), "cuber_regimes": self.regime_log}

    # -- persistence ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "task_grads": self.task_grads, "regime_log": self.regime_log}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.task_grads = list(state["task_grads"])
        self.regime_log = list(state.get("regime_log", []))
