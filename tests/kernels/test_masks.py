"""Mask algebra: dense masks match the written formulas; block maps match a brute-force scan."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from effitrans.kernels import masks as M

BASE_MASKS = [
    M.Full(),
    M.Causal(),
    M.Causal(offset=3),
    M.Causal(offset=-5),
    M.SlidingWindow(4, 0),
    M.SlidingWindow(3, 2),
    M.SlidingWindow(0, 0, offset=2),
    M.Strided(1),
    M.Strided(3),
    M.Strided(8),
    M.GlobalTokens(0),
    M.GlobalTokens(5),
    M.Chunked(1),
    M.Chunked(7),
]
_SUMMARY = [M.SummaryColumns(8, 2), M.SummaryColumns(5, 5)]
COMPOSED_MASKS = [
    M.Fixed(8, 2),
    M.Fixed(5, 0),
    M.Fixed(4, 4),
    M.GlobalTokens(3) | M.SlidingWindow(6, 0),
    M.Causal() & M.Chunked(16),
    (M.Strided(4) | M.GlobalTokens(2)) & M.Causal(offset=1),
    M.SlidingWindow(2, 2) | M.Chunked(9),
]


def _brute_force(dense, q_len, kv_len, bq, bk):
    """(any, all_and_unpadded) per block, scanning the dense mask."""
    nq, nk = -(-q_len // bq), -(-kv_len // bk)
    any_ = np.zeros((nq, nk), bool)
    full = np.zeros((nq, nk), bool)
    for i, j in itertools.product(range(nq), range(nk)):
        blk = dense[i * bq : (i + 1) * bq, j * bk : (j + 1) * bk]
        any_[i, j] = blk.any()
        full[i, j] = blk.all() and (i + 1) * bq <= q_len and (j + 1) * bk <= kv_len
    return any_, full


def _check_block_map(mask, q_len, kv_len, bq, bk, exact):
    bm = mask.block_map(q_len, kv_len, bq, bk)
    assert bm.dtype == np.int8 and bm.shape == (-(-q_len // bq), -(-kv_len // bk))
    any_, full = _brute_force(mask.dense(q_len, kv_len), q_len, kv_len, bq, bk)
    # Soundness: never skip a block with an allowed pair, never call a block full wrongly.
    assert not np.any((bm == M.SKIP) & any_), f"{mask}: skipped a block with allowed pairs"
    assert not np.any((bm == M.FULL) & ~full), f"{mask}: FULL block that is not full"
    if exact:
        assert np.array_equal(bm == M.SKIP, ~any_), f"{mask}: SKIP not exact"
        assert np.array_equal(bm == M.FULL, full), f"{mask}: FULL not exact"


@settings(deadline=None, max_examples=25)
@given(
    q_len=st.integers(1, 70),
    kv_len=st.integers(1, 70),
    bq=st.sampled_from([1, 3, 8, 16]),
    bk=st.sampled_from([1, 5, 8, 32]),
)
def test_base_block_maps_exact(q_len, kv_len, bq, bk):
    for mask in BASE_MASKS + _SUMMARY:
        _check_block_map(mask, q_len, kv_len, bq, bk, exact=True)


@settings(deadline=None, max_examples=25)
@given(
    q_len=st.integers(1, 70),
    kv_len=st.integers(1, 70),
    bq=st.sampled_from([1, 4, 8, 16]),
    bk=st.sampled_from([1, 8, 24]),
)
def test_composed_block_maps_sound(q_len, kv_len, bq, bk):
    for mask in COMPOSED_MASKS:
        _check_block_map(mask, q_len, kv_len, bq, bk, exact=False)


def test_composed_block_maps_exact_where_the_rules_are_exact():
    # Causal & Chunked: the lower triangle of each diagonal chunk; And of FULL x FULL is exact and
    # these blocks never mix partial halves, so the map is exact here.
    _check_block_map(M.Causal() & M.Chunked(16), 64, 64, 8, 8, exact=True)
    # Or of a window and global tokens at block granularity 8 with window 15: exact as well.
    _check_block_map(M.GlobalTokens(8) | M.SlidingWindow(15, 0), 64, 64, 8, 8, exact=True)


def test_block_map_padding_never_full():
    bm = M.Full().block_map(10, 13, 8, 8)
    assert bm.tolist() == [[2, 1], [1, 1]]


def test_block_map_is_linear_in_blocks_not_positions():
    # 2^20 x 2^20 positions would be 1 TiB as a dense bool mask; the block map is 64 x 64.
    bm = M.Causal().block_map(1 << 20, 1 << 20, 1 << 14, 1 << 14)
    assert bm.shape == (64, 64)
    assert np.array_equal(bm, np.tril(np.ones((64, 64)), -1) * 2 + np.eye(64))


def test_formulas():
    n = 40
    i, j = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    np.testing.assert_array_equal(M.Causal().dense(n, n), j <= i)
    np.testing.assert_array_equal(M.Causal(offset=2).dense(n, n), j <= i + 2)
    np.testing.assert_array_equal(M.SlidingWindow(3, 1).dense(n, n), (i - 3 <= j) & (j <= i + 1))
    d = i - j
    np.testing.assert_array_equal(M.Strided(4).dense(n, n), (d >= 0) & ((d < 4) | (d % 4 == 0)))
    np.testing.assert_array_equal(M.Fixed(8, 3).dense(n, n), (j <= i) & ((j // 8 == i // 8) | (j % 8 >= 5)))
    np.testing.assert_array_equal(M.GlobalTokens(2).dense(n, n), (i < 2) | (j < 2))
    np.testing.assert_array_equal(M.Chunked(6).dense(n, n), i // 6 == j // 6)
    np.testing.assert_array_equal(M.Full().dense(3, 5), np.ones((3, 5), bool))


def test_compose_is_elementwise_logic():
    a, b = M.SlidingWindow(2, 0), M.GlobalTokens(3)
    np.testing.assert_array_equal((a | b).dense(20, 25), a.dense(20, 25) | b.dense(20, 25))
    np.testing.assert_array_equal((a & b).dense(20, 25), a.dense(20, 25) & b.dense(20, 25))
    assert isinstance(a | b, M.Or) and isinstance(a & b, M.And)


def test_bottom_right_offset():
    mask = M.Causal(offset=M.bottom_right_offset(3, 8))
    dense = mask.dense(3, 8)
    assert dense[-1].all() and dense[0].sum() == 6


@pytest.mark.parametrize("mask", BASE_MASKS + COMPOSED_MASKS, ids=str)
def test_mask_fn_traces_under_jit(mask):
    @jax.jit
    def f(qi, kj):
        return mask.mask_fn(qi[:, None], kj[None, :])

    got = np.asarray(jnp.broadcast_to(f(jnp.arange(12), jnp.arange(15)), (12, 15)))
    np.testing.assert_array_equal(got, mask.dense(12, 15))


def test_masks_are_hashable_frozen_static_args():
    a, b = M.Causal(offset=1), M.Causal(offset=1)
    assert a == b and hash(a) == hash(b) and a != M.Causal()
    assert len({M.Full(), M.Full(), a | M.Full()}) == 2
    with pytest.raises(AttributeError):  # dataclasses.FrozenInstanceError
        a.offset = 3  # frozen

    f = jax.jit(lambda x, mask: x + mask.dense(2, 2).sum(), static_argnums=1)
    assert float(f(jnp.zeros(()), M.Causal())) == 3.0


@pytest.mark.parametrize(
    "ctor, match",
    [
        (lambda: M.SlidingWindow(-1, 0), "left"),
        (lambda: M.SlidingWindow(2, -3), "right"),
        (lambda: M.SlidingWindow(2.5, 0), "left"),
        (lambda: M.Strided(0), "stride"),
        (lambda: M.Fixed(0, 0), "block"),
        (lambda: M.Fixed(4, 5), "summary"),
        (lambda: M.GlobalTokens(-2), "n"),
        (lambda: M.Chunked(0), "size"),
        (lambda: M.Causal(offset=1.5), "offset"),
        (lambda: M.Full().block_map(8, 8, 0, 8), "block_q"),
        (lambda: M.Full().block_map(0, 8, 8, 8), "q_len"),
    ],
)
def test_invalid_mask_arguments(ctor, match):
    with pytest.raises(ValueError, match=match):
        ctor()


def test_block_lists():
    bmap = np.array([[2, 0, 1, 0], [0, 0, 0, 0], [1, 1, 2, 2]], np.int8)
    lists = M.block_lists(bmap)
    assert lists.width == 4
    np.testing.assert_array_equal(lists.count, [2, 0, 4])
    np.testing.assert_array_equal(lists.idx, [[0, 2, 2, 2], [0, 0, 0, 0], [0, 1, 2, 3]])
    np.testing.assert_array_equal(lists.kind, [[2, 1, 0, 0], [0, 0, 0, 0], [1, 1, 2, 2]])
    empty = M.block_lists(np.zeros((2, 3), np.int8))
    assert empty.width == 1 and not empty.count.any() and not empty.kind.any()


def test_block_lists_cover_block_map():
    # Every non-skipped block of a real mask's map appears exactly once, with its kind.
    bmap = M.Fixed(16, 4).block_map(96, 80, 16, 32)
    rows = M.block_lists(bmap)
    rebuilt = np.zeros_like(bmap)
    for r in range(bmap.shape[0]):
        for j in range(rows.count[r]):
            rebuilt[r, rows.idx[r, j]] = rows.kind[r, j]
    np.testing.assert_array_equal(rebuilt, bmap)


def test_block_lists_of_one_kind_pad_with_the_last_index():
    bmap = np.array([[2, 0, 1, 1], [2, 2, 0, 0]], np.int8)
    partial = M.block_lists(bmap, (M.PARTIAL,))
    np.testing.assert_array_equal(partial.count, [2, 0])
    np.testing.assert_array_equal(partial.idx, [[2, 3], [0, 0]])
    np.testing.assert_array_equal(partial.kind, [[1, 1], [0, 0]])
    full = M.block_lists(bmap, (M.FULL,))
    np.testing.assert_array_equal(full.count, [1, 2])
    np.testing.assert_array_equal(full.idx, [[0, 0], [0, 1]])
    np.testing.assert_array_equal(full.kind, [[2, 0], [2, 2]])


@pytest.mark.parametrize(
    "block_map, kinds, match",
    [
        (np.zeros((4,), np.int8), (M.PARTIAL,), "2-D"),
        (np.zeros((0, 3), np.int8), (M.PARTIAL,), "non-empty"),
        (np.zeros((2, 3), np.int8), (M.SKIP,), "kinds"),
    ],
)
def test_block_lists_rejects_bad_arguments(block_map, kinds, match):
    with pytest.raises(ValueError, match=match):
        M.block_lists(block_map, kinds)


def test_mask_info_tables_agree_with_the_block_map():
    mask = M.GlobalTokens(8) | M.SlidingWindow(20, 0)
    info = M.mask_info(mask, 96, 80, 16, 32)
    bmap = mask.block_map(96, 80, 16, 32)
    np.testing.assert_array_equal(info.block_map, bmap)
    assert info.visited == np.count_nonzero(bmap)
    # Rows visit each q block's non-skipped kv blocks; cols are the same pairs seen per kv block.
    pairs_rows = {(r, int(info.rows.idx[r, j])) for r in range(bmap.shape[0]) for j in range(info.rows.count[r])}
    pairs_cols = {(int(info.cols.idx[c, j]), c) for c in range(bmap.shape[1]) for j in range(info.cols.count[c])}
    assert pairs_rows == pairs_cols == set(zip(*np.nonzero(bmap)))
    # The partial and full lists split the rows by kind.
    np.testing.assert_array_equal(info.partial_rows.count + info.full_rows.count, info.rows.count)
    np.testing.assert_array_equal(info.partial_rows.count, (bmap == M.PARTIAL).sum(1))
    assert M.mask_info(mask, 96, 80, 16, 32) is info  # cached: forward and backward share the tables


def test_mask_info_with_segments_demotes_full_blocks():
    info = M.mask_info(M.Causal(), 64, 64, 16, 16, has_segments=True)
    causal = M.Causal().block_map(64, 64, 16, 16)
    np.testing.assert_array_equal(info.block_map, np.minimum(causal, M.PARTIAL))
    assert info.full_rows.count.sum() == 0 and info.visited == np.count_nonzero(causal)
    with pytest.raises(TypeError, match="mask"):
        M.mask_info("causal", 64, 64, 16, 16)
