"""Validation of `config.model.funnel` (called from effitrans.config_validation)."""

from __future__ import annotations

import types
from collections.abc import Iterable


def funnel_schema():
    """Checks of the keys of config.model.funnel (defaults and descriptions: configs/funnel_common.py)."""
    from effitrans import config_validation as cv

    def int_list(v):
        ok = isinstance(v, (list, tuple)) and all(cv._is_int(x) and x >= 1 for x in v)
        return None if ok else "a list of ints >= 1"

    return {
        "block_layers": int_list,
        "strides": int_list,
        "pooling": cv.one_of("mean", "max", "slice"),
        "separate_cls": cv.boolean,
        "truncate_seq": cv.boolean,
        "pool_q_only": cv.boolean,
        "position_pooling": cv.one_of("first", "mean"),
        "decoder_layers": cv.int_at_least(0),
    }


def check_funnel_config(model_cfg, prefix: str = "config.model", seq_lens: Iterable[int] | None = None) -> None:
    """Relations: funnel only on funnel models, block_layers sum to num_layers, one stride per pooled block,
    and (given the data's sequence lengths) no pooling leaves fewer than one token."""
    from effitrans.config_validation import ConfigError
    from effitrans.funnel.encoder import FunnelSpec, spec_problems

    m = model_cfg
    is_funnel = m.name.startswith("funnel_")
    if not is_funnel:
        if "funnel" in m:
            raise ConfigError(
                f"{prefix}.funnel is set but {prefix}.name={m.name!r} is not a funnel model (allowed "
                f"names with a funnel group: funnel_embedding, funnel_classifier)"
            )
        return
    if "funnel" not in m:
        raise ConfigError(f"{prefix}.funnel is required when {prefix}.name={m.name!r} (see configs/funnel_common.py)")
    f = m.funnel
    values = types.SimpleNamespace(
        block_layers=tuple(f.block_layers),
        strides=tuple(f.strides),
        pooling=f.pooling,
        position_pooling=f.position_pooling,
    )
    for _, msg in spec_problems(values):
        raise ConfigError(f"{prefix}.funnel.{msg}")
    if sum(f.block_layers) != m.num_layers:
        raise ConfigError(
            f"{prefix}.funnel.block_layers={list(f.block_layers)} sum to {sum(f.block_layers)} but "
            f"{prefix}.num_layers={m.num_layers}: a funnel block cannot start beyond the depth; the "
            f"blocks must cover exactly the num_layers layers"
        )
    if m.name == "funnel_embedding" and "embed_dim" not in m:
        raise ConfigError(f"{prefix}.embed_dim is required when {prefix}.name='funnel_embedding'")
    if m.name == "funnel_classifier" and "num_classes" not in m:
        raise ConfigError(f"{prefix}.num_classes is required when {prefix}.name='funnel_classifier'")
    full = FunnelSpec(
        block_layers=tuple(f.block_layers),
        strides=tuple(f.strides),
        pooling=f.pooling,
        separate_cls=f.separate_cls,
        truncate_seq=f.truncate_seq,
        pool_q_only=f.pool_q_only,
        position_pooling=f.position_pooling,
    )
    for t in seq_lens or ():
        try:
            full.pooled_lengths(int(t))
        except ValueError as e:
            raise ConfigError(f"{prefix}.funnel (strides={list(f.strides)}) on sequences of length {t}: {e}") from None
