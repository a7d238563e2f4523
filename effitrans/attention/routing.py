"""Routing Transformer attention (Roy et al. 2021), as pure functions + a thin module.

- Queries and keys are layer-normalised over the head dim (no learned scale/bias), so they lie near a
  sphere of radius sqrt(H); the normalised vectors are used both for routing and for the logits
  (scaled by 1/sqrt(H)).
- Each routing head has C centroids mu [C, H] (spherical k-means: scores are x . mu / |mu|).
- Balanced top-w assignment: cluster c takes the w queries and the w keys with the highest score
  against its centroid (w = `routing_window`, default ceil(S / C)); the w queries attend to the w keys
  (one [w, w] block per cluster: C * w^2 logits per head instead of S^2). A query picked by several
  clusters merges its per-cluster results by their log-sum-exp; a query no cluster picks outputs 0.
- Centroids are updated online by exponential moving average (Sec. 4.1): each normalised query and key
  of real (non-padding) tokens goes to its nearest centroid; mu_c <- decay * mu_c + (1 - decay) * mean.
  Centroids are non-trainable state (`StateVariable`): saved, sharded and restored with the model, never
  given to an optimizer over nnx.Param. A forward pass does not change them: it proposes the EMA step
  (`propose_update`), which a training step applies with `commit_updates`; evaluation and serving drop it.
- The first `num_local_heads` heads are local sliding-window heads (the paper mixes both kinds):
  window `local_window` keys each side (or `local_window` previous keys when causal), through the kernel.
- causal=True masks later keys inside each cluster; segment_ids mask keys of another segment.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from effitrans import kernels
from effitrans.attention.attention_math import layer_norm_no_params, masked_softmax_stats
from effitrans.attention.base import AttentionBase
from effitrans.kernels import masks
from effitrans.layers.params import StateVariable, propose_update


class RoutingCentroids(StateVariable):
    """k-means centroids [N, C, H] of the routing heads, updated by EMA in training steps (not by gradients)."""


def normalize_rows(x: jax.Array) -> jax.Array:
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-6)


def routing_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    centroids: jax.Array,
    *,
    window: int,
    causal: bool,
    segment_ids: jax.Array | None = None,
) -> jax.Array:
    """q, k, v [B, S, N, H] (q, k already normalised), centroids [N, C, H] -> out [B, S, N, H]."""
    b, s, n, h = q.shape
    mu = normalize_rows(centroids.astype(jnp.float32))  # [N, C, H]
    qs = jnp.einsum("BSNH,NCH->BNCS", q.astype(jnp.float32), mu)  # [B, N, C, S]
    ks = jnp.einsum("BSNH,NCH->BNCS", k.astype(jnp.float32), mu)
    seg = jnp.ones((b, s), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
    if segment_ids is not None:  # padding (segment id 0) is picked last by every cluster
        pad = (seg == 0)[:, None, None, :]
        qs, ks = jnp.where(pad, -1e30, qs), jnp.where(pad, -1e30, ks)
    _, qi = jax.lax.top_k(qs, window)  # [B, N, C, w]
    _, ki = jax.lax.top_k(ks, window)  # [B, N, C, w]
    gather = lambda a, idx: jnp.take_along_axis(jnp.moveaxis(a, 2, 1)[:, :, None], idx[..., None], axis=3)
    cq = gather(q.astype(jnp.float32), qi)  # [B, N, C, w, H]
    ck = gather(k.astype(jnp.float32), ki)
    cv = gather(v.astype(jnp.float32), ki)
    logits = jnp.einsum("BNCqH,BNCkH->BNCqk", cq, ck, precision=jax.lax.Precision.HIGHEST) * h**-0.5
    segq = jax.vmap(lambda sg, ix: sg[ix])(seg, qi)  # [B, N, C, w]
    segk = jax.vmap(lambda sg, ix: sg[ix])(seg, ki)
    valid = segq[..., :, None] == segk[..., None, :]  # [B, N, C, w, w]
    if causal:
        valid &= ki[..., None, :] <= qi[..., :, None]
    p, lse = masked_softmax_stats(logits, valid)  # lse [B, N, C, w]
    out = jnp.einsum("BNCqk,BNCkH->BNCqH", p, cv, precision=jax.lax.Precision.HIGHEST)  # [B, N, C, w, H]

    # Scatter back: per query, merge the clusters that picked it by log-sum-exp (online, over clusters).
    num_c = centroids.shape[1]
    rows_b = jnp.arange(b)[:, None, None]
    rows_n = jnp.arange(n)[None, :, None]
    m = jnp.full((b, n, s), -jnp.inf, jnp.float32)
    for c in range(num_c):  # C is small and static
        m = m.at[rows_b, rows_n, qi[:, :, c]].max(lse[:, :, c])
    m_safe = jnp.where(jnp.isfinite(m), m, 0.0)  # [B, N, S]
    acc = jnp.zeros((b, n, s, h), jnp.float32)
    tot = jnp.zeros((b, n, s), jnp.float32)
    for c in range(num_c):
        idx = qi[:, :, c]  # [B, N, w]
        w_c = jnp.exp(lse[:, :, c] - jnp.take_along_axis(m_safe, idx, axis=-1))  # 0 where lse = -inf
        acc = acc.at[rows_b, rows_n, idx].add(w_c[..., None] * out[:, :, c])
        tot = tot.at[rows_b, rows_n, idx].add(w_c)
    res = acc / jnp.where(tot > 0, tot, 1.0)[..., None]  # [B, N, S, H]
    return jnp.moveaxis(res, 1, 2).astype(v.dtype)  # [B, S, N, H]


def ema_centroids(centroids: jax.Array, x: jax.Array, weight: jax.Array, decay: float) -> jax.Array:
    """One k-means EMA step. centroids [N, C, H]; x [B, M, N, H] normalised vectors; weight [B, M] (1 =
    real token). Each x goes to its nearest (cosine) centroid; centroids with no member are unchanged."""
    x = x.astype(jnp.float32)
    scores = jnp.einsum("BMNH,NCH->BMNC", x, normalize_rows(centroids.astype(jnp.float32)))
    assign = jax.nn.one_hot(jnp.argmax(scores, axis=-1), centroids.shape[1]) * weight[:, :, None, None]  # [B, M, N, C]
    sums = jnp.einsum("BMNC,BMNH->NCH", assign, x)  # [N, C, H]
    counts = jnp.sum(assign, axis=(0, 1))[..., None]  # [N, C, 1]
    mean = sums / jnp.maximum(counts, 1.0)
    return jnp.where(counts > 0, decay * centroids + (1.0 - decay) * mean, centroids)


class RoutingAttention(AttentionBase, kind="routing"):
    """Weights: q [D, N, H], k/v [D, N, H], o [N, H, D]; state: centroids [N - num_local_heads, C, H]."""

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        head_dim: int,
        *,
        num_clusters: int,
        window: int | None = None,
        num_local_heads: int = 0,
        local_window: int = 32,
        decay: float = 0.999,
        causal: bool,
        impl: str = "auto",
        rope_base: float | None = 10000.0,
        rope_layout: str = "half",
        rngs: nnx.Rngs,
        dtype=jnp.float32,
    ):
        if num_clusters < 1:
            raise ValueError(f"config.model.attention.num_clusters={num_clusters} must be >= 1")
        if window is not None and window < 1:
            raise ValueError(f"config.model.attention.routing_window={window} must be None or >= 1")
        if not 0 <= num_local_heads < num_heads:
            raise ValueError(
                f"config.model.attention.num_local_heads={num_local_heads} must be in "
                f"[0, num_heads={num_heads}) so at least one head routes"
            )
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"config.model.attention.centroid_decay={decay} must be in [0, 1)")
        self.num_heads, self.head_dim, self.num_clusters, self.window = num_heads, head_dim, num_clusters, window
        self.num_local_heads, self.local_window, self.decay = num_local_heads, local_window, decay
        self.causal, self.impl, self.dtype = causal, impl, dtype
        self.rope_base, self.rope_layout = rope_base, rope_layout
        self._init_heads(rngs, ("q", "k", "v"), d_model, num_heads, head_dim)
        self._init_output(rngs, num_heads, head_dim, d_model)
        self.centroids = RoutingCentroids(
            jax.random.normal(rngs.params(), (num_heads - num_local_heads, num_clusters, head_dim), jnp.float32),
            logical_axes=(None, None, None),
        )

    def _forward(self, x, positions, segment_ids):
        """x [B, S, D], positions [B, S] -> y [B, S, D]. Self-attention, no decode.

        Also proposes the centroids' EMA step (applied only by `commit_updates` in a training step).
        """
        s = x.shape[1]
        q = self._rope(layer_norm_no_params(self._project(x, self.q)), positions)  # [B, S, N, H]
        k = self._rope(layer_norm_no_params(self._project(x, self.k)), positions)  # [B, S, N, H]
        v = self._project(x, self.v)  # [B, S, N, H]
        window = min(self.window or -(-s // self.num_clusters), s)
        nl = self.num_local_heads
        mu = jax.lax.stop_gradient(self.centroids[...])
        outs = []
        if nl:
            lw = self.local_window
            mask = masks.SlidingWindow(lw, 0) if self.causal else masks.SlidingWindow(lw, lw)
            outs.append(
                kernels.attention(
                    q[:, :, :nl], k[:, :, :nl], v[:, :, :nl], mask=mask, segment_ids=segment_ids, impl=self.impl
                )
            )  # [B, S, nl, H]
        outs.append(
            routing_attention(
                q[:, :, nl:], k[:, :, nl:], v[:, :, nl:], mu, window=window, causal=self.causal, segment_ids=segment_ids
            )
        )  # [B, S, N - nl, H]
        out = jnp.concatenate(outs, axis=2) if nl else outs[0]  # [B, S, N, H]
        real = jnp.ones(x.shape[:2], jnp.float32) if segment_ids is None else (segment_ids != 0).astype(jnp.float32)
        both = jax.lax.stop_gradient(jnp.concatenate([q[:, :, nl:], k[:, :, nl:]], axis=1))  # [B, 2S, N-nl, H]
        propose_update(self, "centroids", ema_centroids(mu, both, jnp.concatenate([real, real], axis=1), self.decay))
        return self._output(out)  # [B, S, D]
