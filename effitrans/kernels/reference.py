"""Dense reference attention, written from the definition: softmax(q k^T * scale + mask) v.

Everything is computed in float32 with precision=HIGHEST and materialises [B, K, G, T, S] logits, so
it is the oracle for the fast implementations, not something to run at long lengths.

Fully masked rows (a query that sees no key) return output 0 and lse = -inf; their gradients are 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from effitrans.kernels import masks as masks_lib

_HIGHEST = jax.lax.Precision.HIGHEST


def allowed_pairs(mask: masks_lib.Mask, segment_ids, q_len: int, kv_len: int) -> jax.Array:
    """Bool [B or 1, T, S]: the mask AND the segment-equality constraint."""
    q_idx = jnp.arange(q_len, dtype=jnp.int32)[:, None]  # [T, 1]
    kv_idx = jnp.arange(kv_len, dtype=jnp.int32)[None, :]  # [1, S]
    allowed = jnp.broadcast_to(mask.mask_fn(q_idx, kv_idx), (q_len, kv_len))[None]  # [1, T, S]
    if segment_ids is not None:
        q_seg, kv_seg = segment_ids  # [B, T], [B, S]
        allowed = allowed & (q_seg[:, :, None] == kv_seg[:, None, :])  # [B, T, S]
    return allowed


def reference_attention(q, k, v, *, mask, segment_ids=None, scale, return_lse=False):
    """Dense masked attention.

    Args:
      q: [B, T, N, H]; k: [B, S, K, H]; v: [B, S, K, Hv]; N % K == 0.
      mask: a masks.Mask.
      segment_ids: None or (q_segment_ids [B, T], kv_segment_ids [B, S]).
      scale: float multiplying the logits.
      return_lse: also return the log-sum-exp of the scaled, masked logits.

    Returns:
      out [B, T, N, Hv] in q.dtype, and with return_lse also lse [B, N, T] float32.
    """
    b, t, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]
    g = n // kh
    qf = q.astype(jnp.float32).reshape(b, t, kh, g, h)  # [B, T, K, G, H]
    kf = k.astype(jnp.float32)
    vf = v.astype(jnp.float32)
    logits = jnp.einsum("BTKGH,BSKH->BKGTS", qf, kf, precision=_HIGHEST) * scale  # [B, K, G, T, S]
    allowed = allowed_pairs(mask, segment_ids, t, s)[:, None, None]  # [B|1, 1, 1, T, S]
    logits = jnp.where(allowed, logits, -jnp.inf)
    # The max only stabilises exp; stop its gradient (softmax is shift invariant) and replace -inf
    # (fully masked rows) by 0 so exp(-inf - 0) = 0 instead of NaN.
    row_max = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))  # [B, K, G, T, 1]
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    p = jnp.exp(logits - row_max)  # [B, K, G, T, S]
    denom = jnp.sum(p, axis=-1, keepdims=True)  # [B, K, G, T, 1]
    probs = p / jnp.where(denom > 0, denom, 1.0)
    out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, vf, precision=_HIGHEST)  # [B, T, K, G, Hv]
    out = out.reshape(b, t, n, v.shape[-1]).astype(q.dtype)
    if not return_lse:
        return out
    safe_denom = jnp.where(denom > 0, denom, 1.0)
    lse = jnp.where(denom > 0, jnp.log(safe_denom) + row_max, -jnp.inf)[..., 0]  # [B, K, G, T]
    return out, lse.reshape(b, n, t)


def reference_decode_attention(q, k_cache, v_cache, *, lengths, scale):
    """Dense decode attention: the T newest tokens (positions lengths-T .. lengths-1) over a cache.

    Args:
      q: [B, T, N, H]; k_cache: [B, S, K, H]; v_cache: [B, S, K, Hv]; lengths: int [B].
    Returns:
      out [B, T, N, Hv] in q.dtype.
    """
    b, t, n, h = q.shape
    s, kh = k_cache.shape[1], k_cache.shape[2]
    g = n // kh
    qf = q.astype(jnp.float32).reshape(b, t, kh, g, h)  # [B, T, K, G, H]
    logits = (
        jnp.einsum("BTKGH,BSKH->BKGTS", qf, k_cache.astype(jnp.float32), precision=_HIGHEST) * scale
    )  # [B, K, G, T, S]
    q_pos = lengths.astype(jnp.int32)[:, None] - t + jnp.arange(t, dtype=jnp.int32)[None]  # [B, T]
    kv_pos = jnp.arange(s, dtype=jnp.int32)  # [S]
    allowed = kv_pos[None, None, :] <= q_pos[:, :, None]  # [B, T, S]
    logits = jnp.where(allowed[:, None, None], logits, -jnp.inf)
    row_max = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    p = jnp.exp(logits - row_max)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    probs = p / jnp.where(denom > 0, denom, 1.0)
    out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v_cache.astype(jnp.float32), precision=_HIGHEST)
    return out.reshape(b, t, n, v_cache.shape[-1]).astype(q.dtype)
