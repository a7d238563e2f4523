"""Every shipped config validates, builds, takes training steps and evaluates (shrunk to test size)."""

import numpy as np
import pytest

from effitrans.config_validation import validate_config
from effitrans.train.trainer import Trainer
from tests.helpers import shipped_config

CONFIGS = [
    "lm_tiny",
    "lm_small",
    "encoder_retrieval_small",
    "listops_small",
    "autoformer_synthetic",
    "dlinear_synthetic",
    "moe_lm_tiny",
    "listops_exits",
]


@pytest.mark.parametrize("name", CONFIGS)
def test_config_validates_as_shipped(name):
    validate_config(shipped_config(name))


@pytest.mark.slow  # >= 8 s on 2 cores: CI runs it (keeps the default run under 10 min)
@pytest.mark.parametrize("name", ["encoder_retrieval_small", "listops_small"])
def test_encoder_configs_train_and_evaluate(name, tmp_path):
    cfg = shipped_config(name)
    cfg.model.num_layers, cfg.model.d_model, cfg.model.ffn_width = 1, 64, 96
    cfg.train.steps, cfg.train.batch_size, cfg.train.log_every = 2, 8, 1
    if name == "listops_small":
        cfg.data.seq_len, cfg.data.min_len, cfg.data.max_len, cfg.data.num_eval_examples = 64, 10, 60, 16
    else:
        cfg.data.max_eval_examples = 24
    trainer = Trainer(cfg, str(tmp_path), peak_gflops=1.0, verbose=False)
    result = trainer.train()
    ev = result["eval"]
    if name == "listops_small":
        assert ev["eval_examples"] == 16 and 0.0 <= ev["eval_accuracy"] <= 1.0
        assert np.isfinite(ev["eval_loss"])
    else:
        assert ev["eval_examples"] == 24
        assert 0.0 <= ev["eval_recall_at_1"] <= 1.0 and 0.0 < ev["eval_mrr"] <= 1.0
