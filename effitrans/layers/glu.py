"""Gated linear unit feed-forward (SwiGLU, Shazeer 2020): down(act(x @ gate) * (x @ up)).

The hidden width F is a constructor argument, not derived from D, so each layer can have its own width
(neuron pruning slices F; MatFormer nests prefixes of F).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from effitrans.layers.params import fan_in_normal, init_param

ACTIVATIONS = {"silu": jax.nn.silu, "gelu": jax.nn.gelu, "relu": jax.nn.relu}


def glu_hidden(x: jax.Array, w_gate: jax.Array, w_up: jax.Array, activation: str = "silu") -> jax.Array:
    """x [B, T, D], w_gate/w_up [D, F] -> neuron activations a [B, T, F] (the input of the down projection)."""
    gate = jnp.einsum("BTD,DF->BTF", x, w_gate)
    up = jnp.einsum("BTD,DF->BTF", x, w_up)
    return ACTIVATIONS[activation](gate) * up


def glu_feed_forward(
    x: jax.Array, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array, activation: str = "silu"
) -> jax.Array:
    """x [B, T, D] -> [B, T, D]; w_down [F, D]."""
    return jnp.einsum("BTF,FD->BTD", glu_hidden(x, w_gate, w_up, activation), w_down)


class GLUFeedForward(nnx.Module):
    """SwiGLU block with weights gate/up [D, F] and down [F, D]."""

    def __init__(self, dim: int, hidden: int, *, activation: str = "silu", rngs: nnx.Rngs, dtype=jnp.float32):
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation={activation!r} is not one of {sorted(ACTIVATIONS)}")
        if hidden < 1:
            raise ValueError(f"feed-forward width must be >= 1, got {hidden}")
        self.activation = activation
        self.dtype = dtype
        self.gate = init_param(rngs, (dim, hidden), ("embed", "mlp"), fan_in_normal())
        self.up = init_param(rngs, (dim, hidden), ("embed", "mlp"), fan_in_normal())
        self.down = init_param(rngs, (hidden, dim), ("mlp", "embed"), fan_in_normal())

    @property
    def width(self) -> int:
        return self.gate.shape[1]

    def __call__(self, x: jax.Array) -> jax.Array:
        c = lambda p: p[...].astype(self.dtype)
        return glu_feed_forward(x.astype(self.dtype), c(self.gate), c(self.up), c(self.down), self.activation)
