"""funnel_retrieval_small: encoder_retrieval_small with a funnel at one third of its depth, trained from
scratch. Same parameters as the dense model (a checkpoint of either loads into the other), so the same
funnel is also reachable by surgery on a trained encoder_retrieval_small (effitrans.funnel.insert).

    python -m effitrans.main --config=configs/funnel_retrieval_small.py --workdir=DIR
    ... --config.model.funnel.block_layers=[3,3] --config.model.funnel.strides=[4]
"""

import os

from effitrans import defaults
from effitrans.schema import load_config


def get_config(arg=None):
    del arg
    # data, train and mesh as the dense model
    config = load_config(os.path.join(os.path.dirname(__file__), "encoder_retrieval_small.py"))
    config.model.name = "funnel_embedding"  # the funnel version of encoder_embedding
    # 6 layers: 2 at full length (64 bytes), then 4 on the pooled sequence (CLS + 32 windows of 2 bytes).
    config.model.funnel = defaults.funnel(block_layers=[2, 4], strides=[2])
    return config
