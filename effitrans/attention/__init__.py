"""Attention families, all with one call signature and cache protocol (see docs/contracts.md).

`build_attention(model_cfg, ...)` is the one place a config's `model.attention.kind` becomes a module.
A family registers an `AttentionFamily`: its builder and the extra keys it reads from
`config.model.attention` (each with a check from effitrans.config_validation), so configs for every
family are validated by the same code before anything is built.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping

from flax import nnx

from effitrans.attention.cache import KVCache, cache_bytes
from effitrans.attention.dense import DenseAttention


@dataclasses.dataclass(frozen=True)
class AttentionFamily:
    """build(model_cfg, attn_cfg, *, causal, rngs, dtype) -> module; options: extra attention keys -> check."""

    build: Callable[..., nnx.Module]
    options: Mapping[str, Callable] = dataclasses.field(default_factory=dict)
    supports_decode: bool = False


def _build_dense(model_cfg, attn_cfg, *, causal: bool, rngs: nnx.Rngs, dtype) -> nnx.Module:
    return DenseAttention(
        model_cfg.d_model, model_cfg.num_heads, model_cfg.num_kv_heads, model_cfg.head_dim,
        causal=causal, impl=attn_cfg.impl, rope_base=model_cfg.rope_base, rope_layout=model_cfg.rope_layout,
        block_q=attn_cfg.get("block_q"), block_k=attn_cfg.get("block_k"), rngs=rngs, dtype=dtype)


ATTENTION_FAMILIES: dict[str, AttentionFamily] = {
    "dense": AttentionFamily(_build_dense, supports_decode=True),
}


def register_family(kind: str, family: AttentionFamily) -> None:
    """Adds an attention family under `kind` (model.attention.kind)."""
    if kind in ATTENTION_FAMILIES and ATTENTION_FAMILIES[kind] is not family:
        raise ValueError(f"attention kind {kind!r} is already registered")
    ATTENTION_FAMILIES[kind] = family


def build_attention(model_cfg, *, causal: bool, rngs: nnx.Rngs, dtype) -> nnx.Module:
    """The attention module named by model_cfg.attention.kind."""
    kind = model_cfg.attention.kind
    if kind not in ATTENTION_FAMILIES:
        raise ValueError(f"config.model.attention.kind={kind!r} is not one of {sorted(ATTENTION_FAMILIES)}")
    return ATTENTION_FAMILIES[kind].build(model_cfg, model_cfg.attention, causal=causal, rngs=rngs, dtype=dtype)


__all__ = ["AttentionFamily", "ATTENTION_FAMILIES", "DenseAttention", "KVCache", "build_attention",
           "cache_bytes", "register_family"]
