"""The blockwise xla implementation against the dense reference: forward, lse and all gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from effitrans.kernels import masks as M
from effitrans.kernels import xla_flash
from tests.kernels import helpers

MASKS = [
    M.Full(),
    M.Causal(),
    M.Causal(offset=-9),
    M.SlidingWindow(10, 3),
    M.Strided(5),
    M.Fixed(8, 2),
    M.GlobalTokens(4) | M.SlidingWindow(6, 0),
    M.Chunked(12),
    M.Causal() & (M.Chunked(16) | M.GlobalTokens(3)),
]


@pytest.mark.parametrize("mask", MASKS, ids=str)
def test_every_mask_kind(mask):
    # Non-multiple lengths (45 vs blocks 16 / 8), GQA, head dim 40, v head dim != head dim.
    helpers.check_impl_against_reference(
        "xla",
        batch=2,
        q_len=45,
        kv_len=45,
        num_heads=4,
        num_kv_heads=2,
        head_dim=40,
        v_head_dim=24,
        mask=mask,
        block_q=16,
        block_k=8,
    )


_SHAPES = dict(
    batch=st.integers(1, 2),
    q_len=st.integers(1, 60),
    kv_len=st.integers(1, 60),
    heads=st.sampled_from([(2, 2), (4, 2), (3, 1)]),
    head_dim=st.sampled_from([8, 40]),
    mask=st.sampled_from(MASKS),
    block_q=st.sampled_from([8, 16, 32]),
    block_k=st.sampled_from([8, 24]),
)


def _random_shapes(batch, q_len, kv_len, heads, head_dim, mask, block_q, block_k):
    helpers.check_impl_against_reference(
        "xla",
        batch=batch,
        q_len=q_len,
        kv_len=kv_len,
        num_heads=heads[0],
        num_kv_heads=heads[1],
        head_dim=head_dim,
        mask=mask,
        block_q=block_q,
        block_k=block_k,
    )


# The default run keeps two random shapes (the run's time budget); the slow variant below tries 40.
test_random_shapes = settings(deadline=None, max_examples=2)(given(**_SHAPES)(_random_shapes))
test_random_shapes_many = pytest.mark.slow(settings(deadline=None, max_examples=40)(given(**_SHAPES)(_random_shapes)))


@pytest.mark.parametrize(
    "num_heads, num_kv_heads, head_dim", [(4, 4, 64), (4, 2, 128), (6, 1, 64)], ids=["mha-64", "gqa-128", "mqa-64"]
)
def test_head_layouts(num_heads, num_kv_heads, head_dim):
    helpers.check_impl_against_reference(
        "xla",
        q_len=64,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        mask=M.Causal(),
        block_q=32,
        block_k=16,
    )


def test_q_len_differs_from_kv_len_bottom_right_causal():
    mask = M.Causal(offset=M.bottom_right_offset(20, 53))
    helpers.check_impl_against_reference("xla", q_len=20, kv_len=53, num_heads=2, mask=mask, block_q=8, block_k=16)


def test_fully_masked_rows():
    # Rows 0..20 see nothing (offset -21): out 0, lse -inf, finite zero gradients.
    out, lse, grads = helpers.check_impl_against_reference(
        "xla", q_len=40, num_heads=2, mask=M.Causal(offset=-21), block_q=8, block_k=8
    )
    assert np.all(np.asarray(out)[:, :21] == 0)
    assert np.all(np.isneginf(np.asarray(lse)[:, :, :21]))
    assert np.all(np.asarray(grads[0])[:, :21] == 0)


def test_large_logits():
    helpers.check_impl_against_reference(
        "xla",
        q_len=48,
        num_heads=2,
        head_dim=16,
        q_scale=30.0,
        mask=M.SlidingWindow(20, 0),
        block_q=16,
        block_k=16,
        grad_tol=1e-4 * 30,
    )


@pytest.mark.parametrize("mask", [M.Causal(), M.GlobalTokens(3) | M.SlidingWindow(9, 0)], ids=str)
def test_bfloat16(mask):
    helpers.check_impl_against_reference(
        "xla", q_len=50, num_heads=4, num_kv_heads=2, head_dim=64, dtype=jnp.bfloat16, mask=mask, block_q=16, block_k=16
    )


def test_segment_ids_self_attention():
    helpers.check_impl_against_reference(
        "xla", batch=2, q_len=44, num_heads=2, mask=M.Causal(), segment_ids="random", block_q=16, block_k=8
    )


def test_segment_ids_cross_attention_tuple():
    q_seg = helpers.random_segment_ids(5, 2, 24)
    kv_seg = helpers.random_segment_ids(6, 2, 37)
    helpers.check_impl_against_reference(
        "xla", batch=2, q_len=24, kv_len=37, num_heads=2, segment_ids=(q_seg, kv_seg), block_q=8, block_k=16
    )


def test_default_blocks_and_custom_scale():
    helpers.check_impl_against_reference("xla", q_len=70, num_heads=2, mask=M.Causal(), scale=0.3)


def test_repeat_runs_bitwise_equal():
    q, k, v = helpers.random_qkv(0, batch=1, q_len=64, kv_len=64, num_heads=2, num_kv_heads=1, head_dim=16)
    f = jax.jit(
        jax.value_and_grad(
            lambda q, k, v: helpers.attention_jit(q, k, v, mask=M.Causal(), impl="xla", block_q=16, block_k=16).sum(),
            argnums=(0, 1, 2),
        )
    )
    a = jax.tree.leaves(f(q, k, v))
    b = jax.tree.leaves(f(q, k, v))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


def test_skipped_blocks_are_not_visited():
    n = 16  # blocks per side
    causal = xla_flash.visited_block_count(M.Causal(), 512 * n, 512 * n, 512, 512)
    assert causal == n * (n + 1) // 2
    window = xla_flash.visited_block_count(M.SlidingWindow(255, 0), 512 * n, 512 * n, 512, 512)
    assert window == 2 * n - 1
    # Segment ids keep the mask's skips (blocks only turn partial).
    assert xla_flash.visited_block_count(M.Causal(), 512 * n, 512 * n, 512, 512, True) == causal


def test_default_blocks_grow_only_where_the_mask_is_dense_enough():
    from effitrans.kernels import api

    # Full / causal at 4K: the 512 tiling visits <= 1.15x the 256 tiling's area -> 512 (fewer loop steps).
    assert api._default_xla_blocks(M.Full(), 4096, 4096, None, None) == (512, 512)
    assert api._default_xla_blocks(M.Causal(), 4096, 4096, None, None) == (512, 512)
    # Causal at 1K wastes 20% at 512 and a 256-wide band wastes ~2x: stay at 256.
    assert api._default_xla_blocks(M.Causal(), 1024, 1024, None, None) == (256, 256)
    window = M.SlidingWindow(left=255, right=0)
    assert api._default_xla_blocks(window, 4096, 4096, None, None) == (256, 256)
    # Short sequences are never padded up to a block; explicit sizes always win.
    assert api._default_xla_blocks(M.Full(), 100, 36, None, None) == (104, 40)
    assert api._default_xla_blocks(M.Full(), 4096, 4096, 128, None) == (128, 512)
