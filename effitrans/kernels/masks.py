"""Attention masks as small composable objects, with block maps computed by interval reasoning.

Positions. A mask sees absolute integer positions: query row ``i`` (0 <= i < q_len) and key column
``j`` (0 <= j < kv_len). Masks that relate ``i`` and ``j`` (Causal, SlidingWindow) take an ``offset``
that places query ``i`` at key position ``i + offset``. With ``offset=0`` the alignment is top-left
(query 0 sits on key 0), which is what self-attention wants. When a short query block is the tail of a
longer key sequence (prefill continuation, chunked decoding), use ``bottom_right_offset(q_len, kv_len)``
= ``kv_len - q_len`` so that the last query sits on the last key.

Every mask gives:
  * ``mask_fn(q_idx, kv_idx) -> bool array``: elementwise on broadcastable integer arrays (numpy or
    jax, traced or not). Written only with Python operators so numpy stays numpy and tracers trace.
  * ``dense(q_len, kv_len) -> np.ndarray bool [q_len, kv_len]``: for tests and small references.
  * ``block_map(q_len, kv_len, block_q, block_k) -> np.ndarray int8 [nq, nk]`` with SKIP=0,
    PARTIAL=1, FULL=2, computed from each block's index intervals in O(nq * nk), never via q_len x kv_len.

Block-map soundness: SKIP means no allowed pair in the block's valid region; FULL means every pair in
the block is allowed *and* the block lies wholly inside [0, q_len) x [0, kv_len) (a block hanging past
the end is at most PARTIAL, so kernels mask the padding). Base masks are exact; ``|`` and ``&`` are
exact for FULL of ``&`` and SKIP of ``|`` and may report PARTIAL conservatively otherwise.

Masks are frozen dataclasses, hence hashable and usable as static jit arguments.

Block lists. ``mask_info(mask, q_len, kv_len, block_q, block_k, has_segments)`` turns a block map into
what the block-sparse kernels walk (the role of splash attention's ``MaskInfo``): per q block the
left-packed list of kv blocks to visit with their kind (partial / full) and count (``rows``), the
transposed lists per kv block (``cols``, for dk/dv) and the lists of one kind (``partial_rows``,
``full_rows``). ``block_lists`` is the packer they all come from.
"""

from __future__ import annotations

import dataclasses
import functools
import operator
from typing import Any

import numpy as np

SKIP = 0
PARTIAL = 1
FULL = 2


def bottom_right_offset(q_len: int, kv_len: int) -> int:
    """Offset that aligns the last query with the last key: ``kv_len - q_len``.

    Example: ``Causal(offset=bottom_right_offset(T, S))`` is causal attention of T new tokens that
    follow S - T cached ones.
    """
    return kv_len - q_len


def _check_int(owner: str, name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{owner}: {name} must be an int >= {minimum}, got {value!r}.")


class Mask:
    """Base class. Subclasses implement ``mask_fn`` and ``_any_all``."""

    def mask_fn(self, q_idx, kv_idx):
        """Allowed[i, j] for broadcastable integer position arrays ``q_idx``, ``kv_idx``."""
        raise NotImplementedError

    def _any_all(self, qa, qb, ka, kb):
        """(any, all) over blocks with inclusive index ranges [qa, qb] x [ka, kb].

        Args are broadcastable int64 numpy arrays (one entry per block). ``any`` must be True whenever
        some pair is allowed (True conservatively is fine); ``all`` must be True only when every pair
        is allowed.
        """
        raise NotImplementedError

    def dense(self, q_len: int, kv_len: int) -> np.ndarray:
        """Dense bool mask [q_len, kv_len]; tests only (O(q_len * kv_len) memory)."""
        q_idx = np.arange(q_len, dtype=np.int64)[:, None]
        kv_idx = np.arange(kv_len, dtype=np.int64)[None, :]
        out = np.asarray(self.mask_fn(q_idx, kv_idx), dtype=bool)
        return np.broadcast_to(out, (q_len, kv_len)).copy()

    def block_map(self, q_len: int, kv_len: int, block_q: int, block_k: int) -> np.ndarray:
        """int8 [ceil(q_len / block_q), ceil(kv_len / block_k)]: 0 skip, 1 partial, 2 full."""
        for name, value in (("q_len", q_len), ("kv_len", kv_len), ("block_q", block_q), ("block_k", block_k)):
            _check_int("block_map", name, value, 1)
        nq = -(-q_len // block_q)
        nk = -(-kv_len // block_k)
        q_start = np.arange(nq, dtype=np.int64)[:, None] * block_q  # [nq, 1]
        k_start = np.arange(nk, dtype=np.int64)[None, :] * block_k  # [1, nk]
        # Valid (unpadded) inclusive ranges of each block.
        q_last = np.minimum(q_start + block_q, q_len) - 1
        k_last = np.minimum(k_start + block_k, kv_len) - 1
        any_, all_ = self._any_all(q_start, q_last, k_start, k_last)
        any_ = np.broadcast_to(any_, (nq, nk))
        all_ = np.broadcast_to(all_, (nq, nk))
        # A block hanging over the end contains padding, which must be masked: never FULL.
        padded = (q_start + block_q > q_len) | (k_start + block_k > kv_len)
        out = np.where(any_, PARTIAL, SKIP).astype(np.int8)
        out = np.where(all_ & any_ & ~padded, FULL, out).astype(np.int8)
        return out

    def __or__(self, other: Mask) -> Mask:
        if not isinstance(other, Mask):
            return NotImplemented
        return Or(self, other)

    def __and__(self, other: Mask) -> Mask:
        if not isinstance(other, Mask):
            return NotImplemented
        return And(self, other)


@dataclasses.dataclass(frozen=True)
class Full(Mask):
    """Every query sees every key."""

    def mask_fn(self, q_idx, kv_idx):
        return (q_idx >= 0) | (kv_idx >= 0)  # True with the broadcast shape (positions are >= 0).

    def _any_all(self, qa, qb, ka, kb):
        return np.True_, np.True_


@dataclasses.dataclass(frozen=True)
class Causal(Mask):
    """Query i (at key position i + offset) sees keys j <= i + offset."""

    offset: int = 0

    def __post_init__(self):
        if isinstance(self.offset, bool) or not isinstance(self.offset, (int, np.integer)):
            raise ValueError(f"Causal: offset must be an int, got {self.offset!r}.")

    def mask_fn(self, q_idx, kv_idx):
        return kv_idx <= q_idx + self.offset

    def _any_all(self, qa, qb, ka, kb):
        return ka <= qb + self.offset, kb <= qa + self.offset


@dataclasses.dataclass(frozen=True)
class SlidingWindow(Mask):
    """Query i (at position p = i + offset) sees keys j with p - left <= j <= p + right (inclusive).

    A causal window of W keys including the query itself is ``SlidingWindow(left=W - 1, right=0)``.
    """

    left: int
    right: int = 0
    offset: int = 0

    def __post_init__(self):
        _check_int("SlidingWindow", "left", self.left, 0)
        _check_int("SlidingWindow", "right", self.right, 0)
        if isinstance(self.offset, bool) or not isinstance(self.offset, (int, np.integer)):
            raise ValueError(f"SlidingWindow: offset must be an int, got {self.offset!r}.")

    def mask_fn(self, q_idx, kv_idx):
        d = kv_idx - (q_idx + self.offset)
        return (d >= -self.left) & (d <= self.right)

    def _any_all(self, qa, qb, ka, kb):
        # d = j - (i + offset) takes every integer value in [d_lo, d_hi] over a rectangular block.
        d_lo = ka - qb - self.offset
        d_hi = kb - qa - self.offset
        any_ = (d_lo <= self.right) & (d_hi >= -self.left)
        all_ = (d_lo >= -self.left) & (d_hi <= self.right)
        return any_, all_


@dataclasses.dataclass(frozen=True)
class Strided(Mask):
    """Sparse Transformer "strided" pattern (Child et al. 2019, Sec. 4.2), causal, both heads unioned.

    With d = i - j and l = stride, query i sees key j iff d >= 0 and (d < l or d % l == 0): the
    previous l positions (A^(1)) plus every l-th earlier position (A^(2)).
    """

    stride: int

    def __post_init__(self):
        _check_int("Strided", "stride", self.stride, 1)

    def mask_fn(self, q_idx, kv_idx):
        d = q_idx - kv_idx
        return (d >= 0) & ((d < self.stride) | (d % self.stride == 0))

    def _any_all(self, qa, qb, ka, kb):
        l = self.stride
        d_lo = qa - kb  # d = i - j covers every integer in [d_lo, d_hi] over the block
        d_hi = qb - ka
        lo = np.maximum(d_lo, 0)
        first_multiple = -(-lo // l) * l  # smallest multiple of l that is >= lo
        any_ = (lo <= d_hi) & ((lo < l) | (first_multiple <= d_hi))
        # All allowed: d_lo >= 0 and every d in [max(d_lo, l), d_hi] is a multiple of l, which for a
        # contiguous range means it is empty or a single multiple (or l == 1: everything allowed).
        tail_lo = np.maximum(d_lo, l)
        tail_ok = (tail_lo > d_hi) | ((tail_lo == d_hi) & (d_hi % l == 0)) | (l == 1)
        all_ = (d_lo >= 0) & tail_ok
        return any_, all_


@dataclasses.dataclass(frozen=True)
class SummaryColumns(Mask):
    """Keys j with j % block >= block - summary (the last `summary` keys of every block)."""

    block: int
    summary: int

    def mask_fn(self, q_idx, kv_idx):
        return (kv_idx % self.block >= self.block - self.summary) & (q_idx >= 0)

    def _any_all(self, qa, qb, ka, kb):
        l, c = self.block, self.summary
        same_block = (ka // l) == (kb // l)
        # Within one block the residues run ka%l..kb%l; across a boundary they include l-1.
        any_ = np.where(same_block, kb % l >= l - c, True) & (c > 0)
        all_ = (same_block & (ka % l >= l - c)) | (c >= l)
        return any_, all_


@dataclasses.dataclass(frozen=True)
class Fixed(Mask):
    """Sparse Transformer "fixed" pattern (Child et al. 2019, Sec. 4.2), causal, both heads unioned.

    With l = block and c = summary, query i sees key j iff j <= i and (j // l == i // l or
    j % l >= l - c): its own block (A^(1)) plus the last c "summary" keys of every block (A^(2)).
    """

    block: int
    summary: int

    def __post_init__(self):
        _check_int("Fixed", "block", self.block, 1)
        _check_int("Fixed", "summary", self.summary, 0)
        if self.summary > self.block:
            raise ValueError(f"Fixed: summary must be <= block ({self.block}), got {self.summary!r}.")

    def _parts(self) -> Mask:
        return Causal() & (Chunked(self.block) | SummaryColumns(self.block, self.summary))

    def mask_fn(self, q_idx, kv_idx):
        return self._parts().mask_fn(q_idx, kv_idx)

    def _any_all(self, qa, qb, ka, kb):
        return self._parts()._any_all(qa, qb, ka, kb)


@dataclasses.dataclass(frozen=True)
class GlobalTokens(Mask):
    """The first n positions are global: query i sees key j iff i < n or j < n."""

    n: int

    def __post_init__(self):
        _check_int("GlobalTokens", "n", self.n, 0)

    def mask_fn(self, q_idx, kv_idx):
        return (q_idx < self.n) | (kv_idx < self.n)

    def _any_all(self, qa, qb, ka, kb):
        return (qa < self.n) | (ka < self.n), (qb < self.n) | (kb < self.n)


@dataclasses.dataclass(frozen=True)
class Chunked(Mask):
    """Block-diagonal: query i sees key j iff i // size == j // size (same positions for q and kv)."""

    size: int

    def __post_init__(self):
        _check_int("Chunked", "size", self.size, 1)

    def mask_fn(self, q_idx, kv_idx):
        return q_idx // self.size == kv_idx // self.size

    def _any_all(self, qa, qb, ka, kb):
        s = self.size
        any_ = np.maximum(qa // s, ka // s) <= np.minimum(qb // s, kb // s)
        all_ = (qa // s == qb // s) & (ka // s == kb // s) & (qa // s == ka // s)
        return any_, all_


@dataclasses.dataclass(frozen=True)
class PrecedingBlocks(Mask):
    """Query i sees key j iff key block j // kv_block comes before query block i // q_block.

    The summary part of ``Fixed(block, summary)`` once its summary keys are gathered into a compact
    sequence (``kernels.reorder``): ``PrecedingBlocks(q_block=block, kv_block=summary)``.
    """

    q_block: int
    kv_block: int

    def __post_init__(self):
        _check_int("PrecedingBlocks", "q_block", self.q_block, 1)
        _check_int("PrecedingBlocks", "kv_block", self.kv_block, 1)

    def mask_fn(self, q_idx, kv_idx):
        return kv_idx // self.kv_block < q_idx // self.q_block

    def _any_all(self, qa, qb, ka, kb):
        # The key block grows with j and the query block with i: the extreme corners decide.
        return ka // self.kv_block < qb // self.q_block, kb // self.kv_block < qa // self.q_block


@dataclasses.dataclass(frozen=True)
class _Combined(Mask):
    """Two masks combined elementwise by ``_op`` (| or &), in mask_fn and in block maps alike."""

    a: Mask
    b: Mask
    _op = None  # a binary operator on bool arrays, set by the subclass

    def mask_fn(self, q_idx, kv_idx):
        return self._op(self.a.mask_fn(q_idx, kv_idx), self.b.mask_fn(q_idx, kv_idx))

    def _any_all(self, qa, qb, ka, kb):
        a_any, a_all = self.a._any_all(qa, qb, ka, kb)
        b_any, b_all = self.b._any_all(qa, qb, ka, kb)
        return self._op(a_any, b_any), self._op(a_all, b_all)


@dataclasses.dataclass(frozen=True)
class Or(_Combined):
    """Union: allowed if either side allows.

    Two partial halves may cover a block fully; the block map reports PARTIAL then (conservative).
    """

    _op = staticmethod(operator.or_)


@dataclasses.dataclass(frozen=True)
class And(_Combined):
    """Intersection: allowed if both sides allow.

    Two partial halves may be disjoint; the block map reports PARTIAL then (conservative).
    """

    _op = staticmethod(operator.and_)


@dataclasses.dataclass(frozen=True, eq=False)
class BlockLists:
    """The blocks of each row of a block map that a kernel visits, left-packed.

    idx:   int32 [rows, width]  column index of the j-th visited block of the row; entries past the
                                row's count repeat its last index (0 for an empty row), so a
                                pipelined kernel re-uses the buffer it already holds.
    kind:  int32 [rows, width]  PARTIAL or FULL; 0 (SKIP) on padding entries (do nothing).
    count: int32 [rows]         number of visited blocks in the row.
    """

    idx: np.ndarray
    kind: np.ndarray
    count: np.ndarray

    @property
    def width(self) -> int:
        """Length of the longest row's list (>= 1, so a grid over it is never empty)."""
        return self.idx.shape[1]


def block_lists(block_map: np.ndarray, kinds: tuple[int, ...] = (PARTIAL, FULL)) -> BlockLists:
    """Packs the blocks of an int8 block map [rows, cols] whose kind is in ``kinds``, row by row."""
    block_map = np.asarray(block_map)
    if block_map.ndim != 2 or 0 in block_map.shape:
        raise ValueError(f"block_lists: block_map must be a non-empty 2-D array, got shape {block_map.shape}.")
    if not set(kinds) <= {PARTIAL, FULL}:
        raise ValueError(f"block_lists: kinds must be a subset of (PARTIAL, FULL) = (1, 2), got {kinds!r}.")
    selected = np.isin(block_map, kinds)  # [rows, cols]
    count = selected.sum(axis=1).astype(np.int32)  # [rows]
    width = max(int(count.max()), 1)
    # A stable sort on "not selected" puts each row's selected columns first, in column order.
    order = np.argsort(~selected, axis=1, kind="stable")[:, :width]  # [rows, width]
    used = np.arange(width)[None, :] < count[:, None]  # [rows, width]
    last = np.take_along_axis(order, np.maximum(count - 1, 0)[:, None], axis=1)  # [rows, 1]
    idx = np.where(used, order, np.where(count[:, None] > 0, last, 0)).astype(np.int32)
    kind = np.where(used, np.take_along_axis(block_map, idx, axis=1), SKIP).astype(np.int32)
    return BlockLists(idx=idx, kind=kind, count=count)


@dataclasses.dataclass(frozen=True, eq=False)
class MaskInfo:
    """The static tables the block-sparse kernels need for one mask, shape and tiling.

    block_map: int8 [nq, nk], the mask's map; with segment ids every FULL block is demoted to PARTIAL
    (segment ids are data, so a full block may still straddle a segment boundary). The lists are
    built on first use:
      rows:         BlockLists over q blocks: the kv blocks each q block visits (forward, dq).
      cols:         BlockLists over kv blocks: the q blocks that visit each kv block (dk/dv).
      partial_rows: rows restricted to PARTIAL blocks (elementwise mask needed).
      full_rows:    rows restricted to FULL blocks (no mask work).
    """

    block_map: np.ndarray

    @functools.cached_property
    def rows(self) -> BlockLists:
        return block_lists(self.block_map)

    @functools.cached_property
    def cols(self) -> BlockLists:
        return block_lists(self.block_map.T)

    @functools.cached_property
    def partial_rows(self) -> BlockLists:
        return block_lists(self.block_map, (PARTIAL,))

    @functools.cached_property
    def full_rows(self) -> BlockLists:
        return block_lists(self.block_map, (FULL,))

    @property
    def visited(self) -> int:
        """Number of (q block, kv block) pairs a kernel computes."""
        return int(np.count_nonzero(self.block_map != SKIP))


@functools.lru_cache(maxsize=256)
def mask_info(mask: Mask, q_len: int, kv_len: int, block_q: int, block_k: int, has_segments: bool = False) -> MaskInfo:
    """MaskInfo for ``mask`` at [q_len, kv_len] in [block_q, block_k] tiles; cached, so the forward and
    backward passes (and every layer with the same mask) share one set of tables."""
    if not isinstance(mask, Mask):
        raise TypeError(f"mask_info: mask must be a Mask, got {type(mask).__name__}: {mask!r}.")
    block_map = mask.block_map(q_len, kv_len, block_q, block_k)  # [nq, nk] int8
    if has_segments:
        block_map = np.minimum(block_map, PARTIAL).astype(np.int8)
    return MaskInfo(block_map=block_map)


__all__ = [
    "Mask",
    "Full",
    "Causal",
    "SlidingWindow",
    "Strided",
    "Fixed",
    "GlobalTokens",
    "Chunked",
    "PrecedingBlocks",
    "Or",
    "And",
    "bottom_right_offset",
    "BlockLists",
    "block_lists",
    "MaskInfo",
    "mask_info",
    "SKIP",
    "PARTIAL",
    "FULL",
]
