"""The step programs compiled ahead of time, in stages, the later ones in the background.

`CompiledPrograms` owns one XLA executable per program a step calls: `forward` per
(T, B) bucket pair, each sampler variant per B, prompt logprobs per T. They are compiled
from abstract arguments (`jax.jit(...).lower(...).compile()`): nothing runs, and with the
persistent compilation cache a later start reads them from disk (with an
`ExecutableCache`, as executables, without tracing them again). Compilation follows
`runner.buckets.compile_stages`; `capacity` is the (T, B) rectangle finished so far, published
only once every program in it exists, and the engine keeps its steps inside it. The first
stage (the smallest buckets, with only the sampler's EARLY_VARIANTS: the others run as
`penalties` until the second stage, the same rectangle, adds them) compiles before the
engine serves; the rest at once or in a daemon thread named
`COMPILE_THREAD` (which `testing.forbid_compilation` lets compile). The step path only looks
executables up, so it never compiles.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import logging
import threading
import time
import weakref
from collections.abc import Callable

import jax
import numpy as np

from jaxserve.runner.buckets import compile_stages, reachable_pairs
from jaxserve.runner.executable_cache import ExecutableCache
from jaxserve.model.attention_metadata import AttentionMetadata
from jaxserve.runner.programs import Programs
from jaxserve.runner.sampling_rows import EARLY_VARIANTS, SAMPLER_VARIANTS, dummy_tensors

logger = logging.getLogger(__name__)

COMPILE_THREAD = "jaxserve-compile"


@dataclasses.dataclass(frozen=True)
class StepSignature:
    """What the abstract arguments of the step programs are made of."""

    params: list  # [jax.ShapeDtypeStruct] of the param leaves, with their shardings
    kv_caches: object  # the pools' pytree of jax.ShapeDtypeStruct, with their shardings
    previous_ids: jax.ShapeDtypeStruct  # [R] int32: a sampler's padded ids (async steps)
    input_sharding: object  # of every host input: None (one device) or replicated on a mesh
    max_blocks: int  # block-table width
    vocab_size: int
    max_model_len: int


class CompiledPrograms:
    def __init__(self, programs: Programs, signature: StepSignature,
                 token_buckets: tuple[int, ...], seq_buckets: tuple[int, ...], *,
                 mesh=None, track: Callable[[], contextlib.AbstractContextManager] | None = None,
                 cache: ExecutableCache | None = None):
        self._programs, self._sig, self._mesh = programs, signature, mesh
        self.cache = cache  # executables on disk (executable_cache.py), or None
        self._track = track or contextlib.nullcontext  # counts compilations (the engine's)
        self._ladders = (token_buckets, seq_buckets)
        # (T cap, B cap, sampler variants): the first rectangle twice, its samplers in two parts
        stages = compile_stages(token_buckets, seq_buckets)
        self._stages = ([(*stages[0], EARLY_VARIANTS)]
                        + [(t, b, SAMPLER_VARIANTS) for t, b in stages])
        pairs = reachable_pairs(token_buckets, seq_buckets)
        names = ([f"forward {t} {b}" for t, b in pairs]
                 + [f"sample {v} {b}" for b in sorted({b for _, b in pairs})
                    for v in SAMPLER_VARIANTS]
                 + [f"prompt_logprobs {t}" for t in sorted({t for t, _ in pairs})])
        self.num_programs = len(names)
        if cache is not None:
            cache.use_for(names)
        self._forward: dict[tuple[int, int], object] = {}
        self._sample: dict[tuple[str, int], object] = {}
        self._prompt_logprobs: dict[int, object] = {}
        self._next_stage = 0
        # (largest T bucket, largest B bucket) whose every program is compiled; None at first
        self.capacity: tuple[int, int] | None = None
        self.compile_seconds = 0.0
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.error: BaseException | None = None  # what stopped the background compilation

    # -- lookups (the step path) ---------------------------------------------------------
    def forward(self, num_tokens: int, num_seqs: int):
        return self._get(self._forward, (num_tokens, num_seqs), "forward")

    def sample(self, variant: str, num_seqs: int):
        return self._get(self._sample, (variant, num_seqs), "sampler")

    def sample_variants(self, num_seqs: int) -> tuple[str, ...]:
        """The sampler variants compiled for `num_seqs` (B) rows."""
        return tuple(v for v in SAMPLER_VARIANTS if (v, num_seqs) in self._sample)

    def prompt_logprobs(self, num_tokens: int):
        return self._get(self._prompt_logprobs, num_tokens, "prompt-logprobs")

    @staticmethod
    def _get(table: dict, key, what: str):
        try:
            return table[key]
        except KeyError:
            raise RuntimeError(f"the {what} program for buckets {key} is not compiled (yet): "
                               "a step must stay inside CompiledPrograms.capacity") from None

    @property
    def num_compiled(self) -> int:
        return len(self._forward) + len(self._sample) + len(self._prompt_logprobs)

    @property
    def done(self) -> bool:
        return self._next_stage == len(self._stages)

    # -- compiling -----------------------------------------------------------------------
    def compile_next_stage(self) -> bool:
        """Compiles the next stage's programs and publishes its capacity; False when all
        stages are done."""
        if self.done:
            return False
        t_cap, b_cap, variants = self._stages[self._next_stage]
        start = time.perf_counter()
        mesh = contextlib.nullcontext() if self._mesh is None else jax.set_mesh(self._mesh)
        with self._track(), mesh:
            tokens, seqs = self._ladders
            for t, b in reachable_pairs(tuple(t for t in tokens if t <= t_cap),
                                        tuple(b for b in seqs if b <= b_cap)):
                if (t, b) not in self._forward:
                    self._forward[t, b] = self._compile_forward(t, b)
                for variant in variants:
                    if (variant, b) not in self._sample:
                        hidden_last = self._forward[t, b].out_info[0]  # [B, D]
                        self._sample[variant, b] = self._compile_sample(variant, b, hidden_last)
                if t not in self._prompt_logprobs:
                    hidden_all = self._forward[t, b].out_info[1]  # [T, D]
                    self._prompt_logprobs[t] = self._compile_prompt_logprobs(t, hidden_all)
        self.compile_seconds += time.perf_counter() - start
        self._next_stage += 1
        self.capacity = (t_cap, b_cap)  # only now may steps use the new buckets
        return True

    def compile_all(self, progress: Callable[[int], None] | None = None) -> None:
        """Compiles every remaining stage here; `progress(num_compiled)` after each."""
        while self.compile_next_stage():
            if progress is not None:
                progress(self.num_compiled)

    def start_background(self) -> None:
        """Compiles the remaining stages in a daemon thread; `wait()` joins it."""
        if self.done or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._background, name=COMPILE_THREAD,
                                        daemon=True)
        self._thread.start()
        # A daemon thread still inside XLA when the interpreter finalizes aborts the process:
        # at exit, let the stage in progress finish and start no other.
        atexit.register(_stop_at_exit, weakref.ref(self))

    def _background(self) -> None:
        try:
            while not self._stop.is_set() and self.compile_next_stage():
                logger.debug("compiled up to buckets T=%d B=%d (%d/%d programs)",
                             *self.capacity, self.num_compiled, self.num_programs)
            if self.done:
                logger.info("all %d programs compiled (%.1f s)", self.num_programs,
                            self.compile_seconds)
                self._store_unstored()
        except BaseException as e:  # the engine keeps serving inside the capacity it has
            self.error = e
            logger.exception("background compilation stopped at buckets %s", self.capacity)

    def _store_unstored(self) -> None:
        """Writes the executables JAX's cache supplied (`ExecutableCache.store_unstored`):
        after new sources, the next start then loads every program."""
        if self.cache is None or not self.cache.num_unstored:
            return
        start, count = time.perf_counter(), self.cache.num_unstored
        mesh = contextlib.nullcontext() if self._mesh is None else jax.set_mesh(self._mesh)
        with self._track(), mesh:
            stored = self.cache.store_unstored(self._stop.is_set)
        logger.info("stored %d of %d programs JAX's compilation cache had as executables "
                    "for the next start (%.1f s)", stored, count, time.perf_counter() - start)

    def wait(self, timeout: float | None = None) -> bool:
        """Blocks until every stage is compiled (or the background thread failed, or
        `timeout` seconds passed); returns whether all are."""
        if self._thread is not None:
            self._thread.join(timeout)
        return self.done

    def stop(self) -> None:
        """Stops the background compilation after its current stage."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    # -- one program ---------------------------------------------------------------------
    def _inputs(self, *shape) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(shape, np.int32, sharding=self._sig.input_sharding)

    def _compile_forward(self, t: int, b: int):
        sig = self._sig
        md = AttentionMetadata(slot_mapping=self._inputs(t),
                               block_tables=self._inputs(b, sig.max_blocks),
                               seq_lens=self._inputs(b), query_start_loc=self._inputs(b + 1),
                               logits_indices=self._inputs(b))
        return self._compile(f"forward {t} {b}", lambda: self._programs.forward.lower(
            sig.params, sig.kv_caches, self._inputs(t), self._inputs(t), md, sig.previous_ids))

    def _compile_sample(self, variant: str, b: int, hidden):
        sig = self._sig
        tensors = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sig.input_sharding),
            dummy_tensors(variant, b, vocab_size=sig.vocab_size,
                          max_model_len=sig.max_model_len))
        return self._compile(f"sample {variant} {b}", lambda: self._programs.sample[
            variant].lower(sig.params, hidden, self._inputs(), tensors))

    def _compile_prompt_logprobs(self, t: int, hidden):
        return self._compile(f"prompt_logprobs {t}", lambda: self._programs.prompt_logprobs
                             .lower(self._sig.params, hidden, self._inputs(t)))

    def _compile(self, program: str, lower: Callable[[], jax.stages.Lowered]):
        if self.cache is None:
            return lower().compile()
        return self.cache.get_or_compile(program, lower)


def _stop_at_exit(ref: weakref.ref) -> None:
    programs = ref()
    if programs is not None:
        programs.stop()
