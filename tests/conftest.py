"""Shared fixtures: tiny random HF checkpoints and paged token batches.

`tiny_checkpoint(name)` saves (once per session) a 2-layer model written by transformers +
torch with `save_pretrained`, weights re-drawn so norms, biases and attention all matter.
`paged_step(...)` lays out one engine step: a ragged token batch padded to (T, B) buckets,
with each sequence's tokens in the blocks its block table names.
"""

import os

# Before jax starts: one BLAS thread, and 8 CPU devices for the tensor-parallel tests.
os.environ.setdefault("OMP_NUM_THREADS", "1")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()
from jaxserve.runner.cpu_flags import apply_preferred_cpu_flags  # noqa: E402

apply_preferred_cpu_flags()  # test the CPU configuration the engine serves with

import numpy as np  # noqa: E402
import pytest  # noqa: E402

TINY_CHECKPOINTS = ("llama", "qwen2", "mistral", "qwen3", "llama_head_dim", "llama_hd64",
                    "qwen2_8heads", "mixtral", "qwen2_moe", "deepseek_v2",
                    "deepseek_v2_lite")


def tiny_hf_config(name: str):
    """The transformers config of one tiny checkpoint: each covers a family and a RoPE type."""
    import transformers

    common = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)
    if name == "llama":  # untied, llama3 RoPE
        return transformers.LlamaConfig(**common, tie_word_embeddings=False, rope_parameters=dict(
            rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0,
            high_freq_factor=4.0, original_max_position_embeddings=32))
    if name == "qwen2":  # q/k/v biases, tied, yarn RoPE
        return transformers.Qwen2Config(**common, tie_word_embeddings=True, rope_parameters=dict(
            rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=64))
    if name == "mistral":  # sliding window, GQA 4:1, linear RoPE
        return transformers.MistralConfig(**{**common, "num_key_value_heads": 1},
                                          sliding_window=24, rope_parameters=dict(
                                              rope_type="linear", rope_theta=10000.0, factor=2.0))
    if name == "qwen3":  # q/k RMSNorm, head_dim 32 != 64 / 4
        return transformers.Qwen3Config(**common, head_dim=32, tie_word_embeddings=False,
                                        rope_parameters=dict(rope_type="default",
                                                             rope_theta=1e6))
    if name == "llama_head_dim":  # head_dim 48 != 64 / 2, all biases, tied
        return transformers.LlamaConfig(**{**common, "num_attention_heads": 2,
                                           "num_key_value_heads": 1},
                                        head_dim=48, attention_bias=True, mlp_bias=True,
                                        tie_word_embeddings=True)
    if name == "llama_hd64":  # head_dim 64, which the Pallas kernels accept; GQA 2:1
        return transformers.LlamaConfig(**{**common, "num_attention_heads": 2,
                                           "num_key_value_heads": 1}, head_dim=64)
    if name == "qwen2_8heads":  # 8 query heads, 2 KV heads: splits over a mesh of 8
        return transformers.Qwen2Config(**{**common, "num_attention_heads": 8},
                                        tie_word_embeddings=True)
    if name == "mixtral":  # sparse MoE: 4 experts, top-2
        return transformers.MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2,
                                          tie_word_embeddings=False)
    if name == "qwen2_moe":  # 4 experts top-2 + gated shared expert; layer 1 dense
        return transformers.Qwen2MoeConfig(**common, num_experts=4, num_experts_per_tok=2,
                                           moe_intermediate_size=48,
                                           shared_expert_intermediate_size=96,
                                           norm_topk_prob=False, mlp_only_layers=[1],
                                           tie_word_embeddings=False)
    if name.startswith("deepseek_v2"):  # MLA + DeepSeekMoE: layer 0 dense, 1-2 MoE
        mla = dict(common, num_hidden_layers=3, num_key_value_heads=4, intermediate_size=96,
                   moe_intermediate_size=32, kv_lora_rank=32, qk_nope_head_dim=16,
                   qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8,
                   num_experts_per_tok=2, first_k_dense_replace=1, tie_word_embeddings=False)
        if name == "deepseek_v2":  # q LoRA, YaRN with mscale, group-limited routing
            return transformers.DeepseekV2Config(
                **mla, q_lora_rank=24, n_shared_experts=2, topk_method="group_limited_greedy",
                n_group=4, topk_group=2, routed_scaling_factor=1.5,
                rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0,
                                     original_max_position_embeddings=64, mscale=0.707,
                                     mscale_all_dim=0.707, beta_fast=32, beta_slow=1))
        # V2-Lite's shape: no q LoRA, greedy top-k, one shared expert, plain RoPE
        return transformers.DeepseekV2Config(
            **mla, q_lora_rank=None, n_shared_experts=1, topk_method="greedy", n_group=1,
            topk_group=1, routed_scaling_factor=1.0,
            rope_parameters=dict(rope_type="default", rope_theta=10000.0))
    raise ValueError(f"unknown tiny checkpoint {name!r}; known: {TINY_CHECKPOINTS}")


def save_tiny_checkpoint(name: str, path, *, dtype: str = "float32",
                         max_shard_size: str | None = None, with_tokenizer: bool = False):
    """Builds the HF model of `name` with fixed random weights and saves it at `path`.

    `with_tokenizer` adds the test BPE tokenizer (320 tokens, EOS id 0) and widens the model
    to that vocabulary and a 512-token context, for tests that go through text.
    """
    import torch
    import transformers

    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(TINY_CHECKPOINTS.index(name))
    config = tiny_hf_config(name)
    if with_tokenizer:
        from jaxserve.testing.tokenizer import save_tokenizer

        tokenizer = save_tokenizer(path)
        config.vocab_size, config.max_position_embeddings = len(tokenizer), 512
        config.eos_token_id = config.pad_token_id = tokenizer.eos_token_id
        config.bos_token_id = None
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if "norm" in param_name:
                param.copy_(1.0 + 0.3 * noise)  # norms that are not all ones
            elif param_name.endswith("bias"):
                param.copy_(0.3 * noise)
            else:
                param.copy_(0.15 * noise)  # big enough that attention is far from uniform
    model.to(getattr(torch, dtype))
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(path, **kwargs)
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """`tiny_checkpoint(name, *, dtype="float32", max_shard_size=None, with_tokenizer=False)
    -> Path`, built once per session."""
    built = {}

    def get(name: str, *, dtype: str = "float32", max_shard_size: str | None = None,
            with_tokenizer: bool = False):
        key = (name, dtype, max_shard_size, with_tokenizer)
        if key not in built:
            path = tmp_path_factory.mktemp(f"{name}-{dtype}-{max_shard_size or 'single'}")
            built[key] = save_tiny_checkpoint(name, path, dtype=dtype,
                                              max_shard_size=max_shard_size,
                                              with_tokenizer=with_tokenizer)
        return built[key]

    return get


def make_paged_step(tokens: list[list[int]],        # per sequence: the tokens scheduled now
                    num_computed: list[int],         # per sequence: tokens already in the pool
                    block_tables: list[list[int]],   # per sequence: its block ids
                    *, block_size: int, num_tokens: int, num_seqs: int, max_blocks: int):
    """(input_ids [T], positions [T], AttentionMetadata) of one step, padded to T and B."""
    from jaxserve.model.attention_metadata import AttentionMetadata

    input_ids = np.zeros(num_tokens, np.int32)
    positions = np.zeros(num_tokens, np.int32)
    slots = np.arange(num_tokens, dtype=np.int32) % block_size  # padding: null block 0
    tables = np.zeros((num_seqs, max_blocks), np.int32)
    seq_lens = np.zeros(num_seqs, np.int32)
    query_start_loc = np.zeros(num_seqs + 1, np.int32)
    logits_indices = np.zeros(num_seqs, np.int32)
    start = 0
    for b, (new, done, table) in enumerate(zip(tokens, num_computed, block_tables)):
        pos = np.arange(done, done + len(new))
        input_ids[start:start + len(new)] = new
        positions[start:start + len(new)] = pos
        slots[start:start + len(new)] = np.asarray(table)[pos // block_size] * block_size \
            + pos % block_size
        tables[b, :len(table)] = table
        seq_lens[b] = done + len(new)
        start += len(new)
        logits_indices[b] = start - 1
        query_start_loc[b + 1] = start
    query_start_loc[len(tokens) + 1:] = start  # padding sequences: no queries
    metadata = AttentionMetadata(slot_mapping=slots, block_tables=tables, seq_lens=seq_lens,
                                 query_start_loc=query_start_loc, logits_indices=logits_indices)
    return input_ids, positions, metadata


@pytest.fixture(scope="session")
def paged_step():
    """The `make_paged_step` function, for tests that run the model through the pool."""
    return make_paged_step


@pytest.fixture(scope="session", autouse=True)
def shared_compilation_cache(tmp_path_factory):
    """One JAX persistent compilation cache for the whole session: engines built from the
    same tiny checkpoint and budgets compile each program once and read it afterwards. Its
    path: servers the tests start use it too, with this process's XLA_FLAGS (the cache keys
    include them), so they read what the in-process engines compiled."""
    from jaxserve.engine.llm_engine import enable_persistent_cache

    if os.environ.get("PYTEST_XDIST_WORKER"):  # one directory for every worker's session
        path = tmp_path_factory.getbasetemp().parent / "jax-compilation-cache"
        path.mkdir(exist_ok=True)
    else:
        path = tmp_path_factory.mktemp("jax-compilation-cache")
    enable_persistent_cache(str(path))
    return path


# Small budgets keep compilation to a handful of programs: T buckets 16..128, B buckets 8,
# 16; every bucket compiled before a test steps (background compilation has its own tests).
ENGINE_KWARGS = dict(max_num_seqs=16, max_num_batched_tokens=128, progress=False,
                     background_compilation=False)


@pytest.fixture(scope="session")
def engine_kwargs():
    return dict(ENGINE_KWARGS)


@pytest.fixture(scope="session")
def engine_checkpoint(tiny_checkpoint):
    """`engine_checkpoint(family)`: a tiny checkpoint with tokenizer, 320-token vocab."""
    return lambda family="qwen2": tiny_checkpoint(family, with_tokenizer=True)


@pytest.fixture(scope="session")
def qwen2_llm(engine_checkpoint):
    """One engine for every test that needs a plain qwen2 engine with ENGINE_KWARGS: tests
    read its metrics as differences and leave nothing running or changed."""
    from jaxserve import LLM

    return LLM(str(engine_checkpoint("qwen2")), **ENGINE_KWARGS)


@pytest.fixture(scope="session")
def thinking_llm(engine_checkpoint, tmp_path_factory):
    """The tiny qwen2 engine under reasoning_parser="deepseek_r1", its tokenizer with
    `<think>` and `</think>` as tokens of their own (the programs are qwen2_llm's)."""
    import shutil

    from jaxserve import LLM
    from jaxserve.testing.tokenizer import save_thinking_tokenizer

    path = tmp_path_factory.mktemp("thinking") / "model"
    shutil.copytree(engine_checkpoint("qwen2"), path)
    save_thinking_tokenizer(path)
    return LLM(str(path), reasoning_parser="deepseek_r1", **ENGINE_KWARGS)


# The paged parity run the model-family tests share: ragged prompts of these lengths prefill
# together in one step on shuffled blocks of NaN-poisoned pools, then decode a few steps.
PARITY_PROMPT_LENS = (1, 15, 17, 40)
PARITY_NUM_DECODE = 4


def parity_sequences(vocab: int = 256) -> list[np.ndarray]:
    """Per prompt: its tokens plus the PARITY_NUM_DECODE tokens fed while decoding."""
    rng = np.random.default_rng(0)
    return [rng.integers(3, vocab, n + PARITY_NUM_DECODE, dtype=np.int32)
            for n in PARITY_PROMPT_LENS]


def paged_logit_errors(path, sequences: list[np.ndarray], expected: list[np.ndarray],
                       ) -> np.ndarray:  # [prompt tokens + decoded tokens, V]
    """|logits - expected| of every prompt token (one ragged prefill, T = 128, B = 8) and of
    every decoded token (T = 8), float32, through the model's own pools (`layer_pool_shapes`)
    filled with NaN so that any read of an unwritten slot shows."""
    import jax
    import jax.numpy as jnp

    from jaxserve.config import ModelConfig
    from jaxserve.model.loading.loader import load_model
    from jaxserve.runner.kv_cache import layer_pool_shapes
    from jaxserve.testing.engine_step import engine_step

    block_size, num_blocks = 16, 24
    config = ModelConfig.from_pretrained(path, dtype="float32")
    model = load_model(path, config)
    free = list(np.random.default_rng(1).permutation(np.arange(1, num_blocks)))
    tables = [[int(free.pop()) for _ in range(-(-len(s) // block_size))] for s in sequences]
    layout = dict(block_size=block_size, num_seqs=8, max_blocks=max(map(len, tables)))
    kv_caches = tuple(tuple(jnp.full(shape, jnp.nan) for shape in
                            layer_pool_shapes(config, num_blocks, block_size))
                      for _ in range(config.num_layers))
    diffs = []
    with jax.default_matmul_precision("highest"):
        ids, positions, metadata = make_paged_step(
            [s[:n] for s, n in zip(sequences, PARITY_PROMPT_LENS)], [0] * len(sequences),
            tables, num_tokens=128, **layout)
        logits, kv_caches = engine_step(model, all_token_logits=True)(
            kv_caches, ids, positions, metadata)
        for b, n in enumerate(PARITY_PROMPT_LENS):
            start = metadata.query_start_loc[b]
            diffs.append(np.abs(np.asarray(logits)[start:start + n] - expected[b][:n]))
        decode = engine_step(model)
        for step in range(PARITY_NUM_DECODE):
            done = [n + step for n in PARITY_PROMPT_LENS]
            ids, positions, metadata = make_paged_step(
                [s[d:d + 1] for s, d in zip(sequences, done)], done, tables, num_tokens=8,
                **layout)
            logits, kv_caches = decode(kv_caches, ids, positions, metadata)
            diffs += [np.abs(np.asarray(logits)[b] - expected[b][d])[None]
                      for b, d in enumerate(done)]
    return np.concatenate(diffs)


def hf_float32_logits(path, sequences: list[np.ndarray]) -> list[np.ndarray]:
    """transformers' own float32 logits of each whole sequence (eager attention)."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        return [model(torch.from_numpy(seq[None].astype(np.int64))).logits[0].numpy()
                for seq in sequences]


@pytest.fixture(scope="session")
def paged_parity():
    """`paged_parity.sequences(vocab)`, `.hf_logits(path, sequences)` and
    `.errors(path, sequences, expected)`: the shared paged parity run (see above)."""
    import types

    return types.SimpleNamespace(sequences=parity_sequences, hf_logits=hf_float32_logits,
                                 errors=paged_logit_errors, prompt_lens=PARITY_PROMPT_LENS,
                                 num_decode=PARITY_NUM_DECODE)


@pytest.fixture(scope="session")
def assert_greedy_parity(engine_checkpoint, engine_kwargs):
    """`assert_greedy_parity(family)`: `LLM.generate` on prompts sharing a 40-token prefix,
    in 32-token chunks, on a 12-block pool, gives transformers' greedy tokens, with
    prefix-cache hits and preemptions (> 0) on the way."""
    def check(family: str) -> None:
        from jaxserve import LLM, SamplingParams
        from jaxserve.testing.hf_reference import hf_greedy, random_prompts

        path = engine_checkpoint(family)
        prefix = random_prompts([40], seed=1)[0]
        prompts = [prefix + tail for tail in random_prompts([1, 9, 20, 33], seed=2)]
        prompts += random_prompts([5, 50], seed=3)
        llm = LLM(str(path), **{**engine_kwargs, "max_num_batched_tokens": 32,
                                "num_gpu_blocks_override": 12, "max_num_seqs": 8,
                                "max_model_len": 128})
        greedy = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outs] == hf_greedy(path, prompts, 16)
        metrics = llm.get_metrics()
        assert metrics["num_preemptions"] > 0
        assert metrics["prefix_cache_hits"] > 0

    return check
