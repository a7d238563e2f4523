"""Builders and config options of the sparse / routed families (registered in effitrans/attention/__init__.py).

Each `build_<kind>(model_cfg, attn_cfg, *, causal, rngs, dtype)` reads its keys from
`config.model.attention` (defaults below, used when a key is absent), and each `<kind>_options()` returns
the checks that config validation applies to those keys. See docs/attention_families.md.
"""

from __future__ import annotations

from flax import nnx

from effitrans.attention.lsh import LSHAttention
from effitrans.attention.routing import RoutingAttention
from effitrans.attention.sliding_window import SlidingWindowAttention
from effitrans.attention.sparse_patterns import SparsePatternAttention
from effitrans.attention.transient_global import TransientGlobalAttention

DEFAULTS = {
    "sliding_window": {"window_left": 64, "window_right": None, "num_global": 0},
    "sparse_strided": {"stride": 32},
    "sparse_fixed": {"block": 32, "summary": 4},
    "lsh": {"n_buckets": 8, "n_hashes": 2, "chunk_len": 64},
    "routing": {
        "num_clusters": 4,
        "routing_window": None,
        "num_local_heads": None,
        "local_window": 32,
        "centroid_decay": 0.999,
    },
    "transient_global": {"local_radius": 127, "global_block": 16, "relative_buckets": 32, "relative_max_distance": 128},
}


def _get(attn_cfg, kind, key):
    value = attn_cfg.get(key)
    return DEFAULTS[kind][key] if value is None else value


def _require_mha(model_cfg, kind):
    if model_cfg.num_kv_heads != model_cfg.num_heads:
        raise ValueError(
            f"config.model.num_kv_heads={model_cfg.num_kv_heads} must equal config.model.num_heads="
            f"{model_cfg.num_heads} for config.model.attention.kind={kind!r} (no GQA in this family)"
        )


def _dense_kwargs(model_cfg, attn_cfg):
    return dict(
        impl=attn_cfg.impl,
        rope_base=model_cfg.rope_base,
        rope_layout=model_cfg.rope_layout,
        block_q=attn_cfg.get("block_q"),
        block_k=attn_cfg.get("block_k"),
    )


def build_sliding_window(model_cfg, attn_cfg, *, causal: bool, rngs: nnx.Rngs, dtype) -> nnx.Module:
    left = _get(attn_cfg, "sliding_window", "window_left")
    right = attn_cfg.get("window_right")
    right = (0 if causal else left) if right is None else right
    return SlidingWindowAttention(
        model_cfg.d_model,
        model_cfg.num_heads,
        model_cfg.num_kv_heads,
        model_cfg.head_dim,
        window_left=left,
        window_right=right,
        num_global=_get(attn_cfg, "sliding_window", "num_global"),
        causal=causal,
        rngs=rngs,
        dtype=dtype,
        **_dense_kwargs(model_cfg, attn_cfg),
    )


def build_sparse_strided(model_cfg, attn_cfg, *, causal: bool, rngs: nnx.Rngs, dtype) -> nnx.Module:
    return SparsePatternAttention(
        model_cfg.d_model,
        model_cfg.num_heads,
        model_cfg.num_kv_heads,
        model_cfg.head_dim,
        pattern="strided",
        stride=_get(attn_cfg, "sparse_strided", "stride"),
        causal=causal,
        rngs=rngs,
        dtype=dtype,
        **_dense_kwargs(model_cfg, attn_cfg),
    )


def build_sparse_fixed(model_cfg, attn_cfg, *, causal: bool, rngs: nnx.Rngs, dtype) -> nnx.Module:
    block, summary = _get(attn_cfg, "sparse_fixed", "block"), _get(attn_cfg, "sparse_fixed", "summary")
    if summary > block:
        raise ValueError(f"config.model.attention.summary={summary} must be <= config.model.attention.block={block}")
    return SparsePatternAttention(
        model_cfg.d_model,
        model_cfg.num_heads,
        model_cfg.num_kv_heads,
        model_cfg.head_dim,
        pattern="fixed",
        block=block,
        summary=summary,
        causal=causal,
        rngs=rngs,
        dtype=dtype,
        **_dense_kwargs(model_cfg, attn_cfg),
    )


def build_lsh(model_cfg, attn_cfg, *, causal: bool, rngs: nnx.Rngs, dtype) -> nnx.Module:
    _require_mha(model_cfg, "lsh")
    g = lambda key: _get(attn_cfg, "lsh", key)
    return LSHAttention(
        model_cfg.d_model,
        model_cfg.num_heads,
        model_cfg.head_dim,
        n_buckets=g("n_buckets"),
        n_hashes=g("n_hashes"),
        chunk_len=g("chunk_len"),
        causal=causal,
        rope_base=model_cfg.rope_base,
        rope_layout=model_cfg.rope_layout,
        rngs=rngs,
        dtype=dtype,
    )


def build_routing(model_cfg, attn_cfg, *, causal: bool, rngs: nnx.Rngs, dtype) -> nnx.Module:
    _require_mha(model_cfg, "routing")
    g = lambda key: _get(attn_cfg, "routing", key)
    local = g("num_local_heads")
    local = model_cfg.num_heads // 2 if local is None else local
    return RoutingAttention(
        model_cfg.d_model,
        model_cfg.num_heads,
        model_cfg.head_dim,
        num_clusters=g("num_clusters"),
        window=g("routing_window"),
        num_local_heads=local,
        local_window=g("local_window"),
        decay=g("centroid_decay"),
        causal=causal,
        impl=attn_cfg.impl,
        rope_base=model_cfg.rope_base,
        rope_layout=model_cfg.rope_layout,
        rngs=rngs,
        dtype=dtype,
    )


def build_transient_global(model_cfg, attn_cfg, *, causal: bool, rngs: nnx.Rngs, dtype) -> nnx.Module:
    _require_mha(model_cfg, "transient_global")
    g = lambda key: _get(attn_cfg, "transient_global", key)
    return TransientGlobalAttention(
        model_cfg.d_model,
        model_cfg.num_heads,
        model_cfg.head_dim,
        local_radius=g("local_radius"),
        global_block=g("global_block"),
        causal=causal,
        num_buckets=g("relative_buckets"),
        max_distance=g("relative_max_distance"),
        norm_eps=model_cfg.norm_eps,
        rngs=rngs,
        dtype=dtype,
    )


def _even_or_one(v):
    ok = isinstance(v, int) and not isinstance(v, bool) and (v == 1 or (v >= 2 and v % 2 == 0))
    return None if ok else "1 or an even int >= 2"


def _unit_interval(v):
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and 0.0 <= v < 1.0
    return None if ok else "a number in [0, 1)"


def sliding_window_options():
    from effitrans import config_validation as cv

    return {
        "window_left": cv.int_at_least(0),  # keys before the query (inclusive window)
        "window_right": cv.optional(cv.int_at_least(0)),  # keys after; None: = window_left (0 if causal)
        "num_global": cv.int_at_least(0),
    }  # first n tokens are global (own projections)


def sparse_strided_options():
    from effitrans import config_validation as cv

    return {"stride": cv.int_at_least(1)}  # l: local span and stride of the column heads


def sparse_fixed_options():
    from effitrans import config_validation as cv

    return {
        "block": cv.int_at_least(1),  # l: block length
        "summary": cv.int_at_least(1),
    }  # c: summary keys at the end of every block


def lsh_options():
    from effitrans import config_validation as cv

    return {
        "n_buckets": _even_or_one,  # buckets per hash round
        "n_hashes": cv.int_at_least(1),  # hash rounds
        "chunk_len": cv.int_at_least(1),
    }  # sorted chunk length (attends own + previous)


def routing_options():
    from effitrans import config_validation as cv

    return {
        "num_clusters": cv.int_at_least(1),  # k-means centroids per routing head
        "routing_window": cv.optional(cv.int_at_least(1)),  # w: queries/keys per cluster; None: ceil(S / C)
        "num_local_heads": cv.optional(cv.int_at_least(0)),  # None: num_heads // 2 local heads
        "local_window": cv.int_at_least(0),  # local heads' window each side
        "centroid_decay": _unit_interval,
    }  # EMA decay of the centroids


def transient_global_options():
    from effitrans import config_validation as cv

    return {
        "local_radius": cv.int_at_least(0),  # r: local keys each side
        "global_block": cv.int_at_least(1),  # tokens summed per global token
        "relative_buckets": cv.int_at_least(2),  # T5 relative-position buckets
        "relative_max_distance": cv.int_at_least(1),
    }  # beyond this, one bucket
