"""What one `Scheduler.schedule()` call decides, step by step, before it becomes the
`SchedulerOutput`; and which token ids the runner still lacks for a request."""

from __future__ import annotations

from ..request import Request
from .scheduler_output import CachedRequestData, NewRequestData


class StepPlan:
    """What one schedule() call has decided so far; becomes the SchedulerOutput."""

    __slots__ = ("budget", "num_scheduled_tokens", "sampling_req_ids", "new_reqs",
                 "cached_reqs", "preempted_req_ids")

    def __init__(self, budget: int) -> None:
        self.budget = budget  # tokens still free this step
        self.num_scheduled_tokens: dict[str, int] = {}  # req_id -> tokens, in batch order
        self.sampling_req_ids: list[str] = []  # requests reaching their last token
        self.new_reqs: list[NewRequestData] = []
        self.cached_reqs: list[CachedRequestData] = []
        self.preempted_req_ids: list[str] = []

    def record(self, request: Request, num_new: int) -> None:
        """Schedules `num_new` tokens of `request` (its blocks are already allocated)."""
        self.budget -= num_new
        self.num_scheduled_tokens[request.request_id] = num_new
        request.num_computed_tokens += num_new
        if request.num_computed_tokens == request.num_tokens + request.num_output_placeholders:
            self.sampling_req_ids.append(request.request_id)
            request.num_output_placeholders += 1  # until update_from_output has its token


def unsent_token_ids(request: Request, end: int) -> tuple[int, ...]:
    """Token ids the runner lacks to compute up to position `end`, marked as sent
    (prompt tokens; the runner keeps the tokens it samples itself). A placeholder
    position past the known tokens is not sent: the runner takes it from the device."""
    num_sent = request.num_sent_tokens
    end = min(end, request.num_tokens)
    if end <= num_sent:
        return ()
    request.num_sent_tokens = end
    return tuple(request.all_token_ids[num_sent:end])
