"""Small pure helpers shared by the content-based and transient-global attention families.

Everything here works on explicit score blocks that are already small (chunks, clusters, local windows):
no function builds an S x S array.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def masked_softmax_stats(logits: jax.Array, valid: jax.Array):
    """Softmax over the last axis restricted to `valid`, and its log-sum-exp.

    logits float32 [..., S], valid bool broadcastable to it -> (p [..., S], lse [...]). A row with no
    valid entry gets p = 0 and lse = -inf, with finite (zero) gradients (the kernels' convention).
    """
    masked = jnp.where(valid, logits, -jnp.inf)
    m = jnp.max(masked, axis=-1, keepdims=True)  # [..., 1]
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    e = jnp.where(valid, jnp.exp(jnp.where(valid, logits, 0.0) - m), 0.0)  # [..., S]
    denom = jnp.sum(e, axis=-1, keepdims=True)  # [..., 1]
    p = e / jnp.where(denom > 0, denom, 1.0)
    lse = jnp.where(denom[..., 0] > 0, jnp.log(jnp.where(denom[..., 0] > 0, denom[..., 0], 1.0)) + m[..., 0], -jnp.inf)
    return p, lse


def merge_by_lse(outs: jax.Array, lses: jax.Array, axis: int = 0):
    """Combines partial attentions over disjoint (or count-corrected) key sets.

    outs [..., R, ..., H] with lses [..., R, ...] along `axis` -> (out, lse): out = sum_r w_r out_r with
    w_r = exp(lse_r - logsumexp_r lse_r); rows where every lse is -inf give 0.
    """
    m = jnp.max(lses, axis=axis, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    w = jnp.exp(lses - m)  # 0 where lse = -inf
    total = jnp.sum(w, axis=axis, keepdims=True)
    wn = w / jnp.where(total > 0, total, 1.0)
    out = jnp.sum(outs * wn[..., None].astype(outs.dtype), axis=axis)
    lse = jnp.where(total > 0, jnp.log(jnp.where(total > 0, total, 1.0)) + m, -jnp.inf)
    return out, jnp.squeeze(lse, axis)


def relative_position_bucket(
    relative_position: jax.Array, *, bidirectional: bool, num_buckets: int = 32, max_distance: int = 128
) -> jax.Array:
    """T5's bucketing of relative positions (memory - query): exact for small |d|, log-spaced up to
    max_distance, one bucket beyond. Returns int32 in [0, num_buckets)."""
    rp = relative_position.astype(jnp.int32)
    buckets = jnp.zeros_like(rp)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (rp > 0).astype(jnp.int32) * num_buckets
        rp = jnp.abs(rp)
    else:
        rp = -jnp.minimum(rp, 0)
    max_exact = num_buckets // 2
    is_small = rp < max_exact
    safe = jnp.maximum(rp, 1).astype(jnp.float32)
    large = max_exact + (
        jnp.log(safe / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    ).astype(jnp.int32)
    large = jnp.minimum(large, num_buckets - 1)
    return buckets + jnp.where(is_small, rp, large)


def layer_norm_no_params(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """LayerNorm over the last axis without scale or bias (float32 statistics)."""
    x32 = x.astype(jnp.float32)
    mu = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mu), axis=-1, keepdims=True)
    return ((x32 - mu) * jax.lax.rsqrt(var + eps)).astype(x.dtype)
