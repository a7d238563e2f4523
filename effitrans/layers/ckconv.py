"""Continuous-kernel convolution (CKConv, Romero et al., 2022): the kernel is a small SIREN MLP evaluated at
relative positions, so it has as many taps as the input is long, and the convolution runs by FFT.

Shapes: B batch, T length, K kernel taps, I input channels, O output channels, E hidden width of the kernel net.

- `fft_conv(x [B, T, I], kernel [K, I, O], *, causal)`: causal y[t] = sum_j kernel[j] x[t - j]; non-causal
  (odd K, centred) y[t] = sum_j kernel[j] x[t - j + (K - 1) / 2]; x is zero outside [0, T). O((T + K) log).
- `kernel_positions(length, causal, spacing, span)`: the relative positions where the kernel is sampled: T lags
  (causal) or 2T - 1 offsets (non-causal), so every output sees the whole input. By default they fill [-1, 1]
  (the kernel stretches with the input); with `span` they are offsets in time units (`spacing` per sample)
  divided by `span`, so the same kernel reads a series sampled at any rate (resolution independence).
- `siren_kernel(params, positions, omega_0)`: the kernel net, positions [K] -> kernel [K, I, O].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def fft_conv(x: jax.Array, kernel: jax.Array, *, causal: bool) -> jax.Array:
    """x [B, T, I], kernel [K, I, O] -> [B, T, O] (see the module docstring), computed by rFFT of length
    T + K - 1 (no circular wrap-around)."""
    t, taps = x.shape[1], kernel.shape[0]
    if not causal and taps % 2 == 0:
        raise ValueError(f"kernel taps={taps} must be odd for a centred (non-causal) convolution")
    n = t + taps - 1
    x_f = jnp.fft.rfft(x.astype(jnp.float32), n=n, axis=1)  # [B, n//2+1, I]
    k_f = jnp.fft.rfft(kernel.astype(jnp.float32), n=n, axis=0)  # [n//2+1, I, O]
    full = jnp.fft.irfft(jnp.einsum("BFI,FIO->BFO", x_f, k_f), n=n, axis=1)  # [B, n, O] linear convolution
    start = 0 if causal else (taps - 1) // 2
    return full[:, start : start + t]


def kernel_positions(length: int, *, causal: bool, spacing: float = 1.0, span: float | None = None) -> jax.Array:
    """Relative positions, with u = spacing / span (span None: (T - 1) spacing, so they fill [-1, 1]): causal,
    lag j = 0..T-1 at 1 - 2 j u; non-causal, tap j = 0..2T-2 (offset j - (T - 1)) at (j - (T - 1)) u.
    Returns float32 [K]."""
    if length < 2:
        raise ValueError(f"length={length} must be >= 2 (the kernel spans the input)")
    for name, value in (("spacing", spacing), ("span", span)):
        if value is not None and not value > 0:
            raise ValueError(f"{name}={value!r} must be > 0 (time units)")
    u = spacing / (span if span is not None else (length - 1) * spacing)
    if causal:
        return (1.0 - 2.0 * u * jnp.arange(length, dtype=jnp.float32)).astype(jnp.float32)  # [T]
    return (u * jnp.arange(-(length - 1), length, dtype=jnp.float32)).astype(jnp.float32)  # [2T-1]


def siren_kernel(params: dict, positions: jax.Array, omega_0: float) -> jax.Array:
    """The kernel net: positions [K] -> sin(omega_0 (p w1 + b1)) -> sin(omega_0 (h w2 + b2)) -> h w3 + b3,
    reshaped to [K, I, O]. params: w1 [1, E], b1 [E], w2 [E, E], b2 [E], w3 [E, I, O], b3 [I, O]."""
    h = jnp.sin(omega_0 * (positions[:, None] * params["w1"] + params["b1"]))  # [K, E]
    h = jnp.sin(omega_0 * (h @ params["w2"] + params["b2"]))  # [K, E]
    return jnp.einsum("KE,EIO->KIO", h, params["w3"]) + params["b3"]  # [K, I, O]


class CKConv(nnx.Module):
    """A continuous-kernel convolution layer: x [B, T, I] -> [B, T, O], kernel net of hidden width E with
    SIREN initialisation (first layer U(-1/fan_in, 1/fan_in), then U(-sqrt(6/fan_in)/omega_0, ...)).

    span None: the kernel stretches over the input, whatever its length. span (time units): positions are
    time offsets / span and the sum is weighted by the sample spacing (a Riemann sum of the continuous
    convolution), so the layer gives about the same output for a signal sampled at any spacing."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        hidden: int = 32,
        *,
        causal: bool,
        omega_0: float = 30.0,
        span: float | None = None,
        rngs,
    ):
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels), ("hidden", hidden)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be an int >= 1")
        if span is not None and not span > 0:
            raise ValueError(f"span={span!r} must be > 0 (time units) or None")
        self.causal, self.omega_0, self.span = causal, omega_0, span
        bound = (6.0 / hidden) ** 0.5 / omega_0
        uniform = lambda shape, b: nnx.Param(jax.random.uniform(rngs.params(), shape, jnp.float32, -b, b))
        self.w1, self.b1 = uniform((1, hidden), 1.0), uniform((hidden,), 1.0)
        self.w2, self.b2 = uniform((hidden, hidden), bound), uniform((hidden,), bound)
        self.w3 = uniform((hidden, in_channels, out_channels), bound)
        self.b3 = nnx.Param(jnp.zeros((in_channels, out_channels)))

    def kernel(self, length: int, spacing: float = 1.0) -> jax.Array:
        """The kernel for inputs of `length` samples `spacing` apart: [T, I, O] (causal) or [2T-1, I, O]."""
        if self.span is None and spacing != 1.0:
            raise ValueError(f"spacing={spacing!r} needs a CKConv built with span (time units); this one has None")
        params = {k: getattr(self, k)[...] for k in ("w1", "b1", "w2", "b2", "w3", "b3")}
        positions = kernel_positions(length, causal=self.causal, spacing=spacing, span=self.span)
        return siren_kernel(params, positions, self.omega_0)

    def __call__(self, x: jax.Array, spacing: float = 1.0) -> jax.Array:
        """x [B, T, I] sampled `spacing` time units apart -> [B, T, O]."""
        y = fft_conv(x, self.kernel(x.shape[1], spacing), causal=self.causal)
        return y if self.span is None else spacing * y
