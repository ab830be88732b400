"""Control sets: a held-out evaluation set outside the stream that measures the knowledge a model had before it.

Zhang, Janson, Aljundi & Elhoseiny (CVPR 2024, "Overcoming Generic Knowledge Loss with Selective Parameter Update")
measure how much of a pretrained model's generic knowledge survives a stream by its accuracy on a *control set*
(ImageNet for CLIP) before training and after every task. ``control=<name>`` (``conf/control/``) names one: a
dataset clbench loads, which of its classes, and a readout that turns the model's features into a prediction:

* ``head``: the control head saved in the pretraining checkpoint (``control.checkpoint``, read by
  :func:`clbench.pretrain.load_control_head`: the head, its classes, its dataset) applied to ``model.features(x)``. It
  stays fixed, so a change in accuracy is a change in the features the pretraining head reads.
* ``ncm``: nearest class mean (Rebuffi et al., iCaRL 2017) for a control set without a head: at every evaluation,
  the class means of the L2-normalised features of a fixed sample of the dataset's training images
  (``ncm_per_class`` per class, drawn once with a fixed seed), and each test image goes to the nearest mean.

The runner keeps the accuracies in a :class:`ControlRecord`: ``control_acc_before`` (before the first task),
``control_acc`` (one value per row of R), the control change (final - before) in the metrics, all kept in the
checkpoint so a resumed run continues them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn

from clbench.data.base import ImageDataset
from clbench.pretrain import load_control_head
from clbench.schema import ConfigError

if TYPE_CHECKING:
    from clbench.strategy import Strategy
    from clbench.streams import Stream

READOUTS = ("head", "ncm")
NCM_SEED = 0  # the NCM sample is the same in every run, so runs compare on the same class means' data


@dataclass
class ControlSet:
    """One control set (``conf/control/<name>.yaml``): ``dataset`` (an :class:`ImageDataset` node), the
    ``classes`` to evaluate (original labels; null: the checkpoint's for ``head``, all for ``ncm``), the
    ``readout`` and, for ``head``, the ``checkpoint`` holding the control head."""

    name: str
    dataset: ImageDataset
    readout: Literal["head", "ncm"] = "head"
    classes: list[int] | None = None
    checkpoint: str | None = None
    ncm_per_class: int = 50
    eval_batch_size: int = 1000
    _x: Tensor | None = field(default=None, init=False, repr=False)
    _y: Tensor | None = field(default=None, init=False, repr=False)
    _ncm_x: Tensor | None = field(default=None, init=False, repr=False)
    _ncm_y: Tensor | None = field(default=None, init=False, repr=False)
    _head: nn.Linear | None = field(default=None, init=False, repr=False)
    _scale: Tensor | None = field(default=None, init=False, repr=False)
    _shift: Tensor | None = field(default=None, init=False, repr=False)
    _num_classes: int = field(default=0, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.readout not in READOUTS:
            raise ConfigError(f"unknown control.readout {self.readout!r}: use one of {', '.join(READOUTS)}")
        if self.ncm_per_class < 1 or self.eval_batch_size < 1:
            raise ConfigError("control.ncm_per_class and control.eval_batch_size must be >= 1")

    # -- set-up (before training: every mistake is a ConfigError, exit 2) ------------------------------------
    def prepare(self, model: nn.Module, stream: Stream) -> None:
        """Check the control set against the model and stream and put its tensors on the stream's device."""
        device = stream.device
        dataset = self.dataset
        if tuple(dataset.input_shape) != tuple(stream.input_shape):
            raise ConfigError(
                f"control {self.name}: {dataset.name} images are {tuple(dataset.input_shape)}, the model's inputs "
                f"{tuple(stream.input_shape)}: pick a control dataset of the stream's image shape"
            )
        classes = self._readout_classes(dataset)
        self._num_classes = len(classes)
        position = torch.full((dataset.num_classes,), -1, dtype=torch.int64)
        position[torch.tensor(classes)] = torch.arange(len(classes))
        chosen = torch.isin(dataset.y_test, torch.tensor(classes))
        self._x = dataset.x_test[chosen].to(device)
        self._y = position[dataset.y_test[chosen]].to(device)
        peak = 255.0 if dataset.x_test.dtype == torch.uint8 else 1.0
        mean, std = torch.tensor(dataset.mean), torch.tensor(dataset.std)
        self._scale = (1.0 / (std * peak)).view(1, -1, 1, 1).to(device)
        self._shift = (mean / std).view(1, -1, 1, 1).to(device)
        if self.readout == "ncm":
            generator = torch.Generator().manual_seed(NCM_SEED)
            picks = []
            for label in classes:
                members = torch.nonzero(dataset.y_train == label).flatten()
                picks.append(members[torch.randperm(len(members), generator=generator)[: self.ncm_per_class]])
            index = torch.cat(picks)
            self._ncm_x = dataset.x_train[index].to(device)
            self._ncm_y = position[dataset.y_train[index]].to(device)
        self._check_features(model)

    def _readout_classes(self, dataset: ImageDataset) -> list[int]:
        """The classes the readout predicts, in its output order; loads the control head for ``head``."""
        wanted = None if self.classes is None else [int(c) for c in self.classes]
        if wanted is not None and (
            len(set(wanted)) != len(wanted) or not set(wanted) <= set(range(dataset.num_classes))
        ):
            raise ConfigError(
                f"control.classes must list distinct classes of {dataset.name} (0..{dataset.num_classes - 1}), "
                f"got {wanted}"
            )
        if self.readout == "ncm":
            return wanted if wanted is not None else list(range(dataset.num_classes))
        if not self.checkpoint:
            raise ConfigError(
                f"control {self.name}: readout=head needs the pretraining checkpoint: set control.checkpoint=PATH "
                "(or model.checkpoint), or control.readout=ncm"
            )
        if not Path(self.checkpoint).is_file():
            raise ConfigError(
                f"control.checkpoint={self.checkpoint} is not a file: point it at a pretraining checkpoint"
            )
        try:
            head, head_classes, trained_on = load_control_head(self.checkpoint)
        except (KeyError, TypeError, RuntimeError, OSError, ValueError) as error:
            raise ConfigError(
                f"control.checkpoint={self.checkpoint} holds no control head ({type(error).__name__}: {error}): "
                "use a checkpoint written by clbench.pretrain, or control.readout=ncm"
            ) from None
        if trained_on != dataset.name:
            raise ConfigError(
                f"control {self.name}: the checkpoint's control head was trained on {trained_on}, the control set "
                f"is {dataset.name}: point control.dataset at {trained_on}"
            )
        head_classes = [int(c) for c in head_classes]
        if wanted is not None and not set(wanted) <= set(head_classes):
            raise ConfigError(
                f"control.classes {sorted(set(wanted) - set(head_classes))} are not among the control head's "
                f"classes {head_classes}: drop them or set control.classes=null"
            )
        self._head = head.eval().requires_grad_(False)
        if wanted is not None:  # a sub-set of the head's classes: predict among those rows only
            rows = [head_classes.index(c) for c in wanted]
            narrowed = nn.Linear(head.in_features, len(rows), bias=head.bias is not None)
            with torch.no_grad():
                narrowed.weight.copy_(head.weight[rows])
                if head.bias is not None:
                    narrowed.bias.copy_(head.bias[rows])
            self._head = narrowed.eval().requires_grad_(False)
            return wanted
        return head_classes

    def _check_features(self, model: nn.Module) -> None:
        """The model must have ``features`` and, for ``head``, give as many features as the head reads."""
        if not callable(getattr(model, "features", None)):
            raise ConfigError(f"control {self.name}: the model has no features(x): use a clbench ContinualModel")
        assert self._x is not None
        was_training = model.training
        model.eval()
        with torch.no_grad():
            width = model.features(self._inputs(self._x[:1])).flatten(1).shape[1]
        model.train(was_training)
        if self._head is not None:
            if self._head.in_features != width:
                raise ConfigError(
                    f"control {self.name}: the control head reads {self._head.in_features} features, the model "
                    f"gives {width}: use the model the checkpoint was pretrained with"
                )
            self._head = self._head.to(self._x.device)

    # -- evaluation --------------------------------------------------------------------------------------------
    def _inputs(self, x: Tensor) -> Tensor:
        assert self._scale is not None and self._shift is not None
        return x.float().mul_(self._scale).sub_(self._shift)

    def _features(self, model: nn.Module, x: Tensor) -> Tensor:
        chunks = [model.features(self._inputs(part)).flatten(1) for part in x.split(self.eval_batch_size)]
        return torch.cat(chunks)

    @torch.no_grad()
    def accuracy(self, model: nn.Module) -> float:
        """Control accuracy (percent) of ``model`` as it is now, in eval mode (its mode is restored)."""
        assert self._x is not None and self._y is not None, "ControlSet.prepare must run first"
        was_training = model.training
        model.eval()
        try:
            features = self._features(model, self._x)
            if self._head is not None:
                predicted = self._head(features).argmax(dim=1)
            else:
                assert self._ncm_x is not None and self._ncm_y is not None
                reference = nn.functional.normalize(self._features(model, self._ncm_x), dim=1)
                means = torch.zeros(self._num_classes, reference.shape[1], device=reference.device)
                means.index_add_(0, self._ncm_y, reference)
                means = nn.functional.normalize(means, dim=1)
                predicted = torch.cdist(nn.functional.normalize(features, dim=1), means).argmin(dim=1)
        finally:
            model.train(was_training)
        return int((predicted == self._y).sum()) * 100.0 / self._y.numel()  # a count: no float32 rounding

    def describe(self) -> dict[str, Any]:
        """What result.json records of the control set."""
        return {
            "name": self.name,
            "dataset": self.dataset.name,
            "readout": self.readout,
            "num_classes": self._num_classes,
            "num_test": 0 if self._y is None else int(self._y.numel()),
            "checkpoint": self.checkpoint if self.readout == "head" else None,
        }


@dataclass
class ControlRecord:
    """The control accuracies of one run: before training and after every task (None where a resumed run's
    checkpoint predates the control set); the runner saves :meth:`state_dict` in its checkpoint."""

    control: ControlSet | None
    before: float | None = None
    after_task: list[float | None] = field(default_factory=list)

    @property
    def active(self) -> bool:
        return self.control is not None

    def prepare(self, model: nn.Module, stream: Stream) -> None:
        """Check the control set against the model and stream before training (:meth:`ControlSet.prepare`)."""
        if self.control is not None:
            self.control.prepare(model, stream)

    def measure(self, strategy: Strategy, task_id: int | None) -> float | None:
        """Measure now: before training (``task_id`` None) or after task ``task_id``; returns the accuracy."""
        if self.control is None:
            return None
        assert strategy.model is not None
        value = self.control.accuracy(strategy.model)
        if task_id is None:
            self.before = value
        else:
            del self.after_task[task_id:]
            self.after_task += [None] * (task_id - len(self.after_task)) + [value]
        return value

    def state_dict(self) -> dict[str, Any]:
        return {"control_acc_before": self.before, "control_acc": list(self.after_task)}

    def load_state_dict(self, checkpoint: dict[str, Any], tasks_done: int) -> None:
        """Continue from a runner checkpoint after ``tasks_done`` tasks (one saved without a control set: None)."""
        saved = list(checkpoint.get("control_acc") or [])[:tasks_done]
        self.before = checkpoint.get("control_acc_before")
        self.after_task = saved + [None] * (tasks_done - len(saved))

    def result_fields(self, tasks_done: int) -> dict[str, Any]:
        """result.json's control keys for the first ``tasks_done`` rows of R (nothing without a control set)."""
        if self.control is None:
            return {}
        return {
            "control": self.control.describe(),
            "control_acc_before": self.before,
            "control_acc": self.after_task[:tasks_done],
        }

    def metrics(self) -> dict[str, float | None]:
        """The control summary: the final control accuracy and its change from before training (percent)."""
        if self.control is None:
            return {}
        final = self.after_task[-1] if self.after_task else None
        change = None if final is None or self.before is None else final - self.before
        return {"control_acc_final": final, "control_change": change}
