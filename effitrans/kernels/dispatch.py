"""Which attention implementation a call runs, as a pure function of (mask, shapes, dtype, backend).

``choose_impl`` is what ``impl="auto"`` resolves through; tests call it on the CPU for every mask kind
and backend. The rules (docs/accelerator.md has the table and where the numbers come from):

  cpu: "xla" (the Pallas kernels would run in the interpreter).
  tpu: "pallas" (Mosaic, scalar-prefetched block lists).
  gpu: "cudnn" when cuDNN's fused kernel expresses the call: bf16/f16, no segment ids, no lse output,
       head dims equal, a multiple of 8 and <= 128 (<= 256 on Hopper and later), and a mask that is
       Full, Causal() or a causal SlidingWindow(left, 0) with q_len == kv_len. Otherwise "pallas"
       (Triton) with tiles from ``pallas_gpu_tiles`` that fit shared memory; "xla" if no tile fits.

Decode (``choose_decode_impl``): "xla" flash-decoding on every backend (the T newest tokens against a
cache; memory bound, split over keys).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from effitrans.kernels import masks as masks_lib

BACKENDS = ("cpu", "gpu", "tpu")
# jax.default_backend() names -> the three kinds above.
_BACKEND_ALIASES = {"cpu": "cpu", "gpu": "gpu", "cuda": "gpu", "rocm": "gpu", "tpu": "tpu"}

# Shared memory one Triton program may use on H100/H200 (the limit the compiler reports:
# "available: 232448"); A100 allows 166912, so the table below keeps well inside both for bf16.
GPU_SMEM_BYTES = 232448
CUDNN_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
# Device kinds (jax Device.device_kind) of Hopper and later, where cuDNN accepts head dims up to 256.
_HOPPER_OR_LATER = ("H100", "H200", "H800", "H20", "GH200", "B100", "B200", "GB200")

# Default Pallas GPU (Triton) tiles (block_q, block_k) per (itemsize, largest head dim). bf16, H 128:
# 64 x 64 was the fastest forward+backward tile measured on an H200 at S=8192 causal (17.8 ms vs 38.2 ms
# at 128 x 128); 128 x 128 in float32 at H 128 asks for 262148 bytes of shared memory (> 232448).
# The other rows are sized by ``pallas_gpu_smem_bytes`` (tests check every row fits).
PALLAS_GPU_TILES = {
    (2, 64): (128, 64),
    (2, 128): (64, 64),
    (2, 256): (32, 32),
    (4, 64): (64, 64),
    (4, 128): (64, 64),
    (4, 256): (32, 32),
}
PALLAS_TPU_TILES = (128, 128)


@dataclasses.dataclass(frozen=True)
class Choice:
    """impl ("reference" | "xla" | "pallas" | "cudnn"), why, and default tiles (None: the impl's own)."""

    impl: str
    reason: str
    block_q: int | None = None
    block_k: int | None = None


def normalize_backend(backend: str) -> str:
    """jax.default_backend() name -> "cpu" | "gpu" | "tpu"."""
    if backend not in _BACKEND_ALIASES:
        raise ValueError(f"backend must be one of {sorted(_BACKEND_ALIASES)}, got {backend!r}.")
    return _BACKEND_ALIASES[backend]


def pallas_gpu_smem_bytes(block_q: int, block_k: int, head_dim: int, v_head_dim: int, dtype) -> int:
    """Shared memory estimate of the largest Pallas GPU program (the backward: q, dO, k, v tiles in
    the input dtype plus one float32 [bq, bk] tile). Calibrated on the forward at 128 x 128, H 128,
    float32: the compiler asked for 262148 bytes, i.e. four 64 KiB tiles (q, k, v and the logits)."""
    item = jnp.dtype(dtype).itemsize
    return item * (block_q * (head_dim + v_head_dim) + block_k * (head_dim + v_head_dim)) + 4 * block_q * block_k


def _pow2_at_least(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def pallas_gpu_tiles(dtype, head_dim: int, v_head_dim: int | None = None) -> tuple[int, int] | None:
    """Default (block_q, block_k) for the Pallas GPU kernel, or None when no tile fits shared memory."""
    hv = head_dim if v_head_dim is None else v_head_dim
    width = max(64, _pow2_at_least(max(head_dim, hv)))  # the kernel pads head dims to powers of two
    item = min(jnp.dtype(dtype).itemsize, 4)
    tiles = PALLAS_GPU_TILES.get((item, width))
    hp, hvp = _pow2_at_least(max(head_dim, 16)), _pow2_at_least(max(hv, 16))
    if tiles is not None and pallas_gpu_smem_bytes(*tiles, hp, hvp, dtype) <= GPU_SMEM_BYTES:
        return tiles
    for bq, bk in ((64, 64), (32, 32), (16, 16)):  # head dims beyond the table: the largest that fits
        if pallas_gpu_smem_bytes(bq, bk, hp, hvp, dtype) <= GPU_SMEM_BYTES:
            return bq, bk
    return None


def cudnn_mask_args(mask: masks_lib.Mask, q_len: int, kv_len: int) -> dict | None:
    """jax.nn.dot_product_attention keyword arguments expressing ``mask``, or None if cuDNN cannot."""
    if isinstance(mask, masks_lib.Full):
        return {"is_causal": False}
    if q_len != kv_len:
        return None  # cuDNN's causal is top-left; keep to the self-attention case that matches exactly
    if isinstance(mask, masks_lib.Causal) and mask.offset == 0:
        return {"is_causal": True}
    if isinstance(mask, masks_lib.SlidingWindow) and mask.right == 0 and mask.offset == 0:
        return {"is_causal": True, "local_window_size": (mask.left, 0)}
    return None


def cudnn_unsupported(
    mask, *, q_len, kv_len, head_dim, v_head_dim, dtype, has_segments=False, return_lse=False, device_kind=None
) -> str | None:
    """Why cuDNN's fused attention cannot run this call, or None when it can."""
    if jnp.dtype(dtype) not in CUDNN_DTYPES:
        return f"cuDNN flash attention takes bfloat16/float16, got {jnp.dtype(dtype)}"
    h_max = 256 if device_kind is not None and any(k in str(device_kind) for k in _HOPPER_OR_LATER) else 128
    if head_dim != v_head_dim or head_dim % 8 or head_dim > h_max:
        return f"cuDNN needs equal head dims, a multiple of 8 and <= {h_max}; got {head_dim} / {v_head_dim}"
    if has_segments:
        return "cuDNN has no segment ids"
    if return_lse:
        return "cuDNN returns no float32 log-sum-exp"
    if cudnn_mask_args(mask, q_len, kv_len) is None:
        return f"cuDNN expresses Full, Causal() and causal SlidingWindow(left, 0) (q_len == kv_len), got {mask!r}"
    return None


def choose_impl(
    mask: masks_lib.Mask,
    *,
    q_len: int,
    kv_len: int,
    head_dim: int,
    v_head_dim: int | None = None,
    dtype=jnp.float32,
    backend: str = "cpu",
    has_segments: bool = False,
    return_lse: bool = False,
    device_kind: str | None = None,
) -> Choice:
    """The implementation ``impl="auto"`` runs for this call (pure: no device is touched)."""
    backend = normalize_backend(backend)
    hv = head_dim if v_head_dim is None else v_head_dim
    if backend == "cpu":
        return Choice("xla", "cpu: the block-sparse xla loop (Pallas would run in the interpreter)")
    if backend == "tpu":
        return Choice("pallas", "tpu: the Mosaic block-sparse kernel", *PALLAS_TPU_TILES)
    why_not = cudnn_unsupported(
        mask,
        q_len=q_len,
        kv_len=kv_len,
        head_dim=head_dim,
        v_head_dim=hv,
        dtype=dtype,
        has_segments=has_segments,
        return_lse=return_lse,
        device_kind=device_kind,
    )
    if why_not is None:
        return Choice("cudnn", "gpu: cuDNN's fused kernel expresses this mask, dtype and head dim")
    tiles = pallas_gpu_tiles(dtype, head_dim, hv)
    if tiles is None:
        return Choice("xla", f"gpu: {why_not}; no Pallas tile fits {GPU_SMEM_BYTES} bytes of shared memory")
    return Choice("pallas", f"gpu: {why_not}; the Triton block-sparse kernel", *tiles)


def choose_decode_impl(*, backend: str = "cpu") -> Choice:
    """The implementation ``decode_attention(impl="auto")`` runs (pure)."""
    backend = normalize_backend(backend)
    return Choice("xla", f"{backend}: flash-decoding (split over keys, merged by log-sum-exp)")
