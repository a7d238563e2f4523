import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from effitrans.layers import GLUFeedForward, RMSNorm, apply_rope, rms_norm


def test_rope_layouts_are_the_same_rotation_up_to_a_permutation():
    # interleaved pairs (2i, 2i+1) == half layout pairs (i, i + H/2) after permuting the head dim.
    x = jax.random.normal(jax.random.key(0), (2, 5, 3, 8))
    pos = jnp.broadcast_to(jnp.arange(5), (2, 5)) * 7
    perm = np.concatenate([np.arange(0, 8, 2), np.arange(1, 8, 2)])  # interleaved -> half order
    inter = apply_rope(x, pos, layout="interleaved")
    half = apply_rope(x[..., perm], pos, layout="half")
    np.testing.assert_allclose(np.asarray(inter)[..., perm], np.asarray(half), atol=1e-6)


def test_rope_preserves_norm_and_relative_positions():
    q = jax.random.normal(jax.random.key(1), (1, 1, 1, 16))
    k = jax.random.normal(jax.random.key(2), (1, 1, 1, 16))
    for layout in ("half", "interleaved"):
        dots = []
        for shift in (0, 11):
            qr = apply_rope(q, jnp.array([[3 + shift]]), layout=layout)
            kr = apply_rope(k, jnp.array([[1 + shift]]), layout=layout)
            dots.append(float(jnp.sum(qr * kr)))
            np.testing.assert_allclose(jnp.linalg.norm(qr), jnp.linalg.norm(q), rtol=1e-5)
        assert dots[0] == pytest.approx(dots[1], rel=1e-4)


def test_rope_rejects_unknown_layout():
    with pytest.raises(ValueError, match="rope_layout='neox'"):
        apply_rope(jnp.ones((1, 1, 1, 4)), jnp.zeros((1, 1)), layout="neox")


def test_rms_norm_matches_formula():
    x = jax.random.normal(jax.random.key(3), (2, 3, 6))
    scale = jnp.arange(6.0)
    want = x / np.sqrt(np.mean(np.square(x), -1, keepdims=True) + 1e-6) * scale
    np.testing.assert_allclose(rms_norm(x, scale), want, rtol=1e-5)
    assert RMSNorm(6, rngs=nnx.Rngs(0))(x).shape == x.shape


def test_glu_width_is_independent_of_model_dim():
    ffn = GLUFeedForward(8, 13, rngs=nnx.Rngs(0))
    assert ffn.width == 13
    x = jax.random.normal(jax.random.key(4), (2, 3, 8))
    want = (jax.nn.silu(x @ ffn.gate[...]) * (x @ ffn.up[...])) @ ffn.down[...]
    np.testing.assert_allclose(ffn(x), want, rtol=1e-5, atol=1e-6)
