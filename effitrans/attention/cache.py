"""KV caches shared by the attention families.

A cache is a pytree (flax.struct dataclass), so it flows through jit and its byte size is simply the sum of
its leaves' sizes, which is what the KV-cache benchmark reports.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class KVCache:
    """Keys and values of every token seen so far.

    k: [B, L, K, H] and v: [B, L, K, Hv], L = the allocated max length; slots >= lengths[b] are unwritten.
    lengths: int32 [B], how many tokens of row b are in the cache.
    """

    k: jax.Array
    v: jax.Array
    lengths: jax.Array

    @classmethod
    def zeros(
        cls,
        batch: int,
        max_len: int,
        num_kv_heads: int,
        head_dim: int,
        v_head_dim: int | None = None,
        dtype=jnp.float32,
    ) -> KVCache:
        v_head_dim = head_dim if v_head_dim is None else v_head_dim
        return cls(
            k=jnp.zeros((batch, max_len, num_kv_heads, head_dim), dtype),
            v=jnp.zeros((batch, max_len, num_kv_heads, v_head_dim), dtype),
            lengths=jnp.zeros((batch,), jnp.int32),
        )

    @property
    def max_len(self) -> int:
        return self.k.shape[1]

    def append(self, k_new: jax.Array, v_new: jax.Array) -> KVCache:
        """Writes k_new [B, T, K, H], v_new at each row's current length; returns the updated cache."""
        k = write_at_lengths(self.k, k_new, self.lengths)
        v = write_at_lengths(self.v, v_new, self.lengths)
        return KVCache(k=k, v=v, lengths=self.lengths + k_new.shape[1])


def write_at_lengths(buf: jax.Array, new: jax.Array, lengths: jax.Array) -> jax.Array:
    """The one cache writer: new [B, T, ...] written into buf [B, L, ...] at slots lengths[b] .. + T - 1 of
    each row b (in buf's dtype). Callers keep lengths + T <= L."""

    def write(row, new_row, start):  # row [L, ...], new_row [T, ...]
        return jax.lax.dynamic_update_slice(row, new_row.astype(row.dtype), (start,) + (0,) * (row.ndim - 1))

    return jax.vmap(write)(buf, new, lengths)


def cache_bytes(cache) -> int:
    """Total bytes of every array in a cache pytree (what the KV-cache benchmark reports)."""
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache)))
