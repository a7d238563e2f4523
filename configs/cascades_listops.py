"""cascades_listops: the cascade study of experiments/cascades.py on ListOps (docs/cascades.md): a 1-layer
d=32 and a 4-layer d=64 encoder classifier, the large one with exits after layers 1, 2, 3; the sequential
cascade scored by the small model's max probability, thresholds chosen on the dev split for the large model's
accuracy - 0.5 point; both routers; every exit measure, LTT-calibrated (delta 0.02, epsilon 0.1).

python experiments/cascades.py --parts=listops --config=configs/cascades_listops.py --config.cascade.knn_k=16

Argument: `--config=configs/cascades_listops.py:key=value,...` sets dotted config keys
(`cascade.scorer=margin`) before any --config.x override; effitrans.schema.apply_arg.
"""

import ml_collections

from effitrans import defaults
from effitrans.schema import apply_arg


def get_config(arg=None):
    config = ml_collections.ConfigDict()
    config.cascade = defaults.cascade(stages=[[1, 32], [4, 64]], scorer="max_prob", quality_gap=0.005)
    return apply_arg(config, arg)
