"""What a run cost, beside what it scored: training FLOPs, peak memory, and the bytes a strategy keeps between tasks.

Accuracy alone flatters methods that buy it with compute or memory (a stored model per task, an SVD per layer,
a Fisher per parameter), so ``result.json`` records, under ``cost``:

* ``train_flops``: the FLOPs of one training step (forward, loss, backward; ``torch.utils.flop_counter``
  counts the matmuls and convolutions, the operations that dominate) times the number of training steps the
  run took. The step is measured once, on the last task after the run, with the strategy's own forward and
  loss (penalties and distillation included); per-step gradient surgery (projections) and per-task
  consolidation (an SVD, a Fisher pass) are not in it, so it is a lower bound for those methods.
* ``peak_memory_bytes``: on a GPU, the most memory torch allocated on the device during the run; on a CPU,
  the process's peak resident set during the run (Linux ``VmHWM``, reset at the run's start), which includes
  Python and torch themselves (~0.3-0.7 GB); ``peak_memory_kind`` says which.
* ``kept_bytes``: ``Strategy.kept_bytes()``, what the strategy stores between tasks beyond the model it
  trains (bases, masks, Fisher diagonals, anchors, stored checkpoints or models).
* ``train_steps`` and ``train_samples``: the steps counted, and the samples they saw.
"""

from __future__ import annotations

import contextlib
import math
import resource
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

if TYPE_CHECKING:
    from clbench.strategy import Strategy
    from clbench.streams import Task
    from clbench.trainer import Trainer


def tensor_storages(obj: Any) -> dict[int, int]:
    """Every tensor storage reachable through dicts, lists and tuples of ``obj``: its address -> its bytes
    (a storage shared by several tensors counts once)."""
    found: dict[int, int] = {}
    stack = [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, Tensor):
            storage = item.untyped_storage()
            found[storage.data_ptr()] = storage.nbytes()
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)
    return found


def kept_bytes(strategy_state: Any, model_state: Any) -> int:
    """Bytes of the storages in ``strategy_state`` that the trained model's own state does not hold."""
    model = tensor_storages(model_state)
    return sum(size for address, size in tensor_storages(strategy_state).items() if address not in model)


@dataclass
class StepCounter:
    """Counts training steps and samples by wrapping one ``Trainer`` instance's ``fit`` (only that object, not
    the class): each call adds epochs run x ceil(samples / batch size), whatever a strategy's ``fit_task``
    fits (one task, tasks 0..t for joint, several phases for PackNet)."""

    steps: int = 0
    samples: int = 0

    def attach(self, trainer: Trainer) -> None:
        fit: Callable[..., list[float]] = trainer.fit

        def counted_fit(strategy: Strategy, tasks: Sequence[Task], *args: Any, **kwargs: Any) -> list[float]:
            losses = fit(strategy, tasks, *args, **kwargs)
            num_samples = sum(task.num_train for task in tasks)
            self.steps += len(losses) * math.ceil(num_samples / trainer.batch_size)
            self.samples += len(losses) * num_samples
            return losses

        trainer.fit = counted_fit  # type: ignore[method-assign]


class StepFlopCounter(TorchDispatchMode):
    """The total FLOPs of the operations run under it, by ``torch.utils.flop_counter``'s own per-operation
    formulas (its ``flop_registry``), with its rule for an operation it has no formula for: decompose it and
    count the parts. What ``FlopCounterMode(display=False).get_total_flops()`` gives, without its per-module
    table.

    Why not ``FlopCounterMode`` itself: torch wraps every dispatch mode's ``__torch_dispatch__`` so that
    ``torch.compile`` skips it, and the wrapper imports ``torch._dynamo`` on its first call: about 2.8 s on this
    project's CPU, once per process, for a figure that takes milliseconds to count. Nothing here is compiled,
    so this mode opts out of that wrapping (``_should_skip_dynamo``), and counting costs what it counts."""

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        return False

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        from torch.utils.flop_counter import flop_registry

        kwargs = kwargs or {}
        packet = func._overloadpacket
        if packet not in flop_registry and func is not torch.ops.prim.device.default:
            with self:
                decomposed = func.decompose(*args, **kwargs)
            if decomposed is not NotImplemented:
                return decomposed
        out = func(*args, **kwargs)
        if packet in flop_registry:
            self.total += int(flop_registry[packet](*args, **kwargs, out_val=out))
        return out


def step_flops(strategy: Strategy, trainer: Trainer, task: Task) -> int:
    """FLOPs of one training step on ``task`` (forward, ``strategy.loss``, backward) at the trainer's batch size,
    counted by :class:`StepFlopCounter`. Gradients are cleared afterwards; no parameter, optimizer state or
    random stream is touched, so it may run after the run's last evaluation."""
    from clbench.strategy import Batch

    index = task.train_index[: trainer.batch_size]
    x = trainer.model_inputs("train", index, task.id)
    batch = Batch(x, task.train_targets[: trainer.batch_size], task.id, index)
    counter = StepFlopCounter()
    with counter, torch.enable_grad():
        output = strategy.forward(batch.x, batch.task_ids)
        strategy.loss(output, batch.y, batch, task).backward()
    for module in strategy.eval_modules():
        module.zero_grad(set_to_none=True)
    return counter.total


def reset_peak_memory(device: torch.device) -> None:
    """Start the run's peak-memory reading from now: torch's CUDA peak, or on Linux the process's resident-set
    high-water mark (``VmHWM``, reset by writing 5 to ``/proc/self/clear_refs``), so that the jobs of a sweep
    sharing one process (Hydra's basic launcher) each get their own peak."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    # not Linux, or not allowed: peak_memory then reads the process's peak since its start
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def peak_memory(device: torch.device) -> dict[str, Any]:
    """The run's peak memory: torch's peak allocation on a CUDA device (``cuda_allocated``); else the resident
    set's high-water mark since :func:`reset_peak_memory` (``rss``), or, where that cannot be read, the
    process's lifetime peak (``process_rss``)."""
    if device.type == "cuda":
        return {"peak_memory_bytes": int(torch.cuda.max_memory_allocated(device)), "peak_memory_kind": "cuda_allocated"}
    try:
        status = Path("/proc/self/status").read_text()
        kib = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:"))
        return {"peak_memory_bytes": kib * 1024, "peak_memory_kind": "rss"}
    except (OSError, StopIteration, ValueError, IndexError):
        # ru_maxrss is in KiB on Linux
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return {"peak_memory_bytes": peak, "peak_memory_kind": "process_rss"}


def measure(
    strategy: Strategy,
    trainer: Trainer,
    task: Task,
    counter: StepCounter,
    device: torch.device,
    count_flops: bool = True,
) -> dict[str, Any]:
    """The ``cost`` block of result.json (see the module docstring); a FLOP count that cannot be taken (a
    strategy whose step does not run outside its trainer) is recorded as null with the reason.

    ``count_flops=False`` skips the FLOP count (null, with the reason)."""
    record: dict[str, Any] = {"train_steps": counter.steps, "train_samples": counter.samples}
    if not count_flops:
        record.update(step_flops=None, train_flops=None, flops_error="not counted (count_flops=false)")
    else:
        try:
            per_step = step_flops(strategy, trainer, task)
            record.update(step_flops=per_step, train_flops=per_step * counter.steps)
        except Exception as error:  # a cost figure must never fail a finished run
            record.update(step_flops=None, train_flops=None, flops_error=f"{type(error).__name__}: {error}")
    record["kept_bytes"] = int(strategy.kept_bytes())
    record.update(peak_memory(device))
    return record
