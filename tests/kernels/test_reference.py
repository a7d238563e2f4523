"""The dense reference against a per-head numpy loop written from the definition, and jax.nn."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effitrans import kernels
from effitrans.kernels import masks as M
from tests.kernels import helpers


def _numpy_attention(q, k, v, allowed, scale):
    """Per (batch, head) loop; allowed [B, T, S]. Rows with no allowed key give 0 and lse -inf."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, t, n, _ = q.shape
    g = n // k.shape[2]
    out = np.zeros((b, t, n, v.shape[-1]))
    lse = np.full((b, n, t), -np.inf)
    for bi in range(b):
        for h in range(n):
            logits = q[bi, :, h] @ k[bi, :, h // g].T * scale  # [T, S]
            for i in range(t):
                row = logits[i][allowed[bi, i]]
                if row.size:
                    w = np.exp(row - row.max())
                    out[bi, i, h] = (w / w.sum()) @ v[bi, allowed[bi, i], h // g]
                    lse[bi, h, i] = np.log(w.sum()) + row.max()
    return out, lse


@pytest.mark.parametrize(
    "mask, t, s, n, kh",
    [
        (M.Full(), 7, 9, 4, 2),
        (M.Causal(), 12, 12, 3, 1),
        (M.Causal(offset=-4), 10, 10, 2, 2),  # rows 0..3 fully masked
        (M.SlidingWindow(3, 1) | M.GlobalTokens(2), 15, 15, 4, 4),
        (M.Fixed(4, 1), 16, 16, 2, 1),
    ],
)
def test_reference_matches_definition(mask, t, s, n, kh):
    q, k, v = helpers.random_qkv(0, batch=2, q_len=t, kv_len=s, num_heads=n, num_kv_heads=kh, head_dim=8, v_head_dim=5)
    out, lse = helpers.attention_jit(q, k, v, mask=mask, impl="reference", return_lse=True)
    allowed = np.broadcast_to(mask.dense(t, s), (2, t, s))
    want_out, want_lse = _numpy_attention(q, k, v, allowed, 8**-0.5)
    np.testing.assert_allclose(out, want_out, atol=1e-5)
    np.testing.assert_array_equal(np.isfinite(lse), np.isfinite(want_lse))
    fin = np.isfinite(want_lse)
    np.testing.assert_allclose(np.asarray(lse)[fin], want_lse[fin], atol=1e-5)


def test_reference_segment_ids_match_definition():
    q, k, v = helpers.random_qkv(1, batch=2, q_len=14, kv_len=14, num_heads=2, num_kv_heads=1, head_dim=8)
    seg = helpers.random_segment_ids(1, 2, 14)
    out = helpers.attention_jit(q, k, v, mask=M.Causal(), segment_ids=seg, impl="reference")
    allowed = M.Causal().dense(14, 14)[None] & (np.asarray(seg)[:, :, None] == np.asarray(seg)[:, None, :])
    want, _ = _numpy_attention(q, k, v, allowed, 8**-0.5)
    np.testing.assert_allclose(out, want, atol=1e-5)


def test_reference_matches_jax_nn():
    q, k, v = helpers.random_qkv(2, batch=2, q_len=33, kv_len=33, num_heads=4, num_kv_heads=2, head_dim=16)
    got = helpers.attention_jit(q, k, v, mask=M.Causal(), impl="reference")
    want = jax.jit(jax.nn.dot_product_attention, static_argnames=("is_causal", "implementation"))(
        q, k, v, is_causal=True, implementation="xla"
    )
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_fully_masked_rows_zero_output_finite_grads():
    q, k, v = helpers.random_qkv(3, batch=1, q_len=8, kv_len=8, num_heads=2, num_kv_heads=2, head_dim=8)
    mask = M.Causal(offset=-3)

    def loss(q, k, v):
        return kernels.attention(q, k, v, mask=mask, impl="reference").sum()

    out, lse = helpers.attention_jit(q, k, v, mask=mask, impl="reference", return_lse=True)
    assert np.all(np.asarray(out)[:, :3] == 0) and np.all(np.isneginf(np.asarray(lse)[:, :, :3]))
    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads)
    assert np.all(np.asarray(grads[0])[:, :3] == 0)


def test_large_logits_stay_finite():
    q, k, v = helpers.random_qkv(4, batch=1, q_len=16, kv_len=16, num_heads=2, num_kv_heads=2, head_dim=8, q_scale=1e4)
    out = helpers.attention_jit(q, k, v, mask=M.Causal(), impl="reference")
    assert bool(jnp.all(jnp.isfinite(out)))
