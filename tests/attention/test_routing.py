"""Routing Transformer attention: one cluster with a full window == dense attention on layer-normalised
q, k; several clusters + local heads == a reference from the paper's definition (balanced top-w per
centroid, attention within clusters, per-query merge); a forward pass only proposes the k-means EMA step
and `commit_updates` applies it; gradients finite; memory at S = 8K; config errors name the key."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from effitrans.attention.routing import RoutingAttention, RoutingCentroids, ema_centroids
from effitrans.layers.params import commit_updates
from effitrans.registry import build_model
from effitrans.schema import ConfigError
from tests.attention.sparse_family_helpers import assert_no_quadratic_intermediate, dense_attention_np
from tests.helpers import tiny_model_config

D, H = 16, 8


def _module(n, clusters, window=None, local=0, local_window=3, causal=False, seed=0):
    return RoutingAttention(
        D,
        n,
        H,
        num_clusters=clusters,
        window=window,
        num_local_heads=local,
        local_window=local_window,
        causal=causal,
        impl="xla",
        rope_base=None,
        rngs=nnx.Rngs(params=seed),
    )


def _ln(a):
    mu = a.mean(-1, keepdims=True)
    return (a - mu) / np.sqrt(((a - mu) ** 2).mean(-1, keepdims=True) + 1e-6)


def _qkv(m, x):
    xs = np.asarray(x, np.float64)
    p = lambda w: np.einsum("btd,dnh->btnh", xs, np.asarray(w[...], np.float64))
    return _ln(p(m.q)), _ln(p(m.k)), p(m.v)


def _inputs(t, b=2, seed=1):
    x = jax.random.normal(jax.random.key(seed), (b, t, D), jnp.float32)
    seg = np.ones((b, t), np.int32)
    seg[-1, t - 3 :] = 0
    return x, jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)), seg


@pytest.mark.parametrize("causal", [pytest.param(False, marks=pytest.mark.slow), True])  # ~11 s each
def test_one_cluster_full_window_equals_dense(causal):
    t, n = 14, 2
    m = _module(n, 1, causal=causal)
    x, pos, seg = _inputs(t)
    got, _ = m(x, positions=pos, segment_ids=jnp.asarray(seg))
    q, k, v = _qkv(m, x)
    i, j = np.arange(t)[:, None], np.arange(t)[None, :]
    allowed = (seg[:, None, :, None] == seg[:, None, None, :]) & ((j <= i) if causal else True)
    want = np.einsum("btnh,nhd->btd", dense_attention_np(q, k, v, allowed), np.asarray(m.o[...], np.float64))
    keep = seg.astype(bool)
    np.testing.assert_allclose(np.asarray(got)[keep], want[keep], atol=1e-5, rtol=1e-5)


def reference_routing(m, x, seg, causal):
    q, k, v = _qkv(m, x)
    b, t, n, h = q.shape
    nl = m.num_local_heads
    i, j = np.arange(t)[:, None], np.arange(t)[None, :]
    same = seg[:, None, :, None] == seg[:, None, None, :]
    causal_ok = (j <= i) if causal else np.ones((t, t), bool)
    out = np.zeros_like(v)
    lw = m.local_window
    local = (j >= i - lw) & (j <= i + (0 if causal else lw))
    out[:, :, :nl] = dense_attention_np(q[:, :, :nl], k[:, :, :nl], v[:, :, :nl], local[None, None] & same)
    mu = np.asarray(m.centroids[...], np.float64)
    mu = mu / np.linalg.norm(mu, axis=-1, keepdims=True)
    w = m.window or -(-t // m.num_clusters)
    for bb in range(b):
        for hh in range(nl, n):
            num, den, mx = np.zeros((t, h)), np.zeros(t), np.full(t, -np.inf)
            parts = []
            for c in range(m.num_clusters):
                pad = seg[bb] == 0  # padding picked last
                qi = np.argsort(-np.where(pad, -1e30, q[bb, :, hh] @ mu[hh - nl, c]), kind="stable")[:w]
                ki = np.argsort(-np.where(pad, -1e30, k[bb, :, hh] @ mu[hh - nl, c]), kind="stable")[:w]
                logits = q[bb, qi, hh] @ k[bb, ki, hh].T / np.sqrt(h)
                ok = (seg[bb, qi][:, None] == seg[bb, ki][None, :]) & causal_ok[np.ix_(qi, ki)]
                logits = np.where(ok, logits, -np.inf)
                lmax = np.where(ok.any(1), logits.max(1), 0.0)
                e = np.where(ok, np.exp(logits - lmax[:, None]), 0.0)
                lse = np.where(ok.any(1), np.log(np.maximum(e.sum(1), 1e-300)) + lmax, -np.inf)
                o = (e / np.maximum(e.sum(1, keepdims=True), 1e-300)) @ v[bb, ki, hh]
                parts.append((qi, o, lse))
                mx[qi] = np.maximum(mx[qi], lse)
            mx = np.where(np.isfinite(mx), mx, 0.0)
            for qi, o, lse in parts:
                wgt = np.exp(lse - mx[qi])
                num[qi] += wgt[:, None] * o
                den[qi] += wgt
            out[bb, :, hh] = num / np.where(den > 0, den, 1.0)[:, None]
    return np.einsum("btnh,nhd->btd", out, np.asarray(m.o[...], np.float64))


@pytest.mark.parametrize(
    "n,clusters,window,local,causal,t",
    [
        (3, 3, None, 1, False, 17),
        (2, 4, 6, 0, True, 16),
        (4, 2, 9, 2, True, 15),
    ],
)
@pytest.mark.slow  # >= 8 s on 2 cores: CI runs it (keeps the default run under 10 min)
def test_clusters_equal_reference_from_definition(n, clusters, window, local, causal, t):
    m = _module(n, clusters, window=window, local=local, causal=causal)
    x, pos, seg = _inputs(t)
    got, _ = m(x, positions=pos, segment_ids=jnp.asarray(seg))
    want = reference_routing(m, x, seg, causal)
    keep = seg.astype(bool)
    np.testing.assert_allclose(np.asarray(got)[keep], want[keep], atol=1e-5, rtol=1e-5)


@pytest.mark.slow  # > 10 s on 2 cores; CI runs it
def test_forward_proposes_ema_and_only_commit_applies_it():
    m = _module(2, 3)
    x, pos, _ = _inputs(12)
    before = np.asarray(m.centroids[...]).copy()
    y1, _ = m(x, positions=pos)
    np.testing.assert_array_equal(np.asarray(m.centroids[...]), before)  # a forward pass alone: unchanged
    y2, _ = m(x, positions=pos)
    np.testing.assert_array_equal(np.asarray(y1), np.asarray(y2))  # so eval is repeatable
    assert commit_updates(m) == 1
    assert not np.allclose(np.asarray(m.centroids[...]), before)  # committed (train step): EMA step taken
    assert commit_updates(m) == 0  # nothing pending after a commit
    # decay 0 with one centroid: the centroid becomes the mean of the (weighted) vectors
    xs = jax.random.normal(jax.random.key(0), (2, 5, 1, 4))
    wts = jnp.array([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]], jnp.float32)
    new = ema_centroids(jnp.ones((1, 1, 4)), xs, wts, 0.0)
    want = (np.asarray(xs)[..., 0, :] * np.asarray(wts)[..., None]).sum((0, 1)) / 5.0
    np.testing.assert_allclose(np.asarray(new)[0, 0], want, atol=1e-6)


@pytest.mark.slow  # > 10 s on 2 cores; CI runs it
def test_gradients_finite():
    m = _module(4, 2, local=2, causal=True)
    x, pos, seg = _inputs(12)
    loss = lambda mod: jnp.sum(mod(x, positions=pos, segment_ids=jnp.asarray(seg))[0] ** 2)
    g = nnx.grad(loss)(m)
    assert all(bool(jnp.all(jnp.isfinite(a))) for a in jax.tree.leaves(nnx.state(g)))
    assert "centroids" not in g  # non-trainable state: not a Param, no gradient
    g_mu = nnx.grad(loss, argnums=nnx.DiffState(0, RoutingCentroids))(m)  # even when asked for: stop_gradient
    assert float(jnp.abs(g_mu.centroids[...]).max()) == 0.0


@pytest.mark.slow
def test_no_quadratic_intermediate_at_8k():
    s = 8192
    m = RoutingAttention(
        16, 2, 8, num_clusters=32, num_local_heads=1, local_window=64, causal=True, impl="xla", rngs=nnx.Rngs(params=0)
    )
    assert_no_quadratic_intermediate(m, s, 16)


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="num_clusters"):
        build_model(tiny_model_config(num_kv_heads=4, attention=dict(kind="routing", num_clusters=0)))
    with pytest.raises(ConfigError, match="centroid_decay"):
        build_model(tiny_model_config(num_kv_heads=4, attention=dict(kind="routing", centroid_decay=1.5)))
    with pytest.raises(ValueError, match="num_local_heads"):
        build_model(tiny_model_config(num_kv_heads=4, attention=dict(kind="routing", num_local_heads=4)))
