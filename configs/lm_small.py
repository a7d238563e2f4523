"""lm_small: a 4-layer, d_model 512 byte-level LM at sequence 512 (the MFU benchmark's model).

python -m effitrans.bench train --config=configs/lm_small.py

Argument: `--config=configs/lm_small.py:key=value,...` sets dotted config keys (`train.steps=50`,
`model.attention.impl=xla`) before any --config.x override; effitrans.schema.apply_arg.
"""

from effitrans import defaults
from effitrans.schema import apply_arg


def get_config(arg=None):
    config = defaults.experiment(
        defaults.model(d_model=512, num_layers=4, num_heads=8, num_kv_heads=8, head_dim=64, ffn_width=1536),
        defaults.data("text_lm", seq_len=512, max_eval_batches=16),
        defaults.train(
            steps=600,
            batch_size=8,
            learning_rate=1e-3,
            warmup_steps=60,
            checkpoint_every=50,
            eval_every=200,
            log_every=5,
        ),
        defaults.mesh(),
    )
    return apply_arg(config, arg)
