"""ckcnn_listops: a continuous-kernel CNN classifier (CKConv blocks over token embeddings, mean pooling) on the
ListOps data of configs/listops_small.py, with its schedule.

Argument: `--config=configs/ckcnn_listops.py:key=value,...` sets dotted config keys (`train.steps=50`,
`model.attention.impl=xla`) before any --config.x override; effitrans.schema.apply_arg.
"""

import os

from effitrans import defaults
from effitrans.schema import apply_arg, load_config


def get_config(arg=None):
    config = load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), "listops_small.py"))
    config.model = defaults.model(name="ckcnn_classifier", num_layers=4, d_model=64, pooling="mean", num_classes=10)
    config.model.ckcnn_classifier = defaults.model_group("ckcnn_classifier", kernel_hidden=32)
    config = config
    return apply_arg(config, arg)
