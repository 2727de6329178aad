"""The MLA latent reference against a plain numpy MLA on NaN-poisoned latent pools.

The numpy side does what MLA means before absorption: it expands every context latent into
per-head keys (c W_UK plus the shared RoPE key) and values (c W_UV); the reference sees only
the absorbed queries and the latent pool. Their outputs, mapped through W_UV, must agree.
"""

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.mla_paged_attention import latent_pool_shape, mla_paged_attention

RANK, ROPE, NOPE, V_DIM, HEADS, PAGE = 24, 8, 16, 12, 4, 16


def _batch(q_lens, kv_lens, seed=0):
    rng = np.random.default_rng(seed)
    pages_needed = [-(-kv // PAGE) for kv in kv_lens]
    num_pages = 1 + sum(pages_needed) + 2
    order = rng.permutation(np.arange(1, num_pages))
    table = np.zeros((len(q_lens), max(pages_needed) + 1), np.int32)
    pool = np.full(latent_pool_shape(num_pages, PAGE, RANK + ROPE), np.nan, np.float32)
    contexts = []
    used = 0
    for b, (n, kv_len) in enumerate(zip(pages_needed, kv_lens)):
        table[b, :n] = order[used:used + n]
        used += n
        rows = rng.standard_normal((kv_len, RANK + ROPE)).astype(np.float32)
        for pos in range(kv_len):
            pool[table[b, pos // PAGE], pos % PAGE] = rows[pos]
        contexts.append(rows)
    num_tokens = sum(q_lens) + 3  # three padding tokens
    q_nope = rng.standard_normal((num_tokens, HEADS, NOPE)).astype(np.float32)
    q_rope = rng.standard_normal((num_tokens, HEADS, ROPE)).astype(np.float32)
    w_uk = rng.standard_normal((RANK, HEADS, NOPE)).astype(np.float32) / 4
    w_uv = rng.standard_normal((RANK, HEADS, V_DIM)).astype(np.float32) / 4
    qsl = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    return dict(pool=pool, table=table, contexts=contexts, q_nope=q_nope, q_rope=q_rope,
                w_uk=w_uk, w_uv=w_uv, qsl=qsl, seq_lens=np.asarray(kv_lens, np.int32))


def _numpy_mla(batch, sm_scale):  # [T, N, v]: keys and values expanded per head
    f64 = {k: np.asarray(v, np.float64) for k, v in batch.items() if k != "contexts"}
    out = np.zeros(batch["q_nope"].shape[:2] + (V_DIM,))
    qsl = batch["qsl"]
    for b, rows in enumerate(batch["contexts"]):
        rows = rows.astype(np.float64)
        c, k_rope = rows[:, :RANK], rows[:, RANK:]
        length, q_len = len(rows), qsl[b + 1] - qsl[b]
        for i, t in enumerate(range(qsl[b], qsl[b + 1])):
            pos = length - q_len + i
            for n in range(HEADS):
                keys = np.concatenate([c @ f64["w_uk"][:, n], k_rope], axis=1)  # [ctx, nope+rope]
                q = np.concatenate([f64["q_nope"][t, n], f64["q_rope"][t, n]])
                s = np.where(np.arange(length) <= pos, keys @ q * sm_scale, -np.inf)
                p = np.exp(s - s.max())
                out[t, n] = (p / p.sum()) @ (c @ f64["w_uv"][:, n])
    return out


@pytest.mark.parametrize("q_lens,kv_lens", [
    ([1, 1, 1], [1, 17, 40]),       # decode
    ([20, 3, 0, 9], [20, 35, 0, 9]),  # prefill, a prefix hit, a padding sequence
])
def test_mla_reference_matches_expanded_numpy_attention(q_lens, kv_lens):
    batch = _batch(q_lens, kv_lens)
    sm_scale = (NOPE + ROPE) ** -0.5
    q_latent = np.einsum("tnh,rnh->tnr", batch["q_nope"], batch["w_uk"])  # absorbed W_UK
    out = mla_paged_attention(jnp.asarray(q_latent), jnp.asarray(batch["q_rope"]),
                              jnp.asarray(batch["pool"]), jnp.asarray(batch["table"]),
                              jnp.asarray(batch["seq_lens"]), jnp.asarray(batch["qsl"]),
                              sm_scale=sm_scale)  # [T, N, C]
    got = np.einsum("tnr,rnv->tnv", np.asarray(out, np.float64), batch["w_uv"])
    np.testing.assert_allclose(got, _numpy_mla(batch, sm_scale), atol=2e-5, rtol=1e-4)
    assert not np.asarray(out)[sum(q_lens):].any()  # padding tokens: zero rows


def test_mla_reference_rejects_a_pool_of_the_wrong_width():
    with pytest.raises(ValueError, match="latent_pages"):
        mla_paged_attention(jnp.zeros((2, HEADS, RANK)), jnp.zeros((2, HEADS, ROPE)),
                            jnp.zeros(latent_pool_shape(4, PAGE, RANK)), jnp.zeros((1, 2), jnp.int32),
                            jnp.ones(1, jnp.int32), jnp.asarray([0, 2], jnp.int32), sm_scale=1.0)
