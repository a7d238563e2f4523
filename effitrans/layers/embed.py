"""Token embedding with an `attend` method so the output head can share (tie) its table."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from effitrans.layers.params import init_param


class Embed(nnx.Module):
    """table [V, D]; __call__(ids [B, T]) -> [B, T, D]; attend(x [B, T, D]) -> logits [B, T, V]."""

    def __init__(self, vocab_size: int, dim: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.vocab_size = vocab_size
        self.dtype = dtype
        self.table = init_param(
            rngs, (vocab_size, dim), ("vocab", "embed"), nnx.initializers.normal(stddev=1.0 / dim**0.5)
        )

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.table[...], ids, axis=0).astype(self.dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        return jnp.einsum("BTD,VD->BTV", x, self.table[...].astype(x.dtype))
