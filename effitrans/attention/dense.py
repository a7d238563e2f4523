"""Dense multi-head attention: MHA, GQA and MQA by `num_kv_heads`.

num_kv_heads == num_heads is MHA, 1 is MQA, anything dividing num_heads is GQA. Keys and values keep
their K heads all the way into the kernel (the kernel groups query heads), so GQA saves memory as well
as cache bytes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from effitrans import kernels
from effitrans.attention.cache import KVCache
from effitrans.layers.params import fan_in_normal, init_param
from effitrans.layers.rope import ROPE_LAYOUTS, apply_rope


class DenseAttention(nnx.Module):
    """Softmax attention over all (allowed) keys, through `effitrans.kernels.attention`.

    Weights: q [D, N, H], k and v [D, K, H], o [N, H, D].
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        causal: bool,
        impl: str = "auto",
        rope_base: float | None = 10000.0,
        rope_layout: str = "half",
        block_q: int | None = None,
        block_k: int | None = None,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
    ):
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads}")
        if rope_layout not in ROPE_LAYOUTS:
            raise ValueError(f"rope_layout={rope_layout!r} is not one of {ROPE_LAYOUTS}")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.causal, self.impl = causal, impl
        self.rope_base, self.rope_layout = rope_base, rope_layout
        self.block_q, self.block_k = block_q, block_k
        self.dtype = dtype
        init = fan_in_normal((0,))
        self.q = init_param(rngs, (d_model, num_heads, head_dim), ("embed", "heads", None), init)
        self.k = init_param(rngs, (d_model, num_kv_heads, head_dim), ("embed", "kv_heads", None), init)
        self.v = init_param(rngs, (d_model, num_kv_heads, head_dim), ("embed", "kv_heads", None), init)
        self.o = init_param(rngs, (num_heads, head_dim, d_model), ("heads", None, "embed"), fan_in_normal((0, 1)))

    def _rope(self, x, positions):
        if self.rope_base is None:
            return x
        return apply_rope(x, positions, base=self.rope_base, layout=self.rope_layout)

    def init_cache(self, batch: int, max_len: int, dtype=jnp.float32) -> KVCache:
        return KVCache.zeros(batch, max_len, self.num_kv_heads, self.head_dim, dtype=dtype)

    def __call__(
        self,
        x: jax.Array,
        *,
        positions: jax.Array,
        segment_ids: jax.Array | None = None,
        kv_x: jax.Array | None = None,
        kv_positions: jax.Array | None = None,
        cache: KVCache | None = None,
        decode: bool = False,
    ):
        """x [B, T, D], positions int [B, T] -> (y [B, T, D], cache).

        kv_x [B, S, D] (with kv_positions [B, S]) takes keys/values from another sequence, e.g. a funnel's
        pooled queries over unpooled tokens. With decode=True, x holds the newest T tokens of each row;
        their keys/values are appended to `cache` and they attend to everything cached before them.
        """
        c = lambda p: p[...].astype(self.dtype)
        x = x.astype(self.dtype)
        src = x if kv_x is None else kv_x.astype(self.dtype)
        src_positions = positions if kv_x is None else kv_positions
        if kv_x is not None and kv_positions is None:
            raise ValueError("kv_x was given without kv_positions; pass the positions of the key/value tokens")
        q = self._rope(jnp.einsum("BTD,DNH->BTNH", x, c(self.q)), positions)  # [B, T, N, H]
        k = self._rope(jnp.einsum("BSD,DKH->BSKH", src, c(self.k)), src_positions)  # [B, S, K, H]
        v = jnp.einsum("BSD,DKH->BSKH", src, c(self.v))  # [B, S, K, H]

        if decode:
            if cache is None:
                raise ValueError("decode=True needs a cache; create one with init_cache(batch, max_len)")
            if kv_x is not None:
                raise ValueError("decode=True with kv_x is not supported: a cache holds self-attention keys")
            cache = cache.append(k, v)
            out = kernels.decode_attention(
                q, cache.k, cache.v, lengths=cache.lengths, impl=self.impl if self.impl != "pallas" else "auto"
            )
        else:
            mask = kernels.masks.Causal() if (self.causal and kv_x is None) else kernels.masks.Full()
            out = kernels.attention(
                q, k, v, mask=mask, segment_ids=segment_ids, impl=self.impl, block_q=self.block_q, block_k=self.block_k
            )  # [B, T, N, H]
        y = jnp.einsum("BTNH,NHD->BTD", out, c(self.o))  # [B, T, D]
        return y, cache
