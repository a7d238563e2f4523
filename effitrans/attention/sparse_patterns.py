r"""Sparse Transformer factorised attention (Child et al. 2019, Sec. 4.2 and 5.2), split across heads.

The paper factorises full attention into two patterns A^(1), A^(2) and integrates them in one of three
ways; here the "multi-head" way: the first half of the heads use A^(1), the second half A^(2) (with GQA
the kv heads are split the same way; with one kv head, both halves share it). With l = stride (strided)
or block (fixed), c = summary, d = i - j:

| kind | A^(1) (first half of the heads) | A^(2) (second half) |
|---|---|---|
| strided, causal | 0 <= d < l | d >= 0 and d % l == 0 |
| fixed, causal | j <= i and j // l == i // l | j <= i and j % l >= l - c |
| strided, bidirectional | \|d\| < l | d % l == 0 |
| fixed, bidirectional | j // l == i // l | j % l >= l - c |

The bidirectional rows (for encoders) drop the causal condition; the paper only defines the causal
ones. Each pattern is a `kernels.masks.Mask`, so the block-sparse kernel skips empty blocks and the cost
is O(S * (l + S / l)) for strided, never S x S. In the causal fixed A^(2) pattern the first l - c
queries see no key; a query that sees no key outputs 0 (the kernel's rule).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from effitrans.attention.base import AttentionBase
from effitrans.attention.dense import DenseAttention
from effitrans.kernels import masks


@dataclasses.dataclass(frozen=True)
class StridedColumns(masks.Mask):
    """Query i sees key j iff (i - j) % stride == 0 (and j <= i if causal)."""

    stride: int
    causal: bool = True

    def mask_fn(self, q_idx, kv_idx):
        d = q_idx - kv_idx
        ok = d % self.stride == 0
        return (ok & (d >= 0)) if self.causal else ok

    def _any_all(self, qa, qb, ka, kb):
        l = self.stride
        d_lo, d_hi = qa - kb, qb - ka  # d takes every integer in [d_lo, d_hi] over a block
        lo = np.maximum(d_lo, 0) if self.causal else d_lo
        first = -(-lo // l) * l  # smallest multiple of l >= lo
        any_ = (lo <= d_hi) & (first <= d_hi)
        all_ = ((l == 1) | (d_lo == d_hi) & (d_lo % l == 0)) & ((d_lo >= 0) if self.causal else True)
        return any_, all_


# The fixed pattern's summary columns are the kernel's own mask (shared with masks.Fixed).
SummaryColumns = masks.SummaryColumns


def pattern_masks(
    kind: str, *, causal: bool, stride: int = 0, block: int = 0, summary: int = 1
) -> tuple[masks.Mask, masks.Mask]:
    """(A1, A2) masks of the Sparse Transformer pattern `kind` ("strided" | "fixed")."""
    if kind == "strided":
        if causal:
            return masks.SlidingWindow(stride - 1, 0), StridedColumns(stride, causal=True)
        return masks.SlidingWindow(stride - 1, stride - 1), StridedColumns(stride, causal=False)
    if kind == "fixed":
        a1, a2 = masks.Chunked(block), SummaryColumns(block, summary)
        if causal:
            return a1 & masks.Causal(), a2 & masks.Causal()
        return a1, a2
    raise ValueError(f"pattern kind={kind!r} is not one of ('strided', 'fixed')")


def split_heads(num_heads: int, num_kv_heads: int) -> tuple[slice, slice, slice, slice]:
    """(q heads of A1, kv heads of A1, q heads of A2, kv heads of A2); errors if heads do not split."""
    if num_heads % 2:
        raise ValueError(
            f"config.model.num_heads={num_heads} must be even: the Sparse Transformer patterns "
            f"give half of the heads to each of its two patterns"
        )
    hq = num_heads // 2
    if num_kv_heads == 1:
        return slice(0, hq), slice(0, 1), slice(hq, num_heads), slice(0, 1)
    if num_kv_heads % 2 or hq % (num_kv_heads // 2):
        raise ValueError(
            f"config.model.num_kv_heads={num_kv_heads} must be 1 or an even divisor of num_heads="
            f"{num_heads} so the two head halves keep whole kv groups"
        )
    hk = num_kv_heads // 2
    return slice(0, hq), slice(0, hk), slice(hq, num_heads), slice(hk, num_kv_heads)


class SparsePatternAttention(DenseAttention, cross_attention=False, decodes=False):
    """Strided or fixed Sparse Transformer attention; same weights as DenseAttention.

    dims: d_model, num_heads, num_kv_heads, head_dim, as for DenseAttention.
    """

    init_cache = AttentionBase.init_cache  # no cache

    def __init__(self, *dims: int, pattern: str, stride: int = 0, block: int = 0, summary: int = 1, **kw):
        if pattern == "strided" and stride < 1:
            raise ValueError(f"config.model.attention.stride={stride} must be >= 1")
        if pattern == "fixed" and (block < 1 or not 1 <= summary <= block):
            raise ValueError(f"config.model.attention.summary={summary} must be in [1, block={block}]")
        self.heads = split_heads(*dims[1:3])  # (num_heads, num_kv_heads)
        super().__init__(*dims, **kw)
        self.pattern, self.stride, self.block, self.summary = pattern, stride, block, summary

    @property
    def kind(self) -> str:
        return f"sparse_{self.pattern}"

    def masks(self) -> tuple[masks.Mask, masks.Mask]:
        return pattern_masks(
            self.pattern, causal=self.causal, stride=self.stride, block=self.block, summary=self.summary
        )

    def _forward(self, x, positions, segment_ids):
        """x [B, T, D] -> y [B, T, D]: half of the heads through each pattern."""
        q, k, v = self._qkv(x, positions)  # [B, T, N, H], [B, T, K, H] x 2
        outs = [
            self._kernel(q[:, :, qs], k[:, :, ks], v[:, :, ks], mask, segment_ids)  # [B, T, N/2, H]
            for (qs, ks), mask in zip((self.heads[:2], self.heads[2:]), self.masks())
        ]
        return self._output(jnp.concatenate(outs, axis=2))  # [B, T, N, H] -> [B, T, D]
