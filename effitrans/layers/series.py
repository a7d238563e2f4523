"""Series layers of Autoformer (Wu et al., 2021): moving-average decomposition and auto-correlation.

Pure functions for the math, thin NNX modules around them. Shapes: B batch, T query length, S key length,
N heads, H head width, C channels, D model width, K delays.

- `series_decomposition(x, kernel)`: trend = moving average with the ends repeated, seasonal = x - trend.
- `autocorrelation(q, k)`: R(tau) = sum_t q[t] k[t - tau] for every delay tau at once, by FFT (O(T log T)).
- `time_delay_aggregation(values, corr, num_delays, per_row=)`: the top-K delays of the head-and-channel mean
  correlation, softmax-weighted sum of the values rolled by each delay. per_row=False (the paper's training
  path): one delay set for the whole batch, applied by `jnp.roll`; per_row=True (its inference path): a delay
  set per row, applied by a gather. Delays are picked with `top_k` (no gradient); the weights and the values
  carry the gradient.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from effitrans.layers.params import fan_in_normal, init_param


def moving_average(x: jax.Array, kernel: int) -> jax.Array:
    """Trend of x [B, T, C]: the mean over a centred window of odd `kernel`, the first and last values repeated
    (kernel - 1) / 2 times at the ends. Returns [B, T, C]."""
    if not isinstance(kernel, int) or kernel < 1 or kernel % 2 == 0:
        raise ValueError(f"kernel={kernel!r} must be an odd int >= 1 (a centred window keeps the length)")
    pad = (kernel - 1) // 2
    padded = jnp.concatenate([jnp.repeat(x[:, :1], pad, 1), x, jnp.repeat(x[:, -1:], pad, 1)], 1)  # [B, T+2p, C]
    total = jax.lax.reduce_window(padded, 0.0, jax.lax.add, (1, kernel, 1), (1, 1, 1), "VALID")  # [B, T, C]
    return total / kernel


def series_decomposition(x: jax.Array, kernel: int) -> tuple[jax.Array, jax.Array]:
    """x [B, T, C] -> (seasonal, trend), both [B, T, C], with seasonal + trend == x."""
    trend = moving_average(x, kernel)
    return x - trend, trend


def autocorrelation(q: jax.Array, k: jax.Array) -> jax.Array:
    """q [B, T, N, H], k [B, S, N, H] -> corr [B, T, N, H], corr[:, tau] = sum_t q[:, t] k[:, (t - tau) mod T].

    Keys longer than T are cut to their first T steps, shorter ones padded with zeros (as in the paper)."""
    t, s = q.shape[1], k.shape[1]
    k = k[:, :t] if s >= t else jnp.pad(k, ((0, 0), (0, t - s), (0, 0), (0, 0)))
    q_f = jnp.fft.rfft(q.astype(jnp.float32), axis=1)  # [B, T//2+1, N, H] complex
    k_f = jnp.fft.rfft(k.astype(jnp.float32), axis=1)
    return jnp.fft.irfft(q_f * jnp.conj(k_f), n=t, axis=1)  # [B, T, N, H]


def num_delays(length: int, factor: float) -> int:
    """K = int(factor * ln(length)), the paper's top-k; must be in [1, length]."""
    k = int(factor * math.log(length)) if length >= 1 else 0
    if not 1 <= k <= length:
        raise ValueError(
            f"factor={factor} gives int(factor * ln({length})) = {k} delays for length {length}; allowed: "
            f"1 <= delays <= {length} (raise factor, or lengthen the series)"
        )
    return k


def time_delay_aggregation(values: jax.Array, corr: jax.Array, delays: int, *, per_row: bool) -> jax.Array:
    """values [B, T, N, H], corr [B, T, N, H] -> [B, T, N, H]: sum_i w_i values[(t + tau_i) mod T], tau_i the
    top-`delays` delays of corr averaged over heads and channels, w = softmax of their correlations."""
    mean_corr = jnp.mean(corr, axis=(2, 3))  # [B, T]
    if per_row:
        weights, index = jax.lax.top_k(mean_corr, delays)  # [B, K] each
        w = jax.nn.softmax(weights, axis=-1)  # [B, K]
        t = values.shape[1]
        positions = (jnp.arange(t)[None, None, :] + index[:, :, None]) % t  # [B, K, T]
        rolled = jnp.take_along_axis(values[:, None], positions[..., None, None], axis=2)  # [B, K, T, N, H]
        return jnp.einsum("BK,BKTNH->BTNH", w, rolled.astype(jnp.float32)).astype(values.dtype)
    _, index = jax.lax.top_k(jnp.mean(mean_corr, axis=0), delays)  # [K] shared by the batch
    w = jax.nn.softmax(mean_corr[:, index], axis=-1)  # [B, K]
    out = jnp.zeros(values.shape, jnp.float32)
    for i in range(delays):
        out = out + w[:, i, None, None, None] * jnp.roll(values, -index[i], axis=1)
    return out.astype(values.dtype)


def autocorrelation_attention(q, k, v, *, factor: float, per_row: bool) -> jax.Array:
    """The auto-correlation mechanism: q [B, T, N, H], k [B, S, N, H], v [B, S, N, Hv] -> [B, T, N, Hv] (values
    cut or zero-padded to T like the keys)."""
    t, s = q.shape[1], v.shape[1]
    v = v[:, :t] if s >= t else jnp.pad(v, ((0, 0), (0, t - s), (0, 0), (0, 0)))
    return time_delay_aggregation(v, autocorrelation(q, k), num_delays(t, factor), per_row=per_row)


def circular_conv3(x: jax.Array, w: jax.Array) -> jax.Array:
    """Width-3 convolution with circular padding (Autoformer's token embedding): x [B, T, C], w [3, C, D] ->
    [B, T, D], y[t] = w[0] x[t-1] + w[1] x[t] + w[2] x[t+1] (indices mod T)."""
    padded = jnp.concatenate([x[:, -1:], x, x[:, :1]], axis=1)  # [B, T+2, C]
    t = x.shape[1]
    return sum(jnp.einsum("BTC,CD->BTD", padded[:, j : j + t], w[j]) for j in range(3))


class AutoCorrelation(nnx.Module):
    """Multi-head auto-correlation in place of attention: projections q/k/v [D, N, H] and out [N, H, D] with
    biases around `autocorrelation_attention`."""

    def __init__(self, d_model: int, num_heads: int, head_dim: int, *, factor: float, rngs: nnx.Rngs):
        self.factor = factor
        axes = ("embed", "heads", None)
        for name in ("q", "k", "v"):
            setattr(self, f"w_{name}", init_param(rngs, (d_model, num_heads, head_dim), axes, fan_in_normal()))
            setattr(self, f"b_{name}", nnx.Param(jnp.zeros((num_heads, head_dim))))
        self.w_o = init_param(rngs, (num_heads, head_dim, d_model), ("heads", None, "embed"), fan_in_normal((0, 1)))
        self.b_o = nnx.Param(jnp.zeros((d_model,)))

    def __call__(self, x: jax.Array, kv: jax.Array, *, per_row: bool) -> jax.Array:
        """x [B, T, D], kv [B, S, D] -> [B, T, D]."""
        q = jnp.einsum("BTD,DNH->BTNH", x, self.w_q[...]) + self.b_q[...]
        k = jnp.einsum("BSD,DNH->BSNH", kv, self.w_k[...]) + self.b_k[...]
        v = jnp.einsum("BSD,DNH->BSNH", kv, self.w_v[...]) + self.b_v[...]
        out = autocorrelation_attention(q, k, v, factor=self.factor, per_row=per_row)  # [B, T, N, H]
        return jnp.einsum("BTNH,NHD->BTD", out, self.w_o[...]) + self.b_o[...]
