"""listops_exits: configs/listops_small.py (a 4-layer encoder classifier on ListOps) with early exits after
layers 1, 2 and 3, each with its own zero-initialised adapter head, trained jointly with the last layer
(per-exit losses, distillation from the last layer, learned confidence classifiers). docs/cascades.md.

python -m effitrans.main --config=configs/listops_exits.py --workdir=/tmp/listops_exits
"""

import os

from effitrans import defaults
from effitrans.schema import load_config


def get_config(arg=None):
    del arg
    config = load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), "listops_small.py"))
    config.model.exits = defaults.exits(layers=[1, 2, 3], head="own", distill_weight=0.5, measure="max_prob")
    return config
