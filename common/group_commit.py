"""Group commit: work that many threads of one process submit at the same moment, done in one go.

A thread that submits while nothing is running runs its item at once, alone: nothing ever waits
for company, so an idle process answers as fast as before. Threads that submit while a run is in
flight wait; when it ends, the first of them runs everything that waited (at most `max_items`)
as one group, and the others take their results from it. Under load a group is what arrived
during the previous run, so the number of runs follows the round trip, not the request rate.

Used for the accepting INSERT of single payments (common.ledger.accepting): one statement and
one commit (one WAL flush) for every payment that arrived while the previous one was in flight.
"""
from __future__ import annotations

import copy
import threading
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class _Slot(Generic[T, R]):
    __slots__ = ("item", "woken", "done", "result", "error")

    def __init__(self, item: T):
        self.item = item
        self.woken = threading.Event()
        self.done = False  # woken and not done: this slot's thread runs the next group
        self.result: R | None = None
        self.error: BaseException | None = None


class GroupCommit(Generic[T, R]):
    """`submit(item)` returns `run(items)[i]` for its item, from a run shared with the items that
    other threads submitted alongside it; an exception raised by `run` is raised in every thread
    of that group. `run` must return one result per item, in order."""

    def __init__(self, run: Callable[[Sequence[T]], Sequence[R]], max_items: int,
                 on_group: Callable[[int], None] | None = None):
        if max_items < 1:
            raise ValueError("max_items must be at least 1")
        self._run = run
        self._max_items = max_items
        self._on_group = on_group  # told each group's size (a metric)
        self._lock = threading.Lock()
        self._waiting: list[_Slot[T, R]] = []
        self._running = False

    @property
    def waiting(self) -> int:
        """Items waiting for the run in flight to end (for tests and diagnosis)."""
        with self._lock:
            return len(self._waiting)

    def submit(self, item: T) -> R:
        slot: _Slot[T, R] = _Slot(item)
        with self._lock:
            leads = not self._running
            if leads:
                self._running = True
            else:
                self._waiting.append(slot)
        if not leads:
            slot.woken.wait()
        if not slot.done:
            self._lead(slot)
        if slot.error is not None:
            raise slot.error
        return slot.result  # type: ignore[return-value]

    def _lead(self, first: _Slot[T, R]) -> None:
        with self._lock:
            group = [first, *self._waiting[:self._max_items - 1]]
            del self._waiting[:self._max_items - 1]
        try:
            self._run_group(group)
        finally:
            # Whatever happened, every slot of the group is done and the next waiter (if any)
            # is handed the lead: no thread is left waiting for a run nobody will start.
            with self._lock:
                successor = self._waiting.pop(0) if self._waiting else None
                if successor is None:
                    self._running = False
            for slot in group:
                slot.done = True
                slot.woken.set()
            if successor is not None:
                successor.woken.set()

    def _run_group(self, group: list[_Slot[T, R]]) -> None:
        if self._on_group is not None:
            self._on_group(len(group))
        try:
            results = self._run([slot.item for slot in group])
            if len(results) != len(group):
                raise AssertionError(f"a group of {len(group)} got {len(results)} results")
        except BaseException as exc:
            group[0].error = exc
            for slot in group[1:]:
                slot.error = _copy(exc)  # each thread raises (and adds its traceback to) its own
            return
        for slot, result in zip(group, results):
            slot.result = result


def _copy(exc: BaseException) -> BaseException:
    try:
        return copy.copy(exc)
    except Exception:  # an exception that cannot be rebuilt from its arguments: share it
        return exc
