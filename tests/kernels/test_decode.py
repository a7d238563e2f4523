"""Flash-decoding against the dense decode reference and against causal attention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effitrans import kernels
from effitrans.kernels import masks as M
from tests.kernels import helpers


@pytest.mark.parametrize(
    "t, n, kh, s, block_k",
    [
        (1, 4, 2, 70, 16),  # one new token, GQA, cache not a block multiple
        (3, 4, 1, 64, 8),  # a few new tokens (causal among themselves), MQA
        (1, 2, 2, 40, 64),  # block larger than the cache
    ],
)
def test_decode_matches_reference(t, n, kh, s, block_k):
    q, k, v = helpers.random_qkv(
        0, batch=3, q_len=t, kv_len=s, num_heads=n, num_kv_heads=kh, head_dim=16, v_head_dim=12
    )
    lengths = jnp.array([t, s // 2 + 1, s], jnp.int32)
    ref = helpers.decode_jit(q, k, v, lengths=lengths, impl="reference")
    got = helpers.decode_jit(q, k, v, lengths=lengths, impl="xla", block_k=block_k)
    np.testing.assert_allclose(got, ref, atol=1e-5)


def test_decode_equals_bottom_right_causal_attention():
    t, s = 4, 37
    q, k, v = helpers.random_qkv(1, batch=1, q_len=t, kv_len=s, num_heads=4, num_kv_heads=2, head_dim=8)
    got = helpers.decode_jit(q, k, v, lengths=jnp.array([s], jnp.int32), impl="xla", block_k=8)
    want = helpers.attention_jit(q, k, v, mask=M.Causal(offset=M.bottom_right_offset(t, s)), impl="reference")
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_decode_ignores_unwritten_slots():
    q, k, v = helpers.random_qkv(2, batch=2, q_len=1, kv_len=32, num_heads=2, num_kv_heads=2, head_dim=8)
    lengths = jnp.array([5, 17], jnp.int32)
    out = helpers.decode_jit(q, k, v, lengths=lengths, impl="xla", block_k=8)
    garbage = jnp.where(jnp.arange(32)[None, :, None, None] >= lengths[:, None, None, None], 1e4, k)
    out2 = helpers.decode_jit(q, garbage, v * 1.0, lengths=lengths, impl="xla", block_k=8)
    np.testing.assert_allclose(out, out2, atol=1e-6)


def test_decode_traced_lengths_under_jit():
    q, k, v = helpers.random_qkv(3, batch=2, q_len=1, kv_len=48, num_heads=2, num_kv_heads=1, head_dim=8)
    f = jax.jit(lambda q, k, v, n: kernels.decode_attention(q, k, v, lengths=n, impl="xla", block_k=16))
    ref = helpers.decode_jit(q, k, v, lengths=jnp.array([9, 48], jnp.int32), impl="reference")
    np.testing.assert_allclose(f(q, k, v, jnp.array([9, 48], jnp.int32)), ref, atol=1e-5)
    # Same compiled program, other lengths.
    ref2 = helpers.decode_jit(q, k, v, lengths=jnp.array([1, 30], jnp.int32), impl="reference")
    np.testing.assert_allclose(f(q, k, v, jnp.array([1, 30], jnp.int32)), ref2, atol=1e-5)


def test_decode_bfloat16():
    q, k, v = helpers.random_qkv(
        4, batch=2, q_len=2, kv_len=50, num_heads=4, num_kv_heads=2, head_dim=32, dtype=jnp.bfloat16
    )
    lengths = jnp.array([20, 50], jnp.int32)
    ref = helpers.decode_jit(q, k, v, lengths=lengths, impl="reference")
    got = helpers.decode_jit(q, k, v, lengths=lengths, impl="xla", block_k=16)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(ref, np.float32), atol=1e-2, rtol=1e-2)
