"""Property tests: the scheduler under random arrivals, lengths, aborts, pools and policies.

Driven with the fake model of conftest.py. Every step respects both budgets and the block
invariants (ref counts = holders, free + used = total, sharing only through the cache);
every request finishes; afterwards every block is free; and each request's tokens equal
those it produces alone, so preemption, chunking and prefix hits never change output.
"""

import builtins
import types
from unittest import mock

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jaxserve.core import block_hash
from jaxserve.request import Request, RequestStatus
from jaxserve.sampling_params import SamplingParams

VOCAB_SIZE = 40  # as in conftest.py
MAX_STEPS = 20_000
PROPERTY_SETTINGS = settings(max_examples=200, deadline=None,
                             suppress_health_check=[HealthCheck.too_slow])


@st.composite
def workloads(draw):
    block_size = draw(st.sampled_from([1, 2, 4, 8]))
    max_model_len = draw(st.integers(8, 48))
    min_blocks = 1 + -(-max_model_len // block_size)
    config = dict(  # pools from "one max_model_len request" up: preemption is common
        block_size=block_size, num_blocks=min_blocks + draw(st.integers(0, 12)),
        enable_prefix_caching=draw(st.sampled_from([True, True, False])),
        max_model_len=max_model_len,
        max_num_batched_tokens=draw(st.integers(1, 48)), max_num_seqs=draw(st.integers(1, 6)),
        long_prefill_token_threshold=draw(st.sampled_from([0, 0, 3, 8])),
        policy=draw(st.sampled_from(["fcfs", "priority"])))
    tokens = st.integers(0, VOCAB_SIZE - 1)
    # Prompts are strings of a few block-sized "words" plus a short tail: they share
    # prefixes, and the same block often follows different prefixes.
    words = draw(st.lists(st.lists(tokens, min_size=block_size, max_size=block_size),
                          min_size=1, max_size=3))
    arrivals = []
    for i in range(draw(st.integers(1, 10))):
        prompt = [t for word in draw(st.lists(st.sampled_from(words), max_size=5)) for t in word]
        prompt = (prompt + draw(st.lists(tokens, max_size=6)))[:max_model_len] or [1]
        max_tokens = draw(st.one_of(st.none(), st.integers(1, 24)))
        params = SamplingParams(
            max_tokens=max_tokens, min_tokens=draw(st.integers(0, min(3, max_tokens or 3))),
            ignore_eos=draw(st.booleans()),
            stop_token_ids=draw(st.lists(st.integers(1, VOCAB_SIZE - 1), max_size=2)))
        request = Request(f"r{i}", prompt, params, eos_token_id=0, arrival_time=float(i),
                          priority=draw(st.integers(0, 2)),
                          cache_salt=draw(st.sampled_from([None, None, "salt"])))
        arrivals.append(types.SimpleNamespace(
            request=request, arrive_at=draw(st.integers(0, 12)),
            abort_at=draw(st.one_of(st.none(), st.none(), st.integers(0, 40)))))
    return config, arrivals


def _run(sim, config, arrivals):
    scheduler, runner = sim.make_scheduler(**config)
    for step_index in range(MAX_STEPS):
        for arrival in arrivals:
            if arrival.arrive_at == step_index:
                scheduler.add_request(arrival.request)
            if arrival.abort_at == step_index:
                scheduler.abort_requests([arrival.request.request_id])
        if step_index > 12 and not scheduler.has_unfinished_requests():
            return scheduler
        sim.step(scheduler, runner)
    raise AssertionError(f"requests still unfinished after {MAX_STEPS} steps")


def _check_outcome(sim, config, arrivals, scheduler):
    pool = scheduler.kv_cache_manager.block_pool
    assert pool.num_free_blocks == pool.num_blocks - 1
    assert scheduler.kv_cache_manager.usage == 0.0
    for arrival in arrivals:
        request = arrival.request
        assert request.is_finished
        alone = sim.run_alone(request, max_model_len=config["max_model_len"],
                              block_size=config["block_size"])
        if request.status is RequestStatus.FINISHED_ABORTED:
            num_out = request.num_output_tokens
            assert request.output_token_ids == alone.output_token_ids[:num_out]
        else:
            assert request.output_token_ids == alone.output_token_ids, request.request_id
            assert (request.status, request.stop_reason) == (alone.status, alone.stop_reason)


@PROPERTY_SETTINGS
@given(workloads())
def test_random_workloads_respect_budgets_finish_and_match_running_alone(sim, workload):
    config, arrivals = workload
    scheduler = _run(sim, config, arrivals)
    _check_outcome(sim, config, arrivals, scheduler)


@settings(PROPERTY_SETTINGS, max_examples=150)
@given(workloads())
def test_async_scheduling_finishes_everything_with_the_same_tokens(sim, workload):
    """Each step planned while the one before is in flight (placeholders for its tokens,
    no preemption ahead, wasted slots after stops): the same outputs as running alone."""
    config, arrivals = workload
    scheduler, runner = sim.make_scheduler(**config)

    def arrive(step_index):
        for arrival in arrivals:
            if arrival.arrive_at == step_index:
                scheduler.add_request(arrival.request)
            if arrival.abort_at == step_index:
                scheduler.abort_requests([arrival.request.request_id])

    sim.run_steps_ahead(scheduler, runner, arrive, max_steps=MAX_STEPS)
    _check_outcome(sim, config, arrivals, scheduler)


@settings(PROPERTY_SETTINGS, max_examples=100)
@given(workloads(), st.sampled_from([1, 2, 4, 16]))
def test_hash_collisions_never_change_output(sim, workload, num_hash_values):
    config, arrivals = workload
    config["enable_prefix_caching"] = True
    # Every chained hash lands in one of a few values: most lookups collide.
    colliding_hash = lambda key: builtins.hash(key) % num_hash_values  # noqa: E731
    with mock.patch.object(block_hash, "hash", colliding_hash, create=True):
        scheduler = _run(sim, config, arrivals)
    _check_outcome(sim, config, arrivals, scheduler)
