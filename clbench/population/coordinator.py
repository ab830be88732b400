"""The coordinator: runs a population's members in rounds, training their pending fits together.

Each round every member runs (one at a time) until it waits at a fit or ends; the waiting fits are then sorted
into groups that share batched steps (:func:`plan`), each group is trained in one loop
(:func:`~clbench.population.batched.fit_together`), and a fit that shares with no other is handed back to its
member to run alone. Members that have ended (completed, failed, skipped, or found already completed) drop out;
a member whose training diverged gets its error and ends as its solo run would, while the others go on.
Ctrl-C unwinds every member through its runner (its last finished task's checkpoint stays, as in a solo run)
and then ends the population.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from clbench.population import rendezvous
from clbench.population.batched import MemberFit, fit_together, step_kind
from clbench.population.baton import Member


def plan(requests: Sequence[rendezvous.FitRequest]) -> list[list[tuple[int, MemberFit | None]]]:
    """The requests (by position) in groups: a group of two or more shares batched steps (each with its
    :class:`MemberFit`); a request of its own is trained alone (``None``)."""
    groups: dict[Any, list[tuple[int, MemberFit]]] = {}
    alone: list[list[tuple[int, MemberFit | None]]] = []
    for position, request in enumerate(requests):
        kind = step_kind(request)
        fit = None if kind is None else MemberFit.of(request, kind)
        if fit is None:
            alone.append([(position, None)])
            continue
        groups.setdefault(fit.key(), []).append((position, fit))
    batched: list[list[tuple[int, MemberFit | None]]] = []
    for group in groups.values():
        if len(group) == 1:
            alone.append([(group[0][0], None)])
        else:
            batched.append(list(group))
    return batched + alone


def train_round(requests: Sequence[rendezvous.FitRequest]) -> tuple[list[Any], list[float]]:
    """Per request, the reply its member gets (epoch losses, an error, or ``TRAIN_ALONE``) and its share of
    the batched fit's wall time (0 for a fit trained alone, which its member times itself)."""
    replies: list[Any] = [rendezvous.TRAIN_ALONE] * len(requests)
    shares = [0.0] * len(requests)
    for group in plan(requests):
        fits = [fit for _, fit in group if fit is not None]
        if len(fits) < 2:
            continue
        started = time.perf_counter()
        try:
            results = fit_together(fits)
        except Exception as error:  # a batched fit that cannot go on fails each of its members
            results = [error] * len(fits)
        share = (time.perf_counter() - started) / len(fits)
        for (position, _), result in zip(group, results, strict=True):
            replies[position], shares[position] = result, share
    return replies, shares


def run_members(targets: Sequence[Callable[[], Any]]) -> list[Member]:
    """Run each target (a solo run) as a population member; returns the members, ended, with what each
    returned or raised. A Ctrl-C unwinds every member, then is raised again here."""
    members: list[Member] = []
    for index, target in enumerate(targets):
        members.append(Member(index, _bound(target, index, members)))
    try:
        for member in members:
            member.resume()
        while waiting := [m for m in members if not m.ended]:
            replies, shares = train_round([m.request for m in waiting])
            for member, reply, share in zip(waiting, replies, shares, strict=True):
                member.reply = reply
                member.credited += share
                member.resume()
    except KeyboardInterrupt:
        for member in members:
            if not member.started:  # never ran: nothing to unwind
                member.ended, member.raised = True, KeyboardInterrupt()
            elif not member.ended:
                member.reply = KeyboardInterrupt()
                _unwind(member)
        raise
    return members


def _unwind(member: Member) -> None:
    """Resume a waiting member with the interrupt, so its runner records it; ignore further Ctrl-C meanwhile."""
    while not member.ended:
        try:
            member.resume()
        except KeyboardInterrupt:
            continue


def _bound(target: Callable[[], Any], index: int, members: list[Member]) -> Callable[[], Any]:
    def run() -> Any:
        rendezvous.bind(members[index])
        return target()

    return run
