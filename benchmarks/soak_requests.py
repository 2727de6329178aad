"""The soak's requests: what one client sends next, and whether the answer is well formed.

`plan_request(rng, args)` draws a request (completions or chat, stream or not, n 1-4,
logprobs, stop strings, max_tokens 1..args.max_tokens, args.prompt_words words; a share
cut short or invalid).
`check_response(plan, status, body)` returns (outcome kind, detail, output tokens per
choice): "ok", "rejected" (an invalid request's 4xx), or the error kind.
"""

from __future__ import annotations

import dataclasses
import json

WORDS = ("the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "and", "a", "cat",
         "sat", "on", "mat", "in", "sun", "hello", "world", "story", "of", "time", "\n")
STOPS = ("the", "\n", "a", "fox.", "xyz")
BAD = (  # (path, body): each must be a 4xx with an OpenAI error body
    ("/v1/completions", b"{not json"),
    ("/v1/completions", b'{"prompt": "caf\xe9 \xff"}'),
    ("/v1/completions", b'{"prompt": "hi", "temperature": -1}'),
    ("/v1/completions", b'{"prompt": "hi", "n": 0}'),
    ("/v1/completions", b'{"prompt": [999999999]}'),
    ("/v1/completions", b'{"prompt": "hi", "logprobs": 1000}'),
    ("/v1/completions", b'{"prompt": "a\\ud800"}'),
    ("/v1/chat/completions", b'{"messages": []}'),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "top_p": 0}'),
)


@dataclasses.dataclass(frozen=True)
class RequestPlan:
    path: str
    data: bytes
    headers: dict[str, str]
    bad: bool = False  # must be refused with a 4xx
    stream: bool = False
    disconnect_after: int | None = None  # hang up after this many events
    n: int = 1
    max_tokens: int = 1
    stops: tuple[str, ...] = ()
    logprobs: int | None = None
    chat: bool = False


def plan_request(rng, args) -> RequestPlan:
    headers = {"Content-Type": "application/json"}
    if args.api_key:
        headers["Authorization"] = f"Bearer {args.api_key}"
    if rng.random() < args.bad:
        path, data = rng.choice(BAD)
        return RequestPlan(path, data, headers, bad=True)
    chat, stream = rng.random() < 0.5, rng.random() < 0.5
    n, max_tokens = rng.randint(1, 4), rng.randint(1, args.max_tokens)
    stops = tuple(rng.sample(STOPS, rng.randint(1, 2))) if rng.random() < 0.3 else ()
    logprobs = rng.randint(0, 5) if rng.random() < 0.3 else None
    text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(*args.prompt_words)))
    body = {"model": args.model, "n": n, "max_tokens": max_tokens, "stream": stream,
            "temperature": rng.choice((0.0, 0.7, 1.0)), "ignore_eos": rng.random() < 0.5}
    if stops:
        body["stop"] = list(stops)
    if stream:
        body["stream_options"] = {"include_usage": True}
    if chat:
        body["messages"] = [{"role": "user", "content": text}]
        if logprobs is not None:
            body.update(logprobs=True, top_logprobs=logprobs)
    else:
        body["prompt"] = text
        if logprobs is not None:
            body["logprobs"] = logprobs
    cut = stream and rng.random() < args.disconnect
    return RequestPlan("/v1/chat/completions" if chat else "/v1/completions",
                       json.dumps(body).encode(), headers, stream=stream,
                       disconnect_after=rng.randint(1, 4) if cut else None, n=n,
                       max_tokens=max_tokens, stops=stops, logprobs=logprobs, chat=chat)


def check_response(plan: RequestPlan, status: int, body) -> tuple[str, str, int]:
    """`body`: the raw bytes, or a stream's `data:` payloads."""
    if status >= 500:
        return f"http_{status}", _text(body), 0
    if status != 200:
        if not is_error_body(body):
            return "malformed", f"{status} {_text(body)}", 0
        return ("rejected", "", 0) if plan.bad else (f"http_{status}", _text(body), 0)
    if plan.bad:
        return "bad_accepted", _text(body), 0
    try:
        if plan.stream:
            tokens = _check_stream(plan, body)
        else:
            tokens = _check_body(plan, json.loads(body))
    except (AssertionError, ValueError, KeyError, TypeError, IndexError) as error:
        return "malformed", f"{error!r} in {_text(body)}", 0
    return "ok", "", tokens


def _check_body(plan: RequestPlan, obj: dict) -> int:
    assert obj["object"] == ("chat.completion" if plan.chat else "text_completion"), obj
    choices = obj["choices"]
    assert sorted(c["index"] for c in choices) == list(range(plan.n)), "choice indices"
    for choice in choices:
        text = choice["message"]["content"] if plan.chat else choice["text"]
        _check_choice_end(plan, text, choice["finish_reason"])
        if plan.logprobs is not None:
            entries = (choice["logprobs"]["content"] if plan.chat
                       else choice["logprobs"]["tokens"])
            assert 1 <= len(entries) <= plan.max_tokens, "logprobs per token"
    usage = obj["usage"]
    assert 1 <= usage["completion_tokens"] <= plan.n * plan.max_tokens, usage
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    return usage["completion_tokens"] // plan.n


def _check_stream(plan: RequestPlan, events: list[str]) -> int:
    assert events and events[-1] == "[DONE]", "a stream ends with [DONE]"
    texts, ends, usage = [""] * plan.n, [None] * plan.n, None
    kind = "chat.completion.chunk" if plan.chat else "text_completion"
    for event in events[:-1]:
        chunk = json.loads(event)
        assert "error" not in chunk, chunk
        assert chunk["object"] == kind
        usage = chunk.get("usage") or usage
        for choice in chunk["choices"]:
            i = choice["index"]
            assert ends[i] is None, "a chunk after the choice's end"
            texts[i] += (choice["delta"].get("content") or "") if plan.chat else choice["text"]
            ends[i] = choice.get("finish_reason")
    for text, end in zip(texts, ends):
        _check_choice_end(plan, text, end)
    assert usage is not None and 1 <= usage["completion_tokens"] <= plan.n * plan.max_tokens
    return usage["completion_tokens"] // plan.n


def _check_choice_end(plan: RequestPlan, text: str, finish_reason: str | None) -> None:
    assert isinstance(text, str) and finish_reason in ("stop", "length"), finish_reason
    for stop in plan.stops:  # the output ends before its first stop string
        assert stop not in text, f"stop string {stop!r} in the output"


def is_error_body(body) -> bool:
    try:
        error = json.loads(body)["error"]
        return set(error) == {"message", "type", "param", "code"}
    except (ValueError, KeyError, TypeError):
        return False


def _text(body) -> str:
    if isinstance(body, list):
        return " | ".join(body[-3:])[:300]
    return body[:300].decode("utf-8", "replace") if isinstance(body, bytes) else str(body)[:300]
