"""Reformer LSH attention: one bucket == dense shared-QK attention (self masked unless alone); several
rounds == a reference written from the paper's equations (hash, sort, chunk sets P~_i^r, softmax over
their union); deterministic; gradients finite; linear memory at S = 8K; config errors name the key."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from effitrans.attention.lsh import SELF_LOGIT, LSHAttention, LSHRotations
from effitrans.registry import build_model
from effitrans.schema import ConfigError
from tests.attention.sparse_family_helpers import assert_no_quadratic_intermediate, dense_attention_np
from tests.helpers import tiny_model_config

D, N, H = 16, 2, 8


def _module(n_buckets, n_hashes, chunk_len, causal, seed=0):
    return LSHAttention(
        D,
        N,
        H,
        n_buckets=n_buckets,
        n_hashes=n_hashes,
        chunk_len=chunk_len,
        causal=causal,
        rope_base=None,
        rngs=nnx.Rngs(params=seed),
    )


def _run(m, b, t, seg=None, seed=1):
    x = jax.random.normal(jax.random.key(seed), (b, t, D), jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    y, _ = m(x, positions=pos, segment_ids=None if seg is None else jnp.asarray(seg))
    return x, np.asarray(y)


def _qkv(m, x):
    xs = np.asarray(x, np.float64)
    qk = np.einsum("btd,dnh->btnh", xs, np.asarray(m.qk[...], np.float64))
    v = np.einsum("btd,dnh->btnh", xs, np.asarray(m.v[...], np.float64))
    return qk, qk / np.linalg.norm(qk, axis=-1, keepdims=True), v


def _out(m, o):
    return np.einsum("btnh,nhd->btd", o, np.asarray(m.o[...], np.float64))


@pytest.mark.parametrize("causal", [pytest.param(False, marks=pytest.mark.slow), True])
def test_one_bucket_equals_dense_shared_qk_attention(causal):
    t = 13
    m = _module(1, 1, 16, causal)
    seg = np.ones((2, t), np.int32)
    seg[1, 9:] = 0
    x, got = _run(m, 2, t, seg)
    qk, k, v = _qkv(m, x)
    i, j = np.arange(t)[:, None], np.arange(t)[None, :]
    allowed = (seg[:, None, :, None] == seg[:, None, None, :]) & ((j <= i) if causal else True)
    want = _out(m, dense_attention_np(qk, k, v, allowed, self_logit=SELF_LOGIT))
    keep = seg.astype(bool)
    np.testing.assert_allclose(got[keep], want[keep], atol=1e-5, rtol=1e-5)


def reference_lsh(m, x, seg, causal):
    """Reformer Sec. 2-3 from the equations, per (batch, head), float64."""
    qk, k, v = _qkv(m, x)
    rot = np.asarray(m.rotations[...], np.float64)  # [H, R, nb/2]
    b, t, n, _ = qk.shape
    c = m.chunk_len
    nc = -(-t // c)
    out = np.zeros_like(v)
    for bb in range(b):
        for hh in range(n):
            union = np.zeros((t, t), bool)
            for r in range(m.n_hashes):
                proj = qk[bb, :, hh] @ rot[:, r]  # [T, nb/2]
                bucket = np.argmax(np.concatenate([proj, -proj], -1), -1)
                bucket = np.where(seg[bb] == 0, m.n_buckets, bucket)  # padding sorts last
                order = np.lexsort((np.arange(t), bucket))  # sort by (bucket, position)
                rank = np.empty(t, int)
                rank[order] = np.arange(t)
                chunk = rank // c
                same = chunk[None, :] == chunk[:, None]
                prev = (chunk[None, :] == (chunk[:, None] - 1) % nc) if nc > 1 else np.zeros_like(same)
                union |= same | prev
            i, j = np.arange(t)[:, None], np.arange(t)[None, :]
            allowed = union & (seg[bb][:, None] == seg[bb][None, :]) & ((j <= i) if causal else True)
            out[bb : bb + 1, :, hh : hh + 1] = dense_attention_np(
                qk[bb : bb + 1, :, hh : hh + 1],
                k[bb : bb + 1, :, hh : hh + 1],
                v[bb : bb + 1, :, hh : hh + 1],
                allowed[None, None],
                self_logit=SELF_LOGIT,
            )
    return _out(m, out)


@pytest.mark.parametrize(
    "n_buckets,n_hashes,chunk_len,causal,t",
    [
        pytest.param(4, 3, 4, False, 22, marks=pytest.mark.slow),
        (6, 2, 5, True, 20),
        pytest.param(2, 4, 3, False, 9, marks=pytest.mark.slow),
        pytest.param(8, 2, 16, False, 24, marks=pytest.mark.slow),
    ],
)
def test_multi_round_equals_reference_from_equations(n_buckets, n_hashes, chunk_len, causal, t):
    m = _module(n_buckets, n_hashes, chunk_len, causal)
    seg = np.ones((2, t), np.int32)
    seg[1, t - 5 :] = 0
    x, got = _run(m, 2, t, seg)
    want = reference_lsh(m, x, seg, causal)
    keep = seg.astype(bool)
    np.testing.assert_allclose(got[keep], want[keep], atol=1e-5, rtol=1e-5)


@pytest.mark.slow  # three eager builds (~7 s); the equations tests above run in the default run
def test_deterministic_given_key():
    _, a = _run(_module(4, 2, 4, False, seed=3), 1, 16)
    _, b = _run(_module(4, 2, 4, False, seed=3), 1, 16)
    _, c = _run(_module(4, 2, 4, False, seed=4), 1, 16)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


@pytest.mark.slow  # > 10 s on 2 cores; CI runs it
def test_gradients_finite_and_rotations_frozen():
    m = _module(4, 2, 4, True)
    x = jax.random.normal(jax.random.key(1), (2, 14, D), jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(14, dtype=jnp.int32), (2, 14))
    loss = lambda mod: jnp.sum(mod(x, positions=pos)[0] ** 2)
    g = nnx.grad(loss)(m)
    assert all(bool(jnp.all(jnp.isfinite(a))) for a in jax.tree.leaves(nnx.state(g)))
    assert "rotations" not in g  # non-trainable state: not a Param, no gradient
    g_rot = nnx.grad(loss, argnums=nnx.DiffState(0, LSHRotations))(m)  # even when asked for: read through stop_gradient
    assert float(jnp.abs(g_rot.rotations[...]).max()) == 0.0
    assert float(jnp.abs(g.qk[...]).max()) > 0.0


@pytest.mark.slow
def test_no_quadratic_intermediate_at_8k():
    s = 8192
    m = LSHAttention(16, 2, 8, n_buckets=64, n_hashes=2, chunk_len=64, causal=True, rngs=nnx.Rngs(params=0))
    assert_no_quadratic_intermediate(m, s, 16)


def test_config_errors_name_the_key():
    for bad in (3, 0):
        with pytest.raises(ConfigError, match="n_buckets"):
            build_model(tiny_model_config(num_kv_heads=4, attention=dict(kind="lsh", n_buckets=bad)))
    with pytest.raises(ConfigError, match="chunk_len"):
        build_model(tiny_model_config(num_kv_heads=4, attention=dict(kind="lsh", chunk_len=0)))
    with pytest.raises(ValueError, match="num_kv_heads"):
        build_model(tiny_model_config(num_kv_heads=2, attention=dict(kind="lsh")))
