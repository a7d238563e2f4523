"""RMSNorm (Zhang & Sennrich, 2019): y = x / sqrt(mean(x^2) + eps) * scale."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from effitrans.layers.params import init_param


def rms_norm(x: jax.Array, scale: jax.Array, eps: float = 1e-6) -> jax.Array:
    """x [..., D], scale [D] -> [..., D] in x.dtype; statistics in float32."""
    x32 = x.astype(jnp.float32)
    inv = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)  # [..., 1]
    return (x32 * inv * scale.astype(jnp.float32)).astype(x.dtype)


class RMSNorm(nnx.Module):
    """Thin module over `rms_norm` with a learned scale initialised to one."""

    def __init__(self, dim: int, *, eps: float = 1e-6, rngs: nnx.Rngs):
        self.eps = eps
        self.scale = init_param(rngs, (dim,), ("embed",), nnx.initializers.ones)

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.scale[...], self.eps)
