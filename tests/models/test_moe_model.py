"""config.model.moe: which layers get an MoE feed-forward, the errors of bad MoE configs, the FLOP model's
active parameters, and training through the one Trainer (aux loss, router metrics, the committed bias)."""

import jax
import numpy as np
import pytest
from flax import nnx

from effitrans import defaults, perf
from effitrans.layers import GLUFeedForward
from effitrans.layers.moe import MoEFeedForward
from effitrans.registry import build_model, validate_model_config
from effitrans.schema import ConfigError
from effitrans.train.trainer import Trainer
from tests.helpers import shipped_config, tiny_lm_experiment, tiny_model_config


def _moe_cfg(**moe):
    cfg = tiny_model_config(num_layers=3)
    cfg.moe = defaults.moe(**{"num_experts": 4, "expert_width": 8, "top_k": 2, **moe})
    return cfg


def test_moe_layers_replace_the_dense_feed_forward_where_named():
    build = lambda cfg: nnx.eval_shape(lambda: build_model(cfg))  # shapes only (the forward: the train test)
    model = build(_moe_cfg(layers=[1, 2], num_shared_experts=1))
    kinds = [type(b.ffn) for b in model.blocks]
    assert kinds == [GLUFeedForward, MoEFeedForward, MoEFeedForward]
    assert model.blocks[1].ffn.gate.shape == (4, 32, 8) and model.blocks[1].ffn.shared.width == 8
    assert all(isinstance(b.ffn, MoEFeedForward) for b in build(_moe_cfg()).blocks)  # layers None: all


@pytest.mark.parametrize(
    "moe, match",
    [
        ({"layers": [0, 3]}, r"config\.model\.moe\.layers=\[0, 3\] names layer 3, but config\.model\.num_layers=3: "
         r"allowed layer indices are 0\.\.2"),
        ({"top_k": 5}, r"config\.model\.moe\.top_k=5 is not allowed: expected an int in \[1, num_experts=4\]"),
        ({"num_experts": 0}, r"config\.model\.moe\.num_experts=0 is not allowed: expected an int >= 1"),
        ({"capacity_factor": 0.0}, r"moe\.capacity_factor=0\.0 is not allowed: expected a finite number > 0"),
        ({"layers": [1, 1]}, r"config\.model\.moe\.layers=\[1, 1\] names a layer twice; expected distinct"),
        ({"layers": [-1]}, r"moe\.layers=\[-1\] is not allowed: expected None \(every layer\) or a list"),
    ],
)  # fmt: skip
def test_bad_moe_configs_name_the_key_the_value_and_what_is_allowed(moe, match):
    with pytest.raises(ConfigError, match=match):
        validate_model_config(_moe_cfg(**moe))


def test_flop_model_counts_the_active_experts_and_the_router():
    dense = tiny_model_config(num_layers=3, ffn_width=24)
    moe = _moe_cfg(layers=[1], expert_width=8, top_k=2, num_shared_experts=1)  # 3 x 8 = 24 active neurons
    moe.ffn_width = 24
    router = 2 * 4 * 16 * 32 * 4  # 2 x batch x length x D x E, in layer 1 only
    assert perf.forward_flops(moe, 4, 16) == perf.forward_flops(dense, 4, 16) + router


@pytest.mark.parametrize(
    "moe, dense", [("moe_lm_small", "lm_small"), ("moe_encoder_retrieval_small", "encoder_retrieval_small")]
)
def test_shipped_moe_configs_have_the_active_parameters_of_their_dense_twin(moe, dense):
    """Equal forward FLOPs per token but the router's: the same active feed-forward parameters."""
    moe_cfg, dense_cfg = shipped_config(moe).model, shipped_config(dense).model
    moe_layers = len(moe_cfg.moe.layers)
    router = 2 * moe_cfg.d_model * moe_cfg.moe.num_experts * moe_layers  # per token
    assert perf.forward_flops(moe_cfg, 1, 64) == perf.forward_flops(dense_cfg, 1, 64) + 64 * router
    assert router * 64 < 0.005 * perf.forward_flops(dense_cfg, 1, 64)  # the router: < 0.5% of the work


def test_dense_twin_has_equal_active_parameters_and_no_router():
    """bench train's baseline for an MoE config: dense GLUs of the width a token uses, nothing else changed."""
    from effitrans.bench.train import dense_twin

    config = shipped_config("moe_lm_small")
    twin = dense_twin(config)
    assert "moe" not in twin.model and "moe" in config.model
    assert list(twin.model.ffn_width) == [1536, 1536, 1536, 1536]  # layer 0 dense; (3 + 1) x 384 in 1..3
    router = 2 * 512 * 16 * 3  # per token, in the three MoE layers
    assert perf.forward_flops(config.model, 1, 8) == perf.forward_flops(twin.model, 1, 8) + 8 * router
    validate_model_config(twin.model)


@pytest.mark.slow  # ~20-45 s on 2 loaded cores (three XLA compiles); the jitted step in tests/layers/test_moe.py
# is its fast representative (reports popped, bias committed), and test_configs validates configs/moe_lm_tiny.py
def test_moe_lm_trains_with_aux_loss_router_metrics_and_the_committed_bias(tmp_path):
    cfg = tiny_lm_experiment(steps=1, grad_accum_steps=2)  # micro-batches: reports summed through the scan
    cfg.model.moe = defaults.moe(num_experts=4, expert_width=32, top_k=2, gating="sigmoid", bias_update_rate=0.01)
    trainer = Trainer(cfg, str(tmp_path), peak_gflops=1.0, verbose=False)
    result = trainer.train()
    row = result["history"][-1]
    for key in ("moe_aux_loss", "moe_weighted_aux_loss", "moe_load_max_over_mean", "moe_router_entropy"):
        assert np.isfinite(row[key]), key
    assert row["moe_dropped_share"] == 0.0  # dropless
    assert row["moe_weighted_aux_loss"] == pytest.approx(0.01 * row["moe_aux_loss"], rel=1e-4)
    assert row["moe_load_max_over_mean"] >= 1.0
    bias = jax.device_get(result["state"]["model_state"]["stack"]["blocks"][0]["ffn"]["selection_bias"])
    assert np.abs(bias).max() == pytest.approx(0.01)  # one committed bias step (the last micro-batch's)
    assert np.isfinite(result["eval"]["eval_loss"])
