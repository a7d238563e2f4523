"""Public entry points: validate inputs once, resolve defaults, dispatch to an implementation.

``attention``        q [B, T, N, H], k [B, S, K, H], v [B, S, K, Hv] -> out [B, T, N, Hv] (, lse [B, N, T])
``decode_attention`` the T newest tokens against a KV cache with per-row lengths.

impl: "reference" (dense oracle), "xla" (blockwise, block-sparse, pure JAX), "pallas" (fused kernel;
interpret mode on CPU), "cudnn" (jax.nn.dot_product_attention's cuDNN kernel; GPU, bf16/f16, Full /
Causal() / causal SlidingWindow), "auto" (``dispatch.choose_impl``: cuDNN where it expresses the call and
Pallas otherwise on GPU, Pallas on TPU, xla on CPU). On "xla" and "pallas", Strided and Fixed masks
run reordered into block-sparse parts (``reorder.py``).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from effitrans.kernels import decode as decode_lib
from effitrans.kernels import dispatch, reorder
from effitrans.kernels import masks as masks_lib
from effitrans.kernels import reference as reference_lib

IMPLS = ("reference", "xla", "pallas", "cudnn", "auto")
DECODE_IMPLS = ("reference", "xla", "auto")

# Default block sizes, chosen by measurement (docs/kernels.md). xla (CPU): 512 x 512 tiles amortise the
# per-block loop overhead better (measured on the quiet 2-core CPU: full 8K fwd 3.6 s vs 6.1 s at 256,
# causal 4K fwd 0.55 s vs 0.88-1.18 s, f+b 2.2 s vs 2.8 s), but on banded masks they waste work in
# masked corners (window-256 4K fwd 258 ms vs 198 ms at 256). So `_default_xla_blocks` takes 512 when
# the 512 block map visits at most XLA_BIG_BLOCK_WASTE x the area the 256 map visits, else 256.
# On accelerators the Pallas kernel wants tiles that fit on-chip memory: on GPU the per (dtype, head dim)
# table dispatch.PALLAS_GPU_TILES; on TPU (and interpreted on CPU) 128 x 128.
XLA_BLOCK_Q = 256
XLA_BLOCK_K = 256
XLA_BIG_BLOCK = 512
XLA_BIG_BLOCK_WASTE = 1.15
PALLAS_BLOCK_Q = 128
PALLAS_BLOCK_K = 128
DECODE_BLOCK_K = 512


def _backend() -> str:
    return jax.default_backend()


def _device_kind() -> str | None:
    return jax.devices()[0].device_kind if _backend() in ("gpu", "cuda", "rocm") else None


def _resolve_impl(impl: Any, allowed: tuple[str, ...], choose=None) -> str:
    """Validates impl; "auto" becomes ``choose().impl`` (a dispatch.Choice), or without ``choose`` the
    backend's kernel (pallas on TPU/GPU, xla otherwise)."""
    if not isinstance(impl, str) or impl not in allowed:
        raise ValueError(f"impl must be one of {allowed}, got {impl!r}.")
    if impl != "auto":
        return impl
    if choose is not None:
        return choose().impl
    if "pallas" in allowed and _backend() in ("tpu", "gpu", "cuda", "rocm"):
        return "pallas"
    return "xla"


def _check_block(name: str, value: Any) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0 or value % 8:
        raise ValueError(f"{name} must be a positive multiple of 8 (or None for the default), got {value!r}.")


def _default_block(default: int, length: int) -> int:
    # Never pad a short sequence up to a huge block: round the length up to a multiple of 8.
    return int(min(default, max(8, -(-length // 8) * 8)))


def _visited_area(mask, t: int, s: int, bq: int, bk: int) -> int:
    return masks_lib.mask_info(mask, t, s, bq, bk).visited * bq * bk


def _default_xla_blocks(mask, t: int, s: int, block_q, block_k) -> tuple[int, int]:
    """(block_q, block_k) for the xla kernel: explicit values win; else 256, or 512 where the mask is
    dense enough at 512 (visited area within XLA_BIG_BLOCK_WASTE of the 256 tiling's)."""
    small = (_default_block(XLA_BLOCK_Q, t), _default_block(XLA_BLOCK_K, s))
    big = (_default_block(XLA_BIG_BLOCK, t), _default_block(XLA_BIG_BLOCK, s))
    if big != small and _visited_area(mask, t, s, *big) <= XLA_BIG_BLOCK_WASTE * _visited_area(mask, t, s, *small):
        chosen = big
    else:
        chosen = small
    return (block_q if block_q is not None else chosen[0]), (block_k if block_k is not None else chosen[1])


def _default_pallas_block(default: int, length: int) -> int:
    # GPU Pallas tiles must be powers of two >= 16: round the length up to one, capped at default.
    return int(min(default, max(16, 1 << max(0, (length - 1).bit_length()))))


def _check_array(name: str, x: Any, rank: int, layout: str) -> None:
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{name} must be an array of shape {layout}, got {type(x).__name__}.")
    if x.ndim != rank:
        raise ValueError(f"{name} must have rank {rank} ({layout}), got shape {tuple(x.shape)}.")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must be a floating array, got dtype {x.dtype}.")


def _check_qkv(q, k, v) -> None:
    _check_array("q", q, 4, "[batch, q_len, num_heads, head_dim]")
    _check_array("k", k, 4, "[batch, kv_len, num_kv_heads, head_dim]")
    _check_array("v", v, 4, "[batch, kv_len, num_kv_heads, v_head_dim]")
    if not (q.shape[0] == k.shape[0] == v.shape[0]):
        raise ValueError(f"batch sizes differ: q {q.shape[0]}, k {k.shape[0]}, v {v.shape[0]}; they must be equal.")
    if k.shape[1] != v.shape[1]:
        raise ValueError(f"kv_len differs: k {k.shape[1]}, v {v.shape[1]}; they must be equal.")
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"num_kv_heads differs: k {k.shape[2]}, v {v.shape[2]}; they must be equal.")
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"head_dim differs: q {q.shape[3]}, k {k.shape[3]}; they must be equal.")
    if q.shape[2] % k.shape[2]:
        raise ValueError(
            f"num_heads ({q.shape[2]}) must be a multiple of num_kv_heads ({k.shape[2]}) (N % K == 0 for GQA/MQA)."
        )
    if min(q.shape) < 1 or min(k.shape) < 1 or v.shape[3] < 1:
        raise ValueError(
            f"all dimensions must be >= 1, got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}."
        )


def _check_scale(scale: Any, head_dim: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, (int, float, np.floating, np.integer)):
        raise TypeError(f"scale must be a Python float (static) or None, got {type(scale).__name__}.")
    if not math.isfinite(float(scale)):
        raise ValueError(f"scale must be finite, got {scale!r}.")
    return float(scale)


def normalize_segment_ids(segment_ids: Any, batch: int, q_len: int, kv_len: int):
    """None | int [B, T] (self-attention) | (q_seg [B, T], kv_seg [B, S]) -> None | (q_seg, kv_seg)."""
    if segment_ids is None:
        return None
    if isinstance(segment_ids, (tuple, list)):
        if len(segment_ids) != 2:
            raise ValueError(
                "segment_ids as a tuple must be (q_segment_ids [B, T], kv_segment_ids "
                f"[B, S]), got a tuple of length {len(segment_ids)}."
            )
        q_seg, kv_seg = segment_ids
    else:
        if q_len != kv_len:
            raise ValueError(
                f"segment_ids given as one array needs q_len == kv_len, got q_len {q_len}, "
                f"kv_len {kv_len}; pass (q_segment_ids, kv_segment_ids) instead."
            )
        q_seg = kv_seg = segment_ids
    for name, seg, length in (("q_segment_ids", q_seg, q_len), ("kv_segment_ids", kv_seg, kv_len)):
        if not hasattr(seg, "shape") or not hasattr(seg, "dtype"):
            raise TypeError(f"segment_ids: {name} must be an int array [batch, {length}], got {type(seg).__name__}.")
        if not jnp.issubdtype(seg.dtype, jnp.integer):
            raise TypeError(f"segment_ids: {name} must have an integer dtype, got {seg.dtype}.")
        if tuple(seg.shape) != (batch, length):
            raise ValueError(f"segment_ids: {name} must have shape ({batch}, {length}), got {tuple(seg.shape)}.")
    return jnp.asarray(q_seg, jnp.int32), jnp.asarray(kv_seg, jnp.int32)


def attention(
    q, k, v, *, mask=None, segment_ids=None, scale=None, impl="auto", block_q=None, block_k=None, return_lse=False
):
    """Multi-head attention with GQA/MQA, a structured mask and optional segment ids.

    Args:
      q: [B, T, N, H] queries.
      k: [B, S, K, H] keys, N % K == 0 (G = N // K query heads share a kv head; never repeated).
      v: [B, S, K, Hv] values.
      mask: a masks.Mask (None = masks.Full()). Positions: see masks.py (query i at position i).
      segment_ids: None, int [B, T] (needs T == S) or (q_seg [B, T], kv_seg [B, S]); a query attends
        only keys with an equal segment id.
      scale: logit scale (static float), default 1 / sqrt(H).
      impl: "reference" | "xla" | "pallas" | "cudnn" | "auto" (see the module docstring).
      block_q, block_k: tile sizes (positive multiples of 8) for "xla"/"pallas"; None = default.
      return_lse: also return the float32 log-sum-exp of the scaled masked logits, [B, N, T]
        (-inf for queries that see no key).

    Returns:
      out [B, T, N, Hv] in q.dtype, or (out, lse) with return_lse. Queries that see no key give 0.
    """
    _check_qkv(q, k, v)
    if mask is None:
        mask = masks_lib.Full()
    if not isinstance(mask, masks_lib.Mask):
        raise TypeError(
            f"mask must be an effitrans.kernels.masks.Mask (Full, Causal, SlidingWindow, "
            f"Strided, Fixed, GlobalTokens, Chunked or a |/& composition) or None, "
            f"got {type(mask).__name__}: {mask!r}."
        )
    _check_block("block_q", block_q)
    _check_block("block_k", block_k)
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {return_lse!r}.")
    b, t, _, h = q.shape
    s = k.shape[1]
    scale = _check_scale(scale, h)
    segs = normalize_segment_ids(segment_ids, b, t, s)
    choose = functools.partial(
        dispatch.choose_impl,
        mask,
        q_len=t,
        kv_len=s,
        head_dim=h,
        v_head_dim=v.shape[3],
        dtype=q.dtype,
        backend=_backend(),
        has_segments=segs is not None,
        return_lse=return_lse,
        device_kind=_device_kind(),
    )
    impl = _resolve_impl(impl, IMPLS, choose)

    if impl == "reference":
        return reference_lib.reference_attention(
            q, k, v, mask=mask, segment_ids=segs, scale=scale, return_lse=return_lse
        )
    if impl == "cudnn":
        return _cudnn_attention(q, k, v, mask=mask, segs=segs, scale=scale, return_lse=return_lse)
    run = functools.partial(_blockwise, impl, scale=scale, block_q=block_q, block_k=block_k)
    if reorder.reorderable(mask, t, s):
        out, lse = reorder.reordered_attention(run, q, k, v, mask=mask, segment_ids=segs)
    else:
        out, lse = run(q, k, v, mask, segs, None)
    return (out, lse) if return_lse else out


def _cudnn_attention(q, k, v, *, mask, segs, scale, return_lse):
    """jax.nn.dot_product_attention(implementation="cudnn"); ValueError for what cuDNN cannot express."""
    t, s, h, hv = q.shape[1], k.shape[1], q.shape[3], v.shape[3]
    why_not = dispatch.cudnn_unsupported(
        mask,
        q_len=t,
        kv_len=s,
        head_dim=h,
        v_head_dim=hv,
        dtype=q.dtype,
        has_segments=segs is not None,
        return_lse=return_lse,
        device_kind=_device_kind(),
    )
    if why_not is not None:
        raise ValueError(f'impl="cudnn" cannot run this call: {why_not}. Use impl="auto" or "pallas".')
    if _backend() not in ("gpu", "cuda"):
        raise ValueError(f'impl="cudnn" needs a CUDA GPU backend, got {_backend()!r}.')
    kwargs = dispatch.cudnn_mask_args(mask, t, s)
    return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="cudnn", **kwargs)


def _blockwise(impl, q, k, v, mask, segs, max_block, *, scale, block_q, block_k):
    """One call of the "xla" or "pallas" kernel -> (out [B, T, N, Hv], lse f32 [B, N, T]).

    max_block: None or a cap on the default tile sizes (explicit block_q / block_k win)."""
    t, s = q.shape[1], k.shape[1]
    cap = (lambda blk: blk) if max_block is None else (lambda blk: min(blk, max_block))
    if impl == "xla":
        from effitrans.kernels import xla_flash  # pylint: disable=import-outside-toplevel

        bq, bk = _default_xla_blocks(mask, t, s, None, None)
        bq = block_q if block_q is not None else cap(bq)
        bk = block_k if block_k is not None else cap(bk)
        return xla_flash.xla_attention(
            q, k, v, mask=mask, segment_ids=segs, scale=scale, block_q=int(bq), block_k=int(bk), return_lse=True
        )
    # impl == 'pallas'
    from effitrans.kernels import pallas  # pylint: disable=import-outside-toplevel

    tiles = (
        dispatch.pallas_gpu_tiles(q.dtype, q.shape[3], v.shape[3]) if _backend() in ("gpu", "cuda", "rocm") else None
    )
    default_q, default_k = tiles if tiles is not None else (PALLAS_BLOCK_Q, PALLAS_BLOCK_K)
    bq = block_q if block_q is not None else cap(_default_pallas_block(default_q, t))
    bk = block_k if block_k is not None else cap(_default_pallas_block(default_k, s))
    return pallas.pallas_attention(
        q,
        k,
        v,
        mask=mask,
        segment_ids=segs,
        scale=scale,
        block_q=int(bq),
        block_k=int(bk),
        return_lse=True,
        interpret=_backend() == "cpu",
    )


def decode_attention(q, k_cache, v_cache, *, lengths, scale=None, impl="auto", block_k=None):
    """Attention of the T newest tokens against a KV cache.

    Args:
      q: [B, T, N, H]: tokens at positions lengths[b] - T .. lengths[b] - 1.
      k_cache: [B, S, K, H]; v_cache: [B, S, K, Hv]: slots at positions >= lengths[b] are ignored.
      lengths: int [B] valid cache length per row, including the T new tokens (may be traced).
      scale: logit scale, default 1 / sqrt(H).
      impl: "reference" (dense) | "xla" (flash-decoding) | "auto" (= "xla").
      block_k: keys per split for "xla" (positive multiple of 8), None = default.

    Returns:
      out [B, T, N, Hv] in q.dtype; query t sees cache keys at positions <= lengths[b] - T + t.
    """
    _check_qkv(q, k_cache, v_cache)
    _check_block("block_k", block_k)
    if not hasattr(lengths, "shape") or not hasattr(lengths, "dtype"):
        raise TypeError(f"lengths must be an int array [batch], got {type(lengths).__name__}.")
    if not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise TypeError(f"lengths must have an integer dtype, got {lengths.dtype}.")
    if tuple(lengths.shape) != (q.shape[0],):
        raise ValueError(f"lengths must have shape ({q.shape[0]},) (one per batch row), got {tuple(lengths.shape)}.")
    impl = _resolve_impl(impl, DECODE_IMPLS, functools.partial(dispatch.choose_decode_impl, backend=_backend()))
    scale = _check_scale(scale, q.shape[3])
    if impl == "reference":
        return reference_lib.reference_decode_attention(q, k_cache, v_cache, lengths=lengths, scale=scale)
    bk = block_k if block_k is not None else _default_block(DECODE_BLOCK_K, k_cache.shape[1])
    return decode_lib.xla_decode_attention(q, k_cache, v_cache, lengths=lengths, scale=scale, block_k=int(bk))
