"""cnn_synthetic: the discrete CNN of configs/ckcnn_synthetic.py's size (the same blocks, 17-tap filters in place of
the 16-wide kernel net) on the same series, windows, splits and schedule.

Argument: `--config=configs/cnn_synthetic.py:key=value,...` sets dotted config keys (`train.steps=50`,
`model.attention.impl=xla`) before any --config.x override; effitrans.schema.apply_arg.
"""

import os

from effitrans import defaults
from effitrans.schema import apply_arg, load_config


def get_config(arg=None):
    config = load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), "ckcnn_synthetic.py"))
    ck = config.model
    shapes = {k: ck.ckcnn[k] for k in ("input_len", "pred_len", "num_series")}
    config.model = defaults.model(name="cnn", num_layers=ck.num_layers, d_model=ck.d_model)
    config.model.cnn = defaults.model_group("cnn", kernel_size=ck.ckcnn.kernel_hidden + 1, **shapes)
    config = config
    return apply_arg(config, arg)
