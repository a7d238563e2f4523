"""configs/funnel_retrieval_small.py validates as shipped and trains from scratch through the Trainer;
a dense checkpoint's parameters evaluate in the funnel config unchanged (same tree)."""

import jax
import numpy as np
import pytest

from effitrans import funnel
from effitrans.config_validation import validate_config
from effitrans.train.trainer import Trainer
from tests.helpers import shipped_config


def test_funnel_config_validates_as_shipped():
    cfg = shipped_config("funnel_retrieval_small")
    validate_config(cfg)
    assert list(cfg.model.funnel.block_layers) == [2, 4] and sum(cfg.model.funnel.block_layers) == cfg.model.num_layers


def test_funnel_config_of_a_locked_config():
    # config_flags hands out locked configs (bench serve, sweeps); the funnel copy adds its key anyway and
    # leaves the dense config as it was.
    cfg = shipped_config("encoder_retrieval_small")
    cfg.lock()
    fcfg = funnel.funnel_config(cfg.model, at_layer=2, stride=2)
    assert (
        fcfg.name == "funnel_embedding"
        and list(fcfg.funnel.strides) == [2]
        and list(fcfg.funnel.block_layers) == [2, 4]
    )
    assert "funnel" not in cfg.model and cfg.model.name == "encoder_embedding"


@pytest.mark.slow
def test_funnel_config_trains_and_evaluates(tmp_path):
    cfg = shipped_config("funnel_retrieval_small")
    cfg.model.num_layers, cfg.model.d_model, cfg.model.ffn_width = 3, 64, 96
    cfg.model.attention.impl = "reference"
    cfg.model.funnel.block_layers = [1, 2]
    cfg.train.steps, cfg.train.batch_size, cfg.train.log_every = 2, 8, 1
    cfg.data.max_eval_examples = 24
    trainer = Trainer(cfg, str(tmp_path), peak_gflops=1.0, verbose=False)
    result = trainer.train()
    ev = result["eval"]
    assert ev["eval_examples"] == 24 and 0.0 <= ev["eval_recall_at_1"] <= 1.0 and 0.0 < ev["eval_mrr"] <= 1.0
    # The funnel's parameter tree is the dense encoder's: the dense model evaluates the same weights.
    dense = shipped_config("encoder_retrieval_small")
    dense.model = cfg.model.copy_and_resolve_references()
    dense.model.name = "encoder_embedding"
    del dense.model["funnel"]
    dense.data = cfg.data
    dense_trainer = Trainer(dense, str(tmp_path / "dense"), peak_gflops=1.0, verbose=False)
    assert jax.tree.structure(dense_trainer.abstract_state["params"]) == jax.tree.structure(result["state"]["params"])
    assert np.isfinite(dense_trainer.evaluate(result["state"]["params"])["eval_mrr"])
