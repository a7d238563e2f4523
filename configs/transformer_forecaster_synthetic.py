"""transformer_forecaster_synthetic: the vanilla Transformer forecaster (dense attention, Autoformer's embedding and
head) on the series, windows, splits and schedule of configs/autoformer_synthetic.py (--config.data.series=co2 with
statsmodels; --config.model.attention.kind=autocorrelation swaps in auto-correlation).

Argument: `--config=configs/transformer_forecaster_synthetic.py:key=value,...` sets dotted config keys
(`train.steps=50`, `model.attention.impl=xla`) before any --config.x override; effitrans.schema.apply_arg.
"""

import os

from effitrans import defaults
from effitrans.schema import apply_arg, load_config


def get_config(arg=None):
    config = load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), "autoformer_synthetic.py"))
    shapes = {k: config.model.autoformer[k] for k in ("input_len", "pred_len", "num_series")}
    config.model = defaults.model(
        name="transformer_forecaster",
        num_layers=2,
        d_model=64,
        num_heads=4,
        num_kv_heads=4,
        head_dim=16,
        ffn_width=128,
        ffn_activation="gelu",
    )
    config.model.transformer_forecaster = defaults.model_group("transformer_forecaster", **shapes)
    config = config
    return apply_arg(config, arg)
