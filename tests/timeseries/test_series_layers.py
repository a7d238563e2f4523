"""Autoformer's pieces against their definitions: decomposition, FFT auto-correlation, delay aggregation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effitrans.layers.series import (
    autocorrelation,
    circular_conv3,
    moving_average,
    num_delays,
    series_decomposition,
    time_delay_aggregation,
)


def _normal(seed, shape):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def test_decomposition_sums_to_the_input_and_trend_is_the_padded_moving_average():
    x = _normal(0, (2, 30, 3))
    seasonal, trend = series_decomposition(jnp.asarray(x), 7)
    np.testing.assert_allclose(np.asarray(seasonal + trend), x, atol=1e-6)
    padded = np.concatenate([np.repeat(x[:, :1], 3, 1), x, np.repeat(x[:, -1:], 3, 1)], 1)
    expected = np.stack([padded[:, t : t + 7].mean(1) for t in range(30)], 1)
    np.testing.assert_allclose(np.asarray(trend), expected, atol=1e-5)
    line = jnp.broadcast_to(jnp.arange(30.0)[None, :, None], (1, 30, 1))
    np.testing.assert_allclose(np.asarray(series_decomposition(line, 7)[0])[:, 3:-3], 0.0, atol=1e-4)  # linear = trend
    np.testing.assert_array_equal(np.asarray(moving_average(jnp.asarray(x), 1)), x)
    with pytest.raises(ValueError, match=r"kernel=4 must be an odd int >= 1"):
        moving_average(jnp.asarray(x), 4)


def _direct_correlation(q, k):
    """R[b, tau, n, h] = sum_t q[b, t] k[b, (t - tau) mod T]: the O(T^2) definition."""
    t = q.shape[1]
    out = np.zeros(q.shape, np.float64)
    for tau in range(t):
        out[:, tau] = np.sum(q * np.roll(k, tau, axis=1), axis=1)  # roll(k, tau)[t] = k[t - tau]
    return out


@pytest.mark.parametrize("key_len", [20, 13, 27])
def test_fft_autocorrelation_matches_the_direct_sum(key_len):
    q, k = _normal(1, (2, 20, 3, 4)), _normal(2, (2, key_len, 3, 4))
    aligned = k[:, :20] if key_len >= 20 else np.pad(k, ((0, 0), (0, 20 - key_len), (0, 0), (0, 0)))
    np.testing.assert_allclose(np.asarray(autocorrelation(q, k)), _direct_correlation(q, aligned), atol=1e-4)


def test_num_delays_is_factor_log_length_and_refuses_zero():
    assert num_delays(96, 1.0) == 4 and num_delays(96, 3.0) == 13 and num_delays(720, 1.0) == 6
    with pytest.raises(ValueError, match=r"factor=0.1 gives int\(factor \* ln\(96\)\) = 0 delays"):
        num_delays(96, 0.1)


def _loop_delays(corr, k, per_row):
    """Per row, the k delays of largest head-and-channel mean correlation (of the row, or of the batch)."""
    mean_corr = np.asarray(corr).mean(axis=(2, 3))  # [B, T]
    rows = mean_corr if per_row else np.broadcast_to(mean_corr.mean(0), mean_corr.shape)
    return [np.argsort(-row, kind="stable")[:k] for row in rows]


def _loop_aggregation(values, corr, delays):
    """The explicit loop of the reference code: weights softmax(R(tau_i)), the sum of the rolled values."""
    mean_corr = corr.mean(axis=(2, 3))  # [B, T]
    rows = []
    for b, row_delays in enumerate(delays):
        w = jax.nn.softmax(mean_corr[b, row_delays])
        rows.append(sum(w[i] * jnp.roll(values[b], -int(tau), axis=0) for i, tau in enumerate(row_delays)))
    return jnp.stack(rows)


@pytest.mark.parametrize("per_row", [pytest.param(True, marks=pytest.mark.slow), False])  # ~7 s each
def test_delay_aggregation_and_its_gradients_match_an_explicit_loop(per_row):
    values, corr = jnp.asarray(_normal(3, (3, 16, 2, 4))), jnp.asarray(_normal(4, (3, 16, 2, 4)))
    delays = _loop_delays(corr, 3, per_row)
    if per_row:  # the rows pick different delays, so per-row and per-batch aggregation differ here
        assert len({tuple(d) for d in delays}) > 1
    got = time_delay_aggregation(values, corr, 3, per_row=per_row)
    np.testing.assert_allclose(np.asarray(got), np.asarray(_loop_aggregation(values, corr, delays)), atol=1e-5)
    probe = jnp.asarray(_normal(5, values.shape))
    loss = lambda f: lambda v, c: jnp.sum(f(v, c) * probe)
    fast = jax.jit(jax.grad(loss(lambda v, c: time_delay_aggregation(v, c, 3, per_row=per_row)), argnums=(0, 1)))(
        values, corr
    )
    slow = jax.jit(jax.grad(loss(lambda v, c: _loop_aggregation(v, c, delays)), argnums=(0, 1)))(values, corr)
    for a, b in zip(fast, slow):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
    assert float(jnp.abs(fast[1]).sum()) > 0  # the correlations get a gradient through the weights


def test_a_periodic_series_aggregates_onto_its_period():
    """A period-8 signal: its strongest non-zero delays are multiples of 8, so rolling by them returns the
    signal itself (the auto-correlation finds the period)."""
    t = np.arange(32)
    x = jnp.asarray(np.sin(2 * np.pi * t / 8)[None, :, None, None].astype(np.float32))  # [1, 32, 1, 1]
    corr = autocorrelation(x, x)
    top = np.argsort(-np.asarray(corr[0, :, 0, 0]))[:4]
    assert set(top.tolist()) == {0, 8, 16, 24}
    np.testing.assert_allclose(np.asarray(time_delay_aggregation(x, corr, 4, per_row=True)), np.asarray(x), atol=1e-5)


def test_circular_conv3_wraps_around():
    x, w = _normal(6, (2, 5, 3)), _normal(7, (3, 3, 4))
    expected = sum(np.einsum("btc,cd->btd", np.roll(x, 1 - j, axis=1), w[j]) for j in range(3))
    np.testing.assert_allclose(np.asarray(circular_conv3(jnp.asarray(x), jnp.asarray(w))), expected, atol=1e-5)
