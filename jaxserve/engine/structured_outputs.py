"""Structured outputs: grammars compiled once, one matcher per request, mask rows per step.

`StructuredOutputs` (one per engine) compiles a request's `StructuredOutputsParams` with
llguidance when the request is added (a bad spec is the ValueError `add_request` raises;
the async engine compiles it in a worker thread first, so the engine thread finds it),
caching the grammar by (kind, spec) with a matcher at its start whose first mask it
computed (llguidance builds its lexer states for a grammar at the first mask: tens of ms,
now off the step loop), and gives each child request a copy of that matcher.
Each step it fills the packed mask rows of the constrained requests that sample
(`prepare_step`, into the `SchedulerOutput` the runner gets) while the step's forward runs:
the engine launches the forward first and the sampler once the rows are filled. The rows
are filled on the engine thread one after another, or in llguidance's thread pool off a
CPU backend. It advances each matcher with the tokens the scheduler accepted (`accept`);
a complete grammar finishes its request. A matcher follows the request's output tokens:
if their counts differ (a token appended elsewhere), it is rebuilt from those tokens
before its next mask. The mask of step N+1 depends on the token of step N
(`SamplingParams.needs_sampled_tokens`): a step planned ahead of its tokens gets its rows
once step N is collected and accepted (the engine defers that step's sampler).
Under a reasoning parser a grammar starts after the output's end-of-think tokens (or at
once where the prompt closed the think block): until then its request samples unmasked.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
from collections.abc import Iterable, Sequence

import numpy as np

from jaxserve.core.scheduler_output import SchedulerOutput
from jaxserve.reasoning import get_reasoning_parser
from jaxserve.request import Request
from jaxserve.sampling_params import StructuredOutputsParams

logger = logging.getLogger(__name__)

MAX_CACHED_GRAMMARS = 256  # compiled grammars kept (least recently used dropped)


@dataclasses.dataclass(slots=True)
class _RequestMatcher:
    request: Request  # the scheduler's, whose output tokens the matcher follows
    grammar: str  # llguidance's grammar text, to rebuild the matcher
    matcher: object  # llguidance.LLMatcher
    num_tokens: int = 0  # output tokens offered to it so far
    start: int | None = 0  # the output index where the grammar starts; None: still reasoning


class StructuredOutputs:
    def __init__(self, tokenizer, *, vocab_size: int, eos_token_ids: Sequence[int],
                 reasoning_parser: str | None = None, parallel_fill: bool = False):
        self._hf_tokenizer = tokenizer  # the engine's (HF fast) tokenizer, or None
        self._reasoning = None if reasoning_parser is None else get_reasoning_parser(
            reasoning_parser)
        self._reasoning_end: tuple[int, ...] = ()  # the end tag's ids, encoded at first use
        self._vocab_size = vocab_size  # V of the model: ids at or past it are never allowed
        self._eos_token_ids = sorted(eos_token_ids)
        self._ll_tokenizer = None  # llguidance's view of the vocabulary, built at first use
        self._grammars: collections.OrderedDict[tuple, str] = collections.OrderedDict()
        # grammar text -> llguidance.LLMatcher at the grammar's start, its first mask computed
        # (never advanced: each request's matcher is a `deep_copy`)
        self._prototypes: dict[str, object] = {}
        self._matchers: dict[str, _RequestMatcher] = {}  # live constrained requests
        # Rows filled by llguidance's thread pool (`LLExecutor`), or one by one on the calling
        # thread: on a CPU backend the pool's threads would take cores from the forward
        # that runs meanwhile (and wait behind it for them), so that the fill took longer
        # and cost the step more than the serial loop does.
        self._parallel_fill = parallel_fill
        self._executor = None  # llguidance.LLExecutor, made at the first parallel fill
        # `compile` also runs in the async engine's worker threads: the grammar cache and
        # the tokenizer's first build are shared with the engine thread
        self._lock = threading.Lock()

    # -- requests ------------------------------------------------------------------------
    def compile(self, spec: StructuredOutputsParams) -> str:
        """llguidance's grammar for `spec` (cached); a ValueError starting with
        "structured_outputs" and carrying the compiler's message when it is invalid."""
        import llguidance

        kind, text = spec.grammar_spec()
        key = (kind, text, spec.disable_any_whitespace)
        with self._lock:
            grammar = self._grammars.get(key)
            if grammar is not None:
                self._grammars.move_to_end(key)
                return grammar
            tokenizer = self._tokenizer()
        try:
            if kind == "json":
                grammar = llguidance.LLMatcher.grammar_from_json_schema(
                    text, defaults={"whitespace_flexible": not spec.disable_any_whitespace})
            else:
                grammar = llguidance.grammar_from(kind, text)
        except (ValueError, TypeError) as e:
            raise ValueError(f"structured_outputs: invalid {kind}: {e}") from None
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(
            grammar, tokenizer)
        if is_error:
            raise ValueError(f"structured_outputs: invalid {kind}: {messages[0]}")
        prototype = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
        prototype.compute_bitmask()  # the grammar's lexer states, built here, not in a step
        with self._lock:
            self._grammars[key] = grammar
            self._prototypes[grammar] = prototype
            if len(self._grammars) > MAX_CACHED_GRAMMARS:
                _, dropped = self._grammars.popitem(last=False)
                if dropped not in self._grammars.values():  # the same text under another key
                    self._prototypes.pop(dropped, None)
        return grammar

    def add(self, request: Request, grammar: str) -> None:
        """A matcher at the grammar's start for a new (child) request: a copy of the
        grammar's prototype (0.01 ms; a new LLMatcher parses the grammar again: 1-2 ms)."""
        import llguidance

        with self._lock:
            prototype = self._prototypes.get(grammar)
        matcher = (prototype.deep_copy() if prototype is not None
                   else llguidance.LLMatcher(self._tokenizer(), grammar, log_level=0))
        self._matchers[request.request_id] = _RequestMatcher(
            request, grammar, matcher, start=None if self._reasons(request) else 0)

    def remove(self, req_ids: Iterable[str]) -> None:
        if self._matchers:
            for req_id in req_ids:
                self._matchers.pop(req_id, None)

    def forget_finished(self) -> None:
        """Drops the matchers of requests that finished (completed, stopped, aborted)."""
        for req_id in [r for r, state in self._matchers.items() if state.request.is_finished]:
            del self._matchers[req_id]

    def __len__(self) -> int:
        return len(self._matchers)

    # -- each step -----------------------------------------------------------------------
    def constrains(self, out: SchedulerOutput) -> bool:
        """Whether `prepare_step(out)` would fill mask rows: a request `out` samples for has
        a live grammar (the engine then launches its forward before filling them)."""
        return bool(self._matchers) and any(
            r in self._matchers and out.samples(r) for r in out.num_scheduled_tokens)

    def prepare_step(self, out: SchedulerOutput) -> SchedulerOutput:
        """`out` with the mask rows of its constrained requests that sample (batch order);
        forgets the matchers of the requests it reports finished (not of a new request
        that took a finished one's id since)."""
        if not self._matchers:
            return out
        for req_id in out.finished_req_ids:
            state = self._matchers.get(req_id)
            if state is not None and state.request.is_finished:
                del self._matchers[req_id]
        req_ids = tuple(r for r in out.num_scheduled_tokens
                        if r in self._matchers and out.samples(r)
                        and self._in_step(r).start is not None)
        if not req_ids:
            return out
        tokenizer = self._tokenizer()
        # [G, W'] every row written whole by llguidance (no zeroing needed)
        mask = np.empty((len(req_ids), -(-tokenizer.vocab_size // 32)), np.int32)
        matchers = [self._matchers[r].matcher for r in req_ids]
        if self._parallel_fill:
            self._fill_parallel(matchers, mask)
        else:  # each call drops the GIL and writes its row, as llguidance.numpy's
            # `fill_next_token_bitmask` does after checks this array passes by construction
            address, row_bytes = mask.ctypes.data, mask.shape[1] * mask.itemsize
            for j, matcher in enumerate(matchers):
                matcher.unsafe_compute_mask_ptr(address + j * row_bytes, row_bytes)
        return dataclasses.replace(out, structured_output_req_ids=req_ids,
                                   grammar_bitmask=mask)

    def _fill_parallel(self, matchers: list, mask: np.ndarray) -> None:  # mask [G, W']
        import llguidance
        from llguidance.numpy import fill_next_token_bitmask_par

        if self._executor is None:
            self._executor = llguidance.LLExecutor()
        fill_next_token_bitmask_par(self._executor, [(m, j) for j, m in enumerate(matchers)],
                                    mask)

    def accept(self, req_id: str, token_ids: Sequence[int]) -> bool:
        """Advances the request's matcher by the tokens the scheduler accepted; True when
        its grammar is complete (nothing but EOS may follow): the request should stop."""
        state = self._matchers.get(req_id)
        if state is None:
            return False
        matcher, num_before = state.matcher, state.num_tokens
        state.num_tokens += len(token_ids)
        if state.start is None:  # the grammar starts after the reasoning's end, if it came
            state.start = self._reasoning_end_in(state.request.output_token_ids, num_before)
            if state.start is None:
                return False
            token_ids = state.request.output_token_ids[state.start:state.num_tokens]
        for token_id in token_ids:
            if not matcher.is_stopped() and not matcher.consume_token(token_id):
                logger.error("request %s: token %d does not match its grammar: %s", req_id,
                             token_id, matcher.get_error())
        return matcher.is_stopped()

    def _reasons(self, request: Request) -> bool:
        """Whether the request's output starts with reasoning (its prompt does not close it)."""
        if self._reasoning is None:
            return False
        if not self._reasoning_end:
            self._reasoning_end = tuple(self._hf_tokenizer.encode(
                self._reasoning.end, add_special_tokens=False))
        tail = self._hf_tokenizer.decode(request.prompt_token_ids[-8:])
        return not self._reasoning.ended_in(tail)

    def _reasoning_end_in(self, output_token_ids: Sequence[int], num_seen: int) -> int | None:
        """The index after the first end-of-reasoning ids in the output, looking from where
        they could end among tokens not seen before; None if they are not there yet."""
        end, n = self._reasoning_end, len(self._reasoning_end)
        for at in range(max(0, num_seen - n + 1), len(output_token_ids) - n + 1):
            if tuple(output_token_ids[at:at + n]) == end:
                return at + n
        return None

    def _in_step(self, req_id: str) -> _RequestMatcher:
        """The request's matcher, rebuilt from its output tokens where it missed some."""
        state = self._matchers[req_id]
        output_token_ids = state.request.output_token_ids
        if state.num_tokens != len(output_token_ids):
            self.add(state.request, state.grammar)
            self.accept(req_id, output_token_ids)
            state = self._matchers[req_id]
        return state

    def _tokenizer(self):
        """llguidance's tokenizer over max(V, tokenizer size) ids (built once: about a
        second for a 150k vocabulary); ids past the tokenizer's have no bytes, so no grammar
        ever allows them."""
        if self._ll_tokenizer is None:
            import llguidance.hf

            if self._hf_tokenizer is None:
                raise ValueError("structured_outputs need a tokenizer (skip_tokenizer_init=True)")
            n_vocab = max(self._vocab_size, len(self._hf_tokenizer))
            try:
                self._ll_tokenizer = llguidance.hf.from_tokenizer(
                    self._hf_tokenizer, n_vocab=n_vocab, eos_token=self._eos_token_ids or None)
            except ValueError as e:
                raise ValueError(f"structured_outputs need a fast tokenizer: {e}") from None
        return self._ll_tokenizer
