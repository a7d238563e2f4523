"""funnel_retrieval_small: encoder_retrieval_small with a funnel at one third of its depth, trained from
scratch. Same parameters as the dense model (a checkpoint of either loads into the other), so the same
funnel is also reachable by surgery on a trained encoder_retrieval_small (effitrans.funnel.insert).

    python -m effitrans.main --config=configs/funnel_retrieval_small.py --workdir=DIR
    ... --config.model.funnel.block_layers=[3,3] --config.model.funnel.strides=[4]

Argument: `--config=configs/funnel_retrieval_small.py:key=value,...` sets dotted config keys (`train.steps=50`,
`model.attention.impl=xla`) before any --config.x override; effitrans.schema.apply_arg. Shorthands:
`layer=K` (the funnel after layer K of 6: block_layers=[K, 6-K]) and `stride=S` (strides=[S]), e.g.
`configs/funnel_retrieval_small.py:layer=2,stride=4`.
"""

import os

from effitrans import defaults
from effitrans.schema import ConfigError, apply_arg, load_config


def _layer(config, k):
    """layer=K: the funnel after layer K (block_layers [K, L-K] of the dense model's L layers)."""
    total = config.model.num_layers
    if not isinstance(k, int) or not 1 <= k < total:
        raise ConfigError(f"config argument layer={k!r}: allowed an int in [1, {total - 1}] (model.num_layers={total})")
    config.model.funnel.block_layers = [k, total - k]


def _stride(config, s):
    """stride=S: pool by S once (strides [S])."""
    if not isinstance(s, int) or s < 1:
        raise ConfigError(f"config argument stride={s!r}: allowed an int >= 1")
    config.model.funnel.strides = [s]


def get_config(arg=None):
    # data, train and mesh as the dense model
    config = load_config(os.path.join(os.path.dirname(__file__), "encoder_retrieval_small.py"))
    config.model.name = "funnel_embedding"  # the funnel version of encoder_embedding
    # 6 layers: 2 at full length (64 bytes), then 4 on the pooled sequence (CLS + 32 windows of 2 bytes).
    config.model.funnel = defaults.funnel(block_layers=[2, 4], strides=[2])
    return apply_arg(config, arg, {"layer": _layer, "stride": _stride})
