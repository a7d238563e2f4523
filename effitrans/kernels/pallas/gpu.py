"""GPU formulation (Triton): the block lists are ordinary inputs and each program loops over its list.

Triton has no scalar prefetch, so the grid is (B, N, q block) for forward and dq and (B, K, kv block)
for dk/dv, and each program walks its row's (column's) list of ``MaskInfo`` with a ``lax.fori_loop``
whose trip count is that row's count. Partial and full blocks share one code path (full blocks OR the
element mask with True). Triton needs power-of-two tile shapes; the entry point pads head dims.

Layouts (padded, head-major): q [B, N, Tp, H], k [B, K, Sp, H], v [B, K, Sp, Hv], q_seg [B, Tp],
kv_seg [B, Sp], lse and delta [B, N, Tp].
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from effitrans.kernels import masks as masks_lib
from effitrans.kernels.pallas import common
from effitrans.kernels.pallas.common import Config, dot_nn, dot_nt, dot_tn


def _compiler_params(cfg: Config):
    if cfg.interpret:
        return None
    return pltriton.CompilerParams(num_warps=4, num_stages=2)


def _kv_tile(cfg: Config, i, j, refs, q_seg):
    """The j-th kv tile of q block i's list: k [bk, H], v [bk, Hv] and the allowed mask [bq, bk].

    refs: (idx, kind, k, v, kv_seg or None) refs; q_seg: int32 [bq, 1] or None.
    """
    idx_ref, kind_ref, k_ref, v_ref, kv_seg_ref = refs
    bk = cfg.block_k
    kb = idx_ref[i, j]
    k = k_ref[pl.ds(kb * bk, bk), :]  # [bk, H]
    v = v_ref[pl.ds(kb * bk, bk), :]  # [bk, Hv]
    kv_seg = kv_seg_ref[pl.ds(kb * bk, bk)][None, :] if kv_seg_ref is not None else None  # [1, bk]
    allowed = common.allowed(cfg, i, kb, q_seg, kv_seg) | (kind_ref[i, j] == masks_lib.FULL)
    return k, v, allowed


def _fwd_kernel(idx_ref, kind_ref, count_ref, *refs, cfg: Config):
    """Program (b, n, q block i). Refs: q [bq, H]; k [Sp, H], v [Sp, Hv] (the kv head's sequence)."""
    q_seg_ref, kv_seg_ref, refs = common.split_refs(refs, cfg.has_segments)
    q_ref, k_ref, v_ref, o_ref, lse_ref = refs
    bq = cfg.block_q
    i = pl.program_id(2)
    q = q_ref[...]  # [bq, H]
    q_seg = q_seg_ref[...][:, None] if q_seg_ref is not None else None  # [bq, 1]
    hv = v_ref.shape[-1]

    def body(j, carry):
        m_prev, l_prev, acc = carry  # [bq, 1], [bq, 1], [bq, Hv]
        k, v, allowed = _kv_tile(cfg, i, j, (idx_ref, kind_ref, k_ref, v_ref, kv_seg_ref), q_seg)
        s = jnp.where(allowed, dot_nt(q, k) * cfg.scale, common.MASK_VALUE)  # [bq, bk]
        m_new = jnp.maximum(m_prev, s.max(axis=-1, keepdims=True))
        p = jnp.where(allowed, jnp.exp(s - m_new), 0.0)  # [bq, bk]
        alpha = jnp.exp(m_prev - m_new)
        l_new = alpha * l_prev + p.sum(axis=-1, keepdims=True)
        acc = alpha * acc + dot_nn(p.astype(v.dtype), v)  # [bq, Hv]
        return m_new, l_new, acc

    init = (
        jnp.full((bq, 1), common.MASK_VALUE, jnp.float32),
        jnp.zeros((bq, 1), jnp.float32),
        jnp.zeros((bq, hv), jnp.float32),
    )
    m, l, acc = jax.lax.fori_loop(0, count_ref[i], body, init)
    nonempty = l > 0.0
    safe_l = jnp.where(nonempty, l, 1.0)
    o_ref[...] = jnp.where(nonempty, acc / safe_l, 0.0).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(nonempty, m + jnp.log(safe_l), jnp.inf)[:, 0]


def _dq_kernel(idx_ref, kind_ref, count_ref, *refs, cfg: Config):
    """Program (b, n, q block i): dq [bq, H] over the row's kv blocks."""
    q_seg_ref, kv_seg_ref, refs = common.split_refs(refs, cfg.has_segments)
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref = refs
    i = pl.program_id(2)
    q, do = q_ref[...], do_ref[...]  # [bq, H], [bq, Hv]
    lse = lse_ref[...][:, None]  # [bq, 1]
    delta = delta_ref[...][:, None]  # [bq, 1]
    q_seg = q_seg_ref[...][:, None] if q_seg_ref is not None else None

    def body(j, dq):
        k, v, allowed = _kv_tile(cfg, i, j, (idx_ref, kind_ref, k_ref, v_ref, kv_seg_ref), q_seg)
        s = dot_nt(q, k) * cfg.scale
        p = jnp.where(allowed, jnp.exp(s - lse), 0.0)  # [bq, bk]
        ds = p * (dot_nt(do, v) - delta)  # [bq, bk]
        return dq + dot_nn(ds.astype(k.dtype), k) * cfg.scale  # [bq, H]

    dq = jax.lax.fori_loop(0, count_ref[i], body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = dq.astype(dq_ref.dtype)


def _dkv_kernel(idx_ref, kind_ref, count_ref, *refs, cfg: Config):
    """Program (b, kv head h, kv block c). Refs: q [G, Tp, H], do [G, Tp, Hv], lse/delta [G, Tp]."""
    q_seg_ref, kv_seg_ref, refs = common.split_refs(refs, cfg.has_segments)
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
        rows = pl.ds(qb * bq, bq)
        q = q_ref[gi, rows, :]  # [bq, H]
        do = do_ref[gi, rows, :]  # [bq, Hv]
        lse = lse_ref[gi, rows][:, None]  # [bq, 1]
        delta = delta_ref[gi, rows][:, None]  # [bq, 1]
        q_seg = q_seg_ref[rows][:, None] if q_seg_ref is not None else None
        allowed = common.allowed(cfg, qb, c, q_seg, kv_seg) | (kind_ref[c, j] == masks_lib.FULL)
        s = dot_nt(q, k) * cfg.scale
        p = jnp.where(allowed, jnp.exp(s - lse), 0.0)  # [bq, bk]
        dv = dv + dot_tn(p.astype(do.dtype), do)  # [bk, Hv]
        ds = p * (dot_nt(do, v) - delta)  # [bq, bk]
        dk = dk + dot_tn(ds.astype(q.dtype), q) * cfg.scale  # [bk, H]
        return dk, dv

    trips = cfg.num_groups * count_ref[c]
    dk, dv = jax.lax.fori_loop(0, trips, body, (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32)))
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _list_inputs(lists: masks_lib.BlockLists):
    """The block lists as kernel inputs, (idx, kind, count), and their whole-array BlockSpecs."""
    arrays = (jnp.asarray(lists.idx), jnp.asarray(lists.kind), jnp.asarray(lists.count))
    return arrays, [pl.BlockSpec(a.shape, lambda *_, nd=a.ndim: (0,) * nd) for a in arrays]


def _row_inputs(cfg: Config, sp: int, h: int, hv: int):
    """Inputs and in-specs of the row grid (b, n, i) up to q, k, v: row lists, [q_seg, kv_seg,] and
    the index maps of a q tile and of the whole kv sequence of kv head n // G."""
    bq, g = cfg.block_q, cfg.num_groups
    lists, specs = _list_inputs(cfg.info().rows)
    q_map = lambda bi, ni, i: (bi, ni, i, 0)
    kv_map = lambda bi, ni, i: (bi, jax.lax.div(ni, g), 0, 0)
    if cfg.has_segments:
        specs += [
            pl.BlockSpec((None, bq), lambda bi, ni, i: (bi, i)),
            pl.BlockSpec((None, sp), lambda bi, ni, i: (bi, 0)),
        ]
    specs += [
        pl.BlockSpec((None, None, bq, h), q_map),
        pl.BlockSpec((None, None, sp, h), kv_map),
        pl.BlockSpec((None, None, sp, hv), kv_map),
    ]
    return lists, specs, q_map


def forward(cfg: Config, q, k, v, q_seg, kv_seg):
    """q [B,N,Tp,H], k [B,K,Sp,H], v [B,K,Sp,Hv], q_seg [B,Tp], kv_seg [B,Sp] -> out [B,N,Tp,Hv],
    lse [B,N,Tp] (+inf on rows with no allowed key)."""
    b, n, tp, _ = q.shape
    sp, hv = k.shape[2], v.shape[-1]
    bq = cfg.block_q
    lists, in_specs, q_map = _row_inputs(cfg, sp, q.shape[-1], hv)
    segs = (q_seg, kv_seg) if cfg.has_segments else ()
    return pl.pallas_call(
        functools.partial(_fwd_kernel, cfg=cfg),
        grid=(b, n, tp // bq),
        in_specs=in_specs,
        out_specs=[
            pl.BlockSpec((None, None, bq, hv), q_map),
            pl.BlockSpec((None, None, bq), lambda bi, ni, i: (bi, ni, i)),
        ],
        out_shape=[jax.ShapeDtypeStruct((b, n, tp, hv), q.dtype), jax.ShapeDtypeStruct((b, n, tp), jnp.float32)],
        compiler_params=_compiler_params(cfg),
        interpret=cfg.interpret,
        name="effitrans_flash_fwd_gpu",
    )(*lists, *segs, q, k, v)


def backward(cfg: Config, q, k, v, q_seg, kv_seg, do, lse, delta):
    """GPU dq and dk/dv; do [B,N,Tp,Hv], lse/delta [B,N,Tp] -> dq, dk, dv (padded layouts)."""
    b, n, tp, h = q.shape
    kh, sp, hv = k.shape[1], k.shape[2], v.shape[-1]
    bq, bk, g = cfg.block_q, cfg.block_k, cfg.num_groups
    segs = (q_seg, kv_seg) if cfg.has_segments else ()

    lists, in_specs, q_map = _row_inputs(cfg, sp, h, hv)
    row_map = lambda bi, ni, i: (bi, ni, i)
    in_specs += [
        pl.BlockSpec((None, None, bq, hv), q_map),
        pl.BlockSpec((None, None, bq), row_map),
        pl.BlockSpec((None, None, bq), row_map),
    ]
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg),
        grid=(b, n, tp // bq),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((None, None, bq, h), q_map),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=_compiler_params(cfg),
        interpret=cfg.interpret,
        name="effitrans_flash_dq_gpu",
    )(*lists, *segs, q, k, v, do, lse, delta)

    # Group the G query heads of each kv head: [B, N, ...] -> [B, K, G, ...] (a free reshape).
    q5 = q.reshape(b, kh, g, tp, h)
    do5 = do.reshape(b, kh, g, tp, hv)
    lse4 = lse.reshape(b, kh, g, tp)
    delta4 = delta.reshape(b, kh, g, tp)
    lists, in_specs = _list_inputs(cfg.info().cols)
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
        functools.partial(_dkv_kernel, cfg=cfg),
        grid=(b, kh, sp // bk),
        in_specs=in_specs,
        out_specs=[pl.BlockSpec((None, None, bk, h), kc_map), pl.BlockSpec((None, None, bk, hv), kc_map)],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=_compiler_params(cfg),
        interpret=cfg.interpret,
        name="effitrans_flash_dkv_gpu",
    )(*lists, *segs, q5, k, v, do5, lse4, delta4)
    return dq, dk, dv
