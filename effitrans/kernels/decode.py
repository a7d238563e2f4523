"""Flash-decoding: few queries against a long KV cache, split over key blocks and merged by lse.

Decode is memory bound (T is 1 or a few tokens), so instead of a sequential loop over the cache we
cut it into blocks, compute every block's partial softmax (max, sum, weighted values) in parallel,
and merge the partials with a log-sum-exp weighted sum (Dao et al., "Flash-Decoding", 2023).

Positions: query t of row b sits at position lengths[b] - T + t and sees cache keys at positions
<= its own; slots at positions >= lengths[b] are ignored (not yet written).
"""

from __future__ import annotations

import jax.numpy as jnp


def xla_decode_attention(q, k_cache, v_cache, *, lengths, scale, block_k):
    """Blockwise decode attention.

    Args:
      q: [B, T, N, H]; k_cache: [B, S, K, H]; v_cache: [B, S, K, Hv]; lengths: int [B] (traced ok).
      scale: logit scale; block_k: keys per block (static int).
    Returns:
      out [B, T, N, Hv] in q.dtype.
    """
    b, t, n, h = q.shape
    s, kh, hv = k_cache.shape[1], k_cache.shape[2], v_cache.shape[-1]
    g = n // kh
    bk = min(block_k, s)
    nb = -(-s // bk)
    pad = nb * bk - s
    if pad:
        # Padded slots sit at positions >= S >= lengths, so the position test below masks them.
        k_cache = jnp.pad(k_cache, ((0, 0), (0, pad), (0, 0), (0, 0)))
        v_cache = jnp.pad(v_cache, ((0, 0), (0, pad), (0, 0), (0, 0)))
    kb = k_cache.reshape(b, nb, bk, kh, h)  # [B, nb, bk, K, H]
    vb = v_cache.reshape(b, nb, bk, kh, hv)  # [B, nb, bk, K, Hv]
    qg = q.reshape(b, t, kh, g, h)  # [B, T, K, G, H]
    logits = (
        jnp.einsum("BTKGH,BCSKH->BCKGTS", qg, kb, preferred_element_type=jnp.float32) * scale
    )  # [B, nb, K, G, T, bk]
    q_pos = lengths.astype(jnp.int32)[:, None] - t + jnp.arange(t, dtype=jnp.int32)  # [B, T]
    kv_pos = jnp.arange(nb * bk, dtype=jnp.int32).reshape(nb, bk)  # [nb, bk]
    allowed = kv_pos[None, :, None, :] <= q_pos[:, None, :, None]  # [B, nb, T, bk]
    logits = jnp.where(allowed[:, :, None, None], logits, -jnp.inf)
    # Per-block partial softmax; a block with no visible key has max -inf and contributes nothing.
    m = jnp.max(logits, axis=-1)  # [B, nb, K, G, T]
    m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(logits - m_safe[..., None])  # [B, nb, K, G, T, bk]
    l = jnp.sum(p, axis=-1)  # [B, nb, K, G, T]
    o = jnp.einsum(
        "BCKGTS,BCSKH->BCKGTH", p.astype(v_cache.dtype), vb, preferred_element_type=jnp.float32
    )  # [B, nb, K, G, T, Hv]
    # Merge: weight each block by exp(m_block - m_global).
    m_all = jnp.max(m, axis=1)  # [B, K, G, T]
    m_all_safe = jnp.where(jnp.isfinite(m_all), m_all, 0.0)
    w = jnp.exp(m - m_all_safe[:, None])  # [B, nb, K, G, T]; exp(-inf) = 0 for empty blocks
    l_all = jnp.sum(w * l, axis=1)  # [B, K, G, T]
    o_all = jnp.sum(w[..., None] * o, axis=1)  # [B, K, G, T, Hv]
    out = o_all / jnp.where(l_all > 0, l_all, 1.0)[..., None]
    out = jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(b, t, n, hv)  # [B, T, N, Hv]
    return out.astype(q.dtype)
