"""Strided and fixed Sparse Transformer patterns as block-sparse problems, by reordering positions.

A tiled kernel visits every tile that holds one allowed pair. ``Strided(l)`` allows every l-th earlier
key, so at any tile size <= l every tile row below the diagonal holds one: the block map is as dense
as causal. Both patterns split into two disjoint parts whose block maps are sparse once positions are
reordered, and the two partial softmaxes merge exactly by their log-sum-exp:

``Strided(l)`` (query i sees j with d = i - j in [0, l) or d a positive multiple of l):
  band:    ``SlidingWindow(left=l - 1)`` on the original order (d in [0, l)), O(S * l) work.
  strided: positions p = c * l + r are regrouped by residue r into l sequences of length S / l (the
           [S/l, l] -> [l, S/l] transpose); within one, query c sees c' < c (``Causal(offset=-1)``),
           which is d = (c - c') * l >= l. O(S^2 / (2 l)) work.
``Fixed(l, c)`` (query i sees j <= i in its own block, or j in an earlier block's last c positions):
  local:   ``Causal() & Chunked(l)`` on the original order, O(S * l) work.
  summary: the keys j with j % l >= l - c gathered into one sequence of S / l * c keys; query i sees
           compact key m iff m // c < i // l (``PrecedingBlocks(l, c)``). O(S^2 c / (2 l)) work.

Both need q_len == kv_len (the patterns are self-attention). Segment ids ride along (permuted or
gathered with their positions). Gradients flow through the merge and the kernels' lse outputs.
"""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp

from effitrans.kernels import masks as masks_lib

# attend(q, k, v, mask, segment_ids, max_block) -> (out [B, T, N, Hv] in q.dtype, lse f32 [B, N, T], -inf
# where no key); max_block (None or an int) caps the default tile size (the local parts are narrow bands).
AttendFn = Callable


def _band_block(width: int) -> int:
    """Largest default tile for a band of ``width`` keys: half of it, as a power of two >= 16 (at S=16384,
    window 128 on the CPU xla path: 1.0 s at 64, 1.6 s at 128, 2.7 s at 256)."""
    return max(16, (1 << max(0, (width - 1).bit_length())) // 2)


def reorderable(mask: masks_lib.Mask, q_len: int, kv_len: int) -> bool:
    """True when ``mask`` is a Strided or Fixed pattern that reordering turns block-sparse here."""
    if q_len != kv_len:
        return False
    if isinstance(mask, masks_lib.Strided):
        return 1 < mask.stride < kv_len
    if isinstance(mask, masks_lib.Fixed):
        return mask.summary < mask.block < kv_len
    return False


def _pad_seq(x, length: int):
    """Zero-pads axis 1 of x up to ``length``."""
    pad = length - x.shape[1]
    return x if pad == 0 else jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))


def _by_residue(x, stride: int):
    """[B, S, ...] -> [B * l, ceil(S / l), ...]: sequence r holds positions r, r + l, r + 2l, ..."""
    b, s = x.shape[:2]
    c = -(-s // stride)
    x = _pad_seq(x, c * stride).reshape(b, c, stride, *x.shape[2:])  # [B, C, l, ...]
    return jnp.swapaxes(x, 1, 2).reshape(b * stride, c, *x.shape[3:])  # [B * l, C, ...]


def _from_residue(x, batch: int, length: int):
    """Inverse of ``_by_residue`` for an output [B * l, C, ...] -> [B, S, ...]."""
    stride, c = x.shape[0] // batch, x.shape[1]
    x = jnp.swapaxes(x.reshape(batch, stride, c, *x.shape[2:]), 1, 2)  # [B, C, l, ...]
    return x.reshape(batch, c * stride, *x.shape[3:])[:, :length]


def _summary_keys(x, block: int, summary: int):
    """[B, S, ...] -> [B, ceil(S / l) * c, ...]: the last c positions of every block of l, in order."""
    b, s = x.shape[:2]
    nb = -(-s // block)
    x = _pad_seq(x, nb * block).reshape(b, nb, block, *x.shape[2:])[:, :, block - summary :]  # [B, nb, c, ...]
    return x.reshape(b, nb * summary, *x.shape[3:])


def merge(out_a, lse_a, out_b, lse_b):
    """Exact union of two softmaxes over disjoint key sets: out [B, T, N, Hv], lse [B, N, T] each."""
    m = jnp.maximum(lse_a, lse_b)  # [B, N, T]
    m = jnp.where(jnp.isfinite(m), m, 0.0)  # both empty: weights 0, out 0, lse -inf
    w_a, w_b = jnp.exp(lse_a - m), jnp.exp(lse_b - m)  # [B, N, T]; 0 for an empty part
    total = w_a + w_b
    lse = jnp.where(total > 0, m + jnp.log(jnp.where(total > 0, total, 1.0)), -jnp.inf)
    inv = jnp.where(total > 0, 1.0 / jnp.where(total > 0, total, 1.0), 0.0)
    # [B, N, T] -> [B, T, N, 1] weights on the outputs.
    wa_t = jnp.swapaxes(w_a * inv, 1, 2)[..., None]
    wb_t = jnp.swapaxes(w_b * inv, 1, 2)[..., None]
    out = wa_t * out_a.astype(jnp.float32) + wb_t * out_b.astype(jnp.float32)  # [B, T, N, Hv]
    return out.astype(out_a.dtype), lse


def reordered_attention(attend: AttendFn, q, k, v, *, mask, segment_ids):
    """Runs a ``reorderable`` Strided or Fixed mask as two block-sparse calls of ``attend``, merged.

    q [B, T, N, H], k [B, S, K, H], v [B, S, K, Hv] (T == S); segment_ids None or (q_seg, kv_seg)
    int32 [B, T], [B, S]. Returns (out [B, T, N, Hv], lse f32 [B, N, T]).
    """
    b, t = q.shape[:2]
    if isinstance(mask, masks_lib.Strided):
        l = mask.stride
        out_a, lse_a = attend(q, k, v, masks_lib.SlidingWindow(left=l - 1), segment_ids, _band_block(l))
        segs_b = None if segment_ids is None else tuple(_by_residue(x, l) for x in segment_ids)
        out_b, lse_b = attend(
            _by_residue(q, l), _by_residue(k, l), _by_residue(v, l), masks_lib.Causal(offset=-1), segs_b, None
        )  # out [B * l, C, N, Hv], lse [B * l, N, C]
        out_b = _from_residue(out_b, b, t)  # [B, T, N, Hv]
        lse_b = jnp.swapaxes(_from_residue(jnp.swapaxes(lse_b, 1, 2), b, t), 1, 2)  # [B, N, T]
        return merge(out_a, lse_a, out_b, lse_b)
    if isinstance(mask, masks_lib.Fixed):
        l, c = mask.block, mask.summary
        out_a, lse_a = attend(q, k, v, masks_lib.Causal() & masks_lib.Chunked(l), segment_ids, _band_block(l))
        if c == 0:
            return out_a, lse_a
        segs_b = None if segment_ids is None else (segment_ids[0], _summary_keys(segment_ids[1], l, c))
        out_b, lse_b = attend(
            q, _summary_keys(k, l, c), _summary_keys(v, l, c), masks_lib.PrecedingBlocks(l, c), segs_b, None
        )  # out [B, T, N, Hv], lse [B, N, T]
        return merge(out_a, lse_a, out_b, lse_b)
    raise ValueError(f"reordered_attention: mask must be a Strided or Fixed pattern, got {mask!r}.")
