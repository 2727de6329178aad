"""The scheduler, one behaviour per test: budgets, chunking, stops, aborts, admission."""

import pytest

from jaxserve.core.scheduler import WaitingQueueFullError
from jaxserve.core.scheduler_output import ModelRunnerOutput
from jaxserve.request import RequestStatus

EOS = 0  # the EOS id of sim.request


def test_a_prompt_within_the_budget_is_computed_in_one_step(sim):
    scheduler = sim.scheduler()
    scheduler.add_request(sim.request("a", range(1, 11)))
    out = scheduler.schedule()
    assert out.num_scheduled_tokens == {"a": 10} and out.total_num_scheduled_tokens == 10
    assert out.scheduled_new_reqs[0].block_ids == (1, 2, 3)
    assert out.sampling_req_ids == {"a"}


def test_a_long_prompt_is_chunked_by_the_token_budget_and_samples_only_at_its_end(sim):
    scheduler = sim.scheduler(max_num_batched_tokens=8)
    scheduler.add_request(sim.request("a", range(1, 21)))
    chunks = []
    for _ in range(3):
        out, updates = sim.sample_step(scheduler)
        chunks.append((out.num_scheduled_tokens["a"], out.samples("a"), len(updates)))
    assert chunks == [(8, False, 0), (8, False, 0), (4, True, 1)]


def test_long_prefill_token_threshold_caps_each_request_and_leaves_budget_to_others(sim):
    scheduler = sim.scheduler(long_prefill_token_threshold=5)
    scheduler.add_request(sim.request("a", range(1, 13)))
    scheduler.add_request(sim.request("b", range(20, 23)))
    out = scheduler.schedule()
    assert out.num_scheduled_tokens == {"a": 5, "b": 3}


def test_running_requests_are_served_before_waiting_ones(sim):
    scheduler = sim.scheduler(max_num_batched_tokens=10)
    scheduler.add_request(sim.request("a", range(1, 9)))
    sim.sample_step(scheduler)
    scheduler.add_request(sim.request("b", range(20, 40)))
    out = scheduler.schedule()
    assert list(out.num_scheduled_tokens.items()) == [("a", 1), ("b", 9)]
    # the runner keeps the token it sampled last step: nothing to send
    assert out.scheduled_cached_reqs[0].new_token_ids == ()


def test_max_num_seqs_caps_the_running_set(sim):
    scheduler = sim.scheduler(max_num_seqs=2)
    for name in "abc":
        scheduler.add_request(sim.request(name, range(1, 5)))
    out = scheduler.schedule()
    assert set(out.num_scheduled_tokens) == {"a", "b"}
    assert (scheduler.num_running, scheduler.num_waiting) == (2, 1)


def test_a_capacity_below_the_budgets_chunks_prompts_and_holds_admissions(sim):
    # the runner has compiled only its smallest buckets so far: 8 tokens, 2 sequences
    scheduler = sim.scheduler(max_num_batched_tokens=32, max_num_seqs=4)
    for i, name in enumerate("abc"):
        scheduler.add_request(sim.request(name, range(20 * i + 1, 20 * i + 13)))

    def step(capacity):
        out = scheduler.schedule(capacity=capacity)
        sampled = {r: [7] for r in out.sampling_req_ids}
        scheduler.update_from_output(out, ModelRunnerOutput(sampled))
        return out

    assert step((8, 2)).num_scheduled_tokens == {"a": 8}
    out = step((8, 2))
    assert out.num_scheduled_tokens == {"a": 4, "b": 4} and out.total_num_scheduled_tokens == 8
    assert (scheduler.num_running, scheduler.num_waiting) == (2, 1)
    out = step((32, 4))  # more buckets are compiled now: the budgets again
    assert out.num_scheduled_tokens == {"a": 1, "b": 8, "c": 12}


def test_eos_finishes_a_request_with_reason_stop(sim):
    scheduler = sim.scheduler()
    scheduler.add_request(sim.request("a", range(1, 5)))
    sim.sample_step(scheduler)
    _, [update] = sim.sample_step(scheduler, token_id=EOS)
    assert update.finished and update.finish_reason == "stop" and update.stop_reason is None
    assert update.new_token_ids == (EOS,)
    assert not scheduler.has_unfinished_requests()


def test_a_stop_token_id_finishes_with_it_as_stop_reason(sim):
    scheduler = sim.scheduler()
    scheduler.add_request(sim.request("a", range(1, 5), stop_token_ids=[9]))
    _, [update] = sim.sample_step(scheduler, token_id=9)
    assert (update.finish_reason, update.stop_reason) == ("stop", 9)


def test_without_max_tokens_a_request_stops_at_max_model_len(sim):
    scheduler = sim.scheduler(max_model_len=8)
    request = sim.request("a", range(1, 6), max_tokens=None)
    scheduler.add_request(request)
    while scheduler.has_unfinished_requests():
        sim.sample_step(scheduler)
    assert request.num_tokens == 8 and request.get_finished_reason() == "length"


def test_a_prompt_of_exactly_max_model_len_yields_one_token(sim):
    scheduler = sim.scheduler(max_model_len=8)
    scheduler.add_request(sim.request("a", range(1, 9)))
    _, [update] = sim.sample_step(scheduler)
    assert update.finished and update.finish_reason == "length" and update.new_token_ids == (7,)


def test_tokens_sampled_past_a_stop_are_dropped(sim):
    scheduler = sim.scheduler()
    request = sim.request("a", range(1, 5))
    scheduler.add_request(request)
    _, [update] = sim.sample_step(scheduler, a=[5, EOS, 6])
    assert update.new_token_ids == (5, EOS) and request.output_token_ids == [5, EOS]


def test_tokens_for_a_request_that_did_not_sample_are_ignored(sim):
    scheduler = sim.scheduler(max_num_batched_tokens=4)
    request = sim.request("a", range(1, 10))
    scheduler.add_request(request)
    out = scheduler.schedule()
    assert scheduler.update_from_output(out, ModelRunnerOutput({"a": [3]})) == []
    assert request.output_token_ids == []


def test_a_request_the_runner_sampled_nothing_for_samples_again(sim):
    scheduler = sim.scheduler()
    scheduler.add_request(sim.request("a", range(1, 9)))
    out = scheduler.schedule()
    scheduler.update_from_output(out, ModelRunnerOutput({}))
    out = scheduler.schedule()
    assert out.num_scheduled_tokens == {"a": 1} and out.samples("a")


def test_updates_come_in_batch_order(sim):
    scheduler = sim.scheduler()
    for name in "cab":
        scheduler.add_request(sim.request(name, range(1, 4)))
    _, updates = sim.sample_step(scheduler)
    assert [u.req_id for u in updates] == ["c", "a", "b"]


def test_aborting_a_running_request_frees_its_blocks_and_tells_the_runner(sim):
    scheduler = sim.scheduler()
    request = sim.request("a", range(1, 10))
    scheduler.add_request(request)
    sim.sample_step(scheduler)
    scheduler.abort_requests(["a"])
    assert request.status is RequestStatus.FINISHED_ABORTED
    assert request.get_finished_reason() == "abort"
    assert scheduler.kv_cache_manager.usage == 0.0 and not scheduler.has_unfinished_requests()
    assert scheduler.schedule().finished_req_ids == {"a"}
    assert scheduler.schedule().finished_req_ids == frozenset()  # reported once


def test_aborting_a_waiting_request_removes_it_from_the_queue(sim):
    scheduler = sim.scheduler()
    scheduler.add_request(sim.request("a", range(1, 5)))
    scheduler.abort_requests("a")
    assert scheduler.num_waiting == 0 and scheduler.schedule().num_scheduled_tokens == {}


def test_aborting_unknown_or_finished_ids_is_a_no_op(sim):
    scheduler = sim.scheduler()
    scheduler.abort_requests(["never-seen"])
    assert scheduler.get_num_unfinished_requests() == 0


def test_the_engine_finishes_a_request_for_a_stop_string(sim):
    scheduler = sim.scheduler()
    request = sim.request("a", range(1, 5), stop=["\n\n"])
    scheduler.add_request(request)
    sim.sample_step(scheduler)
    scheduler.finish_requests("a", RequestStatus.FINISHED_STOPPED, stop_reason="\n\n")
    assert (request.get_finished_reason(), request.stop_reason) == ("stop", "\n\n")


def test_finish_requests_refuses_a_live_status(sim):
    with pytest.raises(ValueError, match="finished"):
        sim.scheduler().finish_requests(["a"], RequestStatus.RUNNING)


def test_parallel_sampling_children_share_their_full_prompt_blocks(sim):
    scheduler = sim.scheduler()
    for i in range(3):
        scheduler.add_request(sim.request(f"child{i}", range(1, 11)))
    out = scheduler.schedule()
    tables = [new.block_ids for new in out.scheduled_new_reqs]
    assert tables[0][:2] == tables[1][:2] == tables[2][:2]  # two full blocks shared
    assert len({table[2] for table in tables}) == 3  # each its own partial last block
    assert out.num_scheduled_tokens == {"child0": 10, "child1": 2, "child2": 2}
    assert scheduler.kv_cache_manager.prefix_cache_hits == 16


def test_prefix_cache_stats_and_usage_are_reachable_from_the_scheduler(sim):
    scheduler = sim.scheduler()
    scheduler.add_request(sim.request("a", range(1, 10)))
    sim.sample_step(scheduler)
    manager = scheduler.kv_cache_manager
    assert (manager.prefix_cache_queries, manager.prefix_cache_hits) == (9, 0)
    assert manager.usage == pytest.approx(3 / 63)
    assert not scheduler.reset_prefix_cache()


def test_add_request_rejects_a_live_request_id(sim):
    scheduler = sim.scheduler()
    scheduler.add_request(sim.request("a", range(1, 5)))
    with pytest.raises(ValueError, match="already live"):
        scheduler.add_request(sim.request("a", range(1, 5)))


def test_add_request_refuses_beyond_max_num_waiting(sim):
    scheduler = sim.scheduler(max_num_waiting=1)
    scheduler.add_request(sim.request("a", range(1, 5)))
    with pytest.raises(WaitingQueueFullError):
        scheduler.add_request(sim.request("b", range(1, 5)))


def test_a_pool_too_small_for_one_max_model_len_request_is_refused(sim):
    with pytest.raises(ValueError, match="num_blocks must be >= 17"):
        sim.make_scheduler(num_blocks=16, max_model_len=64)


# -- async scheduling: schedule(ahead=True) while the last step's output is pending --------
def test_ahead_decodes_the_pending_token_and_leaves_out_requests_it_ends(sim):
    scheduler = sim.scheduler()
    scheduler.add_request(sim.request("a", range(1, 9), max_tokens=1))
    scheduler.add_request(sim.request("b", range(20, 28), max_tokens=3))
    out = scheduler.schedule()  # both prompts; both sample
    assert scheduler.can_schedule_ahead()
    ahead = scheduler.schedule(ahead=True)  # "a"'s pending token is its last: left out
    assert ahead.num_scheduled_tokens == {"b": 1} and ahead.sampling_req_ids == {"b"}
    [cached] = ahead.scheduled_cached_reqs
    assert cached.new_token_ids == () and cached.num_computed_tokens == 8  # on the device
    [a_done, b_more] = scheduler.update_from_output(out, ModelRunnerOutput({"a": [5], "b": [6]}))
    assert a_done.finished and a_done.finish_reason == "length" and not b_more.finished
    ahead2 = scheduler.schedule(ahead=True)  # "b" has 1 token out and 1 pending of 3
    assert ahead2.num_scheduled_tokens == {"b": 1} and ahead2.finished_req_ids == {"a"}
    scheduler.update_from_output(ahead, ModelRunnerOutput({"b": [7]}))
    assert scheduler.schedule(ahead=True).num_scheduled_tokens == {}  # its 3rd ends it
    [last] = scheduler.update_from_output(ahead2, ModelRunnerOutput({"b": [8]}))
    assert last.finished and scheduler.requests == {}


def test_a_token_that_stops_a_request_drops_the_step_run_ahead_for_it(sim):
    scheduler = sim.scheduler()
    request = sim.request("a", range(1, 9))
    scheduler.add_request(request)
    out = scheduler.schedule()
    ahead = scheduler.schedule(ahead=True)
    assert ahead.num_scheduled_tokens == {"a": 1}
    [update] = scheduler.update_from_output(out, ModelRunnerOutput({"a": [sim.EOS]}))
    assert update.finished and scheduler.kv_cache_manager.get_block_ids("a") == ()
    assert scheduler.update_from_output(ahead, ModelRunnerOutput({"a": [9]})) == []
    assert request.output_token_ids == [sim.EOS]
    assert scheduler.schedule().finished_req_ids == {"a"}


def test_ahead_never_preempts_and_leaves_that_to_the_next_synchronous_step(sim):
    # two 8-token prompts fill the 4 usable blocks; each needs a 5th block for its token
    scheduler = sim.scheduler(num_blocks=5, max_model_len=16, enable_prefix_caching=False)
    scheduler.add_request(sim.request("old", range(1, 9), arrival_time=0.0))
    scheduler.add_request(sim.request("new", range(10, 18), arrival_time=1.0))
    scheduler.add_request(sim.request("queued", range(30, 32), arrival_time=2.0))
    out = scheduler.schedule()
    ahead = scheduler.schedule(ahead=True)
    assert ahead.num_scheduled_tokens == {} and not ahead.preempted_req_ids
    assert scheduler.num_running == 2 and not scheduler.can_schedule_ahead()
    scheduler.update_from_output(out, ModelRunnerOutput({"old": [5], "new": [6]}))
    sync = scheduler.schedule()  # the engine plans in sync now: it preempts as usual
    assert sync.preempted_req_ids == {"new"} and sync.num_scheduled_tokens == {"old": 1}
    assert scheduler.can_schedule_ahead()


def test_penalties_are_planned_ahead_like_any_request(sim):
    # the engine defers such a step's sampler until the pending token is known
    scheduler = sim.scheduler()
    scheduler.add_request(sim.request("a", range(1, 9)))
    scheduler.add_request(sim.request("p", range(20, 28), presence_penalty=0.5))
    scheduler.schedule()
    assert scheduler.can_schedule_ahead()
    ahead = scheduler.schedule(ahead=True)
    assert ahead.sampling_req_ids == {"a", "p"}
