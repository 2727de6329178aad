"""The runner chooses the kernels once (`select_ops`); the engine's programs run them."""

import jax

from jaxserve.model.ops import select_ops
from jaxserve.testing.native_kernels import needs_compiler


@needs_compiler
def test_the_engine_programs_run_the_ops_chosen_once(qwen2_llm):
    runner = qwen2_llm.llm_engine.runner
    backend = qwen2_llm.llm_engine.config.attention_backend
    assert runner.ops == select_ops(backend)
    assert runner.ops.native_dense  # this CPU has AVX2 (or AVX-512): the native GEMM runs
    # the loader laid the tied head out for the native greedy head; the model did not
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(
        runner.params)[0]]
    assert any("head_kn" in p for p in paths)
    forward = runner.compiled.forward(min(runner.token_buckets), min(runner.seq_buckets))
    text = forward.as_text()
    for kernel in ("jaxserve_matmul", "jaxserve_gated_mlp", "jaxserve_rope"):
        assert kernel in text, kernel
    greedy = runner.compiled.sample("greedy", min(runner.seq_buckets)).as_text()
    assert "jaxserve_lm_head_argmax" in greedy
