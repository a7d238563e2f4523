"""The Autoformer forecaster: structure, row independence in evaluation, config relations, training."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from effitrans.config_validation import validate_config
from effitrans.registry import build_model
from effitrans.schema import ConfigError
from effitrans.train.tasks import forecast_task
from effitrans.train.trainer import Trainer
from tests.helpers import shipped_config


def _tiny(**autoformer):
    """configs/autoformer_synthetic.py shrunk: 48 -> 12 steps, width 16, one layer each side."""
    cfg = shipped_config("autoformer_synthetic")
    cfg.model.update(d_model=16, num_heads=2, num_kv_heads=2, head_dim=8, ffn_width=16)  # few distinct shapes
    cfg.model.autoformer.update(input_len=48, pred_len=12, label_len=24, moving_avg=13, encoder_layers=1)
    cfg.model.autoformer.update(autoformer)
    cfg.data.update(input_len=48, pred_len=12, length=600)
    cfg.train.update(batch_size=8, steps=60, warmup_steps=5, eval_every=1000, checkpoint_every=1000, log_every=60)
    return cfg


_forward = nnx.jit(lambda m, x, training: m(x, training=training), static_argnums=2)


@pytest.fixture(scope="module")
def model():
    return build_model(_tiny().model)  # built once: eager initialisation takes seconds on a loaded CPU


def test_forecast_shape_and_rows_independent_in_evaluation(model):
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 48, 1)).astype(np.float32))
    y = _forward(model, x, False)
    assert y.shape == (4, 12, 1) and bool(jnp.isfinite(y).all())
    alone = _forward(model, x[:1].repeat(4, 0), False)  # row 0 among copies of itself: same forecast
    np.testing.assert_allclose(np.asarray(alone[0]), np.asarray(y[0]), atol=1e-5)


def test_with_silent_layers_the_forecast_is_the_trend_start(model):
    """Zero the decoder's trend projections and the output head: every layer's contribution vanishes and the
    forecast is the decoder's trend start, the mean of the inputs over the horizon."""
    model = nnx.clone(model)
    for layer in model.decoder:
        layer.trend_proj[...] = jnp.zeros_like(layer.trend_proj[...])
    model.head[...] = jnp.zeros_like(model.head[...])
    x = jnp.asarray(np.random.default_rng(1).normal(size=(4, 48, 1)).astype(np.float32))  # the shape compiled above
    expected = jnp.broadcast_to(x.mean(1, keepdims=True), (4, 12, 1))
    np.testing.assert_allclose(np.asarray(_forward(model, x, False)), np.asarray(expected), atol=1e-5)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: c.model.autoformer.update(label_len=60), r"autoformer.label_len=60 must be <= .*input_len=48"),
        (lambda c: c.model.autoformer.update(moving_avg=12), r"autoformer.moving_avg=12 must be odd"),
        (lambda c: c.model.autoformer.update(factor=0.2), r"autoformer.factor=0.2 gives int\(factor \* ln\(48\)\) = 0"),
        (
            lambda c: c.model.autoformer.update(pred_len=24),
            r"autoformer.pred_len=24 does not match the data's pred_len=12",
        ),
        (lambda c: c.model.autoformer.update(num_series=2), r"autoformer.num_series=2 does not match .*num_series=1"),
        (lambda c: c.data.update(pred_len=0), r"config.data.pred_len=0 must be an int >= 1"),
        (lambda c: c.train.update(task="lm"), r"config.train.task='lm' does not fit config.model.name='autoformer'"),
        (lambda c: delattr(c.model, "autoformer"), r"config.model.autoformer is required"),
    ],
)
def test_bad_configs_name_the_key(change, message):
    cfg = _tiny()
    change(cfg)
    with pytest.raises(ConfigError, match=message):
        validate_config(cfg)


def test_forecast_task_scores_weighted_rows_and_trains_on_the_batch_delay_path():
    task = forecast_task()
    targets = np.arange(24, dtype=np.float32).reshape(2, 4, 3)
    forecast = targets + np.array([1.0, 3.0], np.float32)[:, None, None]  # row errors 1 and 3
    batch = {"targets": targets, "example_weights": np.array([1.0, 0.0], np.float32)}  # row 1 is padding
    s, w, m = task.loss(jnp.asarray(forecast), batch)
    assert (float(s), float(w), float(m["mae"])) == (1.0, 1.0, 1.0)
    calls = []
    model = lambda inputs, training: calls.append(training) or jnp.asarray(forecast)
    task.scored(model, {**batch, "inputs": None}, training=True)
    task.scored(model, {**batch, "inputs": None})
    assert calls == [True, False]


@pytest.mark.slow
def test_training_through_the_trainer_beats_the_untrained_forecast(tmp_path):
    trainer = Trainer(_tiny(), str(tmp_path), verbose=False, prefetch=False, peak_gflops=1.0)
    before = trainer.evaluate(trainer.init_state()["params"])
    result = trainer.train()
    after = result["eval"]
    assert set(after) == {"eval_loss", "eval_mse", "eval_mae", "eval_examples"}
    assert after["eval_examples"] == 600 - 480 - 12 + 1  # every test window once (test split: last 120 points)
    assert after["eval_mse"] < 0.75 * before["eval_mse"], (before, after)
    assert np.isfinite(after["eval_mae"]) and after["eval_mae"] < before["eval_mae"]
    jax.clear_caches()
