"""GPM: Gradient Projection Memory (Saha, Garg & Roy, "Gradient Projection Memory for Continual
Learning", ICLR 2021; official code github.com/sahagobinda/GPM)."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from clbench.models import MLP, ContinualModel
from clbench.strategy import Batch, Strategy
from clbench.streams import Stream, Task
from clbench.trainer import Trainer
from strategies.gradient_projection.projection import (
    ConstrainedLayer,
    Projector,
    find_layers,
    gpm_update,
    per_layer,
    representation_matrices,
)

ADAPTIVE_OPTIMIZERS = ("adam", "adamw")
"""Optimizers whose per-coordinate step scaling moves a projected gradient out of the allowed subspace."""


class GPM(Strategy):
    """After each task, keep per layer an orthonormal basis of the inputs the task's samples produce
    (SVD of representation matrices, energy threshold); while learning later tasks, remove from every
    constrained layer's gradient its component in the span of those bases, so old tasks' layer outputs
    stay (nearly) unchanged.

    ``threshold`` (one value or one per projected layer) plus ``threshold_increment * t`` for task t is
    the energy criterion (PMNIST [0.95, 0.99, 0.99]; CIFAR-100 0.97 + 0.003 t). ``num_samples`` (one or
    per layer) is how many training examples build each layer's representation matrix (PMNIST 300;
    conv layers fewer, as the official code). ``layers`` names the projected modules (default: every
    linear / conv layer; the head too when it is shared, ``project_head`` overrides). Batch-norm layers
    must not track running statistics, and their affine parameters are frozen after the first task
    (``freeze_batchnorm``), as in the official code.
    """

    name = "gpm"
    population_safe = True  # a population member gives its solo run's R (tests/population)
    batchable = ("threshold", "threshold_increment")  # numeric settings members of one population may differ in
    graph_safe = True  # its step hooks are recorded whole by trainer.cuda_graphs
    closed_form_safe = True  # closed-form steps take each projected gradient from linear_gradient
    scenarios = ("task", "domain")

    def __init__(
        self,
        threshold: float | Sequence[float] = 0.97,
        threshold_increment: float = 0.0,
        num_samples: int | Sequence[int] = 300,
        layers: Sequence[str] | None = None,
        project_head: bool | None = None,
        freeze_batchnorm: bool = True,
    ) -> None:
        super().__init__()
        self.threshold_config = threshold
        self.threshold_increment = threshold_increment
        self.num_samples_config = num_samples
        self.layer_names = None if layers is None else list(layers)
        self.project_head = project_head
        self.freeze_batchnorm = freeze_batchnorm
        self.layers: list[ConstrainedLayer] = []
        self.bases: list[Tensor | None] = []
        self.projectors: list[Projector | None] = []
        self.rank_log: list[list[int]] = []  # per finished task, each layer's basis rank (memory used)
        self._positions: dict[int, int] = {}  # id(module) -> index in self.layers (see _position)
        self.warned_optimizer = False  # see check_optimizer

    # -- lifecycle -----------------------------------------------------------------------------------
    def setup(self, model: ContinualModel, stream: Stream) -> ContinualModel:
        super().setup(model, stream)
        shared_head = len(model.heads) == 1
        include_heads = shared_head if self.project_head is None else self.project_head
        self.layers = find_layers(model, self.layer_names, include_heads)
        if not self.layers:
            raise ValueError(f"strategy {self.name!r} found no linear / conv layer to project in the model")
        count = len(self.layers)
        self.thresholds = [float(v) for v in per_layer(self.threshold_config, count, "threshold")]
        self.num_samples = [int(v) for v in per_layer(self.num_samples_config, count, "num_samples")]
        for value in self.thresholds:
            if not 0.0 < value <= 1.0:
                raise ValueError(f"strategy.threshold values must lie in (0, 1], got {value}")
        for name, module in model.named_modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
                raise ValueError(
                    f"strategy {self.name!r} needs batch-norm without running statistics (GPM), but {name} "
                    "tracks them: set model.track_running_stats=false"
                )
        self.bases = [None] * count
        self.projectors = [None] * count
        self.step_inputs: dict[int, Tensor | None] = {}
        self.step_out_grads: dict[int, Tensor] = {}
        self.projected_in_step: set[int] = set()  # layers a closed-form step already projected
        for i, layer in enumerate(self.layers):
            if isinstance(layer.module, nn.Linear):
                layer.module.register_forward_hook(partial(self._capture_factors, i))
        return model

    def _capture_factors(self, i: int, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        """Forward hook in training steps: keep the layer's input X and, on backward, its output gradient
        delta, whose product delta^T X is the weight gradient; projecting X (N rows) instead of the
        gradient (``out`` rows) is much cheaper at small batch (PMNIST: batch 10, 100 outputs)."""
        if self.projectors[i] is None or not (module.training and torch.is_grad_enabled() and output.requires_grad):
            return  # nothing to project (first task, empty basis) or not a training step
        if i in self.step_inputs:
            # called twice before one backward: delta^T X no longer is the gradient, use the formed one
            self.step_inputs[i] = None
            return
        x = inputs[0].detach()
        self.step_inputs[i] = self.layers[i].factor_inputs(x.reshape(-1, x.shape[-1]))
        output.register_hook(lambda grad: self.step_out_grads.__setitem__(i, grad.reshape(-1, grad.shape[-1])))

    def prepare_block(self, x: Tensor, task: Task) -> Tensor | None:
        """Closed-form steps: when the first projected layer is an MLP's first linear layer, its inputs are
        the data themselves, so their projection ``X (I - M M^T)`` does not change within a task: made here
        for a whole block in two large products instead of two skinny ones per step (2-3x less time on a
        CPU from rank ~100 on). Each step then forms that layer's gradient as ``delta^T`` times its rows."""
        projector = self.projectors[0]
        if projector is None or not self.takes_raw_inputs:
            return None
        inputs = self.layers[0].factor_inputs(x.flatten(1).to(projector.bases.dtype))
        return projector.orthogonal(inputs)

    @property
    def takes_raw_inputs(self) -> bool:
        """Whether the first projected layer is fed the flattened model input itself (clbench's MLP)."""
        model = self.model
        if type(model) is not MLP or not self.layers:
            return False
        for module in model.body:
            if isinstance(module, nn.Linear):
                return module is self.layers[0].module
            if not isinstance(module, nn.Flatten):
                return False
        return False

    def linear_gradient(self, layer: nn.Linear, inputs: Tensor, out_grad: Tensor, batch: Batch) -> Tensor | None:
        """Closed-form steps: a projected layer's gradient, from its factors or formed and then projected
        (whichever is fewer operations), as the hooked path computes it in ``after_backward`` (which then
        leaves this layer alone); the first layer's from the block's projected inputs when there are any."""
        i = self._position(layer)
        projector = None if i is None else self.projectors[i]
        if projector is None:
            return None
        if i == 0 and batch.aux is not None:
            self.projected_in_step.add(0)
            aux = batch.aux
            return (out_grad if out_grad.dtype == aux.dtype else out_grad.to(aux.dtype)).T @ aux
        inputs = self.layers[i].factor_inputs(inputs)
        grad = projector.orthogonal_from_factors(out_grad, inputs)
        if grad is None:  # projecting the formed gradient is fewer operations here (large batch, wide basis)
            grad = projector.orthogonal(out_grad.to(projector.bases.dtype).T @ inputs.to(projector.bases.dtype))
        self.projected_in_step.add(i)
        return grad

    def _position(self, layer: nn.Module) -> int | None:
        """Index of ``layer`` among the projected layers. Remembered by ``id()`` to spare a scan per layer
        and step, but only trusted when the entry names this very module: a deep copy of the strategy (or a
        module that took a freed one's address) has modules of its own, which are found again by scan."""
        positions = self._positions
        k = positions.get(id(layer))
        if k is not None and k < len(self.layers) and self.layers[k].module is layer:
            return k
        k = next((k for k, known in enumerate(self.layers) if known.module is layer), None)
        if k is not None:
            positions[id(layer)] = k
        return k

    def task_thresholds(self, task: Task) -> list[float]:
        """This task's energy thresholds: the base values plus the per-task increment, capped at 1."""
        return [min(1.0, value + self.threshold_increment * task.id) for value in self.thresholds]

    def fit_task(self, task: Task, trainer: Trainer) -> None:
        self.check_optimizer(trainer)
        self.refresh_projectors()
        trainer.fit(self, [task])

    def check_optimizer(self, trainer: Trainer) -> None:
        """Say once per run, on stderr, that Adam undoes the projection: a step is orthogonal to the old tasks'
        bases only if it is the projected gradient times a scalar (SGD; momentum sums projected gradients),
        and Adam divides each coordinate by its own scale. A warning, not an error: the run is still valid,
        it just no longer tests the method (on exssnet_splitmnist: validation ACC 81 % with Adam, 97 % with SGD)."""
        if trainer.optimizer in ADAPTIVE_OPTIMIZERS and not self.warned_optimizer:
            print(
                f"clbench: warning: {self.name} keeps old tasks' input spaces untouched only with SGD; "
                f"trainer.optimizer={trainer.optimizer} rescales the projected gradient per coordinate: "
                "use trainer.optimizer=sgd",
                file=sys.stderr,
            )
            self.warned_optimizer = True

    def after_task(self, task: Task) -> None:
        mats = self.representations(task)
        for i, (mat, threshold) in enumerate(zip(mats, self.task_thresholds(task), strict=True)):
            self.bases[i] = gpm_update(self.bases[i], mat, threshold)
        self.refresh_projectors()
        self.record_ranks()

    def record_ranks(self) -> None:
        """Log each layer's basis rank after a task: the memory GPM papers plot, and what a step's
        projection costs."""
        self.rank_log.append([0 if b is None else int(b.shape[1]) for b in self.bases])

    def refresh_projectors(self) -> None:
        """Rebuild the projection operators from the current bases (once per task, not per step)."""
        self.projectors = [None if b is None or b.shape[1] == 0 else Projector(b) for b in self.bases]

    # -- representations -----------------------------------------------------------------------------
    def sample_inputs(self, task: Task, count: int) -> Tensor:
        """``count`` random training inputs of ``task`` (the official code's ``r[0:300]``)."""
        assert self.stream is not None
        chosen = torch.randperm(task.num_train, device=task.train_index.device)[:count]
        return self.stream.inputs("train", task.train_index[chosen], task.id)

    def sample_batch(self, task: Task, count: int) -> tuple[Tensor, Tensor]:
        assert self.stream is not None
        chosen = torch.randperm(task.num_train, device=task.train_index.device)[:count]
        return self.stream.inputs("train", task.train_index[chosen], task.id), task.train_targets[chosen]

    def representations(self, task: Task) -> list[Tensor]:
        """Each constrained layer's representation matrix for ``task``: the plain model in eval mode (no
        dropout; batch-norm on the sample's own statistics), as the official GPM and TRGP code."""
        assert self.model is not None
        model = self.model
        model.eval()
        try:
            x = self.sample_inputs(task, max(self.num_samples))
            head = self.head_ids(task.id)
            return representation_matrices(self.layers, lambda inputs: model(inputs, head), x, self.num_samples)
        finally:
            model.train()

    # -- training step -------------------------------------------------------------------------------
    def parameters(self, task: Task) -> Sequence[nn.Parameter]:
        params = list(super().parameters(task))
        if self.freeze_batchnorm and task.id > 0:
            assert self.model is not None
            frozen = {
                id(p)
                for m in self.model.modules()
                if isinstance(m, nn.modules.batchnorm._BatchNorm)
                for p in m.parameters()
            }
            params = [p for p in params if id(p) not in frozen]
        return params

    def orthogonal_gradient(self, i: int) -> Tensor | None:
        """Layer ``i``'s gradient with the old subspaces removed, from this step's captured factors
        (exact when the loss reaches W only through this one layer call); None if not available."""
        projector = self.projectors[i]
        inputs, out_grad = self.step_inputs.get(i), self.step_out_grads.get(i)
        if projector is None or inputs is None or out_grad is None or inputs.shape[0] != out_grad.shape[0]:
            return None
        return projector.orthogonal_from_factors(out_grad, inputs)

    def clear_factors(self) -> None:
        self.step_inputs.clear()
        self.step_out_grads.clear()
        self.projected_in_step.clear()

    def after_backward(self, task: Task) -> None:
        for i, (layer, projector) in enumerate(zip(self.layers, self.projectors, strict=True)):
            if projector is None or i in self.projected_in_step:
                continue
            fast = self.orthogonal_gradient(i)
            if fast is not None and layer.module.weight.grad is not None:
                layer.set_grad_matrix(fast)
            elif layer.has_bias:
                grad = layer.grad_matrix()
                if grad is not None:
                    layer.set_grad_matrix(projector.remove_(grad))
            elif layer.module.weight.grad is not None:
                projector.remove_(layer.grad_matrix())
        self.clear_factors()

    def extra_results(self) -> dict[str, Any]:
        """``basis_ranks[t][l]``: layer ``l``'s basis rank after task ``t``, out of ``basis_dims[l]``
        (the layer's input dimension), for the layers named in ``projected_layers``."""
        return {
            "projected_layers": [layer.name for layer in self.layers],
            "basis_dims": [layer.dim for layer in self.layers],
            "basis_ranks": self.rank_log,
        }

    # -- persistence ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "bases": self.bases, "rank_log": self.rank_log}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.bases = list(state["bases"])
        self.rank_log = [list(ranks) for ranks in state.get("rank_log", [])]
        self.refresh_projectors()
