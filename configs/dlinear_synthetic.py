"""dlinear_synthetic: the DLinear baseline (decomposition + two linear maps over time) on the same series, windows,
splits and training schedule as configs/autoformer_synthetic.py (--config.data.series=co2 with statsmodels).

Argument: `--config=configs/dlinear_synthetic.py:key=value,...` sets dotted config keys (`train.steps=50`,
`model.attention.impl=xla`) before any --config.x override; effitrans.schema.apply_arg.
"""

import os

from effitrans import defaults
from effitrans.schema import apply_arg, load_config


def get_config(arg=None):
    config = load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), "autoformer_synthetic.py"))
    shapes = {k: config.model.autoformer[k] for k in ("input_len", "pred_len", "num_series")}
    config.model = defaults.model(name="dlinear")
    config.model.dlinear = defaults.dlinear(**shapes)
    config.train.learning_rate = 1e-2  # a linear model takes a larger step
    return apply_arg(config, arg)
