"""The model runner: params, the KV pool and the compiled programs; `execute()` per step.

Programs: one forward per reachable (token bucket, sequence bucket) pair, the KV pools
donated; one sampler per (sequence bucket, variant) that applies the LM head to each
sequence's last hidden state and samples; one prompt-logprobs program per token bucket.
`compile_programs()` compiles them ahead of time (`CompiledPrograms`): the smallest buckets
before it returns, the rest at once or in the background; `capacity` says which buckets a
step may use now. A step only calls compiled executables (it never compiles), with one
host-to-device put of its inputs (two when its sampler is deferred, `dispatch(
defer_sampling=True)` then `sample()`: until the step before is collected, or until the
grammar mask rows are filled while the forward runs) and one device-to-host get of its
results. With
`tensor_parallel_size` > 1, params and pools shard over a ("data", "model") mesh, inputs are
replicated on it, and every program runs under `jax.set_mesh` (attention uses shard_map).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from concurrent.futures import Future, ThreadPoolExecutor

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from jaxserve.config import CacheConfig, ModelConfig, SchedulerConfig
from jaxserve.runner.buckets import seq_buckets, token_buckets
from jaxserve.core.scheduler_output import ModelRunnerOutput, SchedulerOutput, TokenLogprobs
from jaxserve.model.sampling import sampler
from jaxserve.model.attention_metadata import AttentionMetadata
from jaxserve.model.loading.loader import load_model
from jaxserve.model.ops import select_ops
from jaxserve.parallel.sharding import make_mesh
from jaxserve.parallel.tensor_parallel import tp_model_config
from jaxserve.runner.input_batch import InputBatch, StepInputs
from jaxserve.runner.kv_cache import allocate_kv_caches, plan_kv_cache
from jaxserve.runner.compiled_programs import CompiledPrograms, StepSignature
from jaxserve.runner.executable_cache import ExecutableCache
from jaxserve.runner.programs import make_programs
from jaxserve.runner.token_bitmask import step_bitmask

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PendingStep:
    """A step whose programs are launched (`dispatch`) and whose results are not read yet.
    With async scheduling the step after it is dispatched meanwhile, its tokens linked to
    this one's samples (`sample_indices`, `next_ids`; see sample_links.py)."""

    out: SchedulerOutput
    inputs: StepInputs | None  # None: nothing was scheduled, nothing runs
    sampled: sampler.SamplerOutput | None  # device arrays, still being computed
    prompt_req: list[int]      # indices in B of the requests wanting prompt logprobs
    prompt_result: tuple | None  # their device arrays, or None
    # [R] int32 on the device: the sampled ids padded, the next step's `previous_ids`
    next_ids: jax.Array | None = None
    # [B, D] the forward's last hidden states while the sampler waits (`defer_sampling`)
    hidden_last: jax.Array | None = None

    def sample_indices(self) -> dict[str, int]:
        """req_id -> index in this step's batch of each request it samples for: the i of
        `link_to_sample(i)` in a step dispatched before this one is collected."""
        if self.inputs is None:
            return {}
        return {r: i for i, r in enumerate(self.inputs.req_ids) if self.out.samples(r)}


class ModelRunner:
    def __init__(self, model_config: ModelConfig, cache_config: CacheConfig,
                 scheduler_config: SchedulerConfig, *, attention_backend: str = "reference",
                 seed: int = 0, tensor_parallel_size: int = 1,
                 track_compilation=None, executable_cache_dir: str | None = None,
                 load_format: str = "auto", faults=None):
        self.model_config = model_config
        self.faults = faults  # core.faults.FaultInjector (tests only) or None
        tp = tensor_parallel_size
        self.mesh = make_mesh(tp) if tp > 1 else None
        # Replicated inputs on the mesh; None: the default device, as without TP.
        self.input_sharding = (None if self.mesh is None
                               else NamedSharding(self.mesh, PartitionSpec()))
        pool_config = tp_model_config(model_config, tp)  # K' KV head slots
        with ThreadPoolExecutor(max_workers=1) as pool:
            # On the CPU the pool's size does not depend on the weights: its zeroing (first
            # touch of ~2 GiB: seconds) overlaps the model's loading. Elsewhere it sizes
            # from the memory the weights leave free, so it waits for them.
            early = jax.default_backend() == "cpu" and jax.process_count() == 1
            if early:
                kv_caches = self._plan_and_allocate(pool, pool_config, cache_config, tp)
            # the kernels are chosen here, once, for the model's lifetime
            self.ops = select_ops(attention_backend, tensor_parallel_size=tp)
            model = load_model(model_config.model_dir, model_config, mesh=self.mesh,
                               ops=self.ops, load_format=load_format)
            if not early:
                kv_caches = self._plan_and_allocate(pool, pool_config, cache_config, tp)
            self.graphdef, self.params = nnx.split(model)
            self.ops.register_kernels(self.params)
            self.kv_caches = kv_caches.result()
        self.token_buckets = token_buckets(scheduler_config.max_num_batched_tokens)
        self.seq_buckets = seq_buckets(scheduler_config.max_num_seqs)
        self.batch = InputBatch(
            max_num_seqs=scheduler_config.max_num_seqs, max_model_len=model_config.max_model_len,
            block_size=cache_config.block_size, vocab_size=model_config.vocab_size,
            token_buckets=self.token_buckets, seq_buckets=self.seq_buckets, seed=seed)
        # the programs take the params as this flat list (see make_programs)
        self.param_leaves = jax.tree.leaves(self.params)
        self.programs = make_programs(self.graphdef, jax.tree.structure(self.params),
                                      max_num_seqs=self.seq_buckets[-1], mesh=self.mesh)
        # [R] forward's previous_ids when no step is in flight (no input id is a link);
        # committed like the samplers' outputs, which jit would otherwise tell apart
        self._no_previous = jax.device_put(
            np.zeros(self.seq_buckets[-1], np.int32),
            jax.devices()[0] if self.mesh is None else self.input_sharding)
        like = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding)  # noqa: E731
        signature = StepSignature(
            params=[like(a) for a in self.param_leaves], kv_caches=jax.tree.map(like, self.kv_caches),
            previous_ids=like(self._no_previous), input_sharding=self.input_sharding,
            max_blocks=self.batch.max_blocks, vocab_size=model_config.vocab_size,
            max_model_len=model_config.max_model_len)
        cache = None
        if executable_cache_dir is not None and jax.process_count() == 1:
            cache = ExecutableCache(executable_cache_dir, repr((
                model_config, attention_backend, tp, self.seq_buckets[-1],
                f"kv_dtype={self.kv_spec.kv_dtype}", signature)))
        self.compiled = CompiledPrograms(self.programs, signature, self.token_buckets,
                                         self.seq_buckets, mesh=self.mesh,
                                         track=track_compilation, cache=cache)

    def _plan_and_allocate(self, pool: ThreadPoolExecutor, pool_config: ModelConfig,
                           cache_config: CacheConfig, tp: int) -> Future:
        """Sizes the KV pools (`kv_spec`) and allocates them in `pool`'s thread."""
        self.kv_spec = plan_kv_cache(pool_config, cache_config, num_shards=tp)
        return pool.submit(allocate_kv_caches, pool_config, self.kv_spec, mesh=self.mesh)

    @property
    def backend(self) -> str:
        """The platform the programs run on: "cpu", "gpu", "tpu"."""
        return jax.default_backend()

    @property
    def num_blocks(self) -> int:
        return self.kv_spec.num_blocks

    def _put(self, tree):
        """Host arrays -> device, replicated over the mesh under TP.

        Across processes every host holds the same inputs (the step broadcast), so each
        builds its own shards (`make_array_from_callback`): `device_put` would check that
        the hosts agree with a collective (and one compilation) per input shape.
        """
        if jax.process_count() == 1:
            return jax.device_put(tree, self.input_sharding)
        return jax.tree.map(lambda x: jax.make_array_from_callback(
            np.shape(x), self.input_sharding, lambda index: np.asarray(x)[index]), tree)

    def _under_mesh(self):
        """The context every program is called in: the mesh's, so that shard_map finds it."""
        return contextlib.nullcontext() if self.mesh is None else jax.set_mesh(self.mesh)

    # -- compilation ---------------------------------------------------------------------
    @property
    def capacity(self) -> tuple[int, int] | None:
        """(largest token bucket, largest sequence bucket) a step may use now."""
        return self.compiled.capacity

    def compile_programs(self, *, background: bool = False, progress: bool = True) -> None:
        """Compiles the smallest buckets' programs, then the rest: in a background thread, or
        here (tqdm bar) before returning."""
        total = self.compiled.num_programs
        with tqdm(total=total, desc="Compiling", disable=not progress) as bar:
            self.compiled.compile_next_stage()
            bar.update(self.compiled.num_compiled)
            if background:
                self.compiled.start_background()
                return
            self.compiled.compile_all(lambda n: bar.update(n - bar.n))

    # -- one step ----------------------------------------------------------------------
    def execute(self, out: SchedulerOutput) -> ModelRunnerOutput:
        return self.collect(self.dispatch(out))

    def dispatch(self, out: SchedulerOutput, in_flight: PendingStep | None = None, *,
                 defer_sampling: bool = False) -> PendingStep:
        """Prepares the step's inputs and launches its programs without waiting for them.

        `in_flight`: a dispatched step not collected yet (async scheduling; `out` is then
        the ahead plan); the tokens it samples are this step's inputs where `out` schedules
        them: sample links, resolved on the device from its `next_ids`.
        `defer_sampling`: launch the forward only; `sample()` launches the sampler once
        `in_flight` is collected (its tokens are then known on the host: penalties read
        them, a grammar's mask follows them) or the grammar masks are filled.
        """
        samples_in_flight = previous_ids = None
        if in_flight is not None and in_flight.inputs is not None:
            samples_in_flight = in_flight.sample_indices()
            previous_ids = in_flight.next_ids
        if out.total_num_scheduled_tokens == 0:
            self.batch.prepare(out)  # still applies finished/preempted deltas
            return PendingStep(out, None, None, [], None)
        inputs = self.batch.prepare(out, samples_in_flight)
        md = AttentionMetadata(inputs.slot_mapping, inputs.block_tables, inputs.seq_lens,
                               inputs.query_start_loc, inputs.logits_indices)
        variant, *sampling = (None, None, None) if defer_sampling else self._sampling_inputs(
            out, inputs)
        # one host-to-device transfer for the whole step (the sampler's too, unless deferred)
        input_ids, positions, md, sampling = self._put(
            (inputs.input_ids, inputs.positions, md, sampling))
        prompt_req = self._prompt_logprob_requests(out, inputs)
        prompt_result = None
        num_tokens = len(inputs.input_ids)  # the step's buckets
        if self.faults is not None:
            self.faults.hit("forward")
        with self._under_mesh():
            hidden_last, hidden_all, self.kv_caches = self.compiled.forward(
                num_tokens, len(inputs.seq_lens))(
                self.param_leaves, self.kv_caches, input_ids, positions, md,
                self._no_previous if previous_ids is None else previous_ids)
            if prompt_req:
                targets = self._put(self._prompt_targets(inputs, inputs.rows))
                prompt_result = self.compiled.prompt_logprobs(num_tokens)(
                    self.param_leaves, hidden_all, targets)
        pending = PendingStep(out, inputs, None, prompt_req, prompt_result,
                              hidden_last=hidden_last)
        if defer_sampling:
            return pending
        return self._launch_sampler(pending, out, variant, *sampling)

    def sample(self, pending: PendingStep, out: SchedulerOutput | None = None) -> PendingStep:
        """Launches the sampler of a step dispatched with `defer_sampling` (after the step
        before it is collected); `out`: its SchedulerOutput with the grammar mask rows
        filled since (None: `pending.out`)."""
        out = pending.out if out is None else out
        if pending.inputs is None:
            return dataclasses.replace(pending, out=out)
        variant, *sampling = self._sampling_inputs(out, pending.inputs)
        return self._launch_sampler(pending, out, variant, *self._put(sampling))

    def _sampling_inputs(self, out: SchedulerOutput, inputs: StepInputs):
        """(variant, num_seqs, tensors) on the host: the sampler's inputs for the step."""
        rows = inputs.rows
        num_padded_seqs = len(inputs.seq_lens)
        # each row's history length; a token being sampled in flight counts (seq_lens)
        history = np.maximum(self.batch.num_tokens[rows], inputs.seq_lens[:len(rows)])
        bitmask = step_bitmask(out, inputs.req_ids, num_padded_seqs,
                               self.model_config.vocab_size)  # [B, W] int32 or None
        variant, tensors = self.batch.sampling.gather(
            rows, history, self.batch.token_ids, num_padded_seqs, bitmask,
            runnable=self.compiled.sample_variants(num_padded_seqs))
        return variant, np.int32(len(inputs.req_ids)), tensors  # the rest of B is padding

    def _launch_sampler(self, pending: PendingStep, out: SchedulerOutput, variant: str,
                        num_seqs: jax.Array, tensors) -> PendingStep:
        with self._under_mesh():
            if self.faults is not None:
                self.faults.hit("sampler")
            sampled, next_ids = self.compiled.sample(variant, len(pending.inputs.seq_lens))(
                self.param_leaves, pending.hidden_last, num_seqs, tensors)
        return dataclasses.replace(pending, out=out, sampled=sampled, next_ids=next_ids,
                                   hidden_last=None)

    def collect(self, pending: PendingStep) -> ModelRunnerOutput:
        """Waits for a dispatched step: its one device-to-host transfer, then the output."""
        if pending.inputs is None:
            return ModelRunnerOutput(sampled_token_ids={})
        sampled, prompt_result = jax.device_get((pending.sampled, pending.prompt_result))
        self.batch.append_sampled(pending.inputs, pending.out.sampling_req_ids, sampled.token_ids)
        return self._runner_output(pending.out, pending.inputs, sampled, pending.prompt_req,
                                   prompt_result)

    # -- helpers -----------------------------------------------------------------------
    def _prompt_logprob_requests(self, out: SchedulerOutput, inputs: StepInputs) -> list[int]:
        """Indices (in B) of requests wanting prompt logprobs whose chunk is in the prompt."""
        wanted = []
        for i, req_id in enumerate(inputs.req_ids):
            if self.batch.params_of(req_id).prompt_logprobs is None:
                continue
            row = self.batch.row_of[req_id]
            if self.batch.num_computed[row] < self.batch.sampling.prompt_lens[row] - 1:
                wanted.append(i)
        return wanted

    def _prompt_targets(self, inputs: StepInputs, rows: np.ndarray) -> np.ndarray:
        """[T] the next prompt token of each token (0 past the prompt; those are unused)."""
        targets = np.zeros(len(inputs.input_ids), np.int32)
        qsl, n = inputs.query_start_loc, inputs.num_tokens
        token_req = np.repeat(np.arange(len(rows)), np.diff(qsl[:len(rows) + 1]))
        next_pos = np.minimum(inputs.positions[:n] + 1, self.batch.token_ids.shape[1] - 1)
        targets[:n] = self.batch.token_ids[rows[token_req], next_pos]
        return targets

    def _runner_output(self, out: SchedulerOutput, inputs: StepInputs,
                       sampled: sampler.SamplerOutput, prompt_req: list[int],
                       prompt_result) -> ModelRunnerOutput:
        token_ids = sampled.token_ids
        sampled_ids, logprobs = {}, {}
        for i, req_id in enumerate(inputs.req_ids):
            if not out.samples(req_id) or not self.batch.knows(req_id):
                continue  # gone since dispatch (async scheduling): nobody wants the token
            sampled_ids[req_id] = [int(token_ids[i])]
            num_top = self.batch.params_of(req_id).logprobs
            if num_top is not None:
                logprobs[req_id] = [TokenLogprobs(
                    int(token_ids[i]), float(sampled.logprobs[i]), int(sampled.ranks[i]),
                    tuple(sampled.top_ids[i, :num_top].tolist()),
                    tuple(sampled.top_logprobs[i, :num_top].tolist()))]
        prompt_logprobs = {}
        for i in prompt_req:
            req_id = inputs.req_ids[i]
            row = inputs.rows[i]
            if self.batch.generation[row] != inputs.generations[i]:
                continue  # gone since dispatch
            num_top = self.batch.params_of(req_id).prompt_logprobs
            prompt_len = self.batch.sampling.prompt_lens[row]
            start, end = inputs.query_start_loc[i], inputs.query_start_loc[i + 1]
            entries = []
            for t in range(start, end):
                if inputs.positions[t] + 1 >= prompt_len:
                    break
                target = int(self.batch.token_ids[row, inputs.positions[t] + 1])
                lp, rank, top_ids, top_lps = (x[t] for x in prompt_result)
                entries.append(TokenLogprobs(target, float(lp), int(rank),
                                             tuple(top_ids[:num_top].tolist()),
                                             tuple(top_lps[:num_top].tolist())))
            prompt_logprobs[req_id] = entries
        return ModelRunnerOutput(sampled_token_ids=sampled_ids, logprobs=logprobs or None,
                                 prompt_logprobs=prompt_logprobs or None)
