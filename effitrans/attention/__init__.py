"""Attention families, all with one call signature and cache protocol (see docs/contracts.md).

`build_attention(model_cfg, ...)` is the one place a config's `model.attention.kind` becomes a module.
A family registers an `AttentionFamily`: its builder and the extra keys it reads from
`config.model.attention` (each an effitrans.schema.Key: default, check, meaning), so configs for every
family are validated by the same code before anything is built; `attention_keys(kind)` is the whole
`config.model.attention` group.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

from flax import nnx

from effitrans import schema
from effitrans.attention import autocorrelation as _ac
from effitrans.attention import sparse_families as _sf
from effitrans.attention.cache import KVCache, cache_bytes
from effitrans.attention.dense import DenseAttention
from effitrans.attention.latent import MLA_PATHS, LatentAttention, LatentCache
from effitrans.kernels.api import IMPLS
from effitrans.schema import Key, block_size, float_at_least, int_at_least, one_of, optional


@dataclasses.dataclass(frozen=True)
class AttentionFamily:
    """build(model_cfg, attn_cfg, *, causal, rngs, dtype) -> module; options: the family's own attention keys
    (name -> Key; the Key's default is used when the config leaves the key None); supports_causal: False for a
    family without a causal form (build_attention rejects causal=True)."""

    build: Callable[..., nnx.Module]
    options: Mapping[str, Key] = dataclasses.field(default_factory=dict)
    supports_decode: bool = False
    supports_causal: bool = True


def _build_dense(model_cfg, attn_cfg, *, causal: bool, rngs: nnx.Rngs, dtype) -> nnx.Module:
    kw = _sf.kernel_kwargs(model_cfg, attn_cfg, causal=causal, rngs=rngs, dtype=dtype)
    return DenseAttention(*_sf.module_dims(model_cfg), **kw)


ATTENTION_FAMILIES: dict[str, AttentionFamily] = {
    "dense": AttentionFamily(_build_dense, supports_decode=True),
}


LATENT_KEYS = {
    "kv_lora_rank": Key(None, int_at_least(1), "C: latent width cached per token (required)", int),
    "qk_rope_head_dim": Key(
        None, int_at_least(2), "R: decoupled RoPE dims, one key shared by all heads (required)", int
    ),
    "q_lora_rank": Key(None, optional(int_at_least(1)), "None: full-rank query projection", int),
    "v_head_dim": Key(None, optional(int_at_least(1)), "None: model.head_dim", int),
    "mla_path": Key("auto", one_of(*MLA_PATHS), "auto: naive for full passes, absorbed for decode"),
    "yarn_factor": Key(None, optional(float_at_least(1.0)), "None: plain RoPE; else YaRN context extension", float),
    "yarn_original_max_len": Key(4096, int_at_least(1), "YaRN: the context length RoPE was trained at"),
    "yarn_beta_fast": Key(32.0, float_at_least(0.0, strict=True), "YaRN: fast ramp boundary (rotations)"),
    "yarn_beta_slow": Key(1.0, float_at_least(0.0, strict=True), "YaRN: slow ramp boundary (rotations)"),
    "yarn_mscale": Key(1.0, float_at_least(0.0), "YaRN: attention scale factor"),
    "yarn_mscale_all_dim": Key(0.0, float_at_least(0.0), "YaRN: attention scale factor of all dims"),
}


def _build_latent(model_cfg, attn_cfg, *, causal: bool, rngs: nnx.Rngs, dtype) -> nnx.Module:
    """MLA: model.head_dim is the per-head no-RoPE query/key dim; kv_lora_rank and qk_rope_head_dim are required."""
    for key in ("kv_lora_rank", "qk_rope_head_dim"):
        if attn_cfg.get(key) is None:
            raise ValueError(
                f"config.model.attention.{key} is required when config.model.attention.kind='latent' "
                f"(an int >= 1; DeepSeek-V3: kv_lora_rank=512, qk_rope_head_dim=64)"
            )
    g = lambda key: schema.value(attn_cfg, LATENT_KEYS, key)
    return LatentAttention(
        model_cfg.d_model,
        model_cfg.num_heads,
        kv_lora_rank=g("kv_lora_rank"),
        qk_nope_head_dim=model_cfg.head_dim,
        qk_rope_head_dim=g("qk_rope_head_dim"),
        v_head_dim=g("v_head_dim") or model_cfg.head_dim,
        q_lora_rank=g("q_lora_rank"),
        causal=causal,
        path=g("mla_path"),
        impl=attn_cfg.impl,
        rope_base=model_cfg.rope_base or 10000.0,
        rope_layout=model_cfg.rope_layout,
        yarn_factor=g("yarn_factor"),
        yarn_original_max_len=g("yarn_original_max_len"),
        yarn_beta_fast=g("yarn_beta_fast"),
        yarn_beta_slow=g("yarn_beta_slow"),
        yarn_mscale=g("yarn_mscale"),
        yarn_mscale_all_dim=g("yarn_mscale_all_dim"),
        norm_eps=model_cfg.norm_eps,
        block_q=attn_cfg.get("block_q"),
        block_k=attn_cfg.get("block_k"),
        rngs=rngs,
        dtype=dtype,
    )


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
    if causal and not ATTENTION_FAMILIES[kind].supports_causal:
        raise ValueError(
            f"config.model.attention.kind={kind!r} has no causal form; use it in a non-causal model "
            f"(encoders, forecasters), not a causal LM"
        )
    return ATTENTION_FAMILIES[kind].build(model_cfg, model_cfg.attention, causal=causal, rngs=rngs, dtype=dtype)


register_family("latent", AttentionFamily(_build_latent, LATENT_KEYS, supports_decode=True))


register_family(
    "sliding_window", AttentionFamily(_sf.build_sliding_window, _sf.SLIDING_WINDOW_KEYS, supports_decode=True)
)
register_family("sparse_strided", AttentionFamily(_sf.build_sparse_strided, _sf.SPARSE_STRIDED_KEYS))
register_family("sparse_fixed", AttentionFamily(_sf.build_sparse_fixed, _sf.SPARSE_FIXED_KEYS))
register_family("lsh", AttentionFamily(_sf.build_lsh, _sf.LSH_KEYS))
register_family("routing", AttentionFamily(_sf.build_routing, _sf.ROUTING_KEYS))
register_family("transient_global", AttentionFamily(_sf.build_transient_global, _sf.TRANSIENT_GLOBAL_KEYS))
register_family(
    "autocorrelation",
    AttentionFamily(_ac.build_autocorrelation, _ac.AUTOCORRELATION_KEYS, supports_causal=False),
)


def attention_keys(kind: str = "dense") -> dict:
    """The `config.model.attention` group for `kind`: kind, impl, kernel blocks, and every family's own keys.

    Family keys default to None (the family's own default) so any of them can be set from the command line,
    e.g. `--config.model.attention.kind=sliding_window --config.model.attention.window_left=128`. The
    chosen kind's keys take None or a value its check allows; any other family's key must stay None, so a
    key the chosen kind would ignore (window_left with kind='dense') is an error, not a silent no-op.
    """
    keys = {
        "kind": Key("dense", one_of(*ATTENTION_FAMILIES), "attention family (ATTENTION_FAMILIES)"),
        "impl": Key(
            "auto", one_of(*IMPLS), "kernel: reference | xla | pallas | cudnn | auto (kernels.dispatch.choose_impl)"
        ),
        "block_q": Key(None, block_size, "kernel query block (None: auto)", int),
        "block_k": Key(None, block_size, "kernel key block (None: auto)", int),
    }
    for owner, family in ATTENTION_FAMILIES.items():
        for name, key in family.options.items():
            if owner == kind:
                check = optional(key.check)
            else:
                check = lambda v, owner=owner, name=name: (
                    None
                    if v is None
                    else f"None: {name} is a key of kind={owner!r}, not of kind={kind!r} (set kind={owner!r} to use it)"
                )
            field_type = key.field_type or (object if key.default is None else type(key.default))
            keys[name] = Key(None, check, key.doc, field_type)
    return keys


# Decode caches: dense -> KVCache, latent -> LatentCache ([latent | rope key] per token), sliding_window ->
# a ring buffer of the window (WindowCache, effitrans/attention/sliding_window.py).

__all__ = [
    "AttentionFamily",
    "ATTENTION_FAMILIES",
    "DenseAttention",
    "KVCache",
    "LatentAttention",
    "LatentCache",
    "attention_keys",
    "build_attention",
    "cache_bytes",
    "register_family",
]
