"""Builders and config options of the sparse / routed families (registered in effitrans/attention/__init__.py).

Each `build_<kind>(model_cfg, attn_cfg, *, causal, rngs, dtype)` reads its keys from
`config.model.attention`; `<KIND>_KEYS` declares them (default when the key is None, check, meaning).
See docs/attention_families.md.
"""

from __future__ import annotations

from flax import nnx

from effitrans import schema
from effitrans.attention.lsh import LSHAttention
from effitrans.attention.routing import RoutingAttention
from effitrans.attention.sliding_window import SlidingWindowAttention
from effitrans.attention.sparse_patterns import SparsePatternAttention
from effitrans.attention.transient_global import TransientGlobalAttention
from effitrans.schema import Key, int_at_least, optional


def _even_or_one(v):
    ok = schema.is_int(v) and (v == 1 or (v >= 2 and v % 2 == 0))
    return None if ok else "1 or an even int >= 2"


def _unit_interval(v):
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and 0.0 <= v < 1.0
    return None if ok else "a number in [0, 1)"


# Each family's own keys of config.model.attention; a default is used when the config leaves the key None.
SLIDING_WINDOW_KEYS = {
    "window_left": Key(64, int_at_least(0), "keys before the query (inclusive window)"),
    "window_right": Key(None, optional(int_at_least(0)), "keys after; None: = window_left (0 if causal)", int),
    "num_global": Key(0, int_at_least(0), "the first n tokens are global (own projections)"),
}
SPARSE_STRIDED_KEYS = {"stride": Key(32, int_at_least(1), "l: local span and stride of the column heads")}
SPARSE_FIXED_KEYS = {
    "block": Key(32, int_at_least(1), "l: block length"),
    "summary": Key(4, int_at_least(1), "c: summary keys at the end of every block"),
}
LSH_KEYS = {
    "n_buckets": Key(8, _even_or_one, "buckets per hash round"),
    "n_hashes": Key(2, int_at_least(1), "hash rounds"),
    "chunk_len": Key(64, int_at_least(1), "sorted chunk length (attends own + previous)"),
}
ROUTING_KEYS = {
    "num_clusters": Key(4, int_at_least(1), "k-means centroids per routing head"),
    "routing_window": Key(None, optional(int_at_least(1)), "w: queries/keys per cluster; None: ceil(S / C)", int),
    "num_local_heads": Key(None, optional(int_at_least(0)), "None: num_heads // 2 local heads", int),
    "local_window": Key(32, int_at_least(0), "local heads' window each side"),
    "centroid_decay": Key(0.999, _unit_interval, "EMA decay of the centroids"),
}
TRANSIENT_GLOBAL_KEYS = {
    "local_radius": Key(127, int_at_least(0), "r: local keys each side"),
    "global_block": Key(16, int_at_least(1), "tokens summed per global token"),
    "relative_buckets": Key(32, int_at_least(2), "T5 relative-position buckets"),
    "relative_max_distance": Key(128, int_at_least(1), "beyond this, one bucket"),
}


def _require_mha(model_cfg, kind):
    if model_cfg.num_kv_heads != model_cfg.num_heads:
        raise ValueError(
            f"config.model.num_kv_heads={model_cfg.num_kv_heads} must equal config.model.num_heads="
            f"{model_cfg.num_heads} for config.model.attention.kind={kind!r} (no GQA in this family)"
        )


def module_dims(model_cfg, *, grouped: bool = True) -> tuple[int, ...]:
    """The leading arguments of every family's module: (d_model, num_heads[, num_kv_heads], head_dim);
    num_kv_heads only for families that support GQA (`grouped`)."""
    kv = (model_cfg.num_kv_heads,) if grouped else ()
    return (model_cfg.d_model, model_cfg.num_heads, *kv, model_cfg.head_dim)


def kernel_kwargs(model_cfg, attn_cfg, *, causal: bool, rngs: nnx.Rngs, dtype) -> dict:
    """Keywords shared by the families that run `kernels.attention` with RoPE: the mask direction, kernel
    choice and blocks, RoPE, rngs and compute dtype."""
    return dict(
        causal=causal,
        impl=attn_cfg.impl,
        rope_base=model_cfg.rope_base,
        rope_layout=model_cfg.rope_layout,
        block_q=attn_cfg.get("block_q"),
        block_k=attn_cfg.get("block_k"),
        rngs=rngs,
        dtype=dtype,
    )


def build_sliding_window(model_cfg, attn_cfg, *, causal: bool, rngs: nnx.Rngs, dtype) -> nnx.Module:
    left = schema.value(attn_cfg, SLIDING_WINDOW_KEYS, "window_left")
    right = attn_cfg.get("window_right")
    right = (0 if causal else left) if right is None else right
    return SlidingWindowAttention(
        *module_dims(model_cfg),
        window_left=left,
        window_right=right,
        num_global=schema.value(attn_cfg, SLIDING_WINDOW_KEYS, "num_global"),
        **kernel_kwargs(model_cfg, attn_cfg, causal=causal, rngs=rngs, dtype=dtype),
    )


def build_sparse_strided(model_cfg, attn_cfg, *, causal: bool, rngs: nnx.Rngs, dtype) -> nnx.Module:
    stride = schema.value(attn_cfg, SPARSE_STRIDED_KEYS, "stride")
    kw = kernel_kwargs(model_cfg, attn_cfg, causal=causal, rngs=rngs, dtype=dtype)
    return SparsePatternAttention(*module_dims(model_cfg), pattern="strided", stride=stride, **kw)


def build_sparse_fixed(model_cfg, attn_cfg, *, causal: bool, rngs: nnx.Rngs, dtype) -> nnx.Module:
    block = schema.value(attn_cfg, SPARSE_FIXED_KEYS, "block")
    summary = schema.value(attn_cfg, SPARSE_FIXED_KEYS, "summary")
    if summary > block:
        raise ValueError(f"config.model.attention.summary={summary} must be <= config.model.attention.block={block}")
    kw = kernel_kwargs(model_cfg, attn_cfg, causal=causal, rngs=rngs, dtype=dtype)
    return SparsePatternAttention(*module_dims(model_cfg), pattern="fixed", block=block, summary=summary, **kw)


def _mha_module(cls, kind: str, model_cfg, *, causal: bool, rngs: nnx.Rngs, dtype, **kw) -> nnx.Module:
    """cls(d_model, num_heads, head_dim, causal=, rngs=, dtype=, **kw) for a family without GQA."""
    _require_mha(model_cfg, kind)
    return cls(*module_dims(model_cfg, grouped=False), causal=causal, rngs=rngs, dtype=dtype, **kw)


def _family_kwargs(attn_cfg, keys: dict, rename: dict | None = None) -> dict:
    """Every key a family declares, at its config value (its default when left None), under the module's
    keyword name (`rename`: config key -> keyword, where the two differ)."""
    rename = rename or {}
    return {rename.get(key, key): schema.value(attn_cfg, keys, key) for key in keys}


def build_lsh(model_cfg, attn_cfg, *, causal: bool, rngs: nnx.Rngs, dtype) -> nnx.Module:
    kw = _family_kwargs(attn_cfg, LSH_KEYS) | dict(rope_base=model_cfg.rope_base, rope_layout=model_cfg.rope_layout)
    return _mha_module(LSHAttention, "lsh", model_cfg, causal=causal, rngs=rngs, dtype=dtype, **kw)


def build_routing(model_cfg, attn_cfg, *, causal: bool, rngs: nnx.Rngs, dtype) -> nnx.Module:
    kw = _family_kwargs(attn_cfg, ROUTING_KEYS, {"routing_window": "window", "centroid_decay": "decay"})
    if kw["num_local_heads"] is None:
        kw["num_local_heads"] = model_cfg.num_heads // 2
    kw |= dict(impl=attn_cfg.impl, rope_base=model_cfg.rope_base, rope_layout=model_cfg.rope_layout)
    return _mha_module(RoutingAttention, "routing", model_cfg, causal=causal, rngs=rngs, dtype=dtype, **kw)


def build_transient_global(model_cfg, attn_cfg, *, causal: bool, rngs: nnx.Rngs, dtype) -> nnx.Module:
    rename = {"relative_buckets": "num_buckets", "relative_max_distance": "max_distance"}
    kw = _family_kwargs(attn_cfg, TRANSIENT_GLOBAL_KEYS, rename) | dict(norm_eps=model_cfg.norm_eps)
    return _mha_module(
        TransientGlobalAttention, "transient_global", model_cfg, causal=causal, rngs=rngs, dtype=dtype, **kw
    )
