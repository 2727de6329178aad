"""LLMEngine: requests in, `RequestOutput`s out, one `step()` at a time.

It owns the scheduler (pure Python), the model runner (devices) and the output processor
(text, stop strings, logprobs). `add_request` validates what the runner cannot check later
(token ids inside the vocabulary, the context length, table widths) with ValueErrors naming
the parameter, the one place that does (the server turns them into 400s); a request with
`n` samples runs as `n` child requests sharing its prompt blocks through the prefix cache.

Steps are pipelined: `step()` launches step N on the devices, then turns step N-1's
tokens into outputs (detokenization, stop strings, logprobs) while they compute, so the
host's output work costs no device time. With async scheduling (the default) it also plans
and launches step N+1 before waiting for step N (the ahead plan,
`Scheduler.schedule(ahead=True)`; N+1's inputs link to N's samples, which stay on the
device: runner/sample_links.py), so scheduling and input preparation overlap the devices'
work too. A stop string therefore ends its request a step or two late; the tokens of those
extra steps are dropped, never shown. docs/architecture.md, "Async scheduling: one step
ahead", follows one step through every file. Structured outputs (a grammar per request,
engine/structured_outputs.py) add their mask rows to each step's SchedulerOutput, filled
while the step's forward runs: `dispatch(defer_sampling=True)` launches the forward, then
`runner.sample` the sampler with the rows. A step planned ahead whose requests sample from
the tokens before (a grammar's mask, penalties) launches its sampler only once the step
before is collected and the matchers have taken its tokens.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import itertools
import numbers
import logging
import time

from jaxserve.config import EngineConfig
from jaxserve.core.faults import FaultInjector
from jaxserve.core.scheduler import Scheduler
from jaxserve.core.scheduler_output import ModelRunnerOutput, RequestUpdate
from jaxserve.engine.output_processor import OutputProcessor
from jaxserve.engine.step_stats import StepRecord, StepStats, count_token_kinds
from jaxserve.engine.structured_outputs import StructuredOutputs
from jaxserve.outputs import RequestOutput
from jaxserve.request import Request, RequestStatus
from jaxserve.runner.compilation_counter import CompilationCounter
from jaxserve.runner.model_runner import ModelRunner, PendingStep
from jaxserve.runner.sampling_rows import MAX_LOGIT_BIAS_ENTRIES, MAX_MIN_TOKENS_BANNED_IDS
from jaxserve.sampling_params import SamplingParams
from jaxserve.tokenization.tokenizer_utils import load_tokenizer

logger = logging.getLogger(__name__)


def enable_persistent_cache(path: str) -> None:
    """JAX's persistent compilation cache: a restart reads compiled programs from disk."""
    import jax

    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


@dataclasses.dataclass(frozen=True, slots=True)
class CollectedStep:
    """A step collected and applied to the scheduler whose `RequestOutput`s are not made
    yet: the next `step()` makes them while its own step computes."""

    updates: list[RequestUpdate]  # the scheduler's, one per request that sampled, batch order
    runner_output: ModelRunnerOutput  # the logprobs and prompt logprobs the updates lack


class LLMEngine:
    def __init__(self, config: EngineConfig, *, tokenizer=None, warm_up: bool = True,
                 progress: bool = True, step_broadcaster=None,
                 faults: FaultInjector | None = None):
        self.config = config
        self.faults = faults  # test-only: makes a chosen runner/output site raise or hang
        # Multi-host serve: sends each step's SchedulerOutput to the other processes
        # (`parallel.step_broadcast`); None on one host.
        self.step_broadcaster = step_broadcaster
        self.model_config = config.model_config
        loading_tokenizer = None
        if tokenizer is None and not config.skip_tokenizer_init:
            # beside the weights' loading (transformers' import and the tokenizer's files
            # overlap reading and repacking the weights, which release the GIL)
            worker = concurrent.futures.ThreadPoolExecutor(1, "jaxserve-tokenizer")
            loading_tokenizer = worker.submit(load_tokenizer, self.model_config.model_dir,
                                              cache_dir=config.compilation_cache_dir)
            worker.shutdown(wait=False)  # the thread ends with its one task
        if config.compilation_cache_dir is not None:
            enable_persistent_cache(config.compilation_cache_dir)
        # XLA compilations of this engine: the programs' (at start-up and in the background)
        # and any of a step's, which must never happen (`num_compilations_after_warm_up`).
        self.compilations = CompilationCounter()
        self.step_compilations = CompilationCounter()
        self.runner = ModelRunner(self.model_config, config.cache_config, config.scheduler_config,
                                  attention_backend=config.attention_backend, seed=config.seed,
                                  tensor_parallel_size=config.tensor_parallel_size,
                                  track_compilation=self.compilations.track,
                                  executable_cache_dir=config.compilation_cache_dir,
                                  load_format=config.load_format, faults=faults)
        if loading_tokenizer is not None:
            tokenizer = loading_tokenizer.result()
        self.tokenizer = tokenizer
        if warm_up:  # the smallest buckets now; the rest now or in the background
            self.runner.compile_programs(
                background=config.background_compilation and step_broadcaster is None,
                progress=progress)
        self.scheduler = Scheduler(config.scheduler_config, config.cache_config,
                                   num_blocks=self.runner.num_blocks)
        self.output_processor = OutputProcessor(tokenizer, faults=faults)
        # Requests dropped alone because their output work raised, until popped.
        self._failed: dict[str, Exception] = {}
        self.structured_outputs = StructuredOutputs(
            tokenizer, vocab_size=self.model_config.vocab_size,
            eos_token_ids=self.model_config.eos_token_ids,
            reasoning_parser=config.reasoning_parser,
            parallel_fill=self.runner.backend != "cpu")
        self._id_counter = itertools.count()
        self.num_prompt_tokens = 0
        self.num_generation_tokens = 0
        # The last step, turned into RequestOutputs during the next step (or by a step that
        # schedules nothing, at the end).
        self._unprocessed: CollectedStep | None = None
        # The step planned ahead and dispatched, not collected: the next `step()` collects
        # it (its SchedulerOutput is `.out`)
        self._in_flight: PendingStep | None = None
        self.async_scheduling = config.scheduler_config.async_scheduling  # may be switched
        # What each step did, for the dashboard (engine/step_stats.py); (prefill, decode)
        # tokens of each dispatched step not collected yet, oldest first, counted when
        # planned, while its requests are all live.
        self.step_stats = StepStats()
        self._planned_tokens: collections.deque[tuple[int, int]] = collections.deque()

    # -- requests ------------------------------------------------------------------------
    def add_request(self, request_id: str | None, prompt_token_ids: list[int],
                    params: SamplingParams | None = None, *, prompt: str | None = None,
                    arrival_time: float | None = None, priority: int = 0,
                    cache_salt: str | None = None) -> str:
        """Queues a request; returns its id. ValueError for anything the model cannot run."""
        params = params or SamplingParams()
        request_id = str(next(self._id_counter)) if request_id is None else request_id
        if self.output_processor.has(request_id):
            raise ValueError(f"request_id {request_id!r} is already in use")
        self._validate(prompt_token_ids, params)
        grammar = (None if params.structured_outputs is None
                   else self.structured_outputs.compile(params.structured_outputs))
        prompt_token_ids = [int(t) for t in prompt_token_ids]  # numpy ints welcome
        child_ids = ([request_id] if params.n == 1
                     else [f"{i}_{request_id}" for i in range(params.n)])
        self.output_processor.add(request_id, prompt, prompt_token_ids, child_ids, params)
        for index, child_id in enumerate(child_ids):
            child_params = params
            if params.n > 1:  # each sample its own seed; prompt logprobs computed once
                child_params = dataclasses.replace(
                    params, n=1, seed=None if params.seed is None else params.seed + index,
                    prompt_logprobs=params.prompt_logprobs if index == 0 else None)
            request = Request(child_id, prompt_token_ids, child_params,
                              eos_token_id=self.model_config.eos_token_ids,
                              arrival_time=arrival_time, priority=priority, cache_salt=cache_salt)
            try:
                self.scheduler.add_request(request)
            except Exception:
                self.scheduler.abort_requests(child_ids[:index])
                self.output_processor.abort(request_id)
                self.structured_outputs.forget_finished()
                raise
            if grammar is not None:  # each child its own matcher
                self.structured_outputs.add(request, grammar)
        self.num_prompt_tokens += len(prompt_token_ids)
        return request_id

    def _validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """The one check of a request against the model (the server only reports it): a
        ValueError whose message starts with the parameter's name."""
        vocab, max_len = self.model_config.vocab_size, self.model_config.max_model_len
        if len(prompt_token_ids) == 0:
            raise ValueError("prompt must not be empty")
        if len(prompt_token_ids) >= max_len:
            raise ValueError(f"prompt is {len(prompt_token_ids)} tokens; max_model_len={max_len} "
                             "leaves no room for an output token")
        bad = [t for t in prompt_token_ids if isinstance(t, bool)
               or not (isinstance(t, numbers.Integral) and 0 <= t < vocab)]
        if bad:
            raise ValueError(f"prompt_token_ids must be in [0, {vocab}), got {bad[0]!r}")
        bias = params.logit_bias or {}
        if len(bias) > MAX_LOGIT_BIAS_ENTRIES:
            raise ValueError(f"logit_bias has {len(bias)} entries; at most "
                             f"{MAX_LOGIT_BIAS_ENTRIES} are supported")
        if any(t >= vocab for t in bias):
            raise ValueError(f"logit_bias token ids must be in [0, {vocab})")
        num_banned = len(params.all_stop_token_ids) + len(self.model_config.eos_token_ids)
        if params.min_tokens and num_banned > MAX_MIN_TOKENS_BANNED_IDS:
            raise ValueError(f"stop_token_ids: at most {MAX_MIN_TOKENS_BANNED_IDS} ids (with EOS) "
                             "are supported together with min_tokens")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer (skip_tokenizer_init=True)")
        max_waiting = self.config.scheduler_config.max_num_waiting
        if max_waiting is not None and params.n > max_waiting:  # else a 503 no retry clears
            raise ValueError(f"n is {params.n}, above max_num_waiting={max_waiting}: its "
                             "samples could never wait together")

    def abort_request(self, request_ids: str | list[str]) -> None:
        for request_id in [request_ids] if isinstance(request_ids, str) else request_ids:
            self.scheduler.abort_requests(self.output_processor.child_ids(request_id))
            self.output_processor.abort(request_id)
        if len(self.structured_outputs):
            self.structured_outputs.forget_finished()

    def pop_failed_requests(self) -> dict[str, Exception]:
        """Requests dropped since the last call (their output work raised), with the error:
        they are aborted and get no more outputs."""
        failed, self._failed = self._failed, {}
        return failed

    def has_unfinished_requests(self) -> bool:
        """Requests still running or waiting, or outputs of the last step not yet returned."""
        return (self._unprocessed is not None or self._in_flight is not None
                or self.scheduler.has_unfinished_requests())

    # -- the loop ------------------------------------------------------------------------
    def step(self, on_outputs=None) -> list[RequestOutput]:
        """Runs one step and returns the outputs of the one before (see the module doc).

        With `on_outputs`, those outputs go to `on_outputs(outputs)` as soon as they are
        ready, while this step still computes, and `step` returns [] (the async engine
        streams them to clients a step's device time sooner).
        """
        start = time.perf_counter()
        pending, self._in_flight = self._in_flight, None
        if pending is None:  # nothing computing: plan this step now
            scheduled = self._schedule()
            # grammar masks: the forward first, the rows filled while it runs, the sampler
            masks_later = (self.step_broadcaster is None
                           and self.structured_outputs.constrains(scheduled))
            with self.step_compilations.track():  # this engine's, on this thread only
                pending = self.runner.dispatch(scheduled, defer_sampling=masks_later)
                if masks_later:
                    pending = self.runner.sample(
                        pending, self.structured_outputs.prepare_step(scheduled))
        deferred = False  # the ahead step's sampler waits for this step's tokens
        if self._may_schedule_ahead(pending.out):  # plan and launch the next one meanwhile
            ahead = self._schedule(ahead=True)  # the ahead plan
            deferred = self._samples_from_history(ahead)
            if not deferred:  # its grammar masks are known now (else: after collection)
                ahead = self.structured_outputs.prepare_step(ahead)
            with self.step_compilations.track():
                self._in_flight = self.runner.dispatch(ahead, pending,
                                                       defer_sampling=deferred)
        outputs = self._finish_step(self._unprocessed) if self._unprocessed else []
        self._unprocessed = None
        if on_outputs is not None and outputs:
            on_outputs(outputs)
            outputs = []
        waited = time.perf_counter()
        with self.step_compilations.track():
            sampled = self.runner.collect(pending)
        waited = time.perf_counter() - waited
        updates = self.scheduler.update_from_output(pending.out, sampled)
        if len(self.structured_outputs):
            updates = self._advance_grammars(updates)
        if deferred:  # this step's tokens are known: masks and penalties of the next one
            ahead = self.structured_outputs.prepare_step(self._in_flight.out)
            with self.step_compilations.track():
                self._in_flight = self.runner.sample(self._in_flight, ahead)
        if len(self.structured_outputs):
            self.structured_outputs.forget_finished()
        if updates or sampled.prompt_logprobs:
            self._unprocessed = CollectedStep(updates, sampled)
        self._record_step(pending, time.perf_counter() - start - waited, waited)
        return outputs

    def _schedule(self, *, ahead: bool = False):
        if self.runner.capacity is None:
            raise RuntimeError("no step program is compiled yet: an LLMEngine built with "
                               "warm_up=False needs runner.compile_programs() first")
        scheduled = self.scheduler.schedule(ahead=ahead, capacity=self.runner.capacity)
        if self.step_broadcaster is not None:  # the other hosts replay the masks it sends
            scheduled = self.structured_outputs.prepare_step(scheduled)
        self._planned_tokens.append(count_token_kinds(scheduled, self.scheduler.requests))
        if self.step_broadcaster is not None:
            self.step_broadcaster.send(scheduled)
        return scheduled

    def _may_schedule_ahead(self, scheduled) -> bool:
        """Async scheduling is on, one host runs the steps (followers replay them one at a
        time), `scheduled` samples something to run ahead of, and the scheduler agrees."""
        return (self.async_scheduling and self.step_broadcaster is None
                and bool(scheduled.sampling_req_ids) and self.scheduler.can_schedule_ahead())

    def _samples_from_history(self, scheduled) -> bool:
        """Whether a request `scheduled` samples for reads the tokens sampled before it
        (penalties, a grammar): planned ahead, its sampler must wait for them."""
        requests = self.scheduler.requests
        return any(requests[r].sampling_params.needs_sampled_tokens
                   for r in scheduled.sampling_req_ids if r in requests)

    def _advance_grammars(self, updates: list[RequestUpdate]) -> list[RequestUpdate]:
        """Each constrained request's matcher takes its accepted tokens; a complete grammar
        stops the request now (its EOS is the only token left)."""
        advanced = []
        for update in updates:
            if self.structured_outputs.accept(update.req_id, update.new_token_ids) and (
                    not update.finished):
                self.scheduler.finish_requests(update.req_id, RequestStatus.FINISHED_STOPPED)
                update = dataclasses.replace(update, finished=True, finish_reason="stop")
            advanced.append(update)
        return advanced

    def _finish_step(self, step: CollectedStep) -> list[RequestOutput]:
        updates = step.updates
        outputs, stopped = self.output_processor.process(updates, step.runner_output)
        for child_id, stop in stopped:
            self.scheduler.finish_requests(child_id, RequestStatus.FINISHED_STOPPED,
                                           stop_reason=stop)
        for parent_id, failed in self.output_processor.pop_failed().items():
            logger.error("request %s failed in output processing: %r", parent_id, failed.error)
            self.scheduler.abort_requests(failed.child_ids)
            self._failed[parent_id] = failed.error
        self.num_generation_tokens += sum(len(u.new_token_ids) for u in updates)
        return outputs

    def _record_step(self, pending: PendingStep, host_seconds: float,
                     device_wait_seconds: float) -> None:
        num_prefill, num_decode = self._planned_tokens.popleft()
        inputs, kv = pending.inputs, self.scheduler.kv_cache_manager
        pool = kv.block_pool
        token_bucket = 0 if inputs is None else len(inputs.input_ids)
        num_cached_free = pool.num_cached_free_blocks
        self.step_stats.append(StepRecord(
            time=time.time(), num_prefill_tokens=num_prefill, num_decode_tokens=num_decode,
            num_padding_tokens=token_bucket - pending.out.total_num_scheduled_tokens,
            num_seqs=pending.out.num_reqs, token_bucket=token_bucket,
            seq_bucket=0 if inputs is None else len(inputs.seq_lens),
            num_blocks=pool.num_blocks - 1,
            num_used_blocks=pool.num_blocks - 1 - pool.num_free_blocks,
            num_cached_free_blocks=num_cached_free,
            num_free_blocks=pool.num_free_blocks - num_cached_free,
            num_running=self.scheduler.num_running, num_waiting=self.scheduler.num_waiting,
            prefix_cache_queries=kv.prefix_cache_queries,
            prefix_cache_hits=kv.prefix_cache_hits,
            num_preemptions=self.scheduler.num_preemptions,
            num_compilations=self.compilations.count + self.step_compilations.count,
            host_seconds=host_seconds, device_wait_seconds=device_wait_seconds))

    def compilation_stats(self) -> dict[str, int]:
        """Step programs compiled so far and still to compile (safe from any thread)."""
        compiled = self.runner.compiled
        return {"num_programs_compiled": compiled.num_compiled,
                "num_programs_pending": compiled.num_programs - compiled.num_compiled}

    def wait_for_compilation(self, timeout: float | None = None) -> bool:
        """Blocks until every program is compiled (see `EngineConfig.background_compilation`)
        or `timeout` seconds passed; returns whether all are."""
        return self.runner.compiled.wait(timeout)

    # -- stats ---------------------------------------------------------------------------
    def block_states(self) -> bytearray:
        """[L - 1] each KV block's state (core/block_pool.py: FREE, CACHED, USED, SHARED);
        O(L), for the dashboard's block map; any thread may read it (a snapshot the engine
        thread may be changing: a block can show the state of the step before)."""
        return self.scheduler.kv_cache_manager.block_pool.block_states()

    def get_stats(self) -> dict[str, float]:
        kv = self.scheduler.kv_cache_manager
        return {
            "num_running": self.scheduler.num_running,
            "num_waiting": self.scheduler.num_waiting,
            "kv_cache_usage": kv.usage,
            "prefix_cache_queries": kv.prefix_cache_queries,
            "prefix_cache_hits": kv.prefix_cache_hits,
            "num_preemptions": self.scheduler.num_preemptions,
            "num_compilations": self.compilations.count + self.step_compilations.count,
            "num_compilations_after_warm_up": self.step_compilations.count,
            **self.compilation_stats(),
            "prompt_tokens": self.num_prompt_tokens,
            "generation_tokens": self.num_generation_tokens,
        }
