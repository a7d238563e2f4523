"""The custom VJP over the padded, head-major arrays, and the public entry ``pallas_attention``.

The entry validates, picks the platform, transposes to head-major and pads to block multiples; the
custom VJP dispatches forward and backward to the TPU (tpu.py) or GPU (gpu.py) kernels and computes
delta = rowsum(dO * O) - dlse in XLA between them.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from effitrans.kernels.pallas import common, gpu, tpu
from effitrans.kernels.pallas.common import Config


def _forward(cfg: Config, q, k, v, q_seg, kv_seg):
    """-> out [B,N,Tp,Hv] (q.dtype), lse [B,N,Tp] f32 (+inf on rows with no allowed key)."""
    if cfg.platform == "gpu":
        return gpu.forward(cfg, q, k, v, q_seg, kv_seg)
    out, lse = tpu.forward(cfg, q, k, v, q_seg, kv_seg)
    return out, lse[..., 0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(cfg: Config, q, k, v, q_seg, kv_seg):
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
        dq, dk, dv = gpu.backward(cfg, q, k, v, q_seg, kv_seg, d_out, lse, delta)
    else:
        dq, dk, dv = tpu.backward(cfg, q, k, v, q_seg, kv_seg, d_out, lse[..., None], delta[..., None])
    return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def _resolve_platform(platform: str | None, interpret: bool) -> str:
    if platform is not None:
        if platform not in common.PLATFORMS:
            raise ValueError(f"pallas_attention: platform must be one of {common.PLATFORMS} or None, got {platform!r}.")
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
    cfg = Config(
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
