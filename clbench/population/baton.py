"""Members of a population as green threads: each runs its own solo run, one at a time, in one process.

A population member is an ordinary clbench run (:func:`clbench.runner.run` through Hydra's ``run_job``): its
config check, run folder, lock, resume, evaluation, checkpoints, loggers and result file are the solo run's own
code, not a copy. Only its training is shared: where the member's ``Trainer.fit`` is called, the member hands
a :class:`~clbench.population.rendezvous.FitRequest` to the coordinator and waits; the coordinator trains the
waiting members together (:mod:`clbench.population.batched`) or lets each train alone, then resumes them.

Why threads and not processes or a rewritten runner: a strategy's ``fit_task`` may call ``trainer.fit`` several
times and in its own order, from deep inside its own code; a thread is the one thing that can pause a call stack
there and resume it later without changing the strategy or the runner. Only one thread runs at a time (the
baton), so nothing happens concurrently and a member sees the process as a solo run would, provided the state
that is global to the process is its own whenever it runs: torch's, NumPy's and Python's random generators
(a member's model initialisation and any draw in its hooks) and Hydra's current job config. :class:`GlobalState`
is saved when a member gives the baton back and put back before it runs again.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig


@dataclass
class GlobalState:
    """What a run may change that is shared by every thread of the process."""

    torch_rng: torch.Tensor
    cuda_rng: list[torch.Tensor] | None
    numpy_rng: Any
    python_rng: Any
    hydra_cfg: Any

    @classmethod
    def capture(cls) -> GlobalState:
        return cls(
            torch_rng=torch.get_rng_state(),
            cuda_rng=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            numpy_rng=np.random.get_state(),
            python_rng=random.getstate(),
            hydra_cfg=HydraConfig.instance().cfg,
        )

    def restore(self) -> None:
        torch.set_rng_state(self.torch_rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state_all(self.cuda_rng)
        np.random.set_state(self.numpy_rng)
        random.setstate(self.python_rng)
        HydraConfig.instance().cfg = self.hydra_cfg


class Member:
    """One member's thread and the baton between it and the coordinator.

    ``resume()`` (coordinator) runs the member until it next waits (:meth:`wait`, at a fit) or ends; ``wait()``
    (member) gives the baton back and blocks until resumed, then returns what the coordinator left in
    ``reply``. ``request`` is the member's pending fit (None once it has ended); ``returned`` / ``raised`` what
    its target gave back."""

    def __init__(self, index: int, target: Callable[[], Any]) -> None:
        self.index = index
        self.target = target
        self.request: Any = None
        self.reply: Any = None
        self.returned: Any = None
        self.raised: BaseException | None = None
        self.ended = False
        self.waited = 0.0  # seconds spent waiting for the baton (rendezvous.clock leaves them out)
        self.credited = 0.0  # seconds of batched fits counted as this member's share
        self._state: GlobalState | None = None
        self._go = threading.Event()
        self._back = threading.Event()
        self._thread = threading.Thread(target=self._main, name=f"clbench-member-{index}", daemon=True)

    def _main(self) -> None:
        self._go.wait()
        try:
            self.returned = self.target()
        except BaseException as error:
            self.raised = error
        finally:
            self.ended = True
            self.request = None
            self._back.set()

    @property
    def started(self) -> bool:
        return self._thread.ident is not None

    def resume(self) -> None:
        """Run the member until it waits at its next fit or ends (coordinator side)."""
        if self.ended:
            return
        if self._state is not None:
            self._state.restore()
        self._back.clear()
        if not self._thread.is_alive():
            self._thread.start()
        self._go.set()
        try:
            self._back.wait()
        except KeyboardInterrupt:  # Ctrl-C reaches the coordinator while the member runs: let it reach its next
            self._wait_back()  # wait or its end first, so that it can then be unwound cleanly
            raise
        finally:
            self._state = GlobalState.capture()

    def _wait_back(self) -> None:
        while True:
            try:
                if self._back.wait(0.1):
                    return
            except KeyboardInterrupt:
                continue

    def wait(self, request: Any) -> Any:
        """Give the baton back with ``request`` and block until resumed (member side); returns the reply."""
        self.request, self.reply = request, None
        self._go.clear()
        started = time.perf_counter()
        self._back.set()
        self._go.wait()
        self.waited += time.perf_counter() - started
        self.request = None
        return self.reply
