"""Request and RequestStatus: token bookkeeping, the status order, finish reasons."""

import pytest

from jaxserve.request import Request, RequestStatus
from jaxserve.sampling_params import SamplingParams


def test_finished_statuses_sort_after_the_live_ones():
    live = [RequestStatus.WAITING, RequestStatus.RUNNING, RequestStatus.PREEMPTED]
    finished = [RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH_CAPPED,
                RequestStatus.FINISHED_ABORTED]
    assert max(live) < min(finished)
    assert not any(s.is_finished for s in live) and all(s.is_finished for s in finished)


@pytest.mark.parametrize("status, reason", [
    (RequestStatus.FINISHED_STOPPED, "stop"), (RequestStatus.FINISHED_LENGTH_CAPPED, "length"),
    (RequestStatus.FINISHED_ABORTED, "abort"), (RequestStatus.RUNNING, None)])
def test_each_status_maps_to_an_openai_finish_reason(status, reason):
    assert status.get_finished_reason() == reason


def test_a_new_request_waits_with_nothing_computed():
    request = Request("a", [1, 2, 3], SamplingParams(), eos_token_id=2, priority=1)
    assert request.status is RequestStatus.WAITING and request.num_computed_tokens == 0
    assert (request.num_prompt_tokens, request.num_tokens, request.eos_token_id) == (3, 3, 2)
    assert not request.is_finished and request.get_finished_reason() is None


def test_appended_outputs_extend_all_token_ids():
    request = Request("a", [1, 2, 3], SamplingParams())
    request.append_output_token_ids(7)
    request.append_output_token_ids([8, 9])
    assert request.output_token_ids == [7, 8, 9]
    assert request.all_token_ids == [1, 2, 3, 7, 8, 9] and request.num_tokens == 6
    assert request.prompt_token_ids == (1, 2, 3)


def test_several_eos_ids_are_accepted():
    request = Request("a", [1], SamplingParams(), eos_token_id=[128009, 128001])
    assert request.eos_token_ids == {128001, 128009} and request.eos_token_id == 128001


def test_an_empty_prompt_is_refused():
    with pytest.raises(ValueError, match="prompt_token_ids"):
        Request("a", [], SamplingParams())


def test_arrival_time_defaults_to_now():
    assert Request("a", [1], SamplingParams()).arrival_time > 0
