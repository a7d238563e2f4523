"""listops_exits: configs/listops_small.py (a 4-layer encoder classifier on ListOps) with early exits after
layers 1, 2 and 3, each with its own zero-initialised adapter head, trained jointly with the last layer
(per-exit losses, distillation from the last layer, learned confidence classifiers). docs/cascades.md.

python -m effitrans.main --config=configs/listops_exits.py --workdir=/tmp/listops_exits

Argument: `--config=configs/listops_exits.py:key=value,...` sets dotted config keys (`train.steps=50`,
`model.attention.impl=xla`) before any --config.x override; effitrans.schema.apply_arg.
"""

import os

from effitrans import defaults
from effitrans.schema import apply_arg, load_config


def get_config(arg=None):
    config = load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), "listops_small.py"))
    config.model.exits = defaults.exits(layers=[1, 2, 3], head="own", distill_weight=0.5, measure="max_prob")
    config = config
    return apply_arg(config, arg)
