"""lm_small: a 4-layer, d_model 512 byte-level LM at sequence 512 (the MFU benchmark's model).

python -m effitrans.bench train --config=configs/lm_small.py
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import common  # noqa: E402
import ml_collections  # noqa: E402


def get_config(arg=None):
    del arg
    data = ml_collections.ConfigDict()
    data.name = "text_lm"
    data.seq_len = 512
    data.corpus_path = ml_collections.FieldReference(None, field_type=str)
    data.val_fraction = 0.05
    data.max_eval_batches = 16
    data.eval_batch_size = ml_collections.FieldReference(None, field_type=int)
    return common.experiment(
        common.model(d_model=512, num_layers=4, num_heads=8, num_kv_heads=8, head_dim=64, ffn_width=1536),
        data,
        common.train(
            steps=600,
            batch_size=8,
            learning_rate=1e-3,
            warmup_steps=60,
            checkpoint_every=50,
            eval_every=200,
            log_every=5,
        ),
        common.mesh(),
    )
