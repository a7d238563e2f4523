"""TPU formulation (Mosaic; also the CPU ``interpret=True`` path): the block lists are scalar-prefetched.

The row lists (``MaskInfo.rows``: per q block, the kv blocks to visit and their kind) go into SMEM
before the grid starts, and the kv BlockSpec index maps read them, so a skipped kv block is neither
computed nor DMA'd. Forward and dq run on the grid (B, N, q block, step); dk/dv on (B, K, kv block,
group member, step) over the column lists. Steps past a row's own count repeat the previous block
index (no new DMA) and do nothing.

Layouts (padded, head-major): q [B, N, Tp, H], k [B, K, Sp, H], v [B, K, Sp, Hv],
q_seg [B, nq, bq, 1], kv_seg [B, nk, 1, bk], lse and delta [B, N, Tp, 1] (the trailing 1 keeps lse
tiles 2-D).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from effitrans.kernels import masks as masks_lib
from effitrans.kernels.pallas import common
from effitrans.kernels.pallas.common import Config, dot_nn, dot_nt, dot_tn

_ROW_SEMANTICS = ("parallel", "parallel", "parallel", "arbitrary")
_COL_SEMANTICS = ("parallel", "parallel", "parallel", "arbitrary", "arbitrary")


def _allowed(cfg: Config, q_block, kv_block, q_seg_ref, kv_seg_ref):
    """common.allowed for one tile pair, reading the segment tiles when there are any."""
    q_seg = q_seg_ref[...] if q_seg_ref is not None else None  # [bq, 1]
    kv_seg = kv_seg_ref[...] if kv_seg_ref is not None else None  # [1, bk]
    return common.allowed(cfg, q_block, kv_block, q_seg, kv_seg)


def _by_kind(kind, update) -> None:
    """update(masked=False) on a FULL step, update(masked=True) on a PARTIAL one; padding does nothing."""
    pl.when(kind == masks_lib.FULL)(lambda: update(False))
    pl.when(kind == masks_lib.PARTIAL)(lambda: update(True))


def _fwd_kernel(row_idx_ref, row_kind_ref, *refs, cfg: Config, width: int):
    """One (b, n, q block i, step j) of the forward. Blocks: q [bq, H], k [bk, H], v [bk, Hv]."""
    q_seg_ref, kv_seg_ref, refs = common.split_refs(refs, cfg.has_segments)
    q_ref, k_ref, v_ref, o_ref, lse_ref, m_scr, l_scr, acc_scr = refs
    i, j = pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        # m starts at the mask value, not -inf: see MASK_VALUE. l and acc start empty.
        m_scr[...] = jnp.full(m_scr.shape, common.MASK_VALUE, jnp.float32)
        l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
        acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

    def update(masked: bool):
        q = q_ref[...]  # [bq, H]
        k = k_ref[...]  # [bk, H]
        v = v_ref[...]  # [bk, Hv]
        s = dot_nt(q, k) * cfg.scale  # [bq, bk] f32
        if masked:
            allowed = _allowed(cfg, i, row_idx_ref[i, j], q_seg_ref, kv_seg_ref)
            s = jnp.where(allowed, s, common.MASK_VALUE)
        m_prev = m_scr[...]  # [bq, 1]
        m_new = jnp.maximum(m_prev, s.max(axis=-1, keepdims=True))  # [bq, 1]
        p = jnp.exp(s - m_new)  # [bq, bk]
        if masked:
            # A row with no allowed key so far has m_new == MASK_VALUE, where exp(s - m_new) = 1 on
            # masked entries; zero them explicitly.
            p = jnp.where(allowed, p, 0.0)
        alpha = jnp.exp(m_prev - m_new)  # [bq, 1] rescales what was accumulated under m_prev
        l_scr[...] = alpha * l_scr[...] + p.sum(axis=-1, keepdims=True)
        acc_scr[...] = alpha * acc_scr[...] + dot_nn(p.astype(v.dtype), v)  # [bq, Hv]
        m_scr[...] = m_new

    _by_kind(row_kind_ref[i, j], update)

    @pl.when(j == width - 1)
    def _finish():
        l = l_scr[...]  # [bq, 1]
        nonempty = l > 0.0
        safe_l = jnp.where(nonempty, l, 1.0)
        o_ref[...] = jnp.where(nonempty, acc_scr[...] / safe_l, 0.0).astype(o_ref.dtype)
        lse_ref[...] = jnp.where(nonempty, m_scr[...] + jnp.log(safe_l), jnp.inf)


def _dq_kernel(row_idx_ref, row_kind_ref, *refs, cfg: Config, width: int):
    """One (b, n, q block i, step j) of dq.

    Blocks: q [bq, H], do [bq, Hv], k [bk, H], v [bk, Hv], lse and delta [bq, 1].
    """
    q_seg_ref, kv_seg_ref, refs = common.split_refs(refs, cfg.has_segments)
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, dq_scr = refs
    i, j = pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        dq_scr[...] = jnp.zeros(dq_scr.shape, jnp.float32)

    def update(masked: bool):
        q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
        s = dot_nt(q, k) * cfg.scale  # [bq, bk]
        p = jnp.exp(s - lse_ref[...])  # [bq, bk]; rows with lse = +inf give 0
        if masked:
            p = jnp.where(_allowed(cfg, i, row_idx_ref[i, j], q_seg_ref, kv_seg_ref), p, 0.0)
        dp = dot_nt(do, v)  # [bq, bk]
        ds = p * (dp - delta_ref[...])  # [bq, bk]
        dq_scr[...] += dot_nn(ds.astype(k.dtype), k) * cfg.scale  # [bq, H]

    _by_kind(row_kind_ref[i, j], update)

    @pl.when(j == width - 1)
    def _finish():
        dq_ref[...] = dq_scr[...].astype(dq_ref.dtype)


def _dkv_kernel(col_idx_ref, col_kind_ref, *refs, cfg: Config, width: int):
    """One (b, kv head h, kv block c, group member g, step j) of dk/dv.

    Blocks: q, do [bq, H|Hv] of query head h * G + g; k, v [bk, H|Hv]; lse, delta [bq, 1].
    """
    q_seg_ref, kv_seg_ref, refs = common.split_refs(refs, cfg.has_segments)
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, dk_scr, dv_scr = refs
    c, g, j = pl.program_id(2), pl.program_id(3), pl.program_id(4)

    @pl.when((g == 0) & (j == 0))
    def _init():
        dk_scr[...] = jnp.zeros(dk_scr.shape, jnp.float32)
        dv_scr[...] = jnp.zeros(dv_scr.shape, jnp.float32)

    def update(masked: bool):
        q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
        s = dot_nt(q, k) * cfg.scale  # [bq, bk]
        p = jnp.exp(s - lse_ref[...])  # [bq, bk]
        if masked:
            p = jnp.where(_allowed(cfg, col_idx_ref[c, j], c, q_seg_ref, kv_seg_ref), p, 0.0)
        dv_scr[...] += dot_tn(p.astype(do.dtype), do)  # [bk, Hv]
        dp = dot_nt(do, v)  # [bq, bk]
        ds = p * (dp - delta_ref[...])  # [bq, bk]
        dk_scr[...] += dot_tn(ds.astype(q.dtype), q) * cfg.scale  # [bk, H]

    _by_kind(col_kind_ref[c, j], update)

    @pl.when((g == cfg.num_groups - 1) & (j == width - 1))
    def _finish():
        dk_ref[...] = dk_scr[...].astype(dk_ref.dtype)
        dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


def _compiler_params(cfg: Config, semantics):
    if cfg.interpret:
        return None
    return pltpu.CompilerParams(dimension_semantics=semantics)


def _row_specs(cfg: Config, h: int, hv: int):
    """In-specs of the row grid (b, n, i, j) for [q_seg, kv_seg,] q, k, v, and the q tile's index map.

    Index maps get the grid indices and then the prefetched (SMEM) lists; k and v follow the row list
    (kv tile idx[i, j] of kv head n // G).
    """
    bq, bk, g = cfg.block_q, cfg.block_k, cfg.num_groups
    q_map = lambda bi, ni, i, j, idx, kind: (bi, ni, i, 0)
    kv_map = lambda bi, ni, i, j, idx, kind: (bi, jax.lax.div(ni, g), idx[i, j], 0)
    specs = []
    if cfg.has_segments:
        specs += [
            pl.BlockSpec((None, None, bq, 1), lambda bi, ni, i, j, idx, kind: (bi, i, 0, 0)),
            pl.BlockSpec((None, None, 1, bk), lambda bi, ni, i, j, idx, kind: (bi, idx[i, j], 0, 0)),
        ]
    specs += [
        pl.BlockSpec((None, None, bq, h), q_map),
        pl.BlockSpec((None, None, bk, h), kv_map),
        pl.BlockSpec((None, None, bk, hv), kv_map),
    ]
    return specs, q_map


def forward(cfg: Config, q, k, v, q_seg, kv_seg):
    """q [B,N,Tp,H], k [B,K,Sp,H], v [B,K,Sp,Hv], q_seg [B,nq,bq,1], kv_seg [B,nk,1,bk].

    Returns out [B,N,Tp,Hv] and lse [B,N,Tp,1] (+inf on rows with no allowed key).
    """
    rows = cfg.info().rows
    b, n, tp, h = q.shape
    hv = v.shape[-1]
    bq = cfg.block_q
    in_specs, q_map = _row_specs(cfg, h, hv)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(b, n, tp // bq, rows.width),
        in_specs=in_specs,
        out_specs=[pl.BlockSpec((None, None, bq, hv), q_map), pl.BlockSpec((None, None, bq, 1), q_map)],
        scratch_shapes=[
            pltpu.VMEM((bq, 1), jnp.float32),  # m
            pltpu.VMEM((bq, 1), jnp.float32),  # l
            pltpu.VMEM((bq, hv), jnp.float32),  # acc
        ],
    )
    segs = (q_seg, kv_seg) if cfg.has_segments else ()
    return pl.pallas_call(
        functools.partial(_fwd_kernel, cfg=cfg, width=rows.width),
        grid_spec=grid_spec,
        out_shape=[jax.ShapeDtypeStruct((b, n, tp, hv), q.dtype), jax.ShapeDtypeStruct((b, n, tp, 1), jnp.float32)],
        compiler_params=_compiler_params(cfg, _ROW_SEMANTICS),
        interpret=cfg.interpret,
        name="effitrans_flash_fwd",
    )(jnp.asarray(rows.idx), jnp.asarray(rows.kind), *segs, q, k, v)


def backward(cfg: Config, q, k, v, q_seg, kv_seg, do, lse, delta):
    """Padded BNTH inputs, do [B,N,Tp,Hv], lse/delta [B,N,Tp,1] -> dq, dk, dv (padded layouts)."""
    info = cfg.info()
    rows, cols = info.rows, info.cols
    b, n, tp, h = q.shape
    kh, sp, hv = k.shape[1], k.shape[2], v.shape[-1]
    bq, bk, g = cfg.block_q, cfg.block_k, cfg.num_groups
    segs = (q_seg, kv_seg) if cfg.has_segments else ()

    # dq: same grid and lists as the forward.
    in_specs, q_map = _row_specs(cfg, h, hv)
    in_specs += [
        pl.BlockSpec((None, None, bq, hv), q_map),
        pl.BlockSpec((None, None, bq, 1), q_map),
        pl.BlockSpec((None, None, bq, 1), q_map),
    ]
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg, width=rows.width),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(b, n, tp // bq, rows.width),
            in_specs=in_specs,
            out_specs=pl.BlockSpec((None, None, bq, h), q_map),
            scratch_shapes=[pltpu.VMEM((bq, h), jnp.float32)],
        ),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=_compiler_params(cfg, _ROW_SEMANTICS),
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
        functools.partial(_dkv_kernel, cfg=cfg, width=cols.width),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(b, kh, sp // bk, g, cols.width),
            in_specs=in_specs,
            out_specs=[pl.BlockSpec((None, None, bk, h), kc_map), pl.BlockSpec((None, None, bk, hv), kc_map)],
            scratch_shapes=[pltpu.VMEM((bk, h), jnp.float32), pltpu.VMEM((bk, hv), jnp.float32)],
        ),
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=_compiler_params(cfg, _COL_SEMANTICS),
        interpret=cfg.interpret,
        name="effitrans_flash_dkv",
    )(jnp.asarray(cols.idx), jnp.asarray(cols.kind), *segs, q, k, v, do, lse, delta)
    return dq, dk, dv
