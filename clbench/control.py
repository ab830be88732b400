"""Control sets: a held-out evaluation set outside the stream that measures the knowledge a model had before it.

Zhang, Janson, Aljundi & Elhoseiny (CVPR 2024, "Overcoming Generic Knowledge Loss with Selective Parameter Update")
measure how much of a pretrained model's generic knowledge survives a stream by its accuracy on a *control set*
(ImageNet for CLIP) before training and after every task. ``control=<name>`` (``conf/control/``) names one: a
dataset clbench loads, which of its classes, and a readout that turns the model's features into a prediction:

* ``head``: the control head saved in the pretraining checkpoint (``control.checkpoint``, read by
  :func:`clbench.pretrain.load_control_head`: the head, its classes, its dataset) applied to ``model.features(x)``. It
  stays fixed, so a change in accuracy is a change in the features the pretraining head reads.
* ``ncm``: nearest class mean (Rebuffi et al., iCaRL 2017; :class:`clbench.ncm.NearestClassMean`, ``cosine``) for
  a control set without a head: at every evaluation, the class means of the L2-normalised features of a fixed
  sample of the dataset's training images (``ncm_per_class`` per class, drawn once with a fixed seed), and each test
  image goes to the nearest mean.

The control set is measured the way a row of R is: its data is a one-task stream built as
the pretraining data is built (:func:`clbench.streams.class_subset_stream`) (the same input normalisation and label
order), and its accuracy comes from the run's :class:`~clbench.evaluator.Evaluator` settings (``trainer.eval_amp``,
``eval_batch_size``, ``channels_last`` ...) through the strategy's ``eval_modules()``, with the readout in place of
``strategy.predict`` (:class:`ControlReadout`). So R and the control accuracy share precision and eval modes.

The runner keeps the accuracies in a :class:`ControlRecord`: ``control_acc_before`` (before the first task),
``control_acc`` (one value per row of R), the control change (final - before) in the metrics, all kept in the
checkpoint so a resumed run continues them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from clbench.data.base import ImageDataset
from clbench.ncm import NearestClassMean
from clbench.pretrain import load_control_head
from clbench.schema import ConfigError
from clbench.strategy import Strategy
from clbench.streams import Stream, class_subset_stream
from clbench.trainer import Trainer

READOUTS = ("head", "ncm")
NCM_SEED = 0  # the NCM sample is the same in every run, so runs compare on the same class means' data
# What the Evaluator reads of its trainer besides the stream: a control set is measured with the run's values.
EVALUATION_SETTINGS = ("eval_batch_size", "eval_amp", "batched_eval", "eval_cache_mb", "eval_chunk_mb", "channels_last")


class ControlReadout(Strategy):
    """The run's strategy read out through a control set: ``predict`` is the readout (the control head, or the
    NCM scores) of ``strategy.model.features(x)``, and ``eval_modules`` are the strategy's own, so that the
    trainer's :class:`~clbench.evaluator.Evaluator` measures the control set as it measures a row of R."""

    name = "control_readout"

    def __init__(self, strategy: Strategy, head: nn.Module | None, ncm: NearestClassMean | None) -> None:
        super().__init__()
        if (head is None) == (ncm is None):
            raise ValueError("ControlReadout reads out through exactly one of a head or class means")
        self.strategy = strategy
        self.model = strategy.model
        self.head = head
        self.ncm = ncm

    def predict(self, x: Tensor, task_id: int | None) -> Tensor:
        assert self.model is not None
        features = self.model.features(x).flatten(1)
        if self.head is not None:
            return self.head(features)
        assert self.ncm is not None
        return self.ncm.scores(features)

    def eval_modules(self) -> list[nn.Module]:
        return self.strategy.eval_modules()


@dataclass
class ControlSet:
    """One control set (``conf/control/<name>.yaml``): ``dataset`` (an :class:`ImageDataset` node), the
    ``classes`` to evaluate (original labels; null: the checkpoint's for ``head``, all for ``ncm``), the
    ``readout`` and, for ``head``, the ``checkpoint`` holding the control head. Its batch sizes are the run's
    (``trainer.eval_batch_size``, ``eval_chunk_mb``), as R's are."""

    name: str
    dataset: ImageDataset
    readout: Literal["head", "ncm"] = "head"
    classes: list[int] | None = None
    checkpoint: str | None = None
    ncm_per_class: int = 50
    _stream: Stream | None = field(default=None, init=False, repr=False)
    _head: nn.Linear | None = field(default=None, init=False, repr=False)
    _num_classes: int = field(default=0, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.readout not in READOUTS:
            raise ConfigError(f"unknown control.readout {self.readout!r}: use one of {', '.join(READOUTS)}")
        if self.ncm_per_class < 1:
            raise ConfigError("control.ncm_per_class must be >= 1")

    # -- set-up (before training: every mistake is a ConfigError, exit 2) ------------------------------------
    def prepare(self, model: nn.Module, stream: Stream) -> None:
        """Check the control set against the model and stream and put its stream on the run's device.

        The control stream's training pool is the NCM sample alone (nothing for ``head``): the rest of the
        dataset's training images would only take device memory."""
        dataset = self.dataset
        if tuple(dataset.input_shape) != tuple(stream.input_shape):
            raise ConfigError(
                f"control {self.name}: {dataset.name} images are {tuple(dataset.input_shape)}, the model's inputs "
                f"{tuple(stream.input_shape)}: pick a control dataset of the stream's image shape"
            )
        classes = self._readout_classes(dataset)
        self._num_classes = len(classes)
        sample = self._ncm_sample(dataset, classes)
        pool = dataclasses.replace(dataset, x_train=dataset.x_train[sample], y_train=dataset.y_train[sample])
        self._stream = class_subset_stream(pool, classes).to(stream.device)
        self._check_features(model)

    def _ncm_sample(self, dataset: ImageDataset, classes: list[int]) -> Tensor:
        """Positions of the NCM sample in the dataset's training images, class by class in ``classes``' order
        (``ncm_per_class`` of each, drawn with ``NCM_SEED``); none for ``head``."""
        if self.readout != "ncm":
            return torch.zeros(0, dtype=torch.int64)
        generator = torch.Generator().manual_seed(NCM_SEED)
        picks = []
        for label in classes:
            members = torch.nonzero(dataset.y_train == label).flatten()
            picks.append(members[torch.randperm(len(members), generator=generator)[: self.ncm_per_class]])
        return torch.cat(picks)

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
        assert self._stream is not None
        task = self._stream.tasks[0]
        was_training = model.training
        model.eval()
        with torch.no_grad():
            width = model.features(self._stream.inputs("test", task.test_index[:1], 0)).flatten(1).shape[1]
        model.train(was_training)
        if self._head is not None:
            if self._head.in_features != width:
                raise ConfigError(
                    f"control {self.name}: the control head reads {self._head.in_features} features, the model "
                    f"gives {width}: use the model the checkpoint was pretrained with"
                )
            self._head = self._head.to(self._stream.device)

    # -- evaluation --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def accuracy(self, strategy: Strategy, trainer: Trainer) -> float:
        """Control accuracy (percent) of ``strategy``'s model as it is now, measured as a row of R: by an
        :class:`~clbench.evaluator.Evaluator` with ``trainer``'s evaluation settings (``EVALUATION_SETTINGS``:
        ``eval_amp``'s autocast, batch sizes, memory format), the strategy's ``eval_modules()`` in eval mode
        (their modes are restored after). The evaluator is made for this measurement and dropped after it, so
        it keeps no prepared inputs between tasks."""
        assert self._stream is not None, "ControlSet.prepare must run first"
        evaluation = Trainer(progress=False, **{key: getattr(trainer, key) for key in EVALUATION_SETTINGS})
        evaluation.attach(self._stream, NCM_SEED)
        modes = [(module, module.training) for module in strategy.eval_modules()]
        try:
            ncm = self._class_means(strategy, evaluation) if self._head is None else None
            readout = ControlReadout(strategy, self._head, ncm)
            return float(evaluation.evaluate(readout, give_task_id=False)[0])
        finally:
            for module, training in modes:
                module.train(training)

    def _class_means(self, strategy: Strategy, evaluation: Trainer) -> NearestClassMean:
        """iCaRL's class means (``cosine``: :mod:`clbench.ncm`) of the NCM sample's features, made as the test
        images' features are: the same eval modules, inputs and autocast."""
        assert self._stream is not None and strategy.model is not None
        task = self._stream.tasks[0]
        for module in strategy.eval_modules():
            module.eval()
        with evaluation.autocast(evaluation=True):
            features = torch.cat(
                [
                    strategy.model.features(evaluation.model_inputs("train", part, task.id)).flatten(1)
                    for part in task.train_index.split(evaluation.eval_batch_size)
                ]
            )
        return NearestClassMean.fit(features, task.train_targets, self._num_classes, "cosine")

    def describe(self) -> dict[str, Any]:
        """What result.json records of the control set."""
        return {
            "name": self.name,
            "dataset": self.dataset.name,
            "readout": self.readout,
            "num_classes": self._num_classes,
            "num_test": 0 if self._stream is None else self._stream.tasks[0].num_test,
            "checkpoint": self.checkpoint if self.readout == "head" else None,
        }


@dataclass
class ControlRecord:
    """The control accuracies of one run: before training and after every task (None where a resumed run's
    checkpoint predates the control set); the runner saves :meth:`state_dict` in its checkpoint."""

    control: ControlSet | None
    before: float | None = None
    after_task: list[float | None] = field(default_factory=list)
    trainer: Trainer | None = field(default=None, repr=False)

    @property
    def active(self) -> bool:
        return self.control is not None

    def prepare(self, model: nn.Module, stream: Stream, trainer: Trainer) -> None:
        """Check the control set against the model and stream before training (:meth:`ControlSet.prepare`); the
        run's ``trainer`` gives every measurement its evaluation settings, read when it is made."""
        self.trainer = trainer
        if self.control is not None:
            self.control.prepare(model, stream)

    def measure(self, strategy: Strategy, task_id: int | None) -> float | None:
        """Measure now: before training (``task_id`` None) or after task ``task_id``; returns the accuracy."""
        if self.control is None:
            return None
        assert self.trainer is not None, "ControlRecord.prepare must run first"
        value = self.control.accuracy(strategy, self.trainer)
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
