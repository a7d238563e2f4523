"""Attention families, all with one call signature and cache protocol (see docs/contracts.md).

`build_attention(kind, ...)` is the one place a config's `model.attention.kind` becomes a module; new
families register a builder in ATTENTION_BUILDERS.
"""

from __future__ import annotations

from typing import Callable

from flax import nnx

from effitrans.attention.cache import KVCache, cache_bytes
from effitrans.attention.dense import DenseAttention


def _build_dense(model_cfg, attn_cfg, *, causal: bool, rngs: nnx.Rngs, dtype) -> nnx.Module:
    return DenseAttention(
        model_cfg.d_model, model_cfg.num_heads, model_cfg.num_kv_heads, model_cfg.head_dim,
        causal=causal, impl=attn_cfg.impl, rope_base=model_cfg.rope_base, rope_layout=model_cfg.rope_layout,
        block_q=attn_cfg.get("block_q"), block_k=attn_cfg.get("block_k"), rngs=rngs, dtype=dtype)


ATTENTION_BUILDERS: dict[str, Callable[..., nnx.Module]] = {"dense": _build_dense}


def build_attention(model_cfg, *, causal: bool, rngs: nnx.Rngs, dtype) -> nnx.Module:
    """The attention module named by model_cfg.attention.kind."""
    kind = model_cfg.attention.kind
    if kind not in ATTENTION_BUILDERS:
        raise ValueError(f"config.model.attention.kind={kind!r} is not one of {sorted(ATTENTION_BUILDERS)}")
    return ATTENTION_BUILDERS[kind](model_cfg, model_cfg.attention, causal=causal, rngs=rngs, dtype=dtype)


__all__ = ["DenseAttention", "KVCache", "cache_bytes", "build_attention", "ATTENTION_BUILDERS"]
