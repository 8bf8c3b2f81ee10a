"""This process's slot in its run store, and the torch threads that go with it.

:func:`holding` wraps whatever computes: a training run (foreground or background), a sweep that
trains its cells itself, a MIL experiment, a benchmark job. The slot and the queue are files
(:mod:`engine.slots`); giving a slot back starts the next queued job (:func:`engine.jobs.
dispatch`).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from engine.jobs import dispatch
from engine.slots import Slots, budget_for, fixed_threads

log = logging.getLogger(__name__)


_HELD: dict[Path, ThreadBudget] = {}
"""The stores this process holds a slot of, with the budget it holds it under."""


class ThreadBudget:
    """The torch threads of this process while it holds a slot. ``pinned``: a fixed count
    (``train.threads``, ``$LOSSATTN_THREADS``) that :meth:`follow` never changes."""

    def __init__(self, slots: Slots, pinned: int | None) -> None:
        self.slots = slots
        self.pinned = pinned
        self.slots_seen = slots.held()
        self.threads = pinned or budget_for(self.slots_seen)
        self.source = "pinned" if pinned else "budget"

    def apply(self) -> None:
        import torch

        torch.set_num_threads(self.threads)

    def follow(self) -> int | None:
        """Look at the slots again and take the new share of the cores; returns the new count
        when it changed (None otherwise, and always when pinned)."""
        if self.pinned:
            return None
        self.slots_seen = self.slots.held()
        threads = budget_for(self.slots_seen)
        if threads == self.threads:
            return None
        self.threads = threads
        self.apply()
        return threads


@contextlib.contextmanager
def holding(root: str | Path, job: str | Path | None = None, threads: int | None = None,
            adopt_only: bool = False) -> Iterator[ThreadBudget | None]:
    """This process computes under the store at ``root`` for the body: it holds a slot (the
    one its spawner took for it, :meth:`engine.jobs.Job.spawn`, or a new one: a foreground
    run counts too), and torch's threads follow the budget, or ``threads`` / ``$LOSSATTN_
    THREADS`` when given. Nested holdings of one store share the slot. On the way out the
    threads are restored, and the outermost holding gives the slot back and starts what the
    queue holds (:func:`engine.jobs.dispatch`). ``adopt_only``: hold the spawner's slot if
    there is one, else hold nothing (yields None)."""
    root = Path(root).resolve()
    held = _HELD.get(root)
    if held is not None:  # e.g. a sweep's cells, trained in the sweep's own process
        import torch

        before = torch.get_num_threads()
        budget = ThreadBudget(held.slots, threads or held.pinned)
        budget.apply()
        try:
            yield budget
        finally:
            torch.set_num_threads(before)
        return
    slots = Slots(root)
    with slots.locked():
        lease = slots.lease_of(os.getpid())
        if lease is None and not adopt_only:
            lease = slots.write_lease(os.getpid(), job)
    if lease is None and adopt_only:
        yield None
        return
    try:  # from here on the slot is given back whatever happens (a SIGTERM during imports)
        import torch

        before = torch.get_num_threads()
        budget = ThreadBudget(slots, threads or fixed_threads())
        budget.apply()
        _HELD[root] = budget
        try:
            yield budget
        finally:
            del _HELD[root]
            torch.set_num_threads(before)
    finally:
        if lease is not None:
            lease.path.unlink(missing_ok=True)
        _start_queued(root)


def _start_queued(root: Path) -> None:
    """A freed slot starts the next queued job."""
    try:
        dispatch(root)
    except (ValueError, OSError) as exc:  # the job that freed it ended well: say, do not fail
        log.warning("could not start the next queued job of %s: %s", root, exc)
