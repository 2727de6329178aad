"""The stop rules, applied to the token just appended."""

from jaxserve.core.stop_rules import check_stop
from jaxserve.request import Request, RequestStatus
from jaxserve.sampling_params import SamplingParams

EOS = 2
MAX_MODEL_LEN = 64


def _after(token_ids, eos=EOS, **params):
    """(status, request) once `token_ids` are sampled one by one, stopping at the first end."""
    params.setdefault("max_tokens", 100)
    request = Request("a", [5, 6, 7], SamplingParams(**params), eos_token_id=eos)
    status = None
    for token_id in token_ids:
        request.append_output_token_ids(token_id)
        status = check_stop(request, token_id, MAX_MODEL_LEN)
        if status is not None:
            break
    return status, request


def test_eos_stops_with_no_stop_reason():
    status, request = _after([9, EOS])
    assert status is RequestStatus.FINISHED_STOPPED and request.stop_reason is None


def test_any_of_several_eos_ids_stops():
    assert _after([128009], eos=[128001, 128009])[0] is RequestStatus.FINISHED_STOPPED


def test_ignore_eos_keeps_going_past_eos():
    assert _after([EOS, EOS], ignore_eos=True)[0] is None


def test_a_stop_token_id_stops_and_becomes_the_stop_reason():
    status, request = _after([9, 11], stop_token_ids=[11])
    assert status is RequestStatus.FINISHED_STOPPED and request.stop_reason == 11


def test_min_tokens_defers_eos_and_stop_token_ids():
    status, request = _after([EOS, 11, EOS], min_tokens=3, stop_token_ids=[11])
    assert status is RequestStatus.FINISHED_STOPPED and request.num_output_tokens == 3


def test_max_tokens_caps_the_length():
    status, request = _after([9] * 10, max_tokens=4)
    assert status is RequestStatus.FINISHED_LENGTH_CAPPED and request.num_output_tokens == 4


def test_eos_as_the_last_allowed_token_is_a_stop_not_a_length():
    assert _after([9, EOS], max_tokens=2)[0] is RequestStatus.FINISHED_STOPPED


def test_without_max_tokens_the_context_length_caps_the_request():
    status, request = _after([9] * 100, max_tokens=None)
    assert status is RequestStatus.FINISHED_LENGTH_CAPPED and request.num_tokens == MAX_MODEL_LEN
