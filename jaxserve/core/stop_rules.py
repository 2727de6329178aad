"""The stop rules: does the token just appended end the request, and how.

EOS (unless `ignore_eos`) and `stop_token_ids` count only once `min_tokens` are out; then
`max_tokens` and the model's context length cap the output. A stop beats a length cap on
the same token. Stop *strings* need text, so the engine's detokenizer applies them and
finishes the request through `Scheduler.finish_requests`.
"""

from __future__ import annotations

from ..request import Request, RequestStatus


def check_stop(request: Request, token_id: int, max_model_len: int) -> RequestStatus | None:
    """The finished status `token_id` (already appended) puts the request in, or None.
    Sets `request.stop_reason` when a stop token id ends it."""
    params = request.sampling_params
    num_output_tokens = len(request.output_token_ids)
    if num_output_tokens >= params.min_tokens:
        if token_id in request.eos_token_ids and not params.ignore_eos:
            return RequestStatus.FINISHED_STOPPED
        if token_id in params.all_stop_token_ids:
            request.stop_reason = token_id
            return RequestStatus.FINISHED_STOPPED
    if ((params.max_tokens is not None and num_output_tokens >= params.max_tokens)
            or request.num_tokens >= max_model_len):
        return RequestStatus.FINISHED_LENGTH_CAPPED
    return None
