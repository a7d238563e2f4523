"""The Pallas GPU (Triton) formulation at its default tiles (dispatch.PALLAS_GPU_TILES), float32 and bfloat16,
in interpret mode on the CPU: forward, lse and gradients against the reference."""

import jax.numpy as jnp
import pytest

from effitrans.kernels import dispatch
from effitrans.kernels import masks as M
from tests.kernels.test_pallas_flash import _check_direct


@pytest.mark.slow  # interpret mode at full-size tiles: ~10 s each on a quiet 2-core CPU; CI runs it
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bfloat16", "float32"])
def test_gpu_formulation_at_the_default_tiles(dtype):
    block_q, block_k = dispatch.pallas_gpu_tiles(dtype, 64)
    assert (block_q, block_k) == ((128, 64) if dtype == jnp.bfloat16 else (64, 64))
    # 160 tokens: a partial last tile in both directions; GQA; a window that makes FULL and SKIP tiles.
    _check_direct(
        "gpu",
        mask=M.SlidingWindow(100, 0),
        q_len=160,
        kv_len=160,
        num_heads=2,
        num_kv_heads=1,
        head_dim=64,
        block_q=block_q,
        block_k=block_k,
        dtype=dtype,
        seed=5,
    )
