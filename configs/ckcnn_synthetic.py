"""ckcnn_synthetic: the continuous-kernel CNN forecaster (CKConv blocks, kernels in time units) on the series,
windows, splits and schedule of configs/autoformer_synthetic.py (--config.data.series=co2 with statsmodels).

Argument: `--config=configs/ckcnn_synthetic.py:key=value,...` sets dotted config keys (`train.steps=50`,
`model.attention.impl=xla`) before any --config.x override; effitrans.schema.apply_arg.
"""

import os

from effitrans import defaults
from effitrans.schema import apply_arg, load_config


def get_config(arg=None):
    config = load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), "autoformer_synthetic.py"))
    shapes = {k: config.model.autoformer[k] for k in ("input_len", "pred_len", "num_series")}
    config.model = defaults.model(name="ckcnn", num_layers=3, d_model=32)
    config.model.ckcnn = defaults.model_group("ckcnn", kernel_hidden=16, **shapes)
    config = config
    return apply_arg(config, arg)
