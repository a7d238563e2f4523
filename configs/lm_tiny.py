"""lm_tiny: a 2-layer byte-level Llama-style LM on the CPython docs; trains in about a minute on 2 CPU cores.

python -m effitrans.main --config=configs/lm_tiny.py --workdir=/tmp/lm_tiny
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import common  # noqa: E402  (configs/common.py: the shared, documented defaults)
import ml_collections  # noqa: E402


def get_config(arg=None):
    del arg
    data = ml_collections.ConfigDict()
    data.name = "text_lm"
    data.seq_len = 128  # bytes per training window
    data.corpus_path = ml_collections.FieldReference(None, field_type=str)  # None: CPython docs, else pydoc topics
    data.val_fraction = 0.05  # share of documents held out (split by document)
    data.max_eval_batches = 8  # cap the held-out pass (eval_batch_size x 8 windows)
    data.eval_batch_size = ml_collections.FieldReference(None, field_type=int)  # None: train.batch_size
    return common.experiment(
        common.model(d_model=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32, ffn_width=384),
        data,
        common.train(
            steps=200,
            batch_size=16,
            learning_rate=3e-3,
            warmup_steps=20,
            checkpoint_every=50,
            eval_every=100,
            log_every=20,
        ),
        common.mesh(),
    )
