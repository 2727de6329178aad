"""Scheduler updates -> `RequestOutput`s: text, stop strings, logprobs, n-sample grouping.

The engine runs a request with `n` samples as `n` child requests; this module keeps one
`RequestOutput` per parent and one detokenizer per child, turns the runner's
`TokenLogprobs` records into `Logprob` dicts, and reports which children matched a stop
string so the engine can finish them in the scheduler. A request whose output work
raises (its detokenizer, say) is dropped alone: `pop_failed()` names it, and its children,
for the engine to abort.
"""

from __future__ import annotations

import dataclasses

from jaxserve.core.scheduler_output import ModelRunnerOutput, RequestUpdate, TokenLogprobs
from jaxserve.engine.detokenizer import IncrementalDetokenizer
from jaxserve.outputs import CompletionOutput, Logprob, RequestOutput


@dataclasses.dataclass
class _Child:
    parent: RequestOutput
    output: CompletionOutput
    detokenizer: IncrementalDetokenizer | None
    wants_prompt_logprobs: bool


@dataclasses.dataclass(frozen=True)
class FailedRequest:
    child_ids: list[str]  # what the scheduler still holds of it
    error: Exception


class OutputProcessor:
    def __init__(self, tokenizer, *, faults=None):
        self.tokenizer = tokenizer
        self.faults = faults  # core.faults.FaultInjector (tests) or None
        self._children: dict[str, _Child] = {}
        self._child_ids: dict[str, list[str]] = {}  # parent id -> child ids
        self._failed: dict[str, FailedRequest] = {}  # parent id -> why, until popped

    def pop_failed(self) -> dict[str, FailedRequest]:
        failed, self._failed = self._failed, {}
        return failed

    def add(self, parent_id: str, prompt: str | None, prompt_token_ids: list[int],
            child_ids: list[str], params) -> None:
        parent = RequestOutput(parent_id, prompt, list(prompt_token_ids),
                               [None] if params.prompt_logprobs is not None else None, [],
                               finished=False)
        for index, child_id in enumerate(child_ids):
            logprobs = [] if params.logprobs is not None else None
            output = CompletionOutput(index, "", [], 0.0 if logprobs is not None else None,
                                      logprobs)
            parent.outputs.append(output)
            detok = None
            if self.tokenizer is not None and params.detokenize:
                detok = IncrementalDetokenizer(
                    self.tokenizer, prompt_token_ids, skip_special_tokens=params.skip_special_tokens,
                    stop=params.stop, include_stop_str_in_output=params.include_stop_str_in_output)
            self._children[child_id] = _Child(parent, output, detok, index == 0)
        self._child_ids[parent_id] = list(child_ids)

    def child_ids(self, parent_id: str) -> list[str]:
        return self._child_ids.get(parent_id, [])

    def has(self, parent_id: str) -> bool:
        return parent_id in self._child_ids

    def abort(self, parent_id: str) -> None:
        for child_id in self._child_ids.pop(parent_id, []):
            self._children.pop(child_id, None)

    def _logprob_dict(self, record: TokenLogprobs) -> dict[int, Logprob]:
        """The scored token first, then the top ones (a top id equal to it keeps its rank)."""
        entries = {record.token_id: Logprob(record.logprob, record.rank)}
        for i, (tid, tlp) in enumerate(zip(record.top_ids, record.top_logprobs)):
            entries.setdefault(tid, Logprob(tlp, i + 1))
        if self.tokenizer is not None:
            for tid, entry in entries.items():
                entry.decoded_token = self.tokenizer.decode([tid])
        return entries

    def process(self, updates: list[RequestUpdate], runner_out: ModelRunnerOutput,
                ) -> tuple[list[RequestOutput], list[tuple[str, str]]]:
        """(outputs of every parent touched this step, [(child id, matched stop string)])."""
        touched: dict[str, RequestOutput] = {}
        stopped: list[tuple[str, str]] = []
        for req_id, records in (runner_out.prompt_logprobs or {}).items():
            child = self._children.get(req_id)
            if child is not None and child.wants_prompt_logprobs:
                child.parent.prompt_logprobs.extend(self._logprob_dict(r) for r in records)
        for update in updates:
            child = self._children.get(update.req_id)
            if child is None:
                continue
            try:
                stop = self._apply(child, update, runner_out)
            except Exception as error:  # noqa: BLE001 - this request fails, the rest go on
                parent_id = child.parent.request_id
                self._failed[parent_id] = FailedRequest(self.child_ids(parent_id), error)
                self.abort(parent_id)
                touched.pop(parent_id, None)
                continue
            if stop is not None:
                stopped.append((update.req_id, stop))
            touched[child.parent.request_id] = child.parent
        if self._failed:  # the engine aborts those children; no stop for them
            failed_ids = {c for failed in self._failed.values() for c in failed.child_ids}
            stopped = [(child_id, s) for child_id, s in stopped if child_id not in failed_ids]
        results = []
        for parent_id, parent in touched.items():
            parent.finished = all(o.finish_reason is not None for o in parent.outputs)
            if parent.finished:
                self._child_ids.pop(parent_id, None)
            results.append(parent)
        return results, stopped

    def _apply(self, child: _Child, update: RequestUpdate, runner_out: ModelRunnerOutput,
               ) -> str | None:
        """One child's new tokens into its output; the stop string that ends it now, if any."""
        stop = None
        out = child.output
        out.token_ids.extend(update.new_token_ids)
        for record in (runner_out.logprobs or {}).get(update.req_id, ()):
            out.logprobs.append(self._logprob_dict(record))
            out.cumulative_logprob += record.logprob
        finished = update.finished
        if update.finished:
            out.finish_reason, out.stop_reason = update.finish_reason, update.stop_reason
        detok = child.detokenizer
        if detok is not None:
            if self.faults is not None:
                self.faults.hit("detokenize")
            out.text += detok.add_tokens(list(update.new_token_ids), finished=finished)
            if detok.stop_string is not None:  # a stop string outranks length or EOS
                if not update.finished:
                    stop = detok.stop_string
                finished = True
                out.finish_reason, out.stop_reason = "stop", detok.stop_string
        if finished:
            self._children.pop(update.req_id)
        return stop
