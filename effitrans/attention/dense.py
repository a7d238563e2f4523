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
from effitrans.attention.base import AttentionBase
from effitrans.attention.cache import KVCache
from effitrans.layers.rope import ROPE_LAYOUTS


class DenseAttention(AttentionBase, kind="dense", cross_attention=True, decodes=True):
    """Softmax attention over all (allowed) keys, through `effitrans.kernels.attention`.

    Weights: q [D, N, H], k and v [D, K, H], o [N, H, D].

    `extra_mask` (a static kernels.masks.Mask, default None) is intersected with the causal / full mask of
    a full pass: it runs the trained weights under a sparse pattern without retraining (effitrans.analysis
    sets it per layer); decoding ignores it.
    """

    extra_mask = None

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
        self._init_heads(rngs, ("q",), d_model, num_heads, head_dim)
        self._init_heads(rngs, ("k", "v"), d_model, num_kv_heads, head_dim, axis="kv_heads")
        self._init_output(rngs, num_heads, head_dim, d_model)

    def init_cache(self, batch: int, max_len: int, dtype=jnp.float32) -> KVCache:
        return KVCache.zeros(batch, max_len, self.num_kv_heads, self.head_dim, dtype=dtype)

    def _kernel(self, q, k, v, mask, segment_ids) -> jax.Array:
        """kernels.attention with this module's impl and block sizes: [B, T, N, H]."""
        return kernels.attention(
            q, k, v, mask=mask, segment_ids=segment_ids, impl=self.impl, block_q=self.block_q, block_k=self.block_k
        )

    def _forward(self, x, positions, segment_ids, kv_x=None, kv_positions=None):
        """x [B, T, D] (keys/values from kv_x [B, S, D] when given) -> y [B, T, D]."""
        q, k, v = self._qkv(x, positions, kv_x, kv_positions)  # [B, T, N, H], [B, S, K, H] x 2
        mask = kernels.masks.Causal() if (self.causal and kv_x is None) else kernels.masks.Full()
        if self.extra_mask is not None:
            mask = mask & self.extra_mask
        return self._output(self._kernel(q, k, v, mask, segment_ids))  # [B, T, N, H] -> [B, T, D]

    def _decode(self, x, positions, cache: KVCache):
        """The newest T tokens x [B, T, D]: appended to `cache`, attending to all of it -> (y, cache)."""
        q, k, v = self._qkv(x, positions)  # [B, T, N, H], [B, T, K, H] x 2
        cache = cache.append(k, v)
        impl = self.impl if self.impl != "pallas" else "auto"
        out = kernels.decode_attention(q, cache.k, cache.v, lengths=cache.lengths, impl=impl)  # [B, T, N, H]
        return self._output(out), cache
