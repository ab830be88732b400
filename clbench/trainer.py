"""The training loop over in-memory, device-resident batches, and evaluation into a row of R."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor
from tqdm.auto import tqdm

from clbench.strategy import Batch, Strategy
from clbench.streams import Stream, Task

OPTIMIZERS = ("sgd", "adam", "adamw")


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite."""


@dataclass
class Trainer:
    """Optimisation settings (``conf/trainer/``) plus the loop that applies a strategy's hooks.

    No DataLoader: each epoch draws a permutation on the device and gathers batches from the stream's
    device-resident pool. The loss is accumulated on the device and read once per epoch, so the step
    loop never waits for the host.
    """

    epochs: int = 1
    batch_size: int = 64
    lr: float = 0.01
    optimizer: str = "sgd"
    momentum: float = 0.0
    weight_decay: float = 0.0
    eval_batch_size: int = 1000
    progress: bool = True
    stream: Stream | None = None
    generator: torch.Generator | None = None
    epoch_losses: list[list[float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown trainer.optimizer {self.optimizer!r}: use one of {', '.join(OPTIMIZERS)}")
        for key in ("epochs", "batch_size", "eval_batch_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"trainer.{key} must be >= 1, got {getattr(self, key)}")
        if not self.lr > 0:
            raise ValueError(f"trainer.lr must be positive, got {self.lr}")

    def attach(self, stream: Stream, seed: int) -> None:
        """Bind the device-resident stream and a generator for batch order on its device."""
        self.stream = stream
        self.generator = torch.Generator(device=stream.device).manual_seed(seed)

    def make_optimizer(self, params: Sequence[torch.nn.Parameter], lr: float | None = None) -> torch.optim.Optimizer:
        lr = self.lr if lr is None else lr
        if self.optimizer == "sgd":
            return torch.optim.SGD(params, lr=lr, momentum=self.momentum, weight_decay=self.weight_decay)
        if self.optimizer == "adam":
            return torch.optim.Adam(params, lr=lr, weight_decay=self.weight_decay)
        return torch.optim.AdamW(params, lr=lr, weight_decay=self.weight_decay)

    def fit(
        self,
        strategy: Strategy,
        tasks: Sequence[Task],
        epochs: int | None = None,
        params: Sequence[torch.nn.Parameter] | None = None,
    ) -> list[float]:
        """Train ``strategy`` on the union of ``tasks`` (one task: the usual case; several: joint).

        The hooks run for ``tasks[-1]``. Returns the mean training loss of each epoch.
        """
        assert self.stream is not None, "Trainer.attach(stream, seed) must run before fit"
        stream, current = self.stream, tasks[-1]
        if len(tasks) == 1:
            index, targets = current.train_index, current.train_targets
            task_ids: int | Tensor = current.id
        else:
            index = torch.cat([t.train_index for t in tasks])
            targets = torch.cat([t.train_targets for t in tasks])
            sizes = torch.tensor([t.num_train for t in tasks], device=index.device)
            task_ids = torch.arange(len(tasks), device=index.device).repeat_interleave(sizes)
            task_ids = torch.tensor([t.id for t in tasks], device=index.device)[task_ids]
        epochs = self.epochs if epochs is None else epochs
        num_samples = int(index.numel())
        steps = math.ceil(num_samples / self.batch_size)
        optimizer = self.make_optimizer(strategy.parameters(current) if params is None else params)
        for module in strategy.eval_modules():
            module.train()
        losses: list[float] = []
        bar = tqdm(
            total=epochs * steps,
            desc=f"task {current.id + 1}/{len(stream)}",
            disable=not self.progress,
            leave=False,
            unit="step",
            mininterval=0.5,
        )
        for epoch in range(epochs):
            order = torch.randperm(num_samples, device=index.device, generator=self.generator)
            running = torch.zeros((), device=index.device)
            for step in range(steps):
                chosen = order[step * self.batch_size : (step + 1) * self.batch_size]
                batch_ids = task_ids if isinstance(task_ids, int) else task_ids[chosen]
                batch = Batch(
                    stream.inputs("train", index[chosen], batch_ids), targets[chosen], batch_ids, index[chosen]
                )
                output = strategy.forward(batch.x, batch.task_ids)
                loss = strategy.loss(output, batch.y, batch, current)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                strategy.after_backward(current)
                optimizer.step()
                strategy.after_step(current)
                running += loss.detach()
                bar.update(1)
            mean_loss = float(running) / steps
            if not math.isfinite(mean_loss):
                bar.close()
                raise NonFiniteLossError(
                    f"training loss became {mean_loss} in task {current.id} epoch {epoch}: lower trainer.lr "
                    "or check the strategy's regularisation strength"
                )
            losses.append(mean_loss)
            bar.set_postfix(loss=f"{mean_loss:.4f}")
        bar.close()
        self.epoch_losses.append(losses)
        return losses

    @torch.inference_mode()
    def accuracy(self, strategy: Strategy, task: Task, split: str = "test", give_task_id: bool = True) -> Tensor:
        """Accuracy (percent, a 0-d tensor on the device) of ``strategy`` on one task's ``split``."""
        assert self.stream is not None
        index = task.test_index if split == "test" else task.val_index
        targets = task.test_targets if split == "test" else task.val_targets
        correct = torch.zeros((), device=index.device, dtype=torch.int64)
        for start in range(0, int(index.numel()), self.eval_batch_size):
            chosen = slice(start, start + self.eval_batch_size)
            pool_split = "test" if split == "test" else "train"
            x = self.stream.inputs(pool_split, index[chosen], task.id)
            logits = strategy.predict(x, task.id if give_task_id else None)
            correct += (logits.argmax(dim=1) == targets[chosen]).sum()
        return correct.double() * (100.0 / max(1, int(index.numel())))

    def evaluate(self, strategy: Strategy, give_task_id: bool) -> list[float]:
        """One row of R: accuracy in percent on every task's test set, seen and unseen."""
        assert self.stream is not None
        for module in strategy.eval_modules():
            module.eval()
        row = torch.stack([self.accuracy(strategy, task, "test", give_task_id) for task in self.stream])
        return row.cpu().tolist()
