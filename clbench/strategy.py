"""The Strategy base class: the one interface every continual-learning method implements.

Its default behaviour is plain fine-tuning; a method overrides only the hooks it needs. The runner calls
``setup`` once, then per task ``fit_task`` (which calls ``trainer.fit``, which calls ``parameters``,
``forward``, ``loss``, ``after_backward`` and ``after_step``) and ``after_task``; evaluation calls
``predict``. ``state_dict`` / ``load_state_dict`` hold everything needed to resume after a task.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clbench.streams import SCENARIOS, Stream, Task, TaskIds

if TYPE_CHECKING:
    from clbench.models import ContinualModel
    from clbench.trainer import Trainer


class UnsupportedScenarioError(ValueError):
    """A strategy was asked to run on a scenario, a stream or a model it does not support: one line, exit 2 for a
    single run; a comparison sweep records the pair as skipped with that line."""


class UnresumableStrategyError(ValueError):
    """A checkpoint of a strategy whose state the default ``state_dict`` could not save in full."""


# set by Strategy.__init__ and by setup: saved as the model, or handed over again on resume
BASE_ATTRIBUTES = ("model", "stream")


def is_plain_state(value: Any) -> bool:
    """Whether the default ``state_dict`` can save ``value`` as it is: tensors, modules, arrays, numbers,
    strings, None, and lists / tuples / dicts (string keys) of those."""
    if value is None or isinstance(value, bool | int | float | str | Tensor | nn.Module | np.ndarray | np.generic):
        return True
    if isinstance(value, list | tuple):
        return all(is_plain_state(item) for item in value)
    if isinstance(value, dict):
        return all(isinstance(k, str | int) and is_plain_state(v) for k, v in value.items())
    return False


@dataclass
class ModuleState:
    """A module attribute's ``state_dict`` in a checkpoint (the module itself is rebuilt by the strategy)."""

    state: dict[str, Any]


def saved_form(value: Any) -> Any:
    """``value`` as the checkpoint keeps it: modules as their state (:class:`ModuleState`)."""
    if isinstance(value, nn.Module):
        return ModuleState(value.state_dict())
    if isinstance(value, list | tuple):
        return type(value)(saved_form(item) for item in value)
    if isinstance(value, dict):
        return {key: saved_form(item) for key, item in value.items()}
    return value


def restore_in_place(current: Any, saved: Any) -> Any:
    """``saved`` written into ``current`` where both are tensors of one shape and dtype (or modules, or
    lists / dicts of them with the same layout), so objects that others hold references to are updated;
    ``saved`` itself otherwise."""
    if isinstance(current, Tensor) and isinstance(saved, Tensor):
        if current.shape == saved.shape and current.dtype == saved.dtype:
            with torch.no_grad():
                current.copy_(saved)
            return current
        return saved
    if isinstance(saved, ModuleState):
        if not isinstance(current, nn.Module):
            raise UnresumableStrategyError(
                "held a module when saved and none after setup(): override state_dict / load_state_dict to "
                "rebuild it, or pass resume=false to start afresh"
            )
        current.load_state_dict(saved.state)
        return current
    if isinstance(current, list) and isinstance(saved, list) and len(current) == len(saved):
        current[:] = [restore_in_place(c, s) for c, s in zip(current, saved, strict=True)]
        return current
    if isinstance(current, dict) and isinstance(saved, dict) and current.keys() == saved.keys():
        for key in saved:
            current[key] = restore_in_place(current[key], saved[key])
        return current
    return saved


@dataclass
class Batch:
    """One training batch: inputs, scenario targets, task id(s), and pool positions (for per-sample state).

    ``x`` is a row slice (a view) of a block of prepared inputs (``trainer.prefetch_mb``): a strategy that
    keeps inputs beyond the step (a replay buffer) should store ``x.clone()`` or the pool positions, or the
    whole block stays alive."""

    x: Tensor
    y: Tensor
    task_ids: TaskIds
    index: Tensor
    aux: Tensor | None = None  # this batch's rows of what the strategy's prepare_block returned, if anything


class Strategy:
    """Base class; on its own it is fine-tuning (``strategy=finetune``).

    Class attributes a subclass sets:
    ``name`` (used in result paths and tables), ``scenarios`` (those it supports; a mismatch is an error
    before training), ``uses_task_oracle`` (True for references that read the task id at test time
    even where the scenario hides it, e.g. one model per task; the result file records it), and
    ``graph_safe`` (True where ``forward``, ``loss``, ``after_backward`` and ``after_step`` read nothing
    back to the host and take the same Python path on every step of a task, so ``trainer.cuda_graphs``
    may record the step once and replay it; only the class's own declaration counts, not a parent's), and
    ``closed_form_safe`` (True where the training loss is ``Strategy.loss`` on ``Strategy.forward`` and the
    hooks need nothing from autograd but ``.grad``, so ``trainer.closed_form`` may write an MLP's gradients
    out without autograd; its ``after_backward`` / ``after_step`` then run under ``torch.no_grad``; see
    :mod:`clbench.closed_form`; again only the class's own declaration counts), and ``population_safe`` (True
    where its runs may be members of a population, ``hydra/launcher=population``: each member then gives the R
    of its solo run; the class's own declaration, checked by a test per strategy) with ``batchable`` (the names
    of its numeric settings that members of one population may differ in, e.g. ``("ewc_lambda",)``).
    """

    name: ClassVar[str] = "finetune"
    scenarios: ClassVar[tuple[str, ...]] = SCENARIOS
    uses_task_oracle: ClassVar[bool] = False
    graph_safe: ClassVar[bool] = False
    closed_form_safe: ClassVar[bool] = False
    population_safe: ClassVar[bool] = False
    batchable: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def declares(cls, flag: str) -> bool:
        """Whether this very class sets the class attribute ``flag`` (``graph_safe``, ``closed_form_safe``)
        to True. Not inherited: a subclass that changes a hook or the loss may break what its parent's
        declaration promised."""
        return bool(cls.__dict__.get(flag, False))

    def __init__(self) -> None:
        self.model: ContinualModel | None = None
        self.stream: Stream | None = None

    # -- lifecycle -----------------------------------------------------------------------------------
    def check_scenario(self, scenario: str) -> None:
        """Raise a one-line error if this strategy cannot run on ``scenario``."""
        if scenario not in self.scenarios:
            raise UnsupportedScenarioError(
                f"strategy {self.name!r} supports the {'/'.join(self.scenarios)} scenario(s), not {scenario!r}: "
                f"pick a stream with stream.scenario={self.scenarios[0]} or another strategy"
            )

    def setup(self, model: ContinualModel, stream: Stream) -> ContinualModel:
        """Take the model (wrap layers, add state) before anything is trained or evaluated."""
        self.check_scenario(stream.scenario)
        self.model = model
        self.stream = stream
        return model

    def fit_task(self, task: Task, trainer: Trainer) -> None:
        """Learn one task; multi-phase methods call ``trainer.fit`` more than once."""
        trainer.fit(self, [task])

    def after_task(self, task: Task) -> None:
        """Consolidate after a task (importance, bases, masks); called after ``fit_task``."""

    # -- training step -------------------------------------------------------------------------------
    def parameters(self, task: Task) -> Sequence[nn.Parameter]:
        """What the optimizer updates for ``task``: the shared body plus this task's head when heads
        are per task (other tasks' heads stay untouched, weight decay included). Parameters that
        ``model.freeze`` fixed (``requires_grad=False``) are left out."""
        assert self.model is not None and self.stream is not None
        if self.stream.scenario == "task":
            params = [*self.model.shared_parameters(), *self.model.heads.heads[task.id].parameters()]
        else:
            params = list(self.model.parameters())
        return [p for p in params if p.requires_grad]

    def head_ids(self, task_ids: TaskIds) -> TaskIds | None:
        """Which head(s) to use: the task id(s) in the task scenario, the shared head otherwise."""
        assert self.stream is not None
        return task_ids if self.stream.scenario == "task" else None

    def forward(self, x: Tensor, task_ids: TaskIds) -> Tensor:
        """Training-time forward pass: the model's own call, or, where the strategy overrides
        :meth:`forward_heads` (it needs the features, as LwF does), the model's features through it."""
        assert self.model is not None
        if type(self).forward_heads is Strategy.forward_heads:
            return self.model(x, self.head_ids(task_ids))
        return self.forward_heads(self.model.features(x), task_ids)

    def forward_heads(self, features: Tensor, task_ids: TaskIds) -> Tensor:
        """The training-time forward pass from the model's features on (the heads). A strategy that keeps
        the features of a step, or changes what follows them, overrides this rather than :meth:`forward`, so
        that a population can compute every member's features in one batched pass (:mod:`clbench.population`)."""
        assert self.model is not None
        return self.model.heads(features, self.head_ids(task_ids))

    def loss(self, output: Tensor, y: Tensor, batch: Batch, task: Task) -> Tensor:
        """Training loss; regularisers add their terms here."""
        return F.cross_entropy(output, y)

    def after_backward(self, task: Task) -> None:
        """Gradient surgery before the optimizer step (projections)."""

    def prepare_block(self, x: Tensor, task: Task) -> Tensor | None:
        """Closed-form steps only: called once per block of prepared training inputs (``trainer.prefetch_mb``)
        with the whole block ``x``; a per-sample tensor returned here reaches each step as its rows in
        ``batch.aux``. For work that depends on the inputs alone (not on the parameters), which runs far
        faster as one large operation than batch by batch (GPM: the first layer's projected inputs)."""
        return None

    def linear_gradient(self, layer: nn.Linear, inputs: Tensor, out_grad: Tensor, batch: Batch) -> Tensor | None:
        """Closed-form steps only (``trainer.closed_form``): ``layer``'s input ``[B, in]`` and the loss's
        gradient with respect to its output ``[B, out]``, whose product ``out_grad^T inputs`` is the
        weight gradient. A strategy may return the ``[out, in]`` gradient to use instead (``[out, in + 1]``
        with the bias gradient as last column), e.g. projected from these factors, which is cheaper than
        changing the formed gradient in ``after_backward``; None keeps the plain one."""
        return None

    def after_step(self, task: Task) -> None:
        """After each optimizer step (path integrals, mask re-application)."""

    # -- evaluation ----------------------------------------------------------------------------------
    def predict(self, x: Tensor, task_id: int | None) -> Tensor:
        """Evaluation-time logits; ``task_id`` is None where the scenario gives no task identity."""
        assert self.model is not None
        return self.model(x, task_id if task_id is not None and self.stream.scenario == "task" else None)

    def inference_batch(self) -> int | None:
        """Samples per inferred task id where ``predict`` without a task id infers one task for the whole
        batch it is given (SupSup); None, the default, where each sample's prediction is its own. The runner
        then evaluates such a strategy task by task in chunks of exactly this size, so no chunk mixes
        tasks and the chunk size is the strategy's, not ``trainer.eval_batch_size``."""
        return None

    def eval_modules(self) -> list[nn.Module]:
        """Modules to switch between train and eval mode (more than one for one-model-per-task)."""
        assert self.model is not None
        return [self.model]

    def extra_results(self) -> dict[str, Any]:
        """Method-specific results the runner adds to result.json when the run completes (e.g. mask
        storage, task-inference accuracy); keys must not clash with the runner's own."""
        return {}

    def kept_bytes(self) -> int:
        """Bytes this strategy keeps between tasks beyond the model it trains (bases, masks, Fisher diagonals,
        anchors, stored models), reported as a cost in result.json. The default counts the tensors of
        ``state_dict()`` that the model's own state does not hold, each storage once; a strategy whose state
        holds more than it needs (caches it could rebuild) overrides it."""
        from clbench.cost import kept_bytes

        assert self.model is not None
        return kept_bytes(self.state_dict(), self.model.state_dict())

    # -- persistence ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue after the last finished task.

        The default saves the model's state and every other attribute of the strategy that is plain data:
        tensors, modules, arrays, numbers, strings, None, and lists / tuples / dicts of those (a user's
        ``self.anchor = [p.detach().clone() ...]``). Attributes of any other kind are named under
        ``unsaved``; a class that keeps such state overrides ``state_dict`` / ``load_state_dict`` to say how,
        or its run refuses to resume (:meth:`load_state_dict`) rather than continue without it."""
        assert self.model is not None
        attributes: dict[str, Any] = {}
        unsaved: dict[str, str] = {}  # name: type
        for name, value in vars(self).items():
            if name in BASE_ATTRIBUTES:
                continue
            if is_plain_state(value):
                attributes[name] = saved_form(value)
            else:
                unsaved[name] = type(value).__name__
        return {"model": self.model.state_dict(), "attributes": attributes, "unsaved": unsaved}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Put back what :meth:`state_dict` saved: tensors and modules in place where they still exist (so
        references to them, e.g. into the model, stay valid), other values by assignment."""
        assert self.model is not None
        unsaved = state.get("unsaved", {})
        if unsaved and type(self).load_state_dict is Strategy.load_state_dict:
            kinds = ", ".join(f"{name} ({kind})" for name, kind in unsaved.items())
            raise UnresumableStrategyError(
                f"strategy {self.name!r} keeps {kinds}, which the default state_dict cannot save: override "
                "state_dict / load_state_dict to save it, or pass resume=false to start afresh"
            )
        self.model.load_state_dict(state["model"])
        own = type(self).load_state_dict is Strategy.load_state_dict
        for name, value in state.get("attributes", {}).items():
            try:
                setattr(self, name, restore_in_place(getattr(self, name, None), value))
            except UnresumableStrategyError as error:
                if own:  # a subclass that loads its own state may rebuild this one itself
                    raise UnresumableStrategyError(f"strategy {self.name!r}: self.{name} {error}") from None
