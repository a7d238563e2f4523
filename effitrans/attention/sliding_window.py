"""Longformer sliding-window attention (Beltagy et al. 2020) with optional global tokens.

Every token attends to a local window of keys, `left` before and `right` after it (inclusive ranges,
the query itself always included), through `kernels.attention` with a `SlidingWindow` mask, so the cost
is O(S * window) and nothing S x S is ever built.

Global tokens (Longformer Sec. 3.1, "global attention"): the first `num_global` positions of a sequence
(e.g. CLS). Every token attends to them with the local projections, and they attend to every token with
their own projections Q_g, K_g, V_g (weights `q_global`, `k_global`, `v_global`), as in the Longformer
reference implementation. The local pass uses the mask `SlidingWindow(left, right) | GlobalTokens(n)`;
the n global query rows are then replaced by a separate full-attention pass of n queries over S keys
(O(n * S)).

Causal models use `SlidingWindow(left, 0)` (right must be 0), global tokens intersected with `Causal()`.
Causal decoding keeps a ring buffer of the last `left + 1` keys (`WindowCache`), so the cache does not
grow with the sequence; decode is supported without global tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct

from effitrans.attention.dense import DenseAttention
from effitrans.kernels import masks


@struct.dataclass
class WindowCache:
    """Ring buffer of the last W = left + 1 keys/values of each row.

    k: [B, W, K, H], v: [B, W, K, H]; pos: int32 [B, W], the absolute position held by each slot
    (-1 = empty); token at position p lives in slot p % W. lengths: int32 [B], tokens seen so far.
    """

    k: jax.Array
    v: jax.Array
    pos: jax.Array
    lengths: jax.Array

    @classmethod
    def zeros(cls, batch: int, window: int, num_kv_heads: int, head_dim: int, dtype=jnp.float32):
        return cls(
            k=jnp.zeros((batch, window, num_kv_heads, head_dim), dtype),
            v=jnp.zeros((batch, window, num_kv_heads, head_dim), dtype),
            pos=jnp.full((batch, window), -1, jnp.int32),
            lengths=jnp.zeros((batch,), jnp.int32),
        )

    @property
    def window(self) -> int:
        return self.k.shape[1]


def window_decode_attention(q, k_new, v_new, cache: WindowCache, *, scale: float):
    """The T newest tokens against a ring buffer plus themselves; returns (out [B, T, N, H], new cache).

    q [B, T, N, H], k_new/v_new [B, T, K, H] at positions lengths[b] .. lengths[b] + T - 1. Query at
    position p sees keys at positions p - W + 1 .. p (W = cache.window). Cost O(T * (W + T)).
    """
    b, t, n, h = q.shape
    kh, w = k_new.shape[2], cache.window
    g = n // kh
    new_pos = cache.lengths[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]  # [B, T]
    keys = jnp.concatenate([cache.k, k_new.astype(cache.k.dtype)], axis=1)  # [B, W+T, K, H]
    vals = jnp.concatenate([cache.v, v_new.astype(cache.v.dtype)], axis=1)  # [B, W+T, K, H]
    kpos = jnp.concatenate([cache.pos, new_pos], axis=1)  # [B, W+T]
    qg = q.reshape(b, t, kh, g, h)  # [B, T, K, G, H]
    logits = (
        jnp.einsum("BTKGH,BSKH->BKGTS", qg, keys.astype(q.dtype), preferred_element_type=jnp.float32) * scale
    )  # [B, K, G, T, W+T]
    d = new_pos[:, :, None] - kpos[:, None, :]  # [B, T, W+T]
    ok = (kpos[:, None, :] >= 0) & (d >= 0) & (d < w)
    logits = jnp.where(ok[:, None, None], logits, -jnp.inf)
    p = jax.nn.softmax(logits, axis=-1)  # every row sees itself
    out = jnp.einsum("BKGTS,BSKH->BTKGH", p, vals.astype(jnp.float32)).reshape(b, t, n, h)

    # Write the newest min(T, W) tokens into their slots (older ones of this call would be overwritten).
    keep = min(t, w)
    slots = new_pos[:, t - keep :] % w  # [B, keep]
    rows = jnp.arange(b)[:, None]
    cache = WindowCache(
        k=cache.k.at[rows, slots].set(k_new[:, t - keep :].astype(cache.k.dtype)),
        v=cache.v.at[rows, slots].set(v_new[:, t - keep :].astype(cache.v.dtype)),
        pos=cache.pos.at[rows, slots].set(new_pos[:, t - keep :]),
        lengths=cache.lengths + t,
    )
    return out.astype(q.dtype), cache


def sliding_window_mask(left: int, right: int, num_global: int, causal: bool) -> masks.Mask:
    """The kernel mask of the local pass: window | global columns (and rows), & causal for causal models."""
    mask = masks.SlidingWindow(left, right)
    if num_global:
        mask = mask | masks.GlobalTokens(num_global)
    if causal:
        mask = mask & masks.Causal()
    return mask


class SlidingWindowAttention(DenseAttention, kind="sliding_window", cross_attention=False):
    """Longformer attention. Weights: q [D, N, H], k/v [D, K, H], o [N, H, D] (+ q/k/v_global if num_global).

    dims: d_model, num_heads, num_kv_heads, head_dim, as for DenseAttention.
    """

    def __init__(
        self,
        *dims: int,
        window_left: int,
        window_right: int = 0,
        num_global: int = 0,
        causal: bool,
        rngs: nnx.Rngs,
        **kw,
    ):
        if window_left < 0 or window_right < 0:
            raise ValueError(f"window_left={window_left} and window_right={window_right} must be >= 0")
        if causal and window_right:
            raise ValueError(
                f"config.model.attention.window_right={window_right} must be 0 in a causal model "
                f"(a token cannot see later tokens)"
            )
        if num_global < 0:
            raise ValueError(f"num_global={num_global} must be >= 0")
        super().__init__(*dims, causal=causal, rngs=rngs, **kw)
        self.window_left, self.window_right, self.num_global = window_left, window_right, num_global
        if num_global:
            d_model, num_heads, num_kv_heads, head_dim = dims
            self._init_heads(rngs, ("q_global",), d_model, num_heads, head_dim)
            self._init_heads(rngs, ("k_global", "v_global"), d_model, num_kv_heads, head_dim, axis="kv_heads")

    def init_cache(self, batch: int, max_len: int, dtype=jnp.float32) -> WindowCache:
        """A ring buffer of the window (max_len is accepted for the protocol; the cache never grows)."""
        del max_len
        return WindowCache.zeros(batch, self.window_left + 1, self.num_kv_heads, self.head_dim, dtype)

    def _forward(self, x, positions, segment_ids):
        """x [B, T, D] -> y [B, T, D]: the local pass, then the global rows replaced by their own pass."""
        q, k, v = self._qkv(x, positions)  # [B, T, N, H], [B, T, K, H] x 2
        mask = sliding_window_mask(self.window_left, self.window_right, self.num_global, self.causal)
        out = self._kernel(q, k, v, mask, segment_ids)  # [B, T, N, H]
        if self.num_global:
            n = min(self.num_global, x.shape[1])
            qg = self._project(x[:, :n], self.q_global, positions[:, :n])  # [B, n, N, H]
            kg = self._project(x, self.k_global, positions)  # [B, T, K, H]
            vg = self._project(x, self.v_global)  # [B, T, K, H]
            seg = None if segment_ids is None else (segment_ids[:, :n], segment_ids)
            gmask = masks.Causal() if self.causal else masks.Full()
            out = out.at[:, :n].set(self._kernel(qg, kg, vg, gmask, seg))  # [B, n, N, H] into the first rows
        return self._output(out)  # [B, T, D]

    def _decode(self, x, positions, cache: WindowCache):
        """The newest T tokens against the ring buffer -> (y [B, T, D], cache)."""
        if not self.causal or self.num_global:
            raise ValueError(
                "sliding_window decode needs a causal model without global tokens "
                f"(causal={self.causal}, num_global={self.num_global})"
            )
        q, k, v = self._qkv(x, positions)  # [B, T, N, H], [B, T, K, H] x 2
        out, cache = window_decode_attention(q, k, v, cache, scale=self.head_dim**-0.5)
        return self._output(out), cache
