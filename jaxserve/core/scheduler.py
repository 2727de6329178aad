"""The continuous-batching scheduler: which tokens of which requests run each step.

One rule: every request's `num_computed_tokens` catches up with its `num_tokens` (prefill,
chunks, prefix hits and decode alike). `schedule()` serves running requests, then admits
waiting ones, under the token and sequence budgets; a short pool preempts (recompute) the
newest running request. `update_from_output()` appends sampled tokens, applies the stop
rules and frees finished requests' blocks at once.

Async scheduling: `schedule(ahead=True)` plans the next step while the current one still
computes. A request whose token is being sampled holds a placeholder
(`num_output_placeholders`) that counts as a known token: it is scheduled to decode it (as
a sample link, runner/sample_links.py, to the running step's output). Requests whose pending
token must end them (max_tokens, max_model_len) are left out, and the ahead step never
preempts: a request that does not fit waits for the next step. One the pending token stops
(EOS, stop ids, stop strings) wastes its slot in the ahead step; that output is dropped.
"""

from __future__ import annotations

from collections.abc import Iterable

from ..config import CacheConfig, SchedulerConfig
from .block_hash import append_block_hashes, extra_keys_of
from .kv_cache_manager import KVCacheBlocks, KVCacheManager
from .request_queue import create_request_queue
from .scheduler_output import (CachedRequestData, ModelRunnerOutput, NewRequestData,
                               RequestUpdate, SchedulerOutput)
from .step_plan import StepPlan, unsent_token_ids
from .stop_rules import check_stop
from ..request import Request, RequestStatus

_RUNNING = RequestStatus.RUNNING


class WaitingQueueFullError(RuntimeError):
    """`add_request` with `max_num_waiting` requests already waiting (the server's 503)."""


class Scheduler:
    """Owns the live requests, the waiting queue, the running set and the KV cache manager."""

    def __init__(self, scheduler_config: SchedulerConfig, cache_config: CacheConfig,
                 num_blocks: int) -> None:
        block_size = cache_config.block_size
        max_blocks_per_request = -(-scheduler_config.max_model_len // block_size)
        if num_blocks < 1 + max_blocks_per_request:
            raise ValueError(
                f"Scheduler.num_blocks must be >= {1 + max_blocks_per_request} (the null block "
                f"and one max_model_len={scheduler_config.max_model_len} request in "
                f"{block_size}-token blocks), got {num_blocks}")
        self.scheduler_config = scheduler_config
        self.cache_config = cache_config
        self.kv_cache_manager = KVCacheManager(num_blocks, block_size,
                                               cache_config.enable_prefix_caching)
        self.requests: dict[str, Request] = {}  # every live request by id
        self.waiting = create_request_queue(scheduler_config.policy)  # hold no blocks
        self.running: dict[str, Request] = {}  # hold blocks; in admission order
        self.num_preemptions = 0  # total since start
        self._finished_req_ids: set[str] = set()  # since the last schedule(), for the runner
        threshold = scheduler_config.long_prefill_token_threshold
        # Chunk size cap: the long-prefill threshold, or the whole budget when it is off.
        self._max_tokens_per_request = threshold or scheduler_config.max_num_batched_tokens
        self._ahead_fell_short = False  # an ahead step met a short pool: plan the next in sync

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def get_num_unfinished_requests(self) -> int:
        return len(self.requests)

    def reset_prefix_cache(self) -> bool:
        return self.kv_cache_manager.reset_prefix_cache()

    def add_request(self, request: Request) -> None:
        """Queues a new request (LLMEngine has checked its prompt against max_model_len).
        ValueError if its id is live; WaitingQueueFullError if max_num_waiting are already
        waiting."""
        config = self.scheduler_config
        if request.request_id in self.requests:
            raise ValueError(f"request_id {request.request_id!r} is already live")
        if config.max_num_waiting is not None and len(self.waiting) >= config.max_num_waiting:
            raise WaitingQueueFullError(f"{len(self.waiting)} requests are already waiting "
                                        f"(max_num_waiting={config.max_num_waiting})")
        self._update_block_hashes(request)
        self.requests[request.request_id] = request
        self.waiting.add(request)

    def can_schedule_ahead(self) -> bool:
        """Whether `schedule(ahead=True)` may run now: something is running and the last
        ahead plan did not fall short of blocks. (Requests that sample from the tokens
        before, penalties or a grammar, are planned ahead too: the engine defers their
        step's sampler until those tokens are known.)"""
        return bool(self.running) and not self._ahead_fell_short

    def schedule(self, *, ahead: bool = False,
                 capacity: tuple[int, int] | None = None) -> SchedulerOutput:
        """The next step. `ahead`: the previous step's output is not applied yet (see the
        module doc); only call it when `can_schedule_ahead()`. `capacity`: (tokens,
        sequences) the step may not exceed, below the budgets (the runner's compiled
        buckets, while the rest compile); prompts are chunked and admissions wait to fit."""
        config = self.scheduler_config
        max_tokens, max_seqs = capacity or (config.max_num_batched_tokens, config.max_num_seqs)
        budget = min(config.max_num_batched_tokens, max_tokens)
        plan = StepPlan(budget)
        self._ahead_fell_short = False
        self._schedule_running(plan, ahead)
        if not plan.preempted_req_ids and not self._ahead_fell_short:  # nor one short of blocks
            self._admit_waiting(plan, min(config.max_num_seqs, max_seqs))
        finished_req_ids, self._finished_req_ids = self._finished_req_ids, set()
        return SchedulerOutput(
            scheduled_new_reqs=tuple(plan.new_reqs),
            scheduled_cached_reqs=tuple(plan.cached_reqs),
            num_scheduled_tokens=plan.num_scheduled_tokens,
            total_num_scheduled_tokens=budget - plan.budget,
            sampling_req_ids=frozenset(plan.sampling_req_ids),
            finished_req_ids=frozenset(finished_req_ids),
            preempted_req_ids=frozenset(plan.preempted_req_ids))

    def update_from_output(self, scheduler_output: SchedulerOutput,
                           model_runner_output: ModelRunnerOutput) -> list[RequestUpdate]:
        """Appends each sampled token, applies the stop rules, frees finished requests; one
        update per request that sampled, in batch order. Tokens for requests that did not
        sample this step (partial prefill chunks) or that are gone (aborted) are ignored."""
        updates = []
        sampling_req_ids = scheduler_output.sampling_req_ids
        sampled = model_runner_output.sampled_token_ids
        for req_id in scheduler_output.num_scheduled_tokens:  # in batch order
            if req_id not in sampling_req_ids:
                continue
            request = self.requests.get(req_id)
            if request is None or request.status is not _RUNNING:
                continue  # finished, aborted or preempted meanwhile: the token is dropped
            request.num_output_placeholders = max(request.num_output_placeholders - 1, 0)
            token_ids = sampled.get(req_id)
            if token_ids:
                updates.append(self._append_tokens(request, token_ids))
        return updates

    def finish_requests(self, req_ids: str | Iterable[str], status: RequestStatus, *,
                        stop_reason: int | str | None = None) -> None:
        """Ends live requests with a finished `status` (aborts; the engine's stop strings,
        with the matched string as `stop_reason`). Unknown or finished ids are skipped."""
        if not status.is_finished:
            raise ValueError(f"finish_requests: status must be a finished one, got {status!r}")
        for req_id in (req_ids,) if isinstance(req_ids, str) else req_ids:
            request = self.requests.get(req_id)
            if request is None:
                continue
            if request.status is _RUNNING:
                del self.running[req_id]
            else:
                self.waiting.remove(request)
            if stop_reason is not None:
                request.stop_reason = stop_reason
            self._release(request, status)

    def abort_requests(self, req_ids: str | Iterable[str]) -> None:
        self.finish_requests(req_ids, RequestStatus.FINISHED_ABORTED)

    def _running_order(self) -> list[Request]:
        """Running requests, served front to back; preemption victims come off the back."""
        if self.scheduler_config.policy == "priority":
            return sorted(self.running.values(), key=lambda r: (r.priority, r.arrival_time))
        return list(self.running.values())

    def _chunk(self, num_tokens: int, budget: int) -> int:
        """How many of a request's `num_tokens` remaining tokens run this step."""
        return min(num_tokens, budget, self._max_tokens_per_request)

    def _schedule_running(self, plan: StepPlan, ahead: bool = False) -> None:
        """Gives each running request its next tokens, front to back, preempting from the
        back of the order whenever the pool is short (ahead: stopping there instead)."""
        order = self._running_order()
        allocate_slots = self.kv_cache_manager.allocate_slots
        max_model_len = self.scheduler_config.max_model_len
        i = 0
        while i < len(order) and plan.budget > 0:
            request = order[i]
            num_computed = request.num_computed_tokens
            num_tokens = request.num_tokens + request.num_output_placeholders
            if request.num_output_placeholders and (
                    num_tokens >= max_model_len
                    or request.num_output_tokens + request.num_output_placeholders
                    >= (request.sampling_params.max_tokens or max_model_len)):
                order.pop(i)  # the pending token ends it: nothing to run ahead
                continue
            if num_computed == num_tokens:  # the runner sampled nothing: sample again
                num_computed = request.num_computed_tokens = num_computed - 1
            num_new = self._chunk(num_tokens - num_computed, plan.budget)
            new_blocks = allocate_slots(request, num_new)
            if new_blocks is None and ahead:
                self._ahead_fell_short = True  # never preempt ahead: the next, synchronous
                break                          # step will (admitting nobody meanwhile)
            if new_blocks is None:
                new_blocks = self._preempt_until_allocated(request, num_new, order, plan)
                if new_blocks is None:
                    break  # `request` itself was preempted: it was the last one of `order`
            new_token_ids = unsent_token_ids(request, num_computed + num_new)
            plan.cached_reqs.append(CachedRequestData(
                request.request_id, new_token_ids, new_blocks.get_block_ids(), num_computed,
                False))
            plan.record(request, num_new)
            i += 1

    def _preempt_until_allocated(self, request: Request, num_new: int, order: list[Request],
                                 plan: StepPlan) -> KVCacheBlocks | None:
        """Preempts from the back of `order` until `request`'s blocks fit; None once
        `request` itself had to go."""
        while True:
            victim = order.pop()
            self._preempt(victim)
            plan.preempted_req_ids.append(victim.request_id)
            if victim is request:
                return None
            new_blocks = self.kv_cache_manager.allocate_slots(request, num_new)
            if new_blocks is not None:
                return new_blocks

    def _preempt(self, request: Request) -> None:
        self.kv_cache_manager.free(request)
        del self.running[request.request_id]
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_output_placeholders = 0  # a pending token of it is dropped
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.add_preempted(request)

    def _admit_waiting(self, plan: StepPlan, max_num_seqs: int) -> None:
        """Admits waiting requests in queue order while budgets and blocks allow. Never
        preempts: a request that does not fit waits, and so do those behind it."""
        manager = self.kv_cache_manager
        while self.waiting and plan.budget > 0 and len(self.running) < max_num_seqs:
            request = self.waiting.peek()
            hit_blocks, num_hit = manager.get_computed_blocks(request)
            num_new = self._chunk(request.num_tokens - num_hit, plan.budget)
            if manager.allocate_slots(request, num_new, hit_blocks, num_hit) is None:
                break
            self.waiting.pop()
            resumed = request.status is RequestStatus.PREEMPTED
            request.status = _RUNNING
            request.num_computed_tokens = num_hit
            if request.num_cached_tokens is None:
                request.num_cached_tokens = num_hit
            self.running[request.request_id] = request
            block_ids = manager.get_block_ids(request.request_id)
            if resumed:
                request.num_sent_tokens = request.num_tokens
                plan.cached_reqs.append(CachedRequestData(
                    request.request_id, tuple(request.all_token_ids), block_ids, num_hit, True))
            else:
                request.num_sent_tokens = request.num_prompt_tokens
                plan.new_reqs.append(NewRequestData(
                    request.request_id, request.prompt_token_ids, request.sampling_params,
                    block_ids, num_hit, tuple(sorted(request.eos_token_ids))))
            plan.record(request, num_new)

    def _append_tokens(self, request: Request, token_ids: list[int]) -> RequestUpdate:
        """Appends sampled tokens up to the first one that stops the request."""
        status = None
        num_accepted = 0
        runner_has_them = request.num_sent_tokens == request.num_tokens  # it sampled them
        for token_id in token_ids:
            request.append_output_token_ids(token_id)
            num_accepted += 1
            status = check_stop(request, token_id, self.scheduler_config.max_model_len)
            if status is not None:
                break
        if runner_has_them:
            request.num_sent_tokens = request.num_tokens
        self._update_block_hashes(request)
        accepted = tuple(token_ids[:num_accepted])
        if status is None:
            return RequestUpdate(request.request_id, accepted, False, None, None)
        del self.running[request.request_id]
        self._release(request, status)
        return RequestUpdate(request.request_id, accepted, True, status.get_finished_reason(),
                             request.stop_reason)

    def _release(self, request: Request, status: RequestStatus) -> None:
        request.status = status
        self.kv_cache_manager.free(request)
        del self.requests[request.request_id]
        self._finished_req_ids.add(request.request_id)

    def _update_block_hashes(self, request: Request) -> None:
        """Hashes the request's newly full blocks (a length check when none filled)."""
        block_size = self.cache_config.block_size
        if (self.cache_config.enable_prefix_caching
                and request.num_tokens >= (len(request.block_hashes) + 1) * block_size):
            append_block_hashes(request.block_hashes, request.all_token_ids, block_size,
                                extra_keys_of(request.cache_salt))
