"""Block-sparse flash attention (online softmax) as Pallas kernels, forward and backward.

Entry point: ``pallas_attention(q, k, v, *, mask, segment_ids, scale, block_q, block_k, return_lse,
interpret, platform=None)``; ``kernels.attention(..., impl="pallas")`` calls it.

Shapes (letters as in DESIGN.md): q [B, T, N, H], k [B, S, K, H], v [B, S, K, Hv], N = K * G.
Query head n reads kv head n // G through the kv BlockSpec's index map, so k and v are never
repeated in memory.

Two formulations of the same algorithm (docs/pallas.md has the full picture):

* ``"tpu"`` (also the CPU ``interpret=True`` path): grid (B, N, q block, step). The static block
  map is compressed, per q-block row, into a list of the kv blocks that are not skipped (plus the
  kind of each: partial or full). The lists go in through scalar prefetch (SMEM), and the kv
  BlockSpec index map reads them, so a skipped kv block is neither computed nor DMA'd: the grid's
  last axis only runs over the longest row's list, and steps past a row's own count repeat the
  previous block index (no new DMA) and do nothing. The backward is two more kernels of the same
  shape: dq over rows, and dk/dv over columns (the transposed lists), the latter also looping over
  the G query heads that share a kv head.
* ``"gpu"`` (Triton): Triton has no scalar prefetch, so the lists are ordinary inputs, the grid is
  (B, N, q block) for forward/dq and (B, K, kv block) for dk/dv, and the kernel walks its row's
  (column's) list with a ``lax.fori_loop`` whose trip count is that row's count. Triton needs
  power-of-two tile shapes, so head dims are zero-padded to a power of two (>= 16) on this path.

Numerics: logits, the running max m, running sum l and the accumulators are float32; p is cast to
v's dtype before the p @ v product (as every flash kernel does). A row with no allowed key keeps
l = 0: its output is 0 and its internal logsumexp is +inf, which makes the recomputed probabilities
exp(s - lse) exactly 0 in the backward, so its gradients are 0 and finite. The public lse of such a
row is -inf (log of an empty sum).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from effitrans.kernels import masks as masks_lib

# Masked logits take a large finite value rather than -inf so that m - s and exp(m_prev - m_new)
# never form inf - inf = nan, even for rows that have seen no allowed key yet.
_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)

_PLATFORMS = ("tpu", "gpu")


# ----------------------------------------------------------------------------------------------
# Static block lists (numpy, computed at trace time from the static mask and shapes).


@dataclasses.dataclass(frozen=True)
class BlockLists:
    """Non-skipped blocks of each row of a block map, left-packed.

    idx:   int32 [rows, width]  column index of the j-th non-skipped block of the row; entries past
                                the row's count repeat the last valid index (0 for an empty row) so
                                a pipelined kernel re-uses the buffer it already holds.
    kind:  int32 [rows, width]  1 = partial, 2 = full, 0 = padding entry (do nothing).
    count: int32 [rows]         number of non-skipped blocks in the row.
    """

    idx: np.ndarray
    kind: np.ndarray
    count: np.ndarray

    @property
    def width(self) -> int:
        return self.idx.shape[1]


def block_lists(block_map: np.ndarray) -> BlockLists:
    """Packs an int8 block map [rows, cols] (0 skip, 1 partial, 2 full) into per-row BlockLists."""
    block_map = np.asarray(block_map)
    rows, _ = block_map.shape
    count = (block_map != masks_lib.SKIP).sum(axis=1).astype(np.int32)  # [rows]
    # Width >= 1 keeps the grid non-empty even when everything is masked.
    width = max(int(count.max(initial=0)), 1)
    idx = np.zeros((rows, width), np.int32)
    kind = np.zeros((rows, width), np.int32)
    for r in range(rows):
        cols = np.flatnonzero(block_map[r] != masks_lib.SKIP)
        n = len(cols)
        if n:
            idx[r, :n] = cols
            idx[r, n:] = cols[-1]
            kind[r, :n] = block_map[r, cols]
    return BlockLists(idx=idx, kind=kind, count=count)


# ----------------------------------------------------------------------------------------------
# Static configuration shared by the forward and backward passes.


@dataclasses.dataclass(frozen=True)
class _Config:
    mask: Any
    scale: float
    block_q: int
    block_k: int
    q_len: int  # true lengths (before padding to block multiples)
    kv_len: int
    num_groups: int  # G = N // K
    has_segments: bool
    platform: str  # 'tpu' or 'gpu'
    interpret: bool

    def lists(self) -> tuple[BlockLists, BlockLists]:
        """(row lists over q blocks, column lists over kv blocks) for this mask and shape."""
        return _lists_for(self)


@functools.lru_cache(maxsize=128)
def _lists_for(cfg: _Config) -> tuple[BlockLists, BlockLists]:
    """Cached per static config: the forward and both backward kernels share the same tables."""
    bmap = np.asarray(cfg.mask.block_map(cfg.q_len, cfg.kv_len, cfg.block_q, cfg.block_k))
    if cfg.has_segments:
        # Segment ids are data, not static: a "full" block may still mix segments, so it is demoted
        # to partial (masked elementwise). Skips stay skips.
        bmap = np.minimum(bmap, masks_lib.PARTIAL)
    return block_lists(bmap), block_lists(bmap.T)


def _allowed(cfg: _Config, q_block, kv_block, q_seg, kv_seg):
    """bool [bq, bk]: mask_fn, padding bounds and segment equality for one (q block, kv block).

    q_seg: int32 [bq, 1] or None; kv_seg: int32 [1, bk] or None.
    """
    shape = (cfg.block_q, cfg.block_k)
    q_pos = q_block * cfg.block_q + jax.lax.broadcasted_iota(jnp.int32, shape, 0)  # [bq, bk]
    kv_pos = kv_block * cfg.block_k + jax.lax.broadcasted_iota(jnp.int32, shape, 1)  # [bq, bk]
    allowed = cfg.mask.mask_fn(q_pos, kv_pos)
    # Padding rows/columns (past the true lengths) never take part.
    allowed = allowed & (q_pos < cfg.q_len) & (kv_pos < cfg.kv_len)
    if q_seg is not None:
        allowed = allowed & (q_seg == kv_seg)
    return allowed


def _dot_nt(a, b):
    """a [m, d] . b [n, d]^T -> float32 [m, n]."""
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _dot_tn(a, b):
    """a [d, m]^T . b [d, n] -> float32 [m, n]."""
    return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _dot_nn(a, b):
    """a [m, d] . b [d, n] -> float32 [m, n]."""
    return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


# ----------------------------------------------------------------------------------------------
# TPU formulation (scalar prefetch of the block lists). Also the CPU interpret path.


def _split_refs(refs, has_segments):
    """Pops the two optional segment refs off the front of a kernel's array refs."""
    if has_segments:
        return refs[0], refs[1], refs[2:]
    return None, None, refs


def _tpu_fwd_kernel(row_idx_ref, row_kind_ref, *refs, cfg: _Config, width: int):
    """One (b, n, q block i, step j) of the forward. Blocks: q [bq, H], k [bk, H], v [bk, Hv]."""
    q_seg_ref, kv_seg_ref, refs = _split_refs(refs, cfg.has_segments)
    q_ref, k_ref, v_ref, o_ref, lse_ref, m_scr, l_scr, acc_scr = refs
    i, j = pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        # m starts at the mask value, not -inf: see _MASK_VALUE. l and acc start empty.
        m_scr[...] = jnp.full(m_scr.shape, _MASK_VALUE, jnp.float32)
        l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
        acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

    kind = row_kind_ref[i, j]

    def update(masked: bool):
        q = q_ref[...]  # [bq, H]
        k = k_ref[...]  # [bk, H]
        v = v_ref[...]  # [bk, Hv]
        s = _dot_nt(q, k) * cfg.scale  # [bq, bk] f32
        if masked:
            allowed = _allowed(
                cfg,
                i,
                row_idx_ref[i, j],
                q_seg_ref[...] if q_seg_ref is not None else None,
                kv_seg_ref[...] if kv_seg_ref is not None else None,
            )
            s = jnp.where(allowed, s, _MASK_VALUE)
        m_prev = m_scr[...]  # [bq, 1]
        m_new = jnp.maximum(m_prev, s.max(axis=-1, keepdims=True))  # [bq, 1]
        p = jnp.exp(s - m_new)  # [bq, bk]
        if masked:
            # A row with no allowed key so far has m_new == _MASK_VALUE, where exp(s - m_new) = 1 on
            # masked entries; zero them explicitly.
            p = jnp.where(allowed, p, 0.0)
        alpha = jnp.exp(m_prev - m_new)  # [bq, 1] rescales what was accumulated under m_prev
        l_scr[...] = alpha * l_scr[...] + p.sum(axis=-1, keepdims=True)
        acc_scr[...] = alpha * acc_scr[...] + _dot_nn(p.astype(v.dtype), v)  # [bq, Hv]
        m_scr[...] = m_new

    pl.when(kind == masks_lib.FULL)(lambda: update(False))
    pl.when(kind == masks_lib.PARTIAL)(lambda: update(True))

    @pl.when(j == width - 1)
    def _finish():
        l = l_scr[...]  # [bq, 1]
        nonempty = l > 0.0
        safe_l = jnp.where(nonempty, l, 1.0)
        o_ref[...] = jnp.where(nonempty, acc_scr[...] / safe_l, 0.0).astype(o_ref.dtype)
        lse_ref[...] = jnp.where(nonempty, m_scr[...] + jnp.log(safe_l), jnp.inf)


def _tpu_dq_kernel(row_idx_ref, row_kind_ref, *refs, cfg: _Config, width: int):
    """One (b, n, q block i, step j) of dq.

    Blocks: q [bq, H], do [bq, Hv], k [bk, H], v [bk, Hv], lse and delta [bq, 1].
    """
    q_seg_ref, kv_seg_ref, refs = _split_refs(refs, cfg.has_segments)
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, dq_scr = refs
    i, j = pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        dq_scr[...] = jnp.zeros(dq_scr.shape, jnp.float32)

    kind = row_kind_ref[i, j]

    def update(masked: bool):
        q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
        s = _dot_nt(q, k) * cfg.scale  # [bq, bk]
        p = jnp.exp(s - lse_ref[...])  # [bq, bk]; rows with lse = +inf give 0
        if masked:
            allowed = _allowed(
                cfg,
                i,
                row_idx_ref[i, j],
                q_seg_ref[...] if q_seg_ref is not None else None,
                kv_seg_ref[...] if kv_seg_ref is not None else None,
            )
            p = jnp.where(allowed, p, 0.0)
        dp = _dot_nt(do, v)  # [bq, bk]
        ds = p * (dp - delta_ref[...])  # [bq, bk]
        dq_scr[...] += _dot_nn(ds.astype(k.dtype), k) * cfg.scale  # [bq, H]

    pl.when(kind == masks_lib.FULL)(lambda: update(False))
    pl.when(kind == masks_lib.PARTIAL)(lambda: update(True))

    @pl.when(j == width - 1)
    def _finish():
        dq_ref[...] = dq_scr[...].astype(dq_ref.dtype)


def _tpu_dkv_kernel(col_idx_ref, col_kind_ref, *refs, cfg: _Config, width: int):
    """One (b, kv head h, kv block c, group member g, step j) of dk/dv.

    Blocks: q, do [bq, H|Hv] of query head h * G + g; k, v [bk, H|Hv]; lse, delta [bq, 1].
    """
    q_seg_ref, kv_seg_ref, refs = _split_refs(refs, cfg.has_segments)
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, dk_scr, dv_scr = refs
    c, g, j = pl.program_id(2), pl.program_id(3), pl.program_id(4)

    @pl.when((g == 0) & (j == 0))
    def _init():
        dk_scr[...] = jnp.zeros(dk_scr.shape, jnp.float32)
        dv_scr[...] = jnp.zeros(dv_scr.shape, jnp.float32)

    kind = col_kind_ref[c, j]

    def update(masked: bool):
        q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
        s = _dot_nt(q, k) * cfg.scale  # [bq, bk]
        p = jnp.exp(s - lse_ref[...])  # [bq, bk]
        if masked:
            allowed = _allowed(
                cfg,
                col_idx_ref[c, j],
                c,
                q_seg_ref[...] if q_seg_ref is not None else None,
                kv_seg_ref[...] if kv_seg_ref is not None else None,
            )
            p = jnp.where(allowed, p, 0.0)
        dv_scr[...] += _dot_tn(p.astype(do.dtype), do)  # [bk, Hv]
        dp = _dot_nt(do, v)  # [bq, bk]
        ds = p * (dp - delta_ref[...])  # [bq, bk]
        dk_scr[...] += _dot_tn(ds.astype(q.dtype), q) * cfg.scale  # [bk, H]

    pl.when(kind == masks_lib.FULL)(lambda: update(False))
    pl.when(kind == masks_lib.PARTIAL)(lambda: update(True))

    @pl.when((g == cfg.num_groups - 1) & (j == width - 1))
    def _finish():
        dk_ref[...] = dk_scr[...].astype(dk_ref.dtype)
        dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


def _tpu_compiler_params(cfg: _Config, semantics):
    if cfg.interpret:
        return None
    return pltpu.CompilerParams(dimension_semantics=semantics)


def _tpu_forward(cfg: _Config, q, k, v, q_seg, kv_seg):
    """q [B,N,Tp,H], k [B,K,Sp,H], v [B,K,Sp,Hv], q_seg [B,nq,bq,1], kv_seg [B,nk,1,bk].

    Returns out [B,N,Tp,Hv] and lse [B,N,Tp,1] (the trailing 1 keeps lse tiles 2-D on TPU).
    """
    rows, _ = cfg.lists()
    b, n, tp, h = q.shape
    hv = v.shape[-1]
    bq, bk, g = cfg.block_q, cfg.block_k, cfg.num_groups
    nq = tp // bq

    # Index maps get the grid indices and then the prefetched (SMEM) lists.
    q_map = lambda bi, ni, i, j, idx, kind: (bi, ni, i, 0)
    kv_map = lambda bi, ni, i, j, idx, kind: (bi, jax.lax.div(ni, g), idx[i, j], 0)
    in_specs = []
    if cfg.has_segments:
        in_specs += [
            pl.BlockSpec((None, None, bq, 1), lambda bi, ni, i, j, idx, kind: (bi, i, 0, 0)),
            pl.BlockSpec((None, None, 1, bk), lambda bi, ni, i, j, idx, kind: (bi, idx[i, j], 0, 0)),
        ]
    in_specs += [
        pl.BlockSpec((None, None, bq, h), q_map),
        pl.BlockSpec((None, None, bk, h), kv_map),
        pl.BlockSpec((None, None, bk, hv), kv_map),
    ]
    out_specs = [pl.BlockSpec((None, None, bq, hv), q_map), pl.BlockSpec((None, None, bq, 1), q_map)]
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(b, n, nq, rows.width),
        in_specs=in_specs,
        out_specs=out_specs,
        scratch_shapes=[
            pltpu.VMEM((bq, 1), jnp.float32),  # m
            pltpu.VMEM((bq, 1), jnp.float32),  # l
            pltpu.VMEM((bq, hv), jnp.float32),
        ],
    )  # acc
    segs = (q_seg, kv_seg) if cfg.has_segments else ()
    out, lse = pl.pallas_call(
        functools.partial(_tpu_fwd_kernel, cfg=cfg, width=rows.width),
        grid_spec=grid_spec,
        out_shape=[jax.ShapeDtypeStruct((b, n, tp, hv), q.dtype), jax.ShapeDtypeStruct((b, n, tp, 1), jnp.float32)],
        compiler_params=_tpu_compiler_params(cfg, ("parallel", "parallel", "parallel", "arbitrary")),
        interpret=cfg.interpret,
        name="effitrans_flash_fwd",
    )(jnp.asarray(rows.idx), jnp.asarray(rows.kind), *segs, q, k, v)
    return out, lse


def _tpu_backward(cfg: _Config, q, k, v, q_seg, kv_seg, do, lse, delta):
    """Padded BNTH inputs, do [B,N,Tp,Hv], lse/delta [B,N,Tp,1] -> dq, dk, dv (padded layouts)."""
    rows, cols = cfg.lists()
    b, n, tp, h = q.shape
    kh, sp, hv = k.shape[1], k.shape[2], v.shape[-1]
    bq, bk, g = cfg.block_q, cfg.block_k, cfg.num_groups
    nq, nk = tp // bq, sp // bk
    segs = (q_seg, kv_seg) if cfg.has_segments else ()

    # dq: same grid and lists as the forward.
    q_map = lambda bi, ni, i, j, idx, kind: (bi, ni, i, 0)
    kv_map = lambda bi, ni, i, j, idx, kind: (bi, jax.lax.div(ni, g), idx[i, j], 0)
    in_specs = []
    if cfg.has_segments:
        in_specs += [
            pl.BlockSpec((None, None, bq, 1), lambda bi, ni, i, j, idx, kind: (bi, i, 0, 0)),
            pl.BlockSpec((None, None, 1, bk), lambda bi, ni, i, j, idx, kind: (bi, idx[i, j], 0, 0)),
        ]
    in_specs += [
        pl.BlockSpec((None, None, bq, h), q_map),
        pl.BlockSpec((None, None, bk, h), kv_map),
        pl.BlockSpec((None, None, bk, hv), kv_map),
        pl.BlockSpec((None, None, bq, hv), q_map),
        pl.BlockSpec((None, None, bq, 1), q_map),
        pl.BlockSpec((None, None, bq, 1), q_map),
    ]
    dq = pl.pallas_call(
        functools.partial(_tpu_dq_kernel, cfg=cfg, width=rows.width),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(b, n, nq, rows.width),
            in_specs=in_specs,
            out_specs=pl.BlockSpec((None, None, bq, h), q_map),
            scratch_shapes=[pltpu.VMEM((bq, h), jnp.float32)],
        ),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=_tpu_compiler_params(cfg, ("parallel", "parallel", "parallel", "arbitrary")),
        interpret=cfg.interpret,
        name="effitrans_flash_dq",
    )(jnp.asarray(rows.idx), jnp.asarray(rows.kind), *segs, q, k, v, do, lse, delta)

    # dk/dv: grid over kv blocks; the reduction axes are the G query heads of this kv head and the
    # column's list of q blocks, so dk/dv for a kv head accumulate in VMEM and are written once.
    qc_map = lambda bi, hi, c, gi, j, idx, kind: (bi, hi * g + gi, idx[c, j], 0)
    kc_map = lambda bi, hi, c, gi, j, idx, kind: (bi, hi, c, 0)
    in_specs = []
    if cfg.has_segments:
        in_specs += [
            pl.BlockSpec((None, None, bq, 1), lambda bi, hi, c, gi, j, idx, kind: (bi, idx[c, j], 0, 0)),
            pl.BlockSpec((None, None, 1, bk), lambda bi, hi, c, gi, j, idx, kind: (bi, c, 0, 0)),
        ]
    in_specs += [
        pl.BlockSpec((None, None, bq, h), qc_map),
        pl.BlockSpec((None, None, bk, h), kc_map),
        pl.BlockSpec((None, None, bk, hv), kc_map),
        pl.BlockSpec((None, None, bq, hv), qc_map),
        pl.BlockSpec((None, None, bq, 1), qc_map),
        pl.BlockSpec((None, None, bq, 1), qc_map),
    ]
    dk, dv = pl.pallas_call(
        functools.partial(_tpu_dkv_kernel, cfg=cfg, width=cols.width),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(b, kh, nk, g, cols.width),
            in_specs=in_specs,
            out_specs=[pl.BlockSpec((None, None, bk, h), kc_map), pl.BlockSpec((None, None, bk, hv), kc_map)],
            scratch_shapes=[pltpu.VMEM((bk, h), jnp.float32), pltpu.VMEM((bk, hv), jnp.float32)],
        ),
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=_tpu_compiler_params(cfg, ("parallel", "parallel", "parallel", "arbitrary", "arbitrary")),
        interpret=cfg.interpret,
        name="effitrans_flash_dkv",
    )(jnp.asarray(cols.idx), jnp.asarray(cols.kind), *segs, q, k, v, do, lse, delta)
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------
# GPU (Triton) formulation: lists are ordinary inputs, the kernel loops over its row's list.


def _gpu_compiler_params(cfg: _Config):
    if cfg.interpret:
        return None
    return pltriton.CompilerParams(num_warps=4, num_stages=2)


def _gpu_fwd_kernel(idx_ref, kind_ref, count_ref, *refs, cfg: _Config):
    """Program (b, n, q block i). Refs: q [bq, H]; k [Sp, H], v [Sp, Hv] (the kv head's sequence)."""
    q_seg_ref, kv_seg_ref, refs = _split_refs(refs, cfg.has_segments)
    q_ref, k_ref, v_ref, o_ref, lse_ref = refs
    bq, bk = cfg.block_q, cfg.block_k
    i = pl.program_id(2)
    q = q_ref[...]  # [bq, H]
    q_seg = q_seg_ref[...][:, None] if q_seg_ref is not None else None  # [bq, 1]
    hv = v_ref.shape[-1]

    def body(j, carry):
        m_prev, l_prev, acc = carry  # [bq, 1], [bq, 1], [bq, Hv]
        kb = idx_ref[i, j]
        kind = kind_ref[i, j]
        k = k_ref[pl.ds(kb * bk, bk), :]  # [bk, H]
        v = v_ref[pl.ds(kb * bk, bk), :]  # [bk, Hv]
        kv_seg = kv_seg_ref[pl.ds(kb * bk, bk)][None, :] if kv_seg_ref is not None else None
        s = _dot_nt(q, k) * cfg.scale  # [bq, bk]
        # One code path for partial and full blocks (Triton branches are costly to keep in sync):
        # full blocks OR the element mask with True.
        allowed = _allowed(cfg, i, kb, q_seg, kv_seg) | (kind == masks_lib.FULL)
        s = jnp.where(allowed, s, _MASK_VALUE)
        m_new = jnp.maximum(m_prev, s.max(axis=-1, keepdims=True))
        p = jnp.where(allowed, jnp.exp(s - m_new), 0.0)  # [bq, bk]
        alpha = jnp.exp(m_prev - m_new)
        l_new = alpha * l_prev + p.sum(axis=-1, keepdims=True)
        acc = alpha * acc + _dot_nn(p.astype(v.dtype), v)  # [bq, Hv]
        return m_new, l_new, acc

    init = (
        jnp.full((bq, 1), _MASK_VALUE, jnp.float32),
        jnp.zeros((bq, 1), jnp.float32),
        jnp.zeros((bq, hv), jnp.float32),
    )
    m, l, acc = jax.lax.fori_loop(0, count_ref[i], body, init)
    nonempty = l > 0.0
    safe_l = jnp.where(nonempty, l, 1.0)
    o_ref[...] = jnp.where(nonempty, acc / safe_l, 0.0).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(nonempty, m + jnp.log(safe_l), jnp.inf)[:, 0]


def _gpu_dq_kernel(idx_ref, kind_ref, count_ref, *refs, cfg: _Config):
    """Program (b, n, q block i): dq [bq, H] over the row's kv blocks."""
    q_seg_ref, kv_seg_ref, refs = _split_refs(refs, cfg.has_segments)
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref = refs
    bk = cfg.block_k
    i = pl.program_id(2)
    q, do = q_ref[...], do_ref[...]  # [bq, H], [bq, Hv]
    lse = lse_ref[...][:, None]  # [bq, 1]
    delta = delta_ref[...][:, None]  # [bq, 1]
    q_seg = q_seg_ref[...][:, None] if q_seg_ref is not None else None

    def body(j, dq):
        kb = idx_ref[i, j]
        kind = kind_ref[i, j]
        k = k_ref[pl.ds(kb * bk, bk), :]  # [bk, H]
        v = v_ref[pl.ds(kb * bk, bk), :]  # [bk, Hv]
        kv_seg = kv_seg_ref[pl.ds(kb * bk, bk)][None, :] if kv_seg_ref is not None else None
        allowed = _allowed(cfg, i, kb, q_seg, kv_seg) | (kind == masks_lib.FULL)
        s = _dot_nt(q, k) * cfg.scale
        p = jnp.where(allowed, jnp.exp(s - lse), 0.0)  # [bq, bk]
        ds = p * (_dot_nt(do, v) - delta)  # [bq, bk]
        return dq + _dot_nn(ds.astype(k.dtype), k) * cfg.scale  # [bq, H]

    dq = jax.lax.fori_loop(0, count_ref[i], body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = dq.astype(dq_ref.dtype)


def _gpu_dkv_kernel(idx_ref, kind_ref, count_ref, *refs, cfg: _Config):
    """Program (b, kv head h, kv block c). Refs: q [G, Tp, H], do [G, Tp, Hv], lse/delta [G, Tp]."""
    q_seg_ref, kv_seg_ref, refs = _split_refs(refs, cfg.has_segments)
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref = refs
    bq = cfg.block_q
    c = pl.program_id(2)
    k, v = k_ref[...], v_ref[...]  # [bk, H], [bk, Hv]
    kv_seg = kv_seg_ref[...][None, :] if kv_seg_ref is not None else None  # [1, bk]

    def body(step, carry):
        dk, dv = carry
        # Flattened (group member, list entry) loop: one trip count, no nested dynamic loops.
        gi, j = step // count_ref[c], step % count_ref[c]
        qb = idx_ref[c, j]
        kind = kind_ref[c, j]
        rows = pl.ds(qb * bq, bq)
        q = q_ref[gi, rows, :]  # [bq, H]
        do = do_ref[gi, rows, :]  # [bq, Hv]
        lse = lse_ref[gi, rows][:, None]  # [bq, 1]
        delta = delta_ref[gi, rows][:, None]  # [bq, 1]
        q_seg = q_seg_ref[rows][:, None] if q_seg_ref is not None else None
        allowed = _allowed(cfg, qb, c, q_seg, kv_seg) | (kind == masks_lib.FULL)
        s = _dot_nt(q, k) * cfg.scale
        p = jnp.where(allowed, jnp.exp(s - lse), 0.0)  # [bq, bk]
        dv = dv + _dot_tn(p.astype(do.dtype), do)  # [bk, Hv]
        ds = p * (_dot_nt(do, v) - delta)  # [bq, bk]
        dk = dk + _dot_tn(ds.astype(q.dtype), q) * cfg.scale  # [bk, H]
        return dk, dv

    trips = cfg.num_groups * count_ref[c]
    dk, dv = jax.lax.fori_loop(0, trips, body, (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32)))
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _full_spec(shape):
    """BlockSpec covering a whole (small, static) array; used for the block lists on GPU."""
    return pl.BlockSpec(shape, lambda *_: (0,) * len(shape))


def _gpu_forward(cfg: _Config, q, k, v, q_seg, kv_seg):
    """Same contract as _tpu_forward but segments are [B, Tp] / [B, Sp] and lse is [B, N, Tp]."""
    rows, _ = cfg.lists()
    b, n, tp, h = q.shape
    sp, hv = k.shape[2], v.shape[-1]
    bq, g = cfg.block_q, cfg.num_groups
    lists = (jnp.asarray(rows.idx), jnp.asarray(rows.kind), jnp.asarray(rows.count))
    in_specs = [_full_spec(rows.idx.shape), _full_spec(rows.kind.shape), _full_spec(rows.count.shape)]
    if cfg.has_segments:
        in_specs += [
            pl.BlockSpec((None, bq), lambda bi, ni, i: (bi, i)),
            pl.BlockSpec((None, sp), lambda bi, ni, i: (bi, 0)),
        ]
    in_specs += [
        pl.BlockSpec((None, None, bq, h), lambda bi, ni, i: (bi, ni, i, 0)),
        pl.BlockSpec((None, None, sp, h), lambda bi, ni, i: (bi, jax.lax.div(ni, g), 0, 0)),
        pl.BlockSpec((None, None, sp, hv), lambda bi, ni, i: (bi, jax.lax.div(ni, g), 0, 0)),
    ]
    segs = (q_seg, kv_seg) if cfg.has_segments else ()
    return pl.pallas_call(
        functools.partial(_gpu_fwd_kernel, cfg=cfg),
        grid=(b, n, tp // bq),
        in_specs=in_specs,
        out_specs=[
            pl.BlockSpec((None, None, bq, hv), lambda bi, ni, i: (bi, ni, i, 0)),
            pl.BlockSpec((None, None, bq), lambda bi, ni, i: (bi, ni, i)),
        ],
        out_shape=[jax.ShapeDtypeStruct((b, n, tp, hv), q.dtype), jax.ShapeDtypeStruct((b, n, tp), jnp.float32)],
        compiler_params=_gpu_compiler_params(cfg),
        interpret=cfg.interpret,
        name="effitrans_flash_fwd_gpu",
    )(*lists, *segs, q, k, v)


def _gpu_backward(cfg: _Config, q, k, v, q_seg, kv_seg, do, lse, delta):
    """GPU dq and dk/dv; lse/delta [B, N, Tp]."""
    rows, cols = cfg.lists()
    b, n, tp, h = q.shape
    kh, sp, hv = k.shape[1], k.shape[2], v.shape[-1]
    bq, bk, g = cfg.block_q, cfg.block_k, cfg.num_groups
    segs = (q_seg, kv_seg) if cfg.has_segments else ()

    lists = (jnp.asarray(rows.idx), jnp.asarray(rows.kind), jnp.asarray(rows.count))
    in_specs = [_full_spec(rows.idx.shape), _full_spec(rows.kind.shape), _full_spec(rows.count.shape)]
    if cfg.has_segments:
        in_specs += [
            pl.BlockSpec((None, bq), lambda bi, ni, i: (bi, i)),
            pl.BlockSpec((None, sp), lambda bi, ni, i: (bi, 0)),
        ]
    q_map = lambda bi, ni, i: (bi, ni, i, 0)
    kv_map = lambda bi, ni, i: (bi, jax.lax.div(ni, g), 0, 0)
    in_specs += [
        pl.BlockSpec((None, None, bq, h), q_map),
        pl.BlockSpec((None, None, sp, h), kv_map),
        pl.BlockSpec((None, None, sp, hv), kv_map),
        pl.BlockSpec((None, None, bq, hv), q_map),
        pl.BlockSpec((None, None, bq), lambda bi, ni, i: (bi, ni, i)),
        pl.BlockSpec((None, None, bq), lambda bi, ni, i: (bi, ni, i)),
    ]
    dq = pl.pallas_call(
        functools.partial(_gpu_dq_kernel, cfg=cfg),
        grid=(b, n, tp // bq),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((None, None, bq, h), q_map),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=_gpu_compiler_params(cfg),
        interpret=cfg.interpret,
        name="effitrans_flash_dq_gpu",
    )(*lists, *segs, q, k, v, do, lse, delta)

    # Group the G query heads of each kv head: [B, N, ...] -> [B, K, G, ...] (a free reshape).
    q5 = q.reshape(b, kh, g, tp, h)
    do5 = do.reshape(b, kh, g, tp, hv)
    lse4 = lse.reshape(b, kh, g, tp)
    delta4 = delta.reshape(b, kh, g, tp)
    lists = (jnp.asarray(cols.idx), jnp.asarray(cols.kind), jnp.asarray(cols.count))
    in_specs = [_full_spec(cols.idx.shape), _full_spec(cols.kind.shape), _full_spec(cols.count.shape)]
    if cfg.has_segments:
        in_specs += [
            pl.BlockSpec((None, tp), lambda bi, hi, c: (bi, 0)),
            pl.BlockSpec((None, bk), lambda bi, hi, c: (bi, c)),
        ]
    grp_map = lambda bi, hi, c: (bi, hi, 0, 0, 0)
    kc_map = lambda bi, hi, c: (bi, hi, c, 0)
    in_specs += [
        pl.BlockSpec((None, None, g, tp, h), grp_map),
        pl.BlockSpec((None, None, bk, h), kc_map),
        pl.BlockSpec((None, None, bk, hv), kc_map),
        pl.BlockSpec((None, None, g, tp, hv), grp_map),
        pl.BlockSpec((None, None, g, tp), lambda bi, hi, c: (bi, hi, 0, 0)),
        pl.BlockSpec((None, None, g, tp), lambda bi, hi, c: (bi, hi, 0, 0)),
    ]
    dk, dv = pl.pallas_call(
        functools.partial(_gpu_dkv_kernel, cfg=cfg),
        grid=(b, kh, sp // bk),
        in_specs=in_specs,
        out_specs=[pl.BlockSpec((None, None, bk, h), kc_map), pl.BlockSpec((None, None, bk, hv), kc_map)],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=_gpu_compiler_params(cfg),
        interpret=cfg.interpret,
        name="effitrans_flash_dkv_gpu",
    )(*lists, *segs, q5, k, v, do5, lse4, delta4)
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------
# custom_vjp over the padded, head-major arrays.


def _forward(cfg: _Config, q, k, v, q_seg, kv_seg):
    """-> out [B,N,Tp,Hv] (q.dtype), lse [B,N,Tp] f32 (+inf on rows with no allowed key)."""
    if cfg.platform == "gpu":
        return _gpu_forward(cfg, q, k, v, q_seg, kv_seg)
    out, lse = _tpu_forward(cfg, q, k, v, q_seg, kv_seg)
    return out, lse[..., 0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(cfg: _Config, q, k, v, q_seg, kv_seg):
    return _forward(cfg, q, k, v, q_seg, kv_seg)


def _flash_fwd(cfg, q, k, v, q_seg, kv_seg):
    out, lse = _forward(cfg, q, k, v, q_seg, kv_seg)
    return (out, lse), (q, k, v, q_seg, kv_seg, out, lse)


def _flash_bwd(cfg, residuals, cotangents):
    q, k, v, q_seg, kv_seg, out, lse = residuals
    d_out, d_lse = cotangents  # [B,N,Tp,Hv], [B,N,Tp]
    # delta_i = sum_j P_ij dP_ij = rowsum(dO * O) (FlashAttention-2). A cotangent on lse adds
    # dlse_i * P_ij to dS_ij, i.e. it shifts delta by -dlse (d lse / d s_ij = P_ij).
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # [B,N,Tp]
    delta = delta - d_lse.astype(jnp.float32)
    d_out = d_out.astype(q.dtype)
    if cfg.platform == "gpu":
        dq, dk, dv = _gpu_backward(cfg, q, k, v, q_seg, kv_seg, d_out, lse, delta)
    else:
        dq, dk, dv = _tpu_backward(cfg, q, k, v, q_seg, kv_seg, d_out, lse[..., None], delta[..., None])
    return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


# ----------------------------------------------------------------------------------------------
# Public entry point.


def _resolve_platform(platform: str | None, interpret: bool) -> str:
    if platform is not None:
        if platform not in _PLATFORMS:
            raise ValueError(f"pallas_attention: platform must be one of {_PLATFORMS} or None, got {platform!r}.")
        return platform
    if interpret:
        return "tpu"  # the scalar-prefetch formulation; interpret mode runs it anywhere
    backend = jax.default_backend()
    if backend == "tpu":
        return "tpu"
    if backend in ("gpu", "cuda", "rocm"):
        return "gpu"
    raise ValueError(
        f"pallas_attention: no compiled Pallas kernel for backend {backend!r}; "
        'pass interpret=True (CPU) or use impl="xla".'
    )


def _is_pow2(x: int) -> bool:
    return x > 0 and (x & (x - 1)) == 0


def _pad_axis(x, axis: int, size: int, value=0):
    pad = size - x.shape[axis]
    if pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths, constant_values=value)


def pallas_attention(q, k, v, *, mask, segment_ids, scale, block_q, block_k, return_lse, interpret, platform=None):
    """Block-sparse flash attention.

    Args:
      q: [B, T, N, H]; k: [B, S, K, H]; v: [B, S, K, Hv]; N % K == 0.
      mask: a kernels.masks Mask (static; hashable).
      segment_ids: None or (q_seg int32 [B, T], kv_seg int32 [B, S]); tokens attend within equal ids.
      scale: float multiplying q . k.
      block_q, block_k: tile sizes, multiples of 8 (powers of two >= 16 on the "gpu" platform).
      return_lse: also return the logsumexp, float32 [B, N, T] (-inf on rows with no allowed key).
      interpret: run the kernels in the Pallas interpreter (CPU).
      platform: "tpu" | "gpu" | None (None: from jax.default_backend(); "tpu" when interpreting).
        Picks the kernel formulation, independently of interpret, so export/lowering tests can
        target a platform from a CPU host.

    Returns:
      out [B, T, N, Hv] in q.dtype, or (out, lse) if return_lse.
    """
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(
            f"pallas_attention: q, k, v must be rank 4 (BTNH), got shapes {q.shape}, {k.shape}, {v.shape}."
        )
    b, t, n, h = q.shape
    _, s, kh, hv = v.shape
    if k.shape != (b, s, kh, h) or v.shape[:3] != (b, s, kh):
        raise ValueError(
            f"pallas_attention: incompatible shapes q {q.shape}, k {k.shape}, "
            f"v {v.shape}; expected k [B, S, K, H] and v [B, S, K, Hv]."
        )
    if n % kh:
        raise ValueError(f"pallas_attention: num_heads ({n}) must be a multiple of num_kv_heads ({kh}).")
    for name, blk in (("block_q", block_q), ("block_k", block_k)):
        if isinstance(blk, bool) or not isinstance(blk, int) or blk < 8 or blk % 8:
            raise ValueError(f"pallas_attention: {name} must be a positive multiple of 8, got {blk!r}.")
    platform = _resolve_platform(platform, interpret)
    if platform == "gpu":
        for name, blk in (("block_q", block_q), ("block_k", block_k)):
            if blk < 16 or not _is_pow2(blk):
                raise ValueError(
                    f'pallas_attention: on the "gpu" platform {name} must be a power of '
                    f"two >= 16 (Triton tile shapes), got {blk!r}."
                )
    if segment_ids is not None:
        q_seg, kv_seg = segment_ids
        if q_seg.shape != (b, t) or kv_seg.shape != (b, s):
            raise ValueError(
                f"pallas_attention: segment_ids must be ([B, T], [B, S]) = "
                f"({(b, t)}, {(b, s)}), got ({q_seg.shape}, {kv_seg.shape})."
            )

    tp = -(-t // block_q) * block_q
    sp = -(-s // block_k) * block_k
    cfg = _Config(
        mask=mask,
        scale=float(scale),
        block_q=block_q,
        block_k=block_k,
        q_len=t,
        kv_len=s,
        num_groups=n // kh,
        has_segments=segment_ids is not None,
        platform=platform,
        interpret=bool(interpret),
    )

    # Head-major layout: [B, T, N, H] -> [B, N, T, H], so each tile is a contiguous [block, H]
    # slab whose last two dims satisfy the TPU (8, 128)-or-full-dim tiling rule.
    qt = _pad_axis(jnp.swapaxes(q, 1, 2), 2, tp)  # [B, N, Tp, H]
    kt = _pad_axis(jnp.swapaxes(k, 1, 2), 2, sp)  # [B, K, Sp, H]
    vt = _pad_axis(jnp.swapaxes(v, 1, 2), 2, sp)  # [B, K, Sp, Hv]
    if platform == "gpu":
        # Triton tiles need power-of-two extents; zero columns change neither q . k nor the used
        # columns of p @ v.
        hp, hvp = max(16, pl.next_power_of_2(h)), max(16, pl.next_power_of_2(hv))
        qt, kt, vt = _pad_axis(qt, 3, hp), _pad_axis(kt, 3, hp), _pad_axis(vt, 3, hvp)

    q_seg = kv_seg = None
    if segment_ids is not None:
        q_seg = _pad_axis(segment_ids[0].astype(jnp.int32), 1, tp)  # [B, Tp]
        kv_seg = _pad_axis(segment_ids[1].astype(jnp.int32), 1, sp)  # [B, Sp]
        if platform == "tpu":
            # One tile per q (kv) block whose last two dims equal the array's, which the TPU tiling
            # rule accepts for any block size: [B, nq, bq, 1] columns and [B, nk, 1, bk] rows.
            q_seg = q_seg.reshape(b, tp // block_q, block_q, 1)
            kv_seg = kv_seg.reshape(b, sp // block_k, 1, block_k)

    out, lse = _flash(cfg, qt, kt, vt, q_seg, kv_seg)  # [B,N,Tp,Hv'], [B,N,Tp]
    out = jnp.swapaxes(out[:, :, :t, :hv], 1, 2)  # [B, T, N, Hv]
    if not return_lse:
        return out
    lse = lse[:, :, :t]  # [B, N, T]
    # Internally +inf marks "no allowed key" (it zeroes recomputed probabilities); publicly that
    # row's logsumexp is log(0) = -inf.
    lse = jnp.where(lse == jnp.inf, -jnp.inf, lse)
    return out, lse
