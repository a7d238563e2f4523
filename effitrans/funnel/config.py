"""The keys of `config.model.funnel` (FUNNEL_KEYS: defaults, checks, meanings) and the checks across them and
the model's keys (check_funnel_config). Used with model.name = funnel_embedding | funnel_classifier.
"""

from __future__ import annotations

import types
from collections.abc import Iterable

from effitrans.funnel.encoder import spec_from_config, spec_problems
from effitrans.funnel.pooling import HIDDEN_POOL_MODES, POSITION_MODES
from effitrans.schema import ConfigError, Key, boolean, int_at_least, int_list, one_of

FUNNEL_KEYS = {
    "block_layers": Key(
        [2, 4], int_list, "layers per block; they must sum to model.num_layers. Block 0 runs at full length", object
    ),
    "strides": Key(
        [2], int_list, "strides[i] pools before block i + 1 (one fewer than blocks); 1 = no pooling", object
    ),
    "pooling": Key("mean", one_of(*HIDDEN_POOL_MODES), "hidden-state pooling (slice: first token of each window)"),
    "separate_cls": Key(True, boolean, "token 0 (CLS) is its own window, never pooled with other tokens"),
    "truncate_seq": Key(False, boolean, "drop a partial trailing window instead of pooling it over fewer tokens"),
    "pool_q_only": Key(True, boolean, "first pooled layer: pooled queries attend over the unpooled keys/values"),
    "position_pooling": Key(
        "first", one_of(*POSITION_MODES), "RoPE position of a pooled token: first (window start, int) | mean (float)"
    ),
    "decoder_layers": Key(0, int_at_least(0), "full-length layers after upsampling (FunnelMaskedLM only)"),
}


def check_funnel_config(model_cfg, prefix: str = "config.model", seq_lens: Iterable[int] | None = None) -> None:
    """Relations: funnel only on funnel models, block_layers sum to num_layers, one stride per pooled block,
    and (given the data's sequence lengths) no pooling leaves fewer than one token."""
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
        raise ConfigError(
            f"{prefix}.funnel is required when {prefix}.name={m.name!r} (keys: effitrans.funnel.FUNNEL_KEYS)"
        )
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
    full = spec_from_config(m)
    for t in seq_lens or ():
        try:
            full.pooled_lengths(int(t))
        except ValueError as e:
            raise ConfigError(f"{prefix}.funnel (strides={list(f.strides)}) on sequences of length {t}: {e}") from None
