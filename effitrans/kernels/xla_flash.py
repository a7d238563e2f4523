"""Block-sparse flash attention in pure JAX (online softmax; FlashAttention-2 style backward).

Layout. q is viewed as [B, K, G, T, H] (G = N // K query heads per kv head) and k, v as [B, K, S, H],
so one dot_general per block covers a whole GQA group without repeating k or v in memory.

Work. The mask's static block map (masks.py) says, per (q block, kv block), skip / partial / full.
``masks.mask_info`` packs it, for every q block, into two static lists: kv blocks that are partial and
kv blocks that are full. The forward visits q blocks in a loop and, per q block, runs one loop over
its partial list (mask_fn applied elementwise) and one over its full list (no mask work at all);
skipped blocks are never touched, so a causal mask costs about half of dense and a sliding window
costs O(S * window). Loop trip counts come from the tables, so rows of different lengths do not pad
to the longest.

Numerics. Running max and sum are float32. The max starts at -inf and the sum at 0 so the first
block's rescale factor exp(-inf - m) is exactly 0; a row that never sees a key keeps l = 0 and we
return out = 0, lse = -inf. Logits are multiplied by `scale` in float32 (not folded into a
low-precision q).

Backward. Residuals are q, k, v, the output and lse (all O(T + S)); probabilities are recomputed per
block as exp(s - lse) (no S x S residual), so training memory is linear in length. A row with
lse = -inf uses +inf instead, making every recomputed probability exactly 0 (finite gradients).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from effitrans.kernels import masks as masks_lib


class _Config(NamedTuple):
    """Static (hashable) parameters of one call."""

    mask: masks_lib.Mask
    scale: float
    block_q: int
    block_k: int
    q_len: int
    kv_len: int
    has_segments: bool


def _info(cfg: _Config) -> masks_lib.MaskInfo:
    return masks_lib.mask_info(cfg.mask, cfg.q_len, cfg.kv_len, cfg.block_q, cfg.block_k, cfg.has_segments)


def visited_block_count(mask, q_len, kv_len, block_q, block_k, has_segments=False) -> int:
    """Number of (q block, kv block) pairs the xla kernel computes (for benchmarks/tests)."""
    return masks_lib.mask_info(mask, q_len, kv_len, block_q, block_k, has_segments).visited


def _visit_row(info: masks_lib.MaskInfo, qi, visit, state):
    """Runs ``visit(kj, state, masked)`` over q block qi's partial kv blocks, then over its full ones.

    Trip counts come from the row's own counts, so rows of different lengths do not pad to the longest.
    """
    for lists, masked in ((info.partial_rows, True), (info.full_rows, False)):
        idx, count = jnp.asarray(lists.idx), jnp.asarray(lists.count)  # [nq, width], [nq]
        state = jax.lax.fori_loop(0, count[qi], lambda j, st, idx=idx, m=masked: visit(idx[qi, j], st, m), state)
    return state


def _block_logits(cfg: _Config, segs, prec, q_blk, kt, vt, qi, kj, masked: bool):
    """Scaled logits of q block qi against kv block kj, -inf where masked (when ``masked``).

    q_blk [B, K, G, bq, H]; kt [B, K, Sp, H]; vt [B, K, Sp, Hv] ->
    s f32 [B, K, G, bq, bk], k_blk [B, K, bk, H], v_blk [B, K, bk, Hv].
    """
    k_blk = jax.lax.dynamic_slice_in_dim(kt, kj * cfg.block_k, cfg.block_k, axis=2)  # [B, K, bk, H]
    v_blk = jax.lax.dynamic_slice_in_dim(vt, kj * cfg.block_k, cfg.block_k, axis=2)  # [B, K, bk, Hv]
    s = jnp.einsum("BKGTH,BKSH->BKGTS", q_blk, k_blk, precision=prec, preferred_element_type=jnp.float32)
    s = s * cfg.scale  # [B, K, G, bq, bk]
    if masked:
        s = jnp.where(_block_allowed(cfg, segs, qi, kj), s, -jnp.inf)
    return s, k_blk, v_blk


def _precision(dtype):
    # float32 inputs get true float32 matmuls on every backend (TPU/GPU default to bf16/tf32 passes).
    return jax.lax.Precision.HIGHEST if dtype == jnp.float32 else jax.lax.Precision.DEFAULT


def _to_blocked_layout(q, k, v, cfg: _Config):
    """q [B,T,N,H] -> [B,K,G,Tp,H]; k [B,S,K,H] -> [B,K,Sp,H]; v -> [B,K,Sp,Hv] (zero padded)."""
    b, t, n, h = q.shape
    kh = k.shape[2]
    g = n // kh
    tp = -(-t // cfg.block_q) * cfg.block_q
    sp = -(-cfg.kv_len // cfg.block_k) * cfg.block_k
    qt = q.reshape(b, t, kh, g, h).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, H]
    qt = jnp.pad(qt, ((0, 0), (0, 0), (0, 0), (0, tp - t), (0, 0)))  # [B, K, G, Tp, H]
    kt = jnp.pad(k.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, sp - cfg.kv_len), (0, 0)))
    vt = jnp.pad(v.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, sp - cfg.kv_len), (0, 0)))
    return qt, kt, vt  # [B, K, G, Tp, H], [B, K, Sp, H], [B, K, Sp, Hv]


def _pad_segments(segs, cfg: _Config):
    if segs is None:
        return None
    q_seg, kv_seg = segs
    tp = -(-cfg.q_len // cfg.block_q) * cfg.block_q
    sp = -(-cfg.kv_len // cfg.block_k) * cfg.block_k
    # Padded kv columns are masked by position anyway; pad values only need to exist.
    return (jnp.pad(q_seg, ((0, 0), (0, tp - cfg.q_len))), jnp.pad(kv_seg, ((0, 0), (0, sp - cfg.kv_len))))


def _block_allowed(cfg: _Config, segs, qi, kj):
    """Bool [B|1, 1, 1, bq, bk] for q block qi, kv block kj (traced indices)."""
    q_idx = qi * cfg.block_q + jnp.arange(cfg.block_q, dtype=jnp.int32)[:, None]  # [bq, 1]
    kv_idx = kj * cfg.block_k + jnp.arange(cfg.block_k, dtype=jnp.int32)[None, :]  # [1, bk]
    allowed = cfg.mask.mask_fn(q_idx, kv_idx) & (kv_idx < cfg.kv_len)  # [bq, bk]; padding masked
    allowed = jnp.broadcast_to(allowed, (cfg.block_q, cfg.block_k))[None]  # [1, bq, bk]
    if segs is not None:
        q_seg = jax.lax.dynamic_slice_in_dim(segs[0], qi * cfg.block_q, cfg.block_q, axis=1)
        kv_seg = jax.lax.dynamic_slice_in_dim(segs[1], kj * cfg.block_k, cfg.block_k, axis=1)
        allowed = allowed & (q_seg[:, :, None] == kv_seg[:, None, :])  # [B, bq, bk]
    return allowed[:, None, None]  # [B|1, 1, 1, bq, bk]


def _forward(cfg: _Config, q, k, v, segs):
    """Returns o [B, K, G, Tp, Hv] float32 and lse [B, K, G, Tp] float32 (padded layout)."""
    info = _info(cfg)
    prec = _precision(q.dtype)
    qt, kt, vt = _to_blocked_layout(q, k, v, cfg)
    segs = _pad_segments(segs, cfg)
    b, kh, g, tp, _ = qt.shape
    hv = vt.shape[-1]
    bq = cfg.block_q
    nq = tp // bq

    def row(qi, bufs):
        o_buf, lse_buf = bufs
        q_blk = jax.lax.dynamic_slice_in_dim(qt, qi * bq, bq, axis=3)  # [B, K, G, bq, H]

        def visit(kj, state, masked):
            m, l, acc = state  # [B,K,G,bq], [B,K,G,bq], [B,K,G,bq,Hv]
            s, _, v_blk = _block_logits(cfg, segs, prec, q_blk, kt, vt, qi, kj, masked)  # s [B, K, G, bq, bk]
            m_new = jnp.maximum(m, jnp.max(s, axis=-1))  # [B, K, G, bq]
            # Rows with nothing visible so far keep m = -inf; shift by 0 there so exp gives 0, not NaN.
            m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
            alpha = jnp.exp(m - m_safe)  # [B, K, G, bq]; 0 on the first visible block
            p = jnp.exp(s - m_safe[..., None])  # [B, K, G, bq, bk]
            l = alpha * l + jnp.sum(p, axis=-1)
            pv = jnp.einsum(
                "BKGTS,BKSH->BKGTH", p.astype(v.dtype), v_blk, precision=prec, preferred_element_type=jnp.float32
            )  # [B, K, G, bq, Hv]
            acc = alpha[..., None] * acc + pv
            return m_new, l, acc

        state = (
            jnp.full((b, kh, g, bq), -jnp.inf, jnp.float32),
            jnp.zeros((b, kh, g, bq), jnp.float32),
            jnp.zeros((b, kh, g, bq, hv), jnp.float32),
        )
        m, l, acc = _visit_row(info, qi, visit, state)
        o_blk = acc / jnp.where(l > 0, l, 1.0)[..., None]  # [B, K, G, bq, Hv]; 0 when nothing seen
        lse_blk = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), -jnp.inf)  # [B, K, G, bq]
        o_buf = jax.lax.dynamic_update_slice_in_dim(o_buf, o_blk, qi * bq, axis=3)
        lse_buf = jax.lax.dynamic_update_slice_in_dim(lse_buf, lse_blk, qi * bq, axis=3)
        return o_buf, lse_buf

    bufs = (jnp.zeros((b, kh, g, tp, hv), jnp.float32), jnp.zeros((b, kh, g, tp), jnp.float32))
    return jax.lax.fori_loop(0, nq, row, bufs)


def _backward(cfg: _Config, q, k, v, segs, o, lse, d_out, d_lse):
    """FlashAttention-2 style backward; returns dq, dk, dv in the input layouts and dtypes."""
    info = _info(cfg)
    prec = _precision(q.dtype)
    qt, kt, vt = _to_blocked_layout(q, k, v, cfg)
    segs = _pad_segments(segs, cfg)
    b, t, n, h = q.shape
    _, kh, g, tp, _ = qt.shape
    sp, hv = kt.shape[2], vt.shape[-1]
    bq, bk = cfg.block_q, cfg.block_k
    nq = tp // bq

    do_t = d_out.reshape(b, t, kh, g, hv).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, Hv]
    do_t = jnp.pad(do_t, ((0, 0), (0, 0), (0, 0), (0, tp - t), (0, 0)))  # [B, K, G, Tp, Hv]
    dlse_t = jnp.pad(
        d_lse.astype(jnp.float32).reshape(b, kh, g, t), ((0, 0), (0, 0), (0, 0), (0, tp - t))
    )  # [B, K, G, Tp]
    # d s_ij = p_ij (dO_i . v_j - delta_i) with delta_i = dO_i . O_i - dlse_i.
    delta = jnp.sum(do_t.astype(jnp.float32) * o, axis=-1) - dlse_t  # [B, K, G, Tp]
    lse_safe = jnp.where(jnp.isfinite(lse), lse, jnp.inf)  # fully masked rows -> p = 0

    def row(qi, bufs):
        dq_buf, dk_buf, dv_buf = bufs
        q_blk = jax.lax.dynamic_slice_in_dim(qt, qi * bq, bq, axis=3)  # [B, K, G, bq, H]
        do_blk = jax.lax.dynamic_slice_in_dim(do_t, qi * bq, bq, axis=3)  # [B, K, G, bq, Hv]
        lse_blk = jax.lax.dynamic_slice_in_dim(lse_safe, qi * bq, bq, axis=3)  # [B, K, G, bq]
        dl_blk = jax.lax.dynamic_slice_in_dim(delta, qi * bq, bq, axis=3)  # [B, K, G, bq]

        def visit(kj, state, masked):
            dq_acc, dk_buf, dv_buf = state
            s, k_blk, v_blk = _block_logits(cfg, segs, prec, q_blk, kt, vt, qi, kj, masked)  # s [B, K, G, bq, bk]
            p = jnp.exp(s - lse_blk[..., None])  # [B, K, G, bq, bk]
            dv_blk = jnp.einsum(
                "BKGTS,BKGTH->BKSH", p.astype(do_blk.dtype), do_blk, precision=prec, preferred_element_type=jnp.float32
            )  # [B, K, bk, Hv]
            dp = jnp.einsum(
                "BKGTH,BKSH->BKGTS", do_blk, v_blk, precision=prec, preferred_element_type=jnp.float32
            )  # [B, K, G, bq, bk]
            ds = (p * (dp - dl_blk[..., None]) * cfg.scale).astype(q.dtype)  # [B, K, G, bq, bk]
            dq_acc = dq_acc + jnp.einsum(
                "BKGTS,BKSH->BKGTH", ds, k_blk, precision=prec, preferred_element_type=jnp.float32
            )  # [B, K, G, bq, H]
            dk_blk = jnp.einsum(
                "BKGTS,BKGTH->BKSH", ds, q_blk, precision=prec, preferred_element_type=jnp.float32
            )  # [B, K, bk, H]
            dk_old = jax.lax.dynamic_slice_in_dim(dk_buf, kj * bk, bk, axis=2)
            dv_old = jax.lax.dynamic_slice_in_dim(dv_buf, kj * bk, bk, axis=2)
            dk_buf = jax.lax.dynamic_update_slice_in_dim(dk_buf, dk_old + dk_blk, kj * bk, axis=2)
            dv_buf = jax.lax.dynamic_update_slice_in_dim(dv_buf, dv_old + dv_blk, kj * bk, axis=2)
            return dq_acc, dk_buf, dv_buf

        state = (jnp.zeros((b, kh, g, bq, h), jnp.float32), dk_buf, dv_buf)
        dq_acc, dk_buf, dv_buf = _visit_row(info, qi, visit, state)
        dq_buf = jax.lax.dynamic_update_slice_in_dim(dq_buf, dq_acc, qi * bq, axis=3)
        return dq_buf, dk_buf, dv_buf

    bufs = (
        jnp.zeros((b, kh, g, tp, h), jnp.float32),
        jnp.zeros((b, kh, sp, h), jnp.float32),
        jnp.zeros((b, kh, sp, hv), jnp.float32),
    )
    dq, dk, dv = jax.lax.fori_loop(0, nq, row, bufs)
    dq = dq[:, :, :, :t].transpose(0, 3, 1, 2, 4).reshape(b, t, n, h).astype(q.dtype)  # [B,T,N,H]
    dk = dk[:, :, : cfg.kv_len].transpose(0, 2, 1, 3).astype(k.dtype)  # [B, S, K, H]
    dv = dv[:, :, : cfg.kv_len].transpose(0, 2, 1, 3).astype(v.dtype)  # [B, S, K, Hv]
    return dq, dk, dv


def _unblock(q, o, lse):
    """Padded [B, K, G, Tp, Hv] / [B, K, G, Tp] -> out [B, T, N, Hv] in q.dtype, lse [B, N, T]."""
    b, t, n, _ = q.shape
    hv = o.shape[-1]
    out = o[:, :, :, :t].transpose(0, 3, 1, 2, 4).reshape(b, t, n, hv).astype(q.dtype)  # [B,T,N,Hv]
    return out, lse[:, :, :, :t].reshape(b, n, t)  # [B, N, T]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(cfg: _Config, q, k, v, segs):
    o, lse = _forward(cfg, q, k, v, segs)
    return _unblock(q, o, lse)


def _flash_fwd(cfg: _Config, q, k, v, segs):
    o, lse = _forward(cfg, q, k, v, segs)
    return _unblock(q, o, lse), (q, k, v, segs, o, lse)


def _flash_bwd(cfg: _Config, res, cts):
    q, k, v, segs, o, lse = res
    d_out, d_lse = cts
    dq, dk, dv = _backward(cfg, q, k, v, segs, o, lse, d_out, d_lse)
    d_segs = None if segs is None else jax.tree.map(lambda x: np.zeros(x.shape, jax.dtypes.float0), segs)
    return dq, dk, dv, d_segs


_flash.defvjp(_flash_fwd, _flash_bwd)


def xla_attention(q, k, v, *, mask, segment_ids, scale, block_q, block_k, return_lse=False):
    """Blockwise, block-sparse attention with a linear-memory custom VJP.

    Args (already validated by api.attention):
      q: [B, T, N, H]; k: [B, S, K, H]; v: [B, S, K, Hv].
      mask: masks.Mask; segment_ids: None or (q_seg [B, T], kv_seg [B, S]) int32.
      scale: float; block_q, block_k: static tile sizes (inputs are padded up to multiples).
    Returns:
      out [B, T, N, Hv] in q.dtype, and with return_lse lse [B, N, T] float32 (-inf: no key seen).
    """
    cfg = _Config(mask, float(scale), int(block_q), int(block_k), q.shape[1], k.shape[1], segment_ids is not None)
    out, lse = _flash(cfg, q, k, v, segment_ids)
    return (out, lse) if return_lse else out
