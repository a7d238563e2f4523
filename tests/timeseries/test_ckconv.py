"""Continuous-kernel convolution: the FFT path against a direct convolution; the kernel net."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from effitrans.layers.ckconv import CKConv, fft_conv, kernel_positions


def _direct(x, kernel, causal):
    """The definition, one output at a time (x zero outside [0, T))."""
    b, t, _ = x.shape
    taps, _, o = kernel.shape
    shift = 0 if causal else (taps - 1) // 2
    y = np.zeros((b, t, o))
    for i in range(t):
        for j in range(taps):
            src = i - j + shift
            if 0 <= src < t:
                y[:, i] += x[:, src] @ kernel[j]
    return y


@pytest.mark.parametrize(("causal", "taps"), [(True, 7), (False, 39)])  # a short kernel; one spanning the input
def test_fft_convolution_matches_the_direct_sum(causal, taps):
    rng = np.random.default_rng(0)
    x, kernel = rng.normal(size=(2, 20, 3)), rng.normal(size=(taps, 3, 4))
    got = fft_conv(jnp.asarray(x, jnp.float32), jnp.asarray(kernel, jnp.float32), causal=causal)
    np.testing.assert_allclose(np.asarray(got), _direct(x, kernel, causal), atol=1e-4)
    with pytest.raises(ValueError, match=r"kernel taps=4 must be odd"):
        fft_conv(jnp.asarray(x), jnp.zeros((4, 3, 4)), causal=False)


@pytest.mark.slow  # the kernel net's initialisation compiles per shape: ~10 s on a loaded 2-core machine
def test_ckconv_is_causal_and_sees_the_whole_input():
    layer = CKConv(2, 3, 16, causal=True, rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(1).normal(size=(1, 24, 2)), jnp.float32)
    y, bumped, kernel = nnx.jit(lambda m, x: (m(x), m(x.at[:, 10].add(1.0)), m.kernel(24)))(layer, x)
    assert y.shape == (1, 24, 3) and kernel.shape == (24, 2, 3)
    np.testing.assert_allclose(np.asarray(bumped[:, :10]), np.asarray(y[:, :10]), atol=1e-5)  # the past is unchanged
    assert float(jnp.abs(bumped[:, -1] - y[:, -1]).max()) > 1e-4  # the last output sees step 10
    assert kernel_positions(24, causal=False).shape == (47,)  # centred: offsets -23..23
    np.testing.assert_allclose(np.asarray(kernel_positions(5, causal=True)), [1.0, 0.5, 0.0, -0.5, -1.0])
    with pytest.raises(ValueError, match=r"hidden=0 must be an int >= 1"):
        CKConv(2, 3, 0, causal=True, rngs=nnx.Rngs(0))
