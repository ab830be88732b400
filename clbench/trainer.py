"""The training loop over in-memory, device-resident batches, and its dispatch to closed-form and CUDA-graph steps.

Its parts have modules of their own: batches (:mod:`clbench.batches`), optimizers (:mod:`clbench.optim`),
the lr schedule (:mod:`clbench.schedule`), NaN checks (:mod:`clbench.divergence`), group masking
(:mod:`clbench.masking`), the fast steps (:mod:`clbench.closed_form`, :mod:`clbench.graphs`) and evaluation
(:mod:`clbench.evaluator`: rows of R, the validation loss; ``Trainer`` keeps thin entry points to it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from clbench import batches
from clbench.batches import TrainingSet
from clbench.closed_form import ClosedFormStep, KeptLogits, use_closed_form
from clbench.divergence import FiniteLossCheck, NonFiniteLossError, check_finite
from clbench.evaluator import AMP_DTYPES, Evaluator
from clbench.graphs import GraphedStep, use_graphs
from clbench.loggers.progress import task_progress
from clbench.masking import absent_classes, batch_absent, mask_absent
from clbench.optim import OPTIMIZERS, SGD, FitOptimizer, torch_optimizer
from clbench.population import rendezvous
from clbench.schedule import PlateauSchedule
from clbench.strategy import Batch, Strategy
from clbench.streams import Stream, Task

__all__ = ["COMPILE_MODES", "OPTIMIZERS", "NonFiniteLossError", "Trainer"]

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass
class Trainer:
    """Optimisation settings (``conf/trainer/``) plus the loop that applies a strategy's hooks.

    No DataLoader: each epoch draws a permutation on the device and gathers batches from the stream's
    device-resident pool, their inputs ``prefetch_mb`` of batches at a time (:mod:`clbench.batches`). The
    loss is accumulated on the device and read a few times per epoch (:mod:`clbench.divergence`), so the
    step loop never waits for the host. Where the strategy declares it safe, a step is recorded once as a
    CUDA graph and replayed on a GPU (``cuda_graphs``, :mod:`clbench.graphs`), or takes an MLP's gradients
    written out without autograd on a CPU (``closed_form``, :mod:`clbench.closed_form`); else autograd.

    Optional paper-protocol schedule (GPM / TRGP official code; off by default): with ``lr_patience`` > 0
    or ``restore_best`` the validation loss is read at the end of every epoch and handed to a
    :class:`~clbench.schedule.PlateauSchedule`. Both need a validation split (``stream.val_fraction`` > 0).

    Speed switches, off by default, each safe with masks and projections (they change neither the
    parameters' layout nor which tensors the hooks see): ``amp="bf16"`` (training forward passes under bf16
    autocast; parameters, gradients and optimizer state stay fp32), ``channels_last`` (4-d inputs in NHWC
    memory format; weights keep theirs, so projections that view gradients as matrices still work) and
    ``compile`` (``torch.compile`` in that mode on every model the strategy trains; ``reduce-overhead``
    records CUDA graphs of the model). The ``eval_*`` and ``batched_eval`` settings are read by the
    trainer's :class:`~clbench.evaluator.Evaluator` (``evaluator``), which fills rows of R.
    """

    epochs: int = 1
    batch_size: int = 64
    lr: float = 0.01
    optimizer: str = "sgd"
    momentum: float = 0.0
    weight_decay: float = 0.0
    eval_batch_size: int = 1000
    progress: bool = True
    lr_patience: int = 0
    lr_factor: float = 2.0
    lr_min: float = 0.0
    restore_best: bool = False
    stream: Stream | None = None
    generator: torch.Generator | None = None
    nan_checks_per_epoch: int = 10
    amp: str | None = None
    eval_amp: str | None = None
    channels_last: bool = False
    compile: str | None = None
    batched_eval: bool = True
    prefetch_mb: float = 16.0
    cuda_graphs: bool | str = "auto"
    graph_warmup_steps: int = 3
    eval_cache_mb: float = 64.0
    eval_chunk_mb: float = 16.0
    closed_form: bool | str = "auto"
    block_threads: int | str | None = None
    epoch_losses: list[list[float]] = field(default_factory=list)
    epoch_accuracies: list[list[float]] = field(default_factory=list)
    val_losses: list[list[float]] = field(default_factory=list)
    graph_replays: list[int] = field(default_factory=list)
    closed_form_steps: list[int] = field(default_factory=list)
    evaluator: Evaluator = field(init=False, repr=False, compare=False)
    _recording: bool = field(default=False, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown trainer.optimizer {self.optimizer!r}: use one of {', '.join(OPTIMIZERS)}")
        for key in ("epochs", "batch_size", "eval_batch_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"trainer.{key} must be >= 1, got {getattr(self, key)}")
        if not self.lr > 0:
            raise ValueError(f"trainer.lr must be positive, got {self.lr}")
        if self.lr_patience < 0:
            raise ValueError(f"trainer.lr_patience must be >= 0 (0 turns the lr schedule off), got {self.lr_patience}")
        if not self.lr_factor > 1:
            raise ValueError(f"trainer.lr_factor must be > 1 (the lr is divided by it), got {self.lr_factor}")
        if self.lr_min < 0:
            raise ValueError(f"trainer.lr_min must be >= 0, got {self.lr_min}")
        if self.amp is not None and self.amp not in AMP_DTYPES:
            raise ValueError(f"unknown trainer.amp {self.amp!r}: use null or one of {', '.join(AMP_DTYPES)}")
        if self.prefetch_mb < 0:
            raise ValueError(f"trainer.prefetch_mb must be >= 0 (0: inputs batch by batch), got {self.prefetch_mb}")
        for key in ("cuda_graphs", "closed_form"):
            if getattr(self, key) not in (True, False, "auto"):
                raise ValueError(f"unknown trainer.{key} {getattr(self, key)!r}: use auto, true or false")
        if (
            self.block_threads is not None
            and self.block_threads != "auto"
            and (not isinstance(self.block_threads, int) or self.block_threads < 1)
        ):
            raise ValueError(
                f"trainer.block_threads must be null, auto or a thread count >= 1, got {self.block_threads!r}"
            )
        if self.graph_warmup_steps < 1:
            raise ValueError(f"trainer.graph_warmup_steps must be >= 1, got {self.graph_warmup_steps}")
        if self.compile is not None and self.compile not in COMPILE_MODES:
            raise ValueError(f"unknown trainer.compile {self.compile!r}: use null or one of {', '.join(COMPILE_MODES)}")
        self.evaluator = Evaluator(self)  # checks the evaluation settings

    @property
    def validates(self) -> bool:
        """Whether ``fit`` reads a validation loss every epoch (lr schedule or restore-best on)."""
        return self.lr_patience > 0 or self.restore_best

    def attach(self, stream: Stream, seed: int) -> None:
        """Bind the device-resident stream and a generator for batch order on its device."""
        self.stream = stream
        self.generator = torch.Generator(device=stream.device).manual_seed(seed)
        self.evaluator.reset()

    def prepare(self, strategy: Strategy) -> None:
        """Apply ``compile`` to every model the strategy trains and evaluates (once, after ``setup``).

        ``nn.Module.compile`` compiles in place, so parameter names, state dicts, hooks and the strategy's
        references to the model are all unchanged."""
        if self.compile is None:
            return
        for module in strategy.eval_modules():
            module.compile(mode=self.compile)

    def autocast(self, evaluation: bool = False) -> contextlib.AbstractContextManager:
        """Autocast on the stream's device when ``amp`` (training) or ``eval_amp`` (evaluation) asks, else nothing."""
        amp = self.eval_amp if evaluation else self.amp
        if amp is None:
            return contextlib.nullcontext()
        assert self.stream is not None
        # a recorded step must not keep autocast's cast-weight cache (it would outlive the capture)
        return torch.autocast(self.stream.device.type, dtype=AMP_DTYPES[amp], cache_enabled=not self._recording)

    def block_threading(self) -> contextlib.AbstractContextManager:
        """CPU threads while a block of training inputs is prepared (:func:`clbench.batches.block_threading`)."""
        return batches.block_threading(self.block_threads, None if self.stream is None else self.stream.device)

    def model_inputs(self, split: str, index: Tensor, task_ids: int | Tensor) -> Tensor:
        """``stream.inputs`` in the memory format the trainer was asked for."""
        assert self.stream is not None
        return self.memory_format(self.stream.inputs(split, index, task_ids))

    def memory_format(self, x: Tensor) -> Tensor:
        """``x`` in NHWC memory format where ``channels_last`` asks and it is a batch of images, else as is."""
        if self.channels_last and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def make_optimizer(
        self, params: Sequence[torch.nn.Parameter], lr: float | None = None, capturable: bool = False
    ) -> torch.optim.Optimizer:
        """A ``torch.optim`` optimizer with this trainer's settings (for strategies, bridges and Adam)."""
        lr = self.lr if lr is None else lr
        return torch_optimizer(self.optimizer, params, lr, self.momentum, self.weight_decay, capturable)

    def block_inputs(self, strategy: Strategy, task: Task, closed_form: bool) -> batches.BlockInputs:
        """How a fit makes a block of training inputs (and, for closed-form steps, the strategy's
        ``prepare_block`` extra); a population's batched fit makes each member's the same way."""

        def make(index: Tensor, ids: int | Tensor) -> tuple[Tensor, Tensor | None]:
            with self.block_threading():
                x = self.model_inputs("train", index, ids)
                return x, strategy.prepare_block(x, task) if closed_form else None

        return make

    def prefetch_steps(self) -> int:
        """How many steps' inputs one block prepares (``prefetch_mb``; see :func:`clbench.batches.prefetch_steps`)."""
        assert self.stream is not None
        return batches.prefetch_steps(self.prefetch_mb, self.stream.input_shape, self.batch_size)

    def _fit_optimizer(self, params: Sequence[torch.nn.Parameter]) -> FitOptimizer:
        """The step loop's optimizer: clbench's lean SGD (same update as ``torch.optim.SGD``) for
        ``optimizer=sgd``, else the torch one (its capturable variant when steps are recorded as CUDA
        graphs: its step count then stays on the device)."""
        if self.optimizer == "sgd":
            return SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
        return self.make_optimizer(params, capturable=self._recording)

    def fit(
        self,
        strategy: Strategy,
        tasks: Sequence[Task],
        epochs: int | None = None,
        params: Sequence[torch.nn.Parameter] | None = None,
    ) -> list[float]:
        """Train ``strategy`` on the union of ``tasks`` (one task: the usual case; several: joint).

        The hooks run for ``tasks[-1]``. Returns the mean training loss of each epoch. Inside a population
        member (``hydra/launcher=population``) the fit is handed to the population's coordinator, which trains
        it together with the other members' fits or hands it back to be run here (:mod:`clbench.population`).
        """
        if rendezvous.current_member() is not None:
            reply = rendezvous.meet(rendezvous.FitRequest(self, strategy, tasks, epochs, params))
            if reply is not rendezvous.TRAIN_ALONE:
                return reply  # trained with other members; else the member trains here, alone
        assert self.stream is not None, "Trainer.attach(stream, seed) must run before fit"
        stream, current, data = self.stream, tasks[-1], TrainingSet.of(tasks)
        epochs = self.epochs if epochs is None else epochs
        num_samples, device = data.num_samples, data.index.device
        checks = FiniteLossCheck(data.steps(self.batch_size), self.nan_checks_per_epoch)
        if self.validates and any(t.val_index.numel() == 0 for t in tasks):
            raise ValueError(
                "trainer.lr_patience / trainer.restore_best need a validation split: set stream.val_fraction > 0"
            )
        trained = list(strategy.parameters(current) if params is None else params)
        self._recording = use_graphs(self.cuda_graphs, strategy, stream.device, self.compile is not None)
        closed = self._closed_form_for(strategy, data.task_ids)
        optimizer = self._fit_optimizer(trained)
        schedule = PlateauSchedule(self.lr, self.lr_patience, self.lr_factor, self.lr_min, self.restore_best)
        absent = self._absent_classes(tasks)
        for module in strategy.eval_modules():
            module.train()
        losses: list[float] = []
        accuracies: list[float] = []
        bar = task_progress(epochs * checks.steps, current.id, len(stream), self.progress)
        block_steps = self.prefetch_steps()

        def step_fn(batch: Batch) -> tuple[Tensor, Tensor]:
            return self._train_step(strategy, batch, current, absent, optimizer)

        block_inputs = self.block_inputs(strategy, current, closed is not None)

        graphed = None
        if self._recording:
            graphed = GraphedStep(step_fn, lambda: optimizer.zero_grad(set_to_none=True), self.graph_warmup_steps)
        # closed-form steps run without autograd (their hooks too) and keep their logits; each step's loss
        # and prediction are read back from those once per block (or NaN check): KeptLogits
        grad_mode = torch.no_grad() if closed is not None else contextlib.nullcontext()
        for epoch in range(epochs):
            shuffled = data.shuffled(self.generator)
            step_losses = torch.zeros(checks.steps, device=device)
            predictions = torch.empty(num_samples, device=device, dtype=torch.int64)
            kept = None if closed is None else KeptLogits(self.batch_size, shuffled.targets, step_losses, predictions)
            with grad_mode:
                for step, chosen, batch, block_rows in shuffled.batches(self.batch_size, block_steps, block_inputs):
                    if kept is not None:
                        if block_rows:
                            kept.start_block(step, block_rows, closed.head[1])
                        masked = batch_absent(stream, absent, batch.y)
                        closed.train_step(batch, current, masked, optimizer, kept.rows(chosen))
                    else:
                        loss, predicted = (
                            step_fn(batch) if graphed is None else graphed(batch, key=optimizer.param_groups[0]["lr"])
                        )
                        step_losses[step] = loss
                        predictions[chosen] = predicted
                    bar.update(1)
                    if checks.due(step):
                        if kept is not None:
                            kept.settle(step + 1)
                        check_finite(step_losses[: step + 1], current, epoch, bar)
            hits = (predictions == shuffled.targets).sum()
            mean_loss = float(step_losses.mean())
            losses.append(mean_loss)
            accuracies.append(float(hits) * 100.0 / num_samples)
            bar.set_postfix(loss=f"{mean_loss:.4f}")
            if not self.validates:
                continue
            val_loss = float(self.validation_loss(strategy, tasks))
            for module in strategy.eval_modules():
                module.train()
            if not schedule.update(val_loss, trained, optimizer):
                break
        bar.close()
        if graphed is not None:
            graphed.release()
            self.graph_replays.append(graphed.replays)
        self.closed_form_steps.append(0 if closed is None else checks.steps * len(losses))  # epochs run
        self._recording = False
        schedule.restore(trained)
        self.epoch_losses.append(losses)
        self.epoch_accuracies.append(accuracies)
        self.val_losses.append(schedule.losses)
        return losses

    def _train_step(
        self, strategy: Strategy, batch: Batch, task: Task, absent: Tensor | None, optimizer: FitOptimizer
    ) -> tuple[Tensor, Tensor]:
        """One optimizer step on ``batch``; returns the detached loss and the predicted classes. Free of
        host reads, so that ``trainer.cuda_graphs`` can record it whole."""
        absent = batch_absent(self.stream, absent, batch.y)
        with self.autocast():
            output = mask_absent(strategy.forward(batch.x, batch.task_ids), absent)
            loss = strategy.loss(output, batch.y, batch, task)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        strategy.after_backward(task)
        optimizer.step()
        strategy.after_step(task)
        return loss.detach(), output.detach().argmax(dim=1)

    def _closed_form_for(self, strategy: Strategy, task_ids: int | Tensor) -> ClosedFormStep | None:
        """This fit's closed-form step, or None for autograd steps (also where the fit's batches mix tasks
        with per-task heads). Recorded CUDA-graph steps take its place on a GPU (``auto`` steps aside;
        ``true`` is an error)."""
        assert self.stream is not None
        model = strategy.model
        if model is None or not use_closed_form(
            self.closed_form, model, strategy, self.stream.device, self.amp, self.compile is not None
        ):
            return None
        if self._recording:
            if self.closed_form is True:
                raise ValueError(
                    "trainer.closed_form=true and CUDA-graph steps cannot be combined: set trainer.cuda_graphs=false"
                )
            return None
        return ClosedFormStep.for_fit(model, strategy, task_ids)

    def _absent_classes(self, tasks: Sequence[Task]) -> Tensor | None:
        """The fit's group mask (:func:`clbench.masking.absent_classes`)."""
        assert self.stream is not None
        return absent_classes(self.stream, tasks)

    def evaluate(self, strategy: Strategy, give_task_id: bool) -> list[float]:
        """One row of R (``Evaluator.row``)."""
        return self.evaluator.row(strategy, give_task_id)

    def accuracy(self, strategy: Strategy, task: Task, split: str = "test", give_task_id: bool = True) -> Tensor:
        """Accuracy on one task's ``split`` (``Evaluator.accuracy``)."""
        return self.evaluator.accuracy(strategy, task, split, give_task_id)

    def class_accuracy(self, strategy: Strategy, task: Task, num_classes: int, give_task_id: bool) -> list[float]:
        """Per-class test accuracy (``Evaluator.class_accuracy``)."""
        return self.evaluator.class_accuracy(strategy, task, num_classes, give_task_id)

    def eval_chunk_size(self) -> int:
        """Samples per evaluation pass (``Evaluator.chunk_size``)."""
        return self.evaluator.chunk_size()

    def validation_loss(self, strategy: Strategy, tasks: Sequence[Task]) -> Tensor:
        """The lr schedule's validation loss (``Evaluator.validation_loss``)."""
        return self.evaluator.validation_loss(strategy, tasks)
