"""dispatch.choose_impl (what impl="auto" runs) for every mask kind and backend, on the CPU, and impl="cudnn"."""

import jax.numpy as jnp
import pytest

from effitrans import kernels
from effitrans.kernels import api, dispatch
from effitrans.kernels import masks as M
from tests.kernels import helpers

# mask -> does cuDNN express it (self-attention, q_len == kv_len)?
MASKS = {
    "full": (M.Full(), True),
    "causal": (M.Causal(), True),
    "causal_offset": (M.Causal(offset=-3), False),
    "window": (M.SlidingWindow(255, 0), True),
    "window_two_sided": (M.SlidingWindow(16, 4), False),
    "strided": (M.Strided(128), False),
    "fixed": (M.Fixed(128, 8), False),
    "global": (M.GlobalTokens(64), False),
    "global_or_window": (M.GlobalTokens(64) | M.SlidingWindow(255, 0), False),
    "chunked": (M.Chunked(512), False),
    "causal_and_chunked": (M.Causal() & M.Chunked(512), False),
    "preceding_blocks": (M.PrecedingBlocks(128, 8), False),
}
SHAPE = dict(q_len=2048, kv_len=2048, head_dim=128)


@pytest.mark.parametrize("name", sorted(MASKS))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_every_mask_kind_and_backend(name, dtype):
    mask, cudnn_ok = MASKS[name]
    assert dispatch.choose_impl(mask, **SHAPE, dtype=dtype, backend="cpu").impl == "xla"
    tpu = dispatch.choose_impl(mask, **SHAPE, dtype=dtype, backend="tpu")
    assert (tpu.impl, tpu.block_q, tpu.block_k) == ("pallas", 128, 128)
    for backend in ("gpu", "cuda"):
        gpu = dispatch.choose_impl(mask, **SHAPE, dtype=dtype, backend=backend)
        if cudnn_ok and dtype != jnp.float32:
            assert gpu.impl == "cudnn", gpu
        else:
            assert gpu.impl == "pallas", gpu
            assert gpu.reason.startswith("gpu: ")
            # Never a tile that exceeds shared memory (float32 at 128 x 128 did: 262148 > 232448 bytes).
            assert dispatch.pallas_gpu_smem_bytes(gpu.block_q, gpu.block_k, 128, 128, dtype) <= dispatch.GPU_SMEM_BYTES


def test_cudnn_needs_self_attention_for_causal_and_window():
    for mask in (M.Causal(), M.SlidingWindow(31, 0)):
        choice = dispatch.choose_impl(mask, q_len=16, kv_len=64, head_dim=64, dtype=jnp.bfloat16, backend="gpu")
        assert choice.impl == "pallas" and "q_len == kv_len" in choice.reason
    full = dispatch.choose_impl(M.Full(), q_len=16, kv_len=64, head_dim=64, dtype=jnp.bfloat16, backend="gpu")
    assert full.impl == "cudnn"


@pytest.mark.parametrize(
    "kwargs, want",
    [
        (dict(has_segments=True), "segment ids"),
        (dict(return_lse=True), "log-sum-exp"),
        (dict(head_dim=100), "multiple of 8"),
        (dict(head_dim=256), "<= 128"),
        (dict(v_head_dim=64), "equal head dims"),
    ],
)
def test_gpu_falls_back_to_pallas_with_the_reason(kwargs, want):
    args = dict(q_len=1024, kv_len=1024, head_dim=128, dtype=jnp.bfloat16, backend="gpu") | kwargs
    choice = dispatch.choose_impl(M.Causal(), **args)
    assert choice.impl == "pallas" and want in choice.reason, choice


def test_hopper_takes_head_dim_256_on_cudnn():
    args = dict(q_len=1024, kv_len=1024, head_dim=256, dtype=jnp.bfloat16, backend="gpu")
    assert dispatch.choose_impl(M.Causal(), **args, device_kind="NVIDIA H200").impl == "cudnn"
    assert dispatch.choose_impl(M.Causal(), **args, device_kind="NVIDIA A100-SXM4-80GB").impl == "pallas"


def test_pallas_gpu_tile_table_fits_shared_memory():
    for (item, width), (bq, bk) in dispatch.PALLAS_GPU_TILES.items():
        dtype = jnp.bfloat16 if item == 2 else jnp.float32
        assert dispatch.pallas_gpu_tiles(dtype, width) == (bq, bk)
        assert dispatch.pallas_gpu_smem_bytes(bq, bk, width, width, dtype) <= dispatch.GPU_SMEM_BYTES
    # The failure seen on an H200 (float32, 128 x 128, head dim 128) is predicted.
    assert dispatch.pallas_gpu_smem_bytes(128, 128, 128, 128, jnp.float32) > dispatch.GPU_SMEM_BYTES
    # Head dims beyond the table shrink the tile; one too wide for any tile sends auto to xla.
    assert dispatch.pallas_gpu_tiles(jnp.float32, 512) == (16, 16)
    wide = dispatch.choose_impl(M.Causal(), q_len=64, kv_len=64, head_dim=2048, dtype=jnp.float32, backend="gpu")
    assert wide.impl == "xla" and "shared memory" in wide.reason


def test_decode_and_backend_names():
    for backend in ("cpu", "gpu", "cuda", "rocm", "tpu"):
        assert dispatch.choose_decode_impl(backend=backend).impl == "xla"
    with pytest.raises(ValueError, match="backend must be one of"):
        dispatch.choose_impl(M.Causal(), q_len=8, kv_len=8, head_dim=8, backend="metal")


def test_auto_on_this_cpu_and_cudnn_errors():
    q = jnp.zeros((1, 16, 2, 8), jnp.bfloat16)
    assert api._resolve_impl("auto", api.IMPLS, lambda: dispatch.Choice("xla", "")) == "xla"  # pylint: disable=protected-access
    with pytest.raises(ValueError, match="cannot run this call: cuDNN expresses"):
        kernels.attention(q, q, q, mask=M.Strided(4), impl="cudnn")
    with pytest.raises(ValueError, match="needs a CUDA GPU backend"):
        kernels.attention(q, q, q, mask=M.Causal(), impl="cudnn")
    out = helpers.attention_jit(q, q, q, mask=M.Causal(), impl="auto")
    assert out.shape == q.shape and out.dtype == q.dtype
