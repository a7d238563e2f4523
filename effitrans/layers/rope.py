"""Rotary position embeddings (Su et al., 2021) in both pair layouts.

`layout="half"` rotates dimension i with i + H/2 (GPT-NeoX / HF Llama "rotate_half").
`layout="interleaved"` rotates adjacent pairs (2i, 2i+1) (the original RoFormer / Meta Llama / GGUF layout).
The two are the same rotation applied to a permuted head dim, so converting weights between them is a
permutation of the q/k projection columns.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

ROPE_LAYOUTS = ("half", "interleaved")


def rope_frequencies(head_dim: int, base: float = 10000.0) -> jax.Array:
    """Inverse frequencies [H/2] in float32: base^(-2i/H)."""
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got head_dim={head_dim}")
    return 1.0 / (base ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))


def apply_rope(
    x: jax.Array, positions: jax.Array, *, base: float = 10000.0, layout: str = "half", inv_freq=None
) -> jax.Array:
    """Rotates x [B, T, N, H] by angles positions [B, T] * freqs; returns x.dtype.

    inv_freq [H/2] overrides the base^(-2i/H) frequencies (e.g. YaRN-scaled ones for MLA)."""
    if layout not in ROPE_LAYOUTS:
        raise ValueError(f"rope_layout={layout!r} is not one of {ROPE_LAYOUTS}")
    head_dim = x.shape[-1]
    freqs = rope_frequencies(head_dim, base) if inv_freq is None else inv_freq  # [H/2]
    angles = positions.astype(jnp.float32)[..., None] * freqs  # [B, T, H/2]
    sin = jnp.sin(angles)[:, :, None, :]  # [B, T, 1, H/2]
    cos = jnp.cos(angles)[:, :, None, :]
    x32 = x.astype(jnp.float32)
    if layout == "half":
        x1, x2 = x32[..., : head_dim // 2], x32[..., head_dim // 2 :]  # [B, T, N, H/2] each
        out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    else:
        pairs = x32.reshape(*x.shape[:-1], head_dim // 2, 2)  # [B, T, N, H/2, 2]
        x1, x2 = pairs[..., 0], pairs[..., 1]
        out = jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).reshape(x.shape)
    return out.astype(x.dtype)
