"""moe_encoder_retrieval_small: configs/encoder_retrieval_small.py with the same *active* feed-forward
parameters per token in a mixture of experts. Layer 0 keeps its dense GLU (512 wide); layers 1-5 hold 8 routed
experts of width 128, top-3 plus one shared expert: 4 x 128 = 512 active neurons per token, the dense width,
and 2.25x its feed-forward parameters in total (router: 192 x 8 per MoE layer). Padding tokens route nowhere.
Sigmoid gating, dropless dispatch, the Switch aux loss (0.01) and the aux-loss-free selection bias. Funnel
variants take the usual keys, e.g. --config.model.funnel... (docs/funnel.md). docs/moe.md.

python -m effitrans.main --config=configs/moe_encoder_retrieval_small.py --workdir=/tmp/moe_retrieval

Argument: `--config=configs/moe_encoder_retrieval_small.py:key=value,...` sets dotted config keys (`train.steps=50`,
`model.moe.top_k=2`) before any --config.x override; effitrans.schema.apply_arg.
"""

import os

from effitrans import defaults
from effitrans.schema import apply_arg, load_config


def get_config(arg=None):
    config = load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), "encoder_retrieval_small.py"))
    config.model.moe = defaults.moe(
        layers=[1, 2, 3, 4, 5],
        num_experts=8,
        expert_width=128,
        top_k=3,
        num_shared_experts=1,
        gating="sigmoid",
        dispatch="dropless",
        aux_loss_weight=0.01,
        bias_update_rate=1e-3,
    )
    return apply_arg(config, arg)
