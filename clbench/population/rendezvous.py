"""Where a population member's ``Trainer.fit`` meets the coordinator.

``Trainer.fit`` asks :func:`current_member` whether it runs inside a population member's thread; if so it
hands its arguments over as a :class:`FitRequest` and returns what the coordinator replies: the fit's epoch
losses when the coordinator trained the member together with others, or :data:`TRAIN_ALONE`, after which the
member runs the very same ``fit`` itself (still one thread at a time). A failure of the member's own training
(a diverged loss) comes back as an exception and is raised in the member, where the solo runner records it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from clbench.population.baton import Member
    from clbench.strategy import Strategy
    from clbench.streams import Task
    from clbench.trainer import Trainer

TRAIN_ALONE = object()  # the coordinator's reply: run your own fit
_local = threading.local()


@dataclass
class FitRequest:
    """One member's pending ``trainer.fit(strategy, tasks, epochs, params)`` call."""

    trainer: Trainer
    strategy: Strategy
    tasks: Sequence[Task]
    epochs: int | None
    params: Sequence[torch.nn.Parameter] | None


def current_member() -> Member | None:
    """The population member this thread runs, or None (a solo run, or the coordinator itself)."""
    return getattr(_local, "member", None)


def clock() -> float:
    """``time.perf_counter()`` for a solo run; in a population member, the member's own time: the wall clock
    less the time it waited for the baton, plus its share of the batched fits it took part in (a fit's wall time
    divided by its members). So a member's ``fit_s`` / ``eval_s`` in result.json measure its work, not the
    other members' (the runner times tasks with this clock)."""
    member = current_member()
    now = time.perf_counter()
    return now if member is None else now - member.waited + member.credited


def bind(member: Member) -> None:
    """Mark the calling thread as ``member``'s (called first thing in the member's thread)."""
    _local.member = member


def meet(request: FitRequest) -> Any:
    """Hand ``request`` to the coordinator and wait; raise what it sends back as an error, else return it."""
    member = current_member()
    assert member is not None, "meet() runs in a population member's thread"
    reply = member.wait(request)
    if isinstance(reply, BaseException):
        raise reply
    return reply
