"""The waiting queue, in one of two orders chosen by `SchedulerConfig.policy`.

"fcfs": arrival order, and a preempted request goes back to the head so it resumes first.
"priority": lowest `priority` value first, then earliest arrival; a preempted request
simply re-enters at its rank. Both give O(1) (fcfs) or O(log n) (priority) add/peek/pop;
`remove` (aborts of waiting requests) is O(n), which is fine for a rare event.
"""

from __future__ import annotations

import collections
import heapq
import itertools
from collections.abc import Iterator

from ..request import Request


class FCFSQueue:
    """A deque of requests in arrival order."""

    def __init__(self) -> None:
        self._requests: collections.deque[Request] = collections.deque()

    def add(self, request: Request) -> None:
        self._requests.append(request)

    def add_preempted(self, request: Request) -> None:
        self._requests.appendleft(request)

    def peek(self) -> Request:
        return self._requests[0]

    def pop(self) -> Request:
        return self._requests.popleft()

    def remove(self, request: Request) -> None:
        self._requests.remove(request)

    def __iter__(self) -> Iterator[Request]:
        return iter(self._requests)

    def __len__(self) -> int:
        return len(self._requests)


class PriorityQueue:
    """A heap keyed by (priority, arrival_time, insertion order)."""

    def __init__(self) -> None:
        self._heap: list[tuple[int, float, int, Request]] = []
        self._counter = itertools.count()  # breaks ties: equal keys pop in insertion order

    def add(self, request: Request) -> None:
        entry = (request.priority, request.arrival_time, next(self._counter), request)
        heapq.heappush(self._heap, entry)

    def add_preempted(self, request: Request) -> None:
        self.add(request)

    def peek(self) -> Request:
        return self._heap[0][3]

    def pop(self) -> Request:
        return heapq.heappop(self._heap)[3]

    def remove(self, request: Request) -> None:
        self._heap = [entry for entry in self._heap if entry[3] is not request]
        heapq.heapify(self._heap)

    def __iter__(self) -> Iterator[Request]:
        return (entry[3] for entry in sorted(self._heap, key=lambda entry: entry[:3]))

    def __len__(self) -> int:
        return len(self._heap)


def create_request_queue(policy: str) -> FCFSQueue | PriorityQueue:
    if policy == "fcfs":
        return FCFSQueue()
    if policy == "priority":
        return PriorityQueue()
    raise ValueError(f"policy must be 'fcfs' or 'priority', got {policy!r}")
