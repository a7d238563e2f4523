"""lm_tiny: a 2-layer byte-level Llama-style LM on the CPython docs; trains in about a minute on 2 CPU cores.

python -m effitrans.main --config=configs/lm_tiny.py --workdir=/tmp/lm_tiny

Argument: `--config=configs/lm_tiny.py:key=value,...` sets dotted config keys (`train.steps=50`,
`model.attention.impl=xla`) before any --config.x override; effitrans.schema.apply_arg.
"""

from effitrans import defaults  # every group's declared keys at their defaults
from effitrans.schema import apply_arg


def get_config(arg=None):
    data = defaults.data(
        "text_lm",
        seq_len=128,  # bytes per training window
        max_eval_batches=8,  # cap the held-out pass (eval_batch_size x 8 windows)
    )
    config = defaults.experiment(
        defaults.model(d_model=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32, ffn_width=384),
        data,
        defaults.train(
            steps=200,
            batch_size=16,
            learning_rate=3e-3,
            warmup_steps=20,
            checkpoint_every=50,
            eval_every=100,
            log_every=20,
        ),
        defaults.mesh(),
    )
    return apply_arg(config, arg)
