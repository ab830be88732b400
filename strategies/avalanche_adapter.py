"""Run any Avalanche strategy template (with any plugins) as a clbench strategy.

clbench's runner keeps control: it calls ``fit_task`` once per task, evaluates with ``predict`` into R,
checkpoints and logs, so an Avalanche method yields the same R, b, metrics, result.json and W&B run as a
native one and the two can be compared number for number. Inside ``fit_task`` the template trains for
one experience made of exactly ``stream.inputs("train", task.train_index, task.id)`` and
``task.train_targets`` (task label = task id), through clbench's own model object.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from typing import Any

from avalanche.core import SupervisedPlugin
from avalanche.models import MultiTaskModule
from avalanche.training.plugins import EvaluationPlugin
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from clbench.bridges.avalanche import to_avalanche
from clbench.masking import absent_classes, batch_absent, mask_absent
from clbench.models import ContinualModel
from clbench.strategy import Strategy
from clbench.streams import Stream, Task
from clbench.trainer import Trainer


class TaskRoutedModel(MultiTaskModule):
    """clbench's model as an Avalanche ``MultiTaskModule``: the task label picks the clbench head.

    Avalanche passes task labels only to ``MultiTaskModule``s, and task-aware plugins (LwF distilling
    every old head) need ``forward(x, None)`` to return all heads seen so far; both come with the base.
    """

    def __init__(self, model: ContinualModel) -> None:
        super().__init__()
        self.model = model

    def forward_single_task(self, x: Tensor, task_label: int) -> Tensor:
        return self.model(x, int(task_label))


class GroupMaskedCrossEntropy(nn.Module):
    """Cross-entropy with a shared head's absent classes masked (:mod:`clbench.masking`), as clbench's trainer
    trains on streams that ask for it (SCoLe's group masking): the logits of the classes the current task does not
    hold (per batch where the stream masks per batch) go to the dtype's minimum before the loss. Without it an
    Avalanche template trained every SCoLe task pushing the absent classes down (Naive: 59.9 % against fine-tune's
    75.0 % on scole_fashion_mnist). On other streams it is plain cross-entropy."""

    def __init__(self, stream: Stream) -> None:
        super().__init__()
        self.stream = stream
        self.absent: Tensor | None = None

    def start_task(self, task: Task) -> None:
        self.absent = absent_classes(self.stream, [task])

    def forward(self, output: Tensor, y: Tensor) -> Tensor:
        return nn.functional.cross_entropy(mask_absent(output, batch_absent(self.stream, self.absent, y)), y)


class EpochLoss(SupervisedPlugin):
    """Appends the mean training loss of each epoch of each task to ``trainer.epoch_losses``, so the
    result file's learning curves have the native runs' shape. Summed on the device, read per epoch."""

    def __init__(self, trainer: Trainer) -> None:
        super().__init__()
        self.trainer = trainer
        self.losses: list[float] = []
        self.total: Tensor | None = None
        self.steps = 0

    def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        self.losses = []

    def before_training_epoch(self, strategy: Any, **kwargs: Any) -> None:
        self.total, self.steps = None, 0

    def after_training_iteration(self, strategy: Any, **kwargs: Any) -> None:
        loss = strategy.loss.detach()
        self.total = loss if self.total is None else self.total + loss
        self.steps += 1

    def after_training_epoch(self, strategy: Any, **kwargs: Any) -> None:
        self.losses.append(float(self.total) / self.steps if self.total is not None else float("nan"))

    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        self.trainer.epoch_losses.append(self.losses)


class Avalanche(Strategy):
    """An Avalanche ``SupervisedTemplate`` (``template``: a ``_target_`` node, e.g.
    ``avalanche.training.EWC`` with ``ewc_lambda``, or ``avalanche.training.Naive`` with ``plugins``).

    The template is built on the first task from clbench's trainer: its optimizer is
    ``trainer.make_optimizer`` (sgd / adam / adamw, lr, momentum, weight decay), ``train_mb_size`` the
    trainer's batch size, ``train_epochs`` its epochs, criterion cross-entropy with the stream's group masking
    where it asks for it (:class:`GroupMaskedCrossEntropy`); keys set in ``template``
    itself win. The optimizer's state (Adam's moments, SGD's momentum) is reset at every task, as clbench's
    trainer does for its own strategies (``reset_optimizer_state``; false: Avalanche 0.6's default, which carries
    it across experiences: with Adam, Avalanche's Naive ended 12 points below fine-tune on ibcl_split_fmnist,
    4 seeds, every seed below). Avalanche's own evaluation is switched off (clbench evaluates). In the task scenario the
    model is wrapped so Avalanche's task labels pick clbench's heads; otherwise Avalanche calls it
    without task labels (the shared head). State for resuming: the model, the template's plugins (where
    methods keep importances, anchors, old models) and its clock.
    """

    name = "avalanche"

    def __init__(
        self, template: DictConfig | dict[str, Any], name: str | None = None, reset_optimizer_state: bool = True
    ) -> None:
        super().__init__()
        self.reset_optimizer_state = bool(reset_optimizer_state)
        self.template_cfg = OmegaConf.create(template) if isinstance(template, dict) else template
        if "_target_" not in self.template_cfg:
            raise ValueError(
                "strategy.template needs a _target_, e.g. strategy.template._target_=avalanche.training.Naive"
            )
        target = str(self.template_cfg._target_).rsplit(".", 1)[-1].lower()
        self.name = name or f"avalanche_{target}"  # type: ignore[misc]  # per instance: results/<stream>/<name>
        self.template: Any = None
        self._restored: dict[str, Any] | None = None

    def setup(self, model: ContinualModel, stream: Stream) -> ContinualModel:
        super().setup(model, stream)
        self.avalanche_model = TaskRoutedModel(model) if stream.scenario == "task" else model
        return model

    def build_template(self, trainer: Trainer) -> Any:
        """Instantiate the configured template around clbench's model with the trainer's settings."""
        assert self.stream is not None
        defaults: dict[str, Any] = {
            "model": self.avalanche_model,
            "optimizer": trainer.make_optimizer(list(self.avalanche_model.parameters())),
            "criterion": GroupMaskedCrossEntropy(self.stream),
            "train_mb_size": trainer.batch_size,
            "train_epochs": trainer.epochs,
            "eval_mb_size": trainer.eval_chunk_size(),
            "device": self.stream.device,
            "evaluator": EvaluationPlugin(loggers=[]),
            "eval_every": -1,
        }
        kwargs = {key: value for key, value in defaults.items() if key not in self.template_cfg}
        with warnings.catch_warnings():
            # an evaluator without loggers is what we want: clbench evaluates and logs
            warnings.filterwarnings("ignore", message="No loggers specified")
            template = instantiate(self.template_cfg, **kwargs)
        template.plugins.append(EpochLoss(trainer))
        if self._restored is not None:
            method_plugins = [
                i for i, p in enumerate(template.plugins) if not isinstance(p, (EvaluationPlugin, EpochLoss))
            ]
            for i, plugin in zip(method_plugins, self._restored["plugins"], strict=False):
                template.plugins[i] = plugin
            template.clock = self._restored["clock"]
            self._restored = None
        return template

    def fit_task(self, task: Task, trainer: Trainer) -> None:
        assert self.stream is not None
        if getattr(trainer, "validates", False):
            raise ValueError(
                "strategy=avalanche trains with Avalanche's loop, which has no clbench lr schedule: set "
                "trainer.lr_patience=0 and trainer.restore_best=false"
            )
        if self.template is None:
            self.template = self.build_template(trainer)
        if isinstance(self.template._criterion, GroupMaskedCrossEntropy):
            self.template._criterion.start_task(task)
        experience = to_avalanche(dataclasses.replace(self.stream, tasks=[task]), splits=("train",)).train_stream[0]
        experience.current_experience = task.id
        # each task starts with a fresh optimizer state, as in clbench's trainer; Avalanche 0.6 carries it over
        # (Adam's moments of the body from one experience into the next) unless told otherwise
        self.template.train(experience, num_workers=0, reset_optimizer_state=self.reset_optimizer_state)
        # the template keeps the experience's dataset; drop it so memory stays one task's worth
        self.template.experience = None
        self.template.adapted_dataset = None
        self.template.dataloader = None

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self.template is not None:
            plugins = [p for p in self.template.plugins if not isinstance(p, (EvaluationPlugin, EpochLoss))]
            state["avalanche"] = {"plugins": copy.deepcopy(plugins), "clock": copy.deepcopy(self.template.clock)}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._restored = state.get("avalanche")
        self.template = None
