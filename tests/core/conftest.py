"""A deterministic fake model runner and invariant checks for the scheduler tests.

`FakeRunner` keeps only what `SchedulerOutput` tells it, plus the tokens it samples (as the
real runner does). Its "KV" of a token is a hash of
the whole prefix up to that token, computed from the previous position's value *read back
from a fake pool through the block table*, and the next token is a function of the last
value. So a wrong block table, a bad prefix hit or a block reused too early changes the
tokens, and a slot read before it was written fails loudly. Exposed as the `sim` fixture.
"""

import collections
import types

import pytest

from jaxserve.config import CacheConfig, SchedulerConfig
from jaxserve.core.scheduler import Scheduler
from jaxserve.core.scheduler_output import ModelRunnerOutput, SchedulerOutput
from jaxserve.request import Request
from jaxserve.sampling_params import SamplingParams

VOCAB_SIZE = 40  # small, so EOS and stop ids show up
EOS = 0
_MODULUS = (1 << 61) - 1
_ROOT = 12345


def _mix(previous: int, token_id: int) -> int:
    return (previous * 1_000_003 + token_id * 7919 + 17) % _MODULUS


def next_token(value: int) -> int:
    return (value >> 11) % VOCAB_SIZE


class FakeRunner:
    """Executes a SchedulerOutput against a fake KV pool; checks the contract as it goes."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self.pool: list[int | None] = [None] * (num_blocks * block_size)  # [L * S]
        self.states: dict[str, types.SimpleNamespace] = {}  # what the runner knows per request

    def execute(self, out: SchedulerOutput) -> ModelRunnerOutput:
        for req_id in out.finished_req_ids | out.preempted_req_ids:
            self.states.pop(req_id, None)  # forget everything: a resume must rebuild it
        for new in out.scheduled_new_reqs:
            assert new.req_id not in self.states
            self.states[new.req_id] = types.SimpleNamespace(
                tokens=list(new.prompt_token_ids), block_ids=list(new.block_ids),
                num_computed=new.num_computed_tokens)
        for cached in out.scheduled_cached_reqs:
            if cached.resumed_from_preemption:
                assert cached.req_id not in self.states
                self.states[cached.req_id] = types.SimpleNamespace(
                    tokens=list(cached.new_token_ids), block_ids=list(cached.new_block_ids),
                    num_computed=cached.num_computed_tokens)
            else:
                state = self.states[cached.req_id]
                assert state.num_computed == cached.num_computed_tokens
                state.tokens.extend(cached.new_token_ids)
                state.block_ids.extend(cached.new_block_ids)
        assert sum(out.num_scheduled_tokens.values()) == out.total_num_scheduled_tokens
        sampled = {}
        for req_id, num_new in out.num_scheduled_tokens.items():  # batch order
            state = self.states[req_id]
            end = state.num_computed + num_new
            assert 0 not in state.block_ids, "the null block is in a block table"
            assert len(state.block_ids) * self.block_size >= end
            assert end <= len(state.tokens)
            for position in range(state.num_computed, end):
                previous = _ROOT if position == 0 else self._read(state, position - 1)
                self.pool[self._slot(state, position)] = _mix(previous, state.tokens[position])
            state.num_computed = end
            assert out.samples(req_id) == (end == len(state.tokens))
            if out.samples(req_id):
                sampled[req_id] = [next_token(self._read(state, end - 1))]
                state.tokens.extend(sampled[req_id])  # the scheduler never sends them back
        return ModelRunnerOutput(sampled_token_ids=sampled)

    def _slot(self, state, position: int) -> int:
        return state.block_ids[position // self.block_size] * self.block_size + (
            position % self.block_size)

    def _read(self, state, position: int) -> int:
        value = self.pool[self._slot(state, position)]
        assert value is not None, f"read of position {position} before it was written"
        return value


def check_invariants(scheduler: Scheduler) -> None:
    """Ref counts, free + used = total, sharing only through the cache, budgets of state."""
    manager = scheduler.kv_cache_manager
    pool = manager.block_pool
    holders = collections.Counter()
    for req_id, request in scheduler.requests.items():
        block_ids = manager.get_block_ids(req_id)
        if request.status.name == "RUNNING":
            assert len(block_ids) * scheduler.cache_config.block_size >= request.num_computed_tokens
        else:
            assert block_ids == (), "a waiting request holds blocks"
        holders.update(block_ids)
    assert holders[0] == 0
    assert pool.null_block.ref_cnt == 0
    for block in pool.blocks[1:]:
        assert block.ref_cnt == holders[block.block_id]
        if holders[block.block_id] > 1:
            assert block.block_hash is not None, "a block is shared outside the prefix cache"
    num_used = sum(1 for block in pool.blocks[1:] if block.ref_cnt > 0)
    assert pool.num_free_blocks + num_used == pool.num_blocks - 1
    assert all(block.ref_cnt == 0 for block in pool.free_queue)
    assert len(list(pool.free_queue)) == pool.num_free_blocks
    assert scheduler.num_running <= scheduler.scheduler_config.max_num_seqs
    assert scheduler.num_running + scheduler.num_waiting == len(scheduler.requests)


def check_step_budgets(scheduler: Scheduler, out: SchedulerOutput) -> None:
    config = scheduler.scheduler_config
    assert out.total_num_scheduled_tokens <= config.max_num_batched_tokens
    assert len(out.num_scheduled_tokens) <= config.max_num_seqs
    assert all(n > 0 for n in out.num_scheduled_tokens.values())


def step(scheduler: Scheduler, runner: FakeRunner, *, check: bool = True):
    """One engine step; returns (SchedulerOutput, list[RequestUpdate])."""
    out = scheduler.schedule()
    if check:
        check_step_budgets(scheduler, out)
        check_invariants(scheduler)
    updates = scheduler.update_from_output(out, runner.execute(out))
    if check:
        check_invariants(scheduler)
    return out, updates


def run_steps_ahead(scheduler: Scheduler, runner: FakeRunner, on_step=None,
                    max_steps: int = 20_000) -> int:
    """Runs the engine's async-scheduling loop to the end: each step planned ahead
    (`schedule(ahead=True)`) while the one before is "in flight" (executed by the fake
    runner, its output not applied yet). `on_step(i)` runs first in each step (arrivals,
    aborts). Returns the number of steps."""
    in_flight = None
    for step_index in range(max_steps):
        if on_step is not None:
            on_step(step_index)
        if in_flight is None:
            if not scheduler.has_unfinished_requests() and (on_step is None or step_index > 12):
                return step_index
            out = scheduler.schedule()
            check_step_budgets(scheduler, out)
            result = runner.execute(out)
        else:
            (out, result), in_flight = in_flight, None
        if out.sampling_req_ids and scheduler.can_schedule_ahead():
            ahead = scheduler.schedule(ahead=True)
            check_step_budgets(scheduler, ahead)
            check_invariants(scheduler)
            in_flight = (ahead, runner.execute(ahead))
        scheduler.update_from_output(out, result)
        check_invariants(scheduler)
    raise AssertionError(f"requests still unfinished after {max_steps} steps")


def make_request(req_id, prompt, *, priority=0, arrival_time=None, **params) -> Request:
    """A request with EOS id 0 and max_tokens=100 unless given."""
    params.setdefault("max_tokens", 100)
    return Request(req_id, list(prompt), SamplingParams(**params), eos_token_id=EOS,
                   arrival_time=arrival_time, priority=priority)


def sample_step(scheduler: Scheduler, token_id: int = 7, **per_request):
    """One step whose "runner" samples `token_id` (or a per-request list) for every request
    that samples; returns (SchedulerOutput, list[RequestUpdate])."""
    out = scheduler.schedule()
    sampled = {r: per_request.get(r, [token_id]) for r in out.sampling_req_ids}
    return out, scheduler.update_from_output(out, ModelRunnerOutput(sampled))


def small_scheduler(**kwargs) -> Scheduler:
    """A scheduler with roomy defaults: 64 blocks of 4, 64 tokens and 8 sequences per step."""
    kwargs.setdefault("num_blocks", 64)
    kwargs.setdefault("max_num_batched_tokens", 64)
    kwargs.setdefault("max_num_seqs", 8)
    return make_scheduler(**kwargs)[0]


def make_scheduler(*, num_blocks: int, block_size: int = 4, enable_prefix_caching=True,
                   **scheduler_kwargs) -> tuple[Scheduler, FakeRunner]:
    scheduler_kwargs.setdefault("max_model_len", 64)
    scheduler = Scheduler(SchedulerConfig(**scheduler_kwargs),
                          CacheConfig(block_size=block_size,
                                      enable_prefix_caching=enable_prefix_caching),
                          num_blocks)
    return scheduler, FakeRunner(num_blocks, block_size)


def copy_request(request: Request) -> Request:
    return Request(request.request_id, request.prompt_token_ids, request.sampling_params,
                   eos_token_id=tuple(request.eos_token_ids), arrival_time=request.arrival_time,
                   priority=request.priority, cache_salt=request.cache_salt)


def run_alone(request: Request, *, max_model_len: int, block_size: int = 4) -> Request:
    """A fresh copy of `request` run by itself to the end, with room to spare."""
    alone = copy_request(request)
    num_blocks = 1 + -(-max_model_len // block_size)
    scheduler, runner = make_scheduler(num_blocks=num_blocks, block_size=block_size,
                                       enable_prefix_caching=False, max_model_len=max_model_len,
                                       max_num_batched_tokens=max_model_len, max_num_seqs=1)
    scheduler.add_request(alone)
    for _ in range(10 * max_model_len):
        if not scheduler.has_unfinished_requests():
            return alone
        step(scheduler, runner, check=False)
    raise AssertionError(f"{request.request_id} did not finish alone")


@pytest.fixture(scope="session")
def sim() -> types.SimpleNamespace:
    return types.SimpleNamespace(
        FakeRunner=FakeRunner, check_invariants=check_invariants, step=step,
        run_steps_ahead=run_steps_ahead,
        make_scheduler=make_scheduler, run_alone=run_alone, copy_request=copy_request,
        request=make_request, sample_step=sample_step, scheduler=small_scheduler,
        next_token=next_token, VOCAB_SIZE=VOCAB_SIZE, EOS=EOS)
