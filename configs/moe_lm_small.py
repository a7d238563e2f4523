"""moe_lm_small: configs/lm_small.py with the same *active* feed-forward parameters per token in a mixture of
experts. Layer 0 keeps its dense GLU (1536 wide, as in DeepSeek-V3's dense first layers); layers 1-3 hold 16
routed experts of width 384, top-3 plus one shared expert: 4 x 384 = 1536 active neurons per token, lm_small's
width, and 4x its feed-forward parameters in total. The router adds 512 x 16 weights per MoE layer (0.1% of
the layer). Sigmoid gating with normalised top-k weights, dropless dispatch, the Switch aux loss (0.01) and the
aux-loss-free selection bias. docs/moe.md.

python -m effitrans.main --config=configs/moe_lm_small.py --workdir=/tmp/moe_lm_small

Argument: `--config=configs/moe_lm_small.py:key=value,...` sets dotted config keys (`train.steps=50`,
`model.moe.top_k=2`) before any --config.x override; effitrans.schema.apply_arg.
"""

import os

from effitrans import defaults
from effitrans.schema import apply_arg, load_config


def get_config(arg=None):
    config = load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), "lm_small.py"))
    config.model.moe = defaults.moe(
        layers=[1, 2, 3],
        num_experts=16,
        expert_width=384,
        top_k=3,
        num_shared_experts=1,
        gating="sigmoid",
        dispatch="dropless",
        aux_loss_weight=0.01,
        bias_update_rate=1e-3,
    )
    return apply_arg(config, arg)
