"""LongT5 TGA helpers and module (the HF cross-check is in test_transient_global_hf.py): block ids with
padding and orphans, global sums, causal variant sees no future, gradients finite, memory at S = 8K,
config errors name the key."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from effitrans.attention.transient_global import (
    TransientGlobalAttention,
    global_aggregates,
    global_block_ids,
    three_blocks,
    transient_global_attention,
    transient_global_reference,
)
from effitrans.registry import build_model
from effitrans.schema import ConfigError
from tests.attention.sparse_family_helpers import assert_no_quadratic_intermediate
from tests.helpers import tiny_model_config


def test_global_block_ids_padding_and_orphans():
    mask = np.zeros((3, 12), bool)
    mask[0, :] = True  # 3 full blocks of 4
    mask[1, :10] = True  # 2 full blocks + 2 orphans -> joined to block 1
    mask[2, :3] = True  # shorter than one block: no global token
    ids, valid = global_block_ids(jnp.asarray(mask), 4)
    np.testing.assert_array_equal(
        np.asarray(ids), [[0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2], [0, 0, 0, 0, 1, 1, 1, 1, 1, 1, -1, -1], [-1] * 12]
    )
    np.testing.assert_array_equal(np.asarray(valid), [[1, 1, 1], [1, 1, 0], [0, 0, 0]])
    x = jnp.arange(3 * 12 * 2, dtype=jnp.float32).reshape(3, 12, 2)
    sums = np.asarray(global_aggregates(x, ids, 3))
    np.testing.assert_allclose(sums[1, 1], np.asarray(x)[1, 4:10].sum(0))
    np.testing.assert_allclose(sums[2], 0.0)


def test_three_blocks():
    x = jnp.arange(1, 7, dtype=jnp.float32).reshape(1, 3, 2)  # blocks [1,2] [3,4] [5,6]
    np.testing.assert_array_equal(
        np.asarray(three_blocks(x))[0], [[0, 0, 1, 2, 3, 4], [1, 2, 3, 4, 5, 6], [3, 4, 5, 6, 0, 0]]
    )


@pytest.mark.parametrize(
    "causal,r,s,lens", [(False, 3, 22, (22, 13)), pytest.param(True, 2, 20, (20, 9), marks=pytest.mark.slow)]
)
def test_blockwise_equals_dense_reference_forward_and_gradients(causal, r, s, lens):
    # S not a multiple of the local block (r + 1), right padding with orphans, both directions.
    b, n, h, gb, nbk = 2, 2, 4, 4, 16
    ks = jax.random.split(jax.random.key(3), 8)
    mask = np.arange(s)[None, :] < np.asarray(lens)[:, None]
    ids, gvalid = global_block_ids(jnp.asarray(mask), gb)
    g = s // gb
    q, k, v = (jax.random.normal(ks[i], (b, s, n, h)) for i in range(3))
    side_k, side_v = (jax.random.normal(ks[3 + i], (b, g, n, h)) for i in range(2))
    local_bias, global_bias = (jax.random.normal(ks[5 + i], (nbk, n)) for i in range(2))
    static = dict(
        local_radius=r,
        token_seg=jnp.asarray(mask, jnp.int32),
        block_ids=ids,
        global_valid=gvalid,
        causal=causal,
        num_buckets=nbk,
        max_distance=12,
        scale=h**-0.5,
    )
    ct = jax.random.normal(ks[7], (b, s, n, h)) * jnp.asarray(mask)[..., None, None]

    def loss(fn, *args):
        return jnp.sum(fn(*args[:5], local_bias=args[5], global_bias=args[6], **static) * ct)

    args = (q, k, v, side_k, side_v, local_bias, global_bias)
    forward = lambda fn: jax.jit(lambda *a: fn(*a[:5], local_bias=a[5], global_bias=a[6], **static))
    np.testing.assert_allclose(
        np.asarray(forward(transient_global_attention)(*args)),
        np.asarray(forward(transient_global_reference)(*args)),
        atol=1e-5,
    )
    grads = lambda fn: jax.jit(jax.grad(lambda *a: loss(fn, *a), argnums=tuple(range(7))))(*args)
    g_fast, g_ref = grads(transient_global_attention), grads(transient_global_reference)
    for name, a, e in zip(["q", "k", "v", "side_k", "side_v", "local_bias", "global_bias"], g_fast, g_ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), atol=1e-4, err_msg=name)


def _module(causal, r=3, g=4, seed=0):
    return TransientGlobalAttention(
        16,
        2,
        8,
        local_radius=r,
        global_block=g,
        causal=causal,
        num_buckets=16,
        max_distance=32,
        rngs=nnx.Rngs(params=seed),
    )


@pytest.mark.slow  # > 10 s on 2 cores; CI runs it
def test_causal_variant_sees_no_future():
    m = _module(True)
    t = 20
    x = jax.random.normal(jax.random.key(1), (1, t, 16))
    pos = jnp.arange(t, dtype=jnp.int32)[None]
    y1, _ = m(x, positions=pos)
    y2, _ = m(x.at[:, 13:].add(5.0), positions=pos)
    np.testing.assert_allclose(np.asarray(y1)[:, :13], np.asarray(y2)[:, :13], atol=1e-6)
    assert not np.allclose(np.asarray(y1)[:, 13:], np.asarray(y2)[:, 13:])


@pytest.mark.slow  # > 10 s on 2 cores; CI runs it
def test_bidirectional_sees_far_tokens_through_globals():
    m = _module(False, r=1, g=4)
    t = 24
    x = jax.random.normal(jax.random.key(1), (1, t, 16))
    pos = jnp.arange(t, dtype=jnp.int32)[None]
    y1, _ = m(x, positions=pos)
    y2, _ = m(x.at[:, 20].add(5.0), positions=pos)
    assert not np.allclose(np.asarray(y1)[:, 0], np.asarray(y2)[:, 0])  # token 0 is far outside radius 1


@pytest.mark.slow  # > 10 s on 2 cores; CI runs it
def test_gradients_finite():
    m = _module(False)
    x = jax.random.normal(jax.random.key(1), (2, 16, 16))
    seg = jnp.ones((2, 16), jnp.int32).at[1, 9:].set(0)
    pos = jnp.broadcast_to(jnp.arange(16, dtype=jnp.int32), (2, 16))
    g = nnx.grad(lambda mod: jnp.sum(mod(x, positions=pos, segment_ids=seg)[0] ** 2))(m)
    leaves = jax.tree.leaves(nnx.state(g))
    assert all(bool(jnp.all(jnp.isfinite(a))) for a in leaves)
    assert float(jnp.abs(g.global_bias[...]).max()) > 0 and float(jnp.abs(g.global_norm[...]).max()) > 0


@pytest.mark.slow
def test_no_quadratic_intermediate_at_8k():
    s = 8192
    m = TransientGlobalAttention(16, 2, 8, local_radius=63, global_block=64, causal=False, rngs=nnx.Rngs(params=0))
    assert_no_quadratic_intermediate(m, s, 16)


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="global_block"):
        build_model(tiny_model_config(num_kv_heads=4, attention=dict(kind="transient_global", global_block=0)))
    m = build_model(
        tiny_model_config(num_kv_heads=4, attention=dict(kind="transient_global", global_block=5, local_radius=2))
    )
    with pytest.raises(ValueError, match="global_block=5"):
        m(jnp.ones((1, 12), jnp.int32))  # 12 is not a multiple of 5
    with pytest.raises(ValueError, match="num_kv_heads"):
        build_model(tiny_model_config(num_kv_heads=2, attention=dict(kind="transient_global")))
