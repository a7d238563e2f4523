"""Strided and Fixed patterns reordered into block-sparse parts (kernels/reorder.py).

Forward and gradients against the dense reference on every blockwise impl are checked by the mask
suites (tests/kernels/test_xla_flash.py and test_pallas_flash.py run Strided and Fixed masks, which
kernels.attention reorders); here: which masks reorder, how much work it saves, the exact merge and
segment ids.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effitrans.kernels import masks as M
from effitrans.kernels import reference, reorder
from tests.kernels import helpers


def test_reorderable():
    assert reorder.reorderable(M.Strided(128), 16384, 16384)
    assert reorder.reorderable(M.Fixed(128, 8), 16384, 16384)
    assert not reorder.reorderable(M.Strided(128), 64, 16384)  # cross lengths: kept as one problem
    assert not reorder.reorderable(M.Strided(1), 64, 64)  # stride 1 is causal
    assert not reorder.reorderable(M.Fixed(16, 16), 64, 64)  # every key a summary: causal
    assert not reorder.reorderable(M.Causal(), 64, 64)


def test_preceding_blocks_mask_and_block_map():
    mask = M.PrecedingBlocks(q_block=4, kv_block=2)
    dense = mask.dense(12, 6)
    want = (np.arange(6)[None, :] // 2) < (np.arange(12)[:, None] // 4)
    np.testing.assert_array_equal(dense, want)
    bm = mask.block_map(12, 6, 3, 2)
    for qi in range(4):
        for kj in range(3):
            tile = dense[qi * 3 : qi * 3 + 3, kj * 2 : kj * 2 + 2]
            assert bm[qi, kj] == (M.FULL if tile.all() else M.PARTIAL if tile.any() else M.SKIP)
    with pytest.raises(ValueError, match="kv_block must be an int >= 1"):
        M.PrecedingBlocks(4, 0)


@pytest.mark.parametrize("mask", [M.Strided(128), M.Fixed(128, 8)], ids=str)
def test_reordering_visits_an_eighth_of_causal_at_16k(mask):
    s, blk = 16384, 256
    causal = M.mask_info(M.Causal(), s, s, blk, blk).visited * blk * blk
    direct = M.mask_info(mask, s, s, blk, blk).visited * blk * blk
    if isinstance(mask, M.Strided):
        parts = [(M.SlidingWindow(127), s, s), (M.Causal(offset=-1), s // 128, s // 128)]
        copies = [1, 128]  # the transposed problem runs once per residue
    else:
        parts = [(M.Causal() & M.Chunked(128), s, s), (M.PrecedingBlocks(128, 8), s, s // 128 * 8)]
        copies = [1, 1]
    reordered = 0
    for (m, t, kv), n in zip(parts, copies):
        bq, bk = min(blk, t), min(blk, kv)
        reordered += n * M.mask_info(m, t, kv, bq, bk).visited * bq * bk
    assert direct >= 0.99 * causal  # without reordering the pattern is as dense as causal
    assert reordered * 8 <= causal, (reordered, causal)


def test_merge_of_disjoint_parts_is_the_union():
    q, k, v = helpers.random_qkv(0, batch=1, q_len=12, kv_len=12, num_heads=2, num_kv_heads=2, head_dim=8)
    a, b = M.SlidingWindow(2), M.Causal(offset=-3)

    @jax.jit
    def parts_and_union(q, k, v):
        def ref(mask):
            return reference.reference_attention(q, k, v, mask=mask, segment_ids=None, scale=0.5, return_lse=True)

        return reorder.merge(*ref(a), *ref(b)), ref(a | b)

    (out, lse), (want, want_lse) = parts_and_union(q, k, v)
    np.testing.assert_allclose(out, want, atol=1e-6)
    np.testing.assert_allclose(lse, want_lse, atol=1e-6)
    empty = jnp.full_like(lse, -jnp.inf)
    out0, lse0 = jax.jit(reorder.merge)(jnp.zeros_like(out), empty, jnp.zeros_like(out), empty)
    assert bool(jnp.all(out0 == 0)) and bool(jnp.all(lse0 == -jnp.inf))


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["xla", "pallas"])
@pytest.mark.parametrize("mask", [M.Strided(5), M.Fixed(10, 3)], ids=str)
def test_reordered_with_segment_ids(impl, mask):
    # 40 is a multiple of neither the stride nor the block: padded residues and summary keys.
    helpers.check_impl_against_reference(
        impl,
        q_len=40,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        mask=mask,
        segment_ids="random",
        block_q=16,
        block_k=16,
    )


@pytest.mark.slow
def test_reordered_strided_bfloat16_xla():
    helpers.check_impl_against_reference(
        "xla", q_len=48, num_heads=2, head_dim=16, mask=M.Strided(8), dtype=jnp.bfloat16, block_q=16, block_k=16
    )
