"""moe_lm_tiny: configs/lm_tiny.py with a mixture-of-experts feed-forward in its second layer (the first stays
dense, as in DeepSeek-V3): 8 experts of width 96, top-2 routing plus one shared expert, so a token uses
3 x 96 = 288 expert neurons (lm_tiny's dense layer has 384). Sigmoid gating with normalised top-k weights,
dropless dispatch, the Switch aux loss and the aux-loss-free selection bias. docs/moe.md.

python -m effitrans.main --config=configs/moe_lm_tiny.py --workdir=/tmp/moe_lm_tiny

Argument: `--config=configs/moe_lm_tiny.py:key=value,...` sets dotted config keys (`train.steps=50`,
`model.attention.impl=xla`) before any --config.x override; effitrans.schema.apply_arg.
"""

import os

from effitrans import defaults
from effitrans.schema import apply_arg, load_config


def get_config(arg=None):
    config = load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), "lm_tiny.py"))
    config.model.moe = defaults.moe(
        layers=[1],  # layer 0 keeps its dense GLU
        num_experts=8,
        expert_width=96,
        top_k=2,
        num_shared_experts=1,
        gating="sigmoid",
        dispatch="dropless",
        aux_loss_weight=0.01,
        bias_update_rate=1e-3,
    )
    config.train.log_every = 10
    return apply_arg(config, arg)
