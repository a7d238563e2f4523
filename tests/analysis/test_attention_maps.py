"""Attention probabilities beside the forward pass: they are the reference kernel's softmax, sum to 1 on every
allowed row, summarise hand-built matrices to known answers, and the long-input path has no S x S array."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from effitrans.analysis import attention_maps as am
from effitrans.kernels import masks
from effitrans.kernels.reference import reference_attention
from effitrans.registry import build_model
from tests.attention.sparse_family_helpers import largest_intermediate
from tests.helpers import tiny_model_config


def _qkv(seed, b=2, t=24, s=24, n=4, kh=2, h=8):
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(kq, (b, t, n, h), jnp.float32) * 2.0
    k = jax.random.normal(kk, (b, s, kh, h), jnp.float32)
    v = jax.random.normal(kv, (b, s, kh, h), jnp.float32)
    return q, k, v


@pytest.mark.parametrize("support", [masks.Causal(), masks.Chunked(8) | masks.GlobalTokens(2)])
def test_probs_are_the_reference_softmax_and_sum_to_one(support):
    q, k, v = _qkv(0)
    p = am.attention_probs(q, k, support=support)  # [B, N, T, S]
    allowed = support.dense(24, 24)
    np.testing.assert_allclose(np.asarray(p).sum(-1), np.ones((2, 4, 24)), atol=1e-5)
    assert np.all(np.asarray(p)[..., ~allowed] == 0)
    # Independently: softmax of the scaled logits with GQA heads repeated, in float64.
    kr = np.repeat(np.asarray(k, np.float64), 2, axis=2)  # [B, S, N, H]
    logits = np.einsum("btnh,bsnh->bnts", np.asarray(q, np.float64), kr) / math.sqrt(8)
    logits = np.where(allowed, logits, -np.inf)
    want = np.exp(logits - logits.max(-1, keepdims=True))
    want /= want.sum(-1, keepdims=True)
    np.testing.assert_allclose(np.asarray(p), want, atol=1e-5)
    # And p @ v is the reference kernel's output.
    out = np.einsum("bnts,bsnh->btnh", np.asarray(p, np.float64), np.repeat(np.asarray(v, np.float64), 2, axis=2))
    np.testing.assert_allclose(
        out, np.asarray(reference_attention(q, k, v, mask=support, scale=1 / math.sqrt(8))), atol=1e-5
    )


def test_chosen_rows_match_all_rows():
    q, k, _ = _qkv(1)
    full = am.attention_probs(q, k, support=masks.Causal())
    rows = np.array([0, 7, 23])
    np.testing.assert_allclose(am.attention_probs(q, k, support=masks.Causal(), rows=rows), full[:, :, rows], atol=1e-6)
    with pytest.raises(ValueError, match=r"rows must lie in \[0, 24\)"):
        am.attention_probs(q, k, support=masks.Causal(), rows=[24])


def test_blockwise_sums_equal_dense_sums():
    q, k, _ = _qkv(2, t=37, s=37)
    cands = (masks.Full(), masks.Causal(), masks.SlidingWindow(3, 0), masks.GlobalTokens(2) | masks.Strided(5))
    blocked = am.attention_sums(q, k, support=masks.Causal(), candidates=cands, block_q=16, sink=3)
    dense = am.probs_sums(
        am.attention_probs(q, k, support=masks.Causal()), support=masks.Causal(), candidates=cands, sink=3
    )
    for key in dense:
        np.testing.assert_allclose(np.asarray(blocked[key]), np.asarray(dense[key]), rtol=1e-4, atol=1e-4, err_msg=key)
    stats = am.head_statistics(am.add_sums(None, blocked))
    # Coverage of Full and of a mask equal to the support is 1 for every head.
    np.testing.assert_allclose(stats["coverage"][:2], 1.0, atol=1e-5)
    np.testing.assert_allclose(stats["density"][:2], 1.0)
    assert stats["density"][2] == pytest.approx((37 * 4 - 6) / (37 * 38 / 2))
    assert np.all(stats["coverage"][2:] < 1.0)


def _hand_built(kind, t=8):
    """probs [1, 1, T, T] of a causal head with a known pattern."""
    p = np.zeros((t, t))
    for i in range(t):
        if kind == "sink":
            p[i, 0] = 1
        elif kind == "diagonal":
            p[i, i] = 1
        elif kind == "uniform":
            p[i, : i + 1] = 1 / (i + 1)
        elif kind == "period4":
            p[i, i - 4 if i >= 4 else i] = 1
    return p[None, None]


def _stats(kind, **kw):
    cands = (masks.SlidingWindow(0, 0), masks.SlidingWindow(1, 0), masks.GlobalTokens(1))
    sums = am.probs_sums(_hand_built(kind), support=masks.Causal(), candidates=cands, sink=1)
    return am.head_statistics(sums, band=kw.get("band", 1))


def test_statistics_of_hand_built_heads():
    t = 8
    s = _stats("sink")
    assert (s["sink"][0], s["entropy"][0]) == (pytest.approx(1.0), pytest.approx(0.0))
    assert s["distance"][0] == pytest.approx(np.mean(np.arange(t)))
    assert s["band"][0] == pytest.approx(2 / t)  # rows 0 and 1 sit within distance 1 of key 0
    np.testing.assert_allclose(s["coverage"][:, 0], [1 / t, 2 / t, 1.0])
    d = _stats("diagonal")
    assert (d["distance"][0], d["band"][0], d["sink"][0]) == (0.0, 1.0, pytest.approx(1 / t))
    np.testing.assert_allclose(d["coverage"][:, 0], [1.0, 1.0, 1 / t])
    u = _stats("uniform")
    assert u["entropy"][0] == pytest.approx(np.mean(np.log(np.arange(1, t + 1))))
    assert u["distance"][0] == pytest.approx(np.mean(np.arange(t) / 2))
    assert u["coverage"][0, 0] == pytest.approx(np.mean(1 / np.arange(1, t + 1)))
    per = _stats("period4")
    assert per["period"][0] == 4 and per["periodic"][0] == pytest.approx((t - 4) / t)
    assert per["periodic_lift"][0] == pytest.approx(4.0)  # every mass beyond the band is on multiples of 4
    np.testing.assert_allclose(per["profile"][0, 7 + 4], (t - 4) / t)  # offset d = 4 sits at index d + S - 1


def test_long_input_never_builds_s_by_s():
    s = 4096
    q = jnp.zeros((1, s, 2, 8), jnp.float32)
    k = jnp.zeros((1, s, 1, 8), jnp.float32)
    cands = (masks.SlidingWindow(63, 0), masks.GlobalTokens(4) | masks.Strided(64), masks.Fixed(128, 4))

    def f(q, k):
        return am.attention_sums(q, k, support=masks.Causal(), candidates=cands, block_q=64)

    size, shape = largest_intermediate(f, q, k)
    assert size < s * s // 8, shape


def test_layer_qk_reads_the_model_without_changing_it():
    model = build_model(tiny_model_config(num_layers=2, attention=dict(impl="reference")), seed=0)
    tokens = jax.random.randint(jax.random.key(3), (2, 12), 0, 61)
    before = jax.tree_util.tree_map(np.asarray, nnx.to_pure_dict(nnx.state(model)))
    q, k, supports = am.layer_qk(model, tokens)
    assert q.shape == (2, 2, 12, 4, 8) and k.shape == (2, 2, 12, 2, 8) and supports == [masks.Causal()] * 2
    # Layer 0's queries are the attention module's own projection of the normed embeddings.
    pos = jnp.broadcast_to(jnp.arange(12), (2, 12))

    @nnx.jit
    def first_layer_qk(model, tokens):
        block = model.stack.blocks[0]
        return block.attn._qkv(block.attn_norm(model.stack.embed(tokens)), pos)[:2]

    q0, k0 = first_layer_qk(model, tokens)
    np.testing.assert_allclose(q[0], q0, atol=1e-5)
    np.testing.assert_allclose(k[0], k0, atol=1e-5)
    after = jax.tree_util.tree_map(np.asarray, nnx.to_pure_dict(nnx.state(model)))
    jax.tree_util.tree_map(np.testing.assert_array_equal, before, after)


def test_bad_inputs_are_named():
    lsh = build_model(tiny_model_config(num_kv_heads=4, attention=dict(kind="lsh")), seed=0)
    with pytest.raises(ValueError, match=r"attention family 'lsh'.*no probabilities to show.*\('dense',\)"):
        am.layer_qk(lsh, jnp.zeros((1, 8), jnp.int32))
    with pytest.raises(TypeError, match="model must be an effitrans Transformer model"):
        am.attention_modules(nnx.Linear(2, 2, rngs=nnx.Rngs(0)))
    q, k, _ = _qkv(0)
    with pytest.raises(TypeError, match="support must be a kernels.masks.Mask"):
        am.attention_probs(q, k, support="causal")
    with pytest.raises(ValueError, match="block_q must be an int >= 1, got 0"):
        am.attention_sums(q, k, support=masks.Causal(), block_q=0)
    with pytest.raises(
        ValueError, match=r"probs put mass 0.25 on a pair the support Causal\(offset=0\) does not allow"
    ):
        am.probs_sums(np.ones((1, 1, 4, 4)) / 4, support=masks.Causal())
    with pytest.raises(ValueError, match="band must be an int >= 0"):
        am.head_statistics(am.probs_sums(_hand_built("sink"), support=masks.Causal()), band=-1)
