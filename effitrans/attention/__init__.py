"""Attention families, all with one call signature and cache protocol (see docs/contracts.md).

`build_attention(model_cfg, ...)` is the one place a config's `model.attention.kind` becomes a module.
A family registers an `AttentionFamily`: its builder and the extra keys it reads from
`config.model.attention` (each with a check from effitrans.config_validation), so configs for every
family are validated by the same code before anything is built.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

from flax import nnx

from effitrans.attention.cache import KVCache, cache_bytes
from effitrans.attention.dense import DenseAttention
from effitrans.attention.latent import MLA_PATHS, LatentAttention, LatentCache


@dataclasses.dataclass(frozen=True)
class AttentionFamily:
    """build(model_cfg, attn_cfg, *, causal, rngs, dtype) -> module; options: extra attention keys -> check."""

    build: Callable[..., nnx.Module]
    options: Mapping[str, Callable] = dataclasses.field(default_factory=dict)
    supports_decode: bool = False


def _build_dense(model_cfg, attn_cfg, *, causal: bool, rngs: nnx.Rngs, dtype) -> nnx.Module:
    return DenseAttention(
        model_cfg.d_model,
        model_cfg.num_heads,
        model_cfg.num_kv_heads,
        model_cfg.head_dim,
        causal=causal,
        impl=attn_cfg.impl,
        rope_base=model_cfg.rope_base,
        rope_layout=model_cfg.rope_layout,
        block_q=attn_cfg.get("block_q"),
        block_k=attn_cfg.get("block_k"),
        rngs=rngs,
        dtype=dtype,
    )


ATTENTION_FAMILIES: dict[str, AttentionFamily] = {
    "dense": AttentionFamily(_build_dense, supports_decode=True),
}


def _build_latent(model_cfg, attn_cfg, *, causal: bool, rngs: nnx.Rngs, dtype) -> nnx.Module:
    """MLA: model.head_dim is the per-head no-RoPE query/key dim; kv_lora_rank and qk_rope_head_dim are required."""
    for key in ("kv_lora_rank", "qk_rope_head_dim"):
        if attn_cfg.get(key) is None:
            raise ValueError(
                f"config.model.attention.{key} is required when config.model.attention.kind='latent' "
                f"(an int >= 1; DeepSeek-V3: kv_lora_rank=512, qk_rope_head_dim=64)"
            )

    def g(key, default=None):  # a declared-but-unset key (None) means the default
        value = attn_cfg.get(key)
        return default if value is None else value

    return LatentAttention(
        model_cfg.d_model,
        model_cfg.num_heads,
        kv_lora_rank=g("kv_lora_rank"),
        qk_nope_head_dim=model_cfg.head_dim,
        qk_rope_head_dim=g("qk_rope_head_dim"),
        v_head_dim=g("v_head_dim") or model_cfg.head_dim,
        q_lora_rank=g("q_lora_rank"),
        causal=causal,
        path=g("mla_path", "auto"),
        impl=attn_cfg.impl,
        rope_base=model_cfg.rope_base or 10000.0,
        rope_layout=model_cfg.rope_layout,
        yarn_factor=g("yarn_factor"),
        yarn_original_max_len=g("yarn_original_max_len", 4096),
        yarn_beta_fast=g("yarn_beta_fast", 32.0),
        yarn_beta_slow=g("yarn_beta_slow", 1.0),
        yarn_mscale=g("yarn_mscale", 1.0),
        yarn_mscale_all_dim=g("yarn_mscale_all_dim", 0.0),
        norm_eps=model_cfg.norm_eps,
        block_q=g("block_q"),
        block_k=g("block_k"),
        rngs=rngs,
        dtype=dtype,
    )


def _latent_options():
    from effitrans import config_validation as cv

    return {
        "kv_lora_rank": cv.int_at_least(1),  # C: latent width cached per token (required)
        "qk_rope_head_dim": cv.int_at_least(2),  # R: decoupled RoPE dims, one key shared by all heads (required)
        "q_lora_rank": cv.optional(cv.int_at_least(1)),  # None: full-rank query projection
        "v_head_dim": cv.optional(cv.int_at_least(1)),  # None: model.head_dim
        "mla_path": cv.one_of(*MLA_PATHS),  # auto: naive for full passes, absorbed for decode
        "yarn_factor": cv.optional(cv.float_at_least(1.0)),  # None: plain RoPE; else YaRN context extension
        "yarn_original_max_len": cv.int_at_least(1),
        "yarn_beta_fast": cv.float_at_least(0.0, strict=True),
        "yarn_beta_slow": cv.float_at_least(0.0, strict=True),
        "yarn_mscale": cv.float_at_least(0.0),
        "yarn_mscale_all_dim": cv.float_at_least(0.0),
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


register_family("latent", AttentionFamily(_build_latent, _latent_options(), supports_decode=True))

from effitrans.attention import sparse_families as _sf  # noqa: E402  (sparse / routed / TGA families, issue 4)

register_family(
    "sliding_window", AttentionFamily(_sf.build_sliding_window, _sf.sliding_window_options(), supports_decode=True)
)
register_family("sparse_strided", AttentionFamily(_sf.build_sparse_strided, _sf.sparse_strided_options()))
register_family("sparse_fixed", AttentionFamily(_sf.build_sparse_fixed, _sf.sparse_fixed_options()))
register_family("lsh", AttentionFamily(_sf.build_lsh, _sf.lsh_options()))
register_family("routing", AttentionFamily(_sf.build_routing, _sf.routing_options()))
register_family("transient_global", AttentionFamily(_sf.build_transient_global, _sf.transient_global_options()))

# Decode caches: dense -> KVCache, latent -> LatentCache ([latent | rope key] per token), sliding_window ->
# a ring buffer of the window (WindowCache, effitrans/attention/sliding_window.py).

__all__ = [
    "AttentionFamily",
    "ATTENTION_FAMILIES",
    "DenseAttention",
    "KVCache",
    "LatentAttention",
    "LatentCache",
    "build_attention",
    "cache_bytes",
    "register_family",
]
