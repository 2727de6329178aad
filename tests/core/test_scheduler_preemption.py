"""Preemption by recompute and the priority policy: who goes, where to, how it resumes."""

from jaxserve.request import RequestStatus


def _fill_pool_with_two_decoders(sim):
    """Two running requests of 8 tokens in a pool of 4 usable blocks (block size 4)."""
    scheduler = sim.scheduler(num_blocks=5, max_model_len=16, enable_prefix_caching=False)
    scheduler.add_request(sim.request("old", range(1, 9), arrival_time=0.0))
    scheduler.add_request(sim.request("new", range(10, 18), arrival_time=1.0))
    sim.sample_step(scheduler)  # both prompts computed: all 4 blocks held, one token each sampled
    return scheduler


def test_pool_exhaustion_preempts_the_newest_running_request(sim):
    scheduler = _fill_pool_with_two_decoders(sim)
    scheduler.add_request(sim.request("queued", range(1, 3)))
    out = scheduler.schedule()
    new = next(r for r in scheduler.waiting if r.request_id == "new")
    assert out.preempted_req_ids == {"new"} and set(out.num_scheduled_tokens) == {"old"}
    assert new.status is RequestStatus.PREEMPTED and new.num_computed_tokens == 0
    assert scheduler.kv_cache_manager.get_block_ids("new") == ()
    assert [r.request_id for r in scheduler.waiting] == ["new", "queued"]  # back at the head
    assert scheduler.num_preemptions == 1 and new.num_preemptions == 1


def test_no_waiting_request_is_admitted_in_a_step_that_preempted(sim):
    scheduler = _fill_pool_with_two_decoders(sim)
    out = scheduler.schedule()
    assert out.preempted_req_ids and not out.scheduled_new_reqs
    assert not any(c.resumed_from_preemption for c in out.scheduled_cached_reqs)


def test_a_resumed_request_carries_its_whole_block_table_and_all_token_ids(sim):
    scheduler = _fill_pool_with_two_decoders(sim)
    sim.sample_step(scheduler)  # "new" is preempted
    scheduler.abort_requests("old")
    out = scheduler.schedule()
    [resumed] = out.scheduled_cached_reqs
    assert resumed.resumed_from_preemption and resumed.req_id == "new"
    assert resumed.new_token_ids == tuple(range(10, 18)) + (7,)
    assert resumed.new_block_ids == scheduler.kv_cache_manager.get_block_ids("new")
    assert len(resumed.new_block_ids) == 3 and out.num_scheduled_tokens == {"new": 9}


def test_a_resumed_request_recomputes_through_hits_on_its_own_blocks(sim):
    scheduler = sim.scheduler(num_blocks=6, max_model_len=16)  # 5 usable blocks
    scheduler.add_request(sim.request("old", range(1, 9)))
    scheduler.add_request(sim.request("new", range(10, 18)))
    sim.sample_step(scheduler)  # 4 blocks held
    out, _ = sim.sample_step(scheduler)  # "old" takes the last block; "new" is preempted
    assert out.preempted_req_ids == {"new"}  # its two full prompt blocks stay cached
    scheduler.abort_requests("old")
    out = scheduler.schedule()
    assert out.scheduled_cached_reqs[0].num_computed_tokens == 8
    assert out.num_scheduled_tokens == {"new": 1}


def test_a_preempted_request_resumes_with_identical_tokens(sim):
    scheduler, runner = sim.make_scheduler(num_blocks=7, max_model_len=24,
                                           max_num_batched_tokens=32)
    requests = [sim.request(f"r{i}", range(1 + i, 9 + i), max_tokens=14, ignore_eos=True)
                for i in range(3)]
    for request in requests:
        scheduler.add_request(request)
    while scheduler.has_unfinished_requests():
        sim.step(scheduler, runner)
    assert scheduler.num_preemptions > 0
    for request in requests:
        assert request.output_token_ids == sim.run_alone(request, max_model_len=24).output_token_ids


def test_priority_policy_admits_the_lowest_priority_value_first(sim):
    scheduler = sim.scheduler(policy="priority", max_num_seqs=1)
    scheduler.add_request(sim.request("late", range(1, 4), priority=5, arrival_time=0.0))
    scheduler.add_request(sim.request("urgent", range(1, 4), priority=-1, arrival_time=1.0))
    assert set(scheduler.schedule().num_scheduled_tokens) == {"urgent"}


def test_priority_policy_preempts_the_lowest_priority_running_request(sim):
    scheduler = sim.scheduler(num_blocks=5, max_model_len=16, policy="priority")
    scheduler.add_request(sim.request("background", range(1, 9), priority=9, arrival_time=0.0))
    scheduler.add_request(sim.request("important", range(10, 18), priority=0, arrival_time=1.0))
    sim.sample_step(scheduler)
    out = scheduler.schedule()
    assert out.preempted_req_ids == {"background"}
    assert set(out.num_scheduled_tokens) == {"important"}
