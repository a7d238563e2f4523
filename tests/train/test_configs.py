"""Every shipped config validates, builds, takes training steps and evaluates (shrunk to test size)."""

import os

import numpy as np
import pytest

from effitrans.config_validation import validate_config
from effitrans.schema import ConfigError, load_config
from effitrans.train.trainer import Trainer
from tests.helpers import ROOT, shipped_config

CONFIGS = [
    "lm_tiny",
    "lm_small",
    "lm_gpu",
    "encoder_retrieval_small",
    "listops_small",
    "autoformer_synthetic",
    "dlinear_synthetic",
    "moe_lm_tiny",
    "moe_lm_small",
    "moe_encoder_retrieval_small",
    "transformer_forecaster_synthetic",
    "ckcnn_synthetic",
    "cnn_synthetic",
    "ckcnn_listops",
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


@pytest.mark.parametrize("name", [*CONFIGS, "funnel_retrieval_small"])
def test_every_config_applies_its_key_value_argument(name):
    cfg = load_config(os.path.join(ROOT, "configs", f"{name}.py:train.steps=7,train.seed=3"))
    assert cfg.train.steps == 7 and cfg.train.seed == 3
    with pytest.raises(ConfigError, match=r"train.stepz=7: train.stepz is not a key of this config"):
        load_config(os.path.join(ROOT, "configs", f"{name}.py"), "train.stepz=7")
    with pytest.raises(ConfigError, match=r"config argument train.steps=many: train.steps holds int"):
        load_config(os.path.join(ROOT, "configs", f"{name}.py"), "train.steps=many")


def test_funnel_config_shorthands_and_list_values():
    path = os.path.join(ROOT, "configs", "funnel_retrieval_small.py")
    cfg = load_config(path, "layer=2,stride=4")
    assert list(cfg.model.funnel.block_layers) == [2, 4] and list(cfg.model.funnel.strides) == [4]
    cfg = load_config(path, "model.funnel.block_layers=[1,5], model.attention.impl=xla")
    assert list(cfg.model.funnel.block_layers) == [1, 5] and cfg.model.attention.impl == "xla"
    validate_config(cfg)
    for arg, message in [
        ("layer=6", r"layer=6: allowed an int in \[1, 5\]"),
        ("stride=0", r"stride=0: allowed an int >= 1"),
        ("model=1", r"model=1: model is a group"),
        ("layer", r"'layer' is not key=value"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config(path, arg)
