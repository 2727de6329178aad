"""SamplingParams: how one request samples and when it stops, with vLLM's names and rules.

The API server and the offline `LLM` build one from user input; every rule is checked once,
here, and a violation raises `ValueError` naming the parameter, the value and the allowed
range. The object is frozen afterwards: the scheduler reads its stop rules, the runner turns
its numbers into sampling arrays, and the `n` children of a parallel request share it.
`StructuredOutputsParams` (vLLM's name) constrains the output to a JSON schema, a regex,
a choice of strings or a Lark grammar; the engine compiles it (engine/structured_outputs.py).
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math

_SAMPLING_EPS = 1e-5  # a temperature below this is greedy (argmax), as in vLLM
_MAX_LOGPROBS = 20  # most (prompt) logprobs a request may ask for per position
_MAX_LOGIT_BIAS = 100.0  # OpenAI's bound on |logit_bias| values
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1  # the range of `seed`


class SamplingType(enum.IntEnum):
    """How the sampler treats a request; the runner batches rows of one type together."""

    GREEDY = 0  # argmax; temperature < 1e-5
    RANDOM = 1  # random draws from the step's shared key
    RANDOM_SEED = 2  # random draws from the request's own seed (reproducible)


@dataclasses.dataclass(frozen=True)
class StructuredOutputsParams:
    """What the output must match: exactly one of `json`, `regex`, `choice`, `grammar`,
    `json_object` (vLLM's fields). The engine checks the spec itself when the request is
    added (a ValueError with the grammar compiler's message)."""

    json: dict | str | None = None  # a JSON schema (dict or JSON text)
    regex: str | None = None  # the whole output matches it
    choice: list[str] | tuple[str, ...] | None = None  # the output is one of these; a tuple
    grammar: str | None = None  # a Lark (or GBNF) grammar
    json_object: bool = False  # any JSON object
    disable_any_whitespace: bool = False  # JSON without whitespace between tokens

    def __post_init__(self) -> None:
        given = [name for name in ("json", "regex", "choice", "grammar")
                 if getattr(self, name) is not None] + (["json_object"] if self.json_object
                                                        else [])
        if len(given) != 1:
            raise ValueError("SamplingParams.structured_outputs must set exactly one of json, "
                             f"regex, choice, grammar, json_object; got {given or 'none'}")
        if self.json is not None and not isinstance(self.json, (dict, str)):
            _fail("structured_outputs.json", self.json, "a JSON schema (a dict or a string)")
        for name in ("regex", "grammar"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                _fail(f"structured_outputs.{name}", getattr(self, name), "a string")
        if self.choice is not None:
            if (not isinstance(self.choice, (list, tuple)) or not self.choice
                    or not all(isinstance(c, str) for c in self.choice)):
                _fail("structured_outputs.choice", self.choice, "a non-empty list of strings")
            object.__setattr__(self, "choice", tuple(self.choice))

    def grammar_spec(self) -> tuple[str, str]:
        """(kind, text): llguidance's grammar format and the spec as text; also the key
        under which the engine caches the compiled grammar."""
        if self.json is not None:
            # key order kept: it is the order of the output's properties
            text = self.json if isinstance(self.json, str) else json.dumps(self.json)
            return "json", text
        if self.json_object:
            return "json", '{"type": "object"}'
        if self.regex is not None:
            return "regex", self.regex
        if self.choice is not None:
            return "choice", json.dumps(list(self.choice))
        return "grammar", self.grammar


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """One request's sampling and stopping rules; see vLLM's SamplingParams for each name."""

    n: int = 1  # completions per prompt; the engine runs them as n child requests
    presence_penalty: float = 0.0  # [-2, 2]: subtracted once from each token already output
    frequency_penalty: float = 0.0  # [-2, 2]: subtracted per occurrence in the output
    repetition_penalty: float = 1.0  # > 0: divides (or multiplies) logits of seen tokens
    temperature: float = 1.0  # >= 0; below 1e-5 means greedy
    top_p: float = 1.0  # (0, 1]: keep the smallest set of tokens with this mass
    top_k: int = 0  # 0 (or -1, normalized to 0) disables; else keep the k most likely
    min_p: float = 0.0  # [0, 1]: drop tokens below min_p * p(most likely)
    seed: int | None = None  # per-request random seed; None draws from the engine's key
    stop: str | list[str] | tuple[str, ...] | None = None  # stop strings; a tuple afterwards
    stop_token_ids: list[int] | tuple[int, ...] | None = None  # stop ids; a tuple afterwards
    include_stop_str_in_output: bool = False  # keep the matched stop string in the text
    ignore_eos: bool = False  # keep generating past EOS (benchmarks)
    max_tokens: int | None = 16  # output cap; None = up to the model's context length
    min_tokens: int = 0  # EOS and stop ids are masked until this many tokens are out
    logprobs: int | None = None  # [0, 20]: top logprobs returned per output token
    prompt_logprobs: int | None = None  # [0, 20]: top logprobs per prompt token
    logit_bias: dict[int, float] | None = None  # token id -> [-100, 100] added to its logit
    skip_special_tokens: bool = True  # drop special tokens when detokenizing
    spaces_between_special_tokens: bool = True  # detokenizer option, as in HF
    detokenize: bool = True  # produce text; stop strings need it
    structured_outputs: StructuredOutputsParams | None = None  # a grammar the output matches
    # frozenset(stop_token_ids), kept for O(1) stop checks; EOS ids live on the Request.
    all_stop_token_ids: frozenset[int] = dataclasses.field(
        init=False, repr=False, compare=False, default=frozenset())

    def __post_init__(self) -> None:
        _check_int("n", self.n, 1, None)
        _check_real("presence_penalty", self.presence_penalty, -2.0, 2.0)
        _check_real("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        _check_real("repetition_penalty", self.repetition_penalty, 0.0, math.inf,
                    open_low=True, allowed="(0, inf)")
        _check_real("temperature", self.temperature, 0.0, math.inf, allowed="[0, inf)")
        _check_real("top_p", self.top_p, 0.0, 1.0, open_low=True, allowed="(0, 1]")
        _check_real("min_p", self.min_p, 0.0, 1.0)
        if not _is_int(self.top_k) or not (self.top_k in (-1, 0) or self.top_k >= 1):
            _fail("top_k", self.top_k, "0 or -1 (disabled), or an integer >= 1")
        if self.seed is not None:
            _check_int("seed", self.seed, _INT64_MIN, _INT64_MAX)
        if self.max_tokens is not None:
            _check_int("max_tokens", self.max_tokens, 1, None, allowed="None or an integer >= 1")
        _check_int("min_tokens", self.min_tokens, 0, self.max_tokens,
                   allowed=f"[0, max_tokens={self.max_tokens}]")
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), 0, _MAX_LOGPROBS,
                           allowed=f"None or [0, {_MAX_LOGPROBS}]")
        stop = _normalize_stop(self.stop)
        if stop and not self.detokenize:
            _fail("stop", self.stop, "empty when detokenize=False (stop strings need text)")
        stop_token_ids = _normalize_stop_token_ids(self.stop_token_ids)
        if not isinstance(self.structured_outputs, (StructuredOutputsParams, type(None))):
            _fail("structured_outputs", self.structured_outputs,
                  "None or a StructuredOutputsParams")
        greedy = self.temperature < _SAMPLING_EPS
        normalized = dict(
            temperature=float(self.temperature), stop=stop, stop_token_ids=stop_token_ids,
            top_k=0 if greedy or self.top_k == -1 else self.top_k,
            top_p=1.0 if greedy else float(self.top_p),
            min_p=0.0 if greedy else float(self.min_p),
            logit_bias=_normalize_logit_bias(self.logit_bias),
            all_stop_token_ids=frozenset(stop_token_ids))
        for name, value in normalized.items():
            object.__setattr__(self, name, value)

    @property
    def is_greedy(self) -> bool:
        """True when the sampler takes the argmax (temperature below 1e-5)."""
        return self.temperature < _SAMPLING_EPS

    @property
    def has_penalties(self) -> bool:
        """Presence, frequency or repetition penalties: sampling reads the output history."""
        return (self.presence_penalty != 0 or self.frequency_penalty != 0
                or self.repetition_penalty != 1)

    @property
    def needs_sampled_tokens(self) -> bool:
        """Sampling reads the tokens sampled before (penalties: the history; a grammar: the
        mask follows the last token), so the next step waits for this one's token."""
        return self.has_penalties or self.structured_outputs is not None

    @property
    def sampling_type(self) -> SamplingType:
        if self.is_greedy:
            return SamplingType.GREEDY
        return SamplingType.RANDOM if self.seed is None else SamplingType.RANDOM_SEED


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _fail(name: str, value: object, allowed: str) -> None:
    raise ValueError(f"SamplingParams.{name} must be {allowed}, got {value!r}")


def _check_int(name: str, value: object, low: int, high: int | None, *,
               allowed: str | None = None) -> None:
    in_range = _is_int(value) and value >= low and (high is None or value <= high)
    if not in_range:
        _fail(name, value, allowed or (f"an integer >= {low}" if high is None
                                       else f"an integer in [{low}, {high}]"))


def _check_real(name: str, value: object, low: float, high: float, *,
                open_low: bool = False, allowed: str | None = None) -> None:
    is_real = isinstance(value, (int, float)) and not isinstance(value, bool)
    above = is_real and (value > low if open_low else value >= low)
    if not (above and value <= high and not math.isnan(value)):
        _fail(name, value, allowed or f"in [{low}, {high}]")


def _normalize_stop(stop: object) -> tuple[str, ...]:
    if stop is None:
        return ()
    strings = (stop,) if isinstance(stop, str) else stop
    if not isinstance(strings, (list, tuple)) or not all(isinstance(s, str) for s in strings):
        _fail("stop", stop, "a string or a list of strings")
    if any(s == "" for s in strings):
        _fail("stop", stop, "free of empty strings")
    return tuple(strings)


def _normalize_stop_token_ids(ids: object) -> tuple[int, ...]:
    if ids is None:
        return ()
    if not isinstance(ids, (list, tuple)) or not all(_is_int(i) and i >= 0 for i in ids):
        _fail("stop_token_ids", ids, "a list of integers >= 0")
    return tuple(ids)


def _normalize_logit_bias(bias: object) -> dict[int, float] | None:
    if bias is None:
        return None
    if not isinstance(bias, dict):
        _fail("logit_bias", bias, "a dict of token id -> bias")
    for token_id, value in bias.items():
        if not (_is_int(token_id) and token_id >= 0):
            _fail("logit_bias", bias, "keyed by integer token ids >= 0")
        _check_real(f"logit_bias[{token_id}]", value, -_MAX_LOGIT_BIAS, _MAX_LOGIT_BIAS)
    return {int(k): float(v) for k, v in bias.items()}
