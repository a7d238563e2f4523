"""Sequence pooling / upsampling against hand-computed cases (effitrans.funnel.pooling)."""

import jax.numpy as jnp
import numpy as np
import pytest

from effitrans.funnel import pooling as P


def test_pooled_masks_and_positions_hand_computed():
    # Row 0: CLS + 6 real tokens + 1 pad; row 1: CLS + 3 real + 4 pad. Stride 2, CLS separate:
    # windows (1,2) (3,4) (5,6) (7) -> min of the mask in each window.
    mask = jnp.array([[1, 1, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0, 0, 0]])
    assert P.pool_mask(mask, 2).tolist() == [[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]]
    pos = jnp.broadcast_to(jnp.arange(8), (2, 8))
    assert P.pool_positions(pos, 2).tolist() == [[0, 1, 3, 5, 7]] * 2
    assert P.pool_positions(pos, 2, mode="mean").tolist() == [[0.0, 1.5, 3.5, 5.5, 7.0]] * 2
    # Stride 3, CLS pooled with the rest: windows (0,1,2) (3,4,5) (6,7).
    assert P.pool_mask(mask, 3, separate_cls=False).tolist() == [[1, 1, 0], [1, 0, 0]]
    assert P.pool_positions(pos, 3, separate_cls=False).tolist() == [[0, 3, 6]] * 2
    # truncate_seq drops the partial window (7) / (6,7).
    assert P.pool_mask(mask, 2, truncate_seq=True).tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert P.pool_positions(pos, 3, separate_cls=False, truncate_seq=True).tolist() == [[0, 3]] * 2
    # Segment ids pool by min as well (a window spanning two segments takes the smaller id).
    seg = jnp.array([[1, 1, 1, 2, 2, 2, 3, 3]])
    assert P.pool_mask(seg, 2).tolist() == [[1, 1, 2, 2, 3]]


def test_hidden_pooling_modes_hand_computed():
    x = jnp.arange(8, dtype=jnp.float32).reshape(1, 8, 1) ** 2  # 0 1 4 9 16 25 36 49
    got = lambda **kw: pytest.approx(P.pool_sequence(x, 3, **kw)[0, :, 0].tolist(), rel=1e-6)
    assert [0.0, (1 + 4 + 9) / 3, (16 + 25 + 36) / 3, 49.0] == got(mode="mean")
    assert [0.0, 9.0, 36.0, 49.0] == got(mode="max")
    assert [0.0, 1.0, 16.0, 49.0] == got(mode="slice")
    assert [0.0, 14 / 3, 77 / 3] == got(mode="mean", truncate_seq=True)
    assert [5 / 3, 50 / 3, 42.5] == got(mode="mean", separate_cls=False)


def test_stride_one_is_identity_and_lengths():
    x = jnp.ones((2, 5, 3))
    assert P.pool_sequence(x, 1) is x
    assert P.pooled_length(64, 2) == 33 and P.pooled_length(64, 2, truncate_seq=True) == 32
    assert P.pooled_length(64, 4, separate_cls=False) == 16
    assert P.pooled_length(1, 8) == 1  # CLS alone survives


@pytest.mark.parametrize(
    "kw,msg",
    [
        (dict(length=8, stride=0), "stride=0"),
        (dict(length=3, stride=4, separate_cls=False, truncate_seq=True), "leaves 0 tokens"),
    ],
)
def test_bad_pooling_rejected(kw, msg):
    with pytest.raises(ValueError, match=msg):
        P.pooled_length(kw.pop("length"), kw.pop("stride"), **kw)


def test_bad_mode_rejected():
    with pytest.raises(ValueError, match="not one of"):
        P.pool_sequence(jnp.ones((1, 4, 2)), 2, mode="median")
    with pytest.raises(ValueError, match="not one of"):
        P.pool_positions(jnp.ones((1, 4), jnp.int32), 2, mode="last")


def test_upsample_hand_computed():
    h = jnp.array([[10.0, 1.0, 2.0, 3.0]])[..., None]  # CLS + 3 pooled tokens
    assert P.upsample(h, 2, 7)[0, :, 0].tolist() == [10, 1, 1, 2, 2, 3, 3]
    assert P.upsample(h, 2, 6)[0, :, 0].tolist() == [10, 1, 1, 2, 2, 3]
    assert P.upsample(h, 2, 9)[0, :, 0].tolist() == [10, 1, 1, 2, 2, 3, 3, 0, 0]  # truncated tokens: zeros
    assert P.upsample(h, 3, 8, separate_cls=False)[0, :, 0].tolist() == [10, 10, 10, 1, 1, 1, 2, 2]
    # upsample(pool(x)) restores the length pooled from, for every stride.
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 11, 4)), jnp.float32)
    for s in (1, 2, 3, 4):
        assert P.upsample(P.pool_sequence(x, s), s, 11).shape == x.shape
