"""The Transformer, CKCNN and CNN forecasters and the CKCNN classifier: the canvas, shapes, row independence,
time-unit kernels, config relations; one short training run each (slow)."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from effitrans.defaults import model_group
from effitrans.layers.ckconv import CKConv, kernel_positions
from effitrans.models.forecasters import forecast_canvas
from effitrans.registry import build_model
from effitrans.schema import ConfigError
from effitrans.train.trainer import Trainer
from tests.helpers import shipped_config

_SHAPES = dict(input_len=24, pred_len=8, num_series=2)


def _tiny(name: str):
    """configs/<name>_synthetic.py shrunk to 24 -> 8 steps of 2 channels, width 16."""
    cfg = shipped_config(f"{name}_synthetic")
    cfg.model.update(d_model=16, num_layers=1, num_heads=2, num_kv_heads=2, head_dim=8, ffn_width=16)
    cfg.model[name].update(_SHAPES)
    if name == "ckcnn":
        cfg.model.ckcnn.kernel_hidden = 8
    cfg.data.update(input_len=24, pred_len=8, num_series=2, length=400)
    cfg.train.update(batch_size=8, steps=40, warmup_steps=4, eval_every=1000, checkpoint_every=1000, log_every=40)
    return cfg


def test_canvas_is_the_centred_window_then_zeros_with_an_observed_flag():
    x = jnp.arange(12.0).reshape(1, 6, 2)
    canvas, mean = forecast_canvas(x, 3)
    assert canvas.shape == (1, 9, 3) and mean.shape == (1, 1, 2)
    np.testing.assert_allclose(np.asarray(canvas[0, :6, :2] + mean[0]), np.asarray(x[0]))
    np.testing.assert_array_equal(np.asarray(canvas[0, 6:, :2]), 0.0)
    np.testing.assert_array_equal(np.asarray(canvas[0, :, 2]), [1, 1, 1, 1, 1, 1, 0, 0, 0])


@pytest.mark.slow  # eager initialisation and two compiles: ~10-20 s on a loaded 2-core machine
@pytest.mark.parametrize("name", ["transformer_forecaster", "cnn"])
def test_forecast_shape_rows_independent_and_bad_shapes(name):
    model = build_model(_tiny(name).model)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 24, 2)).astype(np.float32))
    run = nnx.jit(lambda m, x: m(x))
    y = run(model, x)
    assert y.shape == (3, 8, 2) and bool(jnp.isfinite(y).all())
    np.testing.assert_allclose(np.asarray(run(model, x[:1].repeat(3, 0))[0]), np.asarray(y[0]), atol=1e-5)
    with pytest.raises(ValueError, match=r"inputs shape \(3, 20, 2\) does not match input_len=24"):
        model(x[:, :20])
    with pytest.raises(ValueError, match=r"pred_len=0 must be an int >= 1"):
        model.forecast(x, 0)


def test_kernel_positions_are_time_offsets_over_the_span():
    np.testing.assert_allclose(
        np.asarray(kernel_positions(3, causal=False, spacing=0.5, span=4.0)), np.arange(-2, 3) / 8
    )
    np.testing.assert_allclose(np.asarray(kernel_positions(3, causal=True, spacing=2.0, span=8.0)), [1.0, 0.5, 0.0])
    np.testing.assert_allclose(np.asarray(kernel_positions(5, causal=True)), [1.0, 0.5, 0.0, -0.5, -1.0])
    with pytest.raises(ValueError, match=r"span=-1.0 must be > 0"):
        kernel_positions(4, causal=True, span=-1.0)


@pytest.mark.slow  # eager kernel-net initialisation and two FFT shapes: ~15 s on a loaded 2-core machine
def test_time_unit_kernel_reads_any_sampling_rate():
    """A CKConv with a span in time units: a smooth signal sampled at spacing 1 and at spacing 1/2 gives the
    same output at the shared times (up to the Riemann sum's error)."""
    layer = CKConv(1, 2, 8, causal=False, omega_0=3.0, span=64.0, rngs=nnx.Rngs(0))
    coarse_t, fine_t = np.arange(64.0), np.arange(128.0) / 2
    signal = lambda t: np.sin(2 * np.pi * t / 32)[None, :, None].astype(np.float32)
    coarse = layer(jnp.asarray(signal(coarse_t)), 1.0)
    fine = layer(jnp.asarray(signal(fine_t)), 0.5)
    assert coarse.shape == (1, 64, 2) and fine.shape == (1, 128, 2)
    err = float(jnp.abs(fine[:, ::2] - coarse).max() / jnp.abs(coarse).max())
    assert err < 0.05, err
    with pytest.raises(ValueError, match=r"spacing=0.5 needs a CKConv built with span"):
        CKConv(1, 1, 4, causal=True, rngs=nnx.Rngs(0))(jnp.zeros((1, 8, 1)), 0.5)


@pytest.mark.parametrize(
    ("name", "change", "message"),
    [
        ("cnn", lambda c: c.model.cnn.update(kernel_size=4), r"cnn.kernel_size=4 must be odd"),
        ("ckcnn", lambda c: setattr(c.model, "cnn", model_group("cnn")), r"model.cnn is set but .*name='ckcnn'"),
    ],
)
def test_config_relations(name, change, message):
    cfg = _tiny(name)
    change(cfg)
    with pytest.raises(ConfigError, match=message):
        build_model(cfg.model)


@pytest.mark.slow  # builds and trains three models: ~25 s on 2 cores
@pytest.mark.parametrize("name", ["transformer_forecaster", "ckcnn", "cnn"])
def test_forecasters_train_below_the_mean_forecast(name, tmp_path):
    """40 steps on the synthetic series: the held-out MSE falls below 1 (the window-mean forecast's scale)."""
    result = Trainer(_tiny(name), str(tmp_path), peak_gflops=1.0, verbose=False).train()
    assert result["eval"]["eval_mse"] < 0.8, result["eval"]


@pytest.mark.slow  # eager initialisation: ~10 s on a loaded 2-core machine
def test_ckcnn_classifier_logits_ignore_padding():
    cfg = shipped_config("ckcnn_listops")
    cfg.model.update(d_model=16, num_layers=1, vocab_size=20)
    cfg.model.ckcnn_classifier.kernel_hidden = 8
    model = build_model(cfg.model)
    tokens = jnp.asarray(np.random.default_rng(0).integers(1, 20, size=(2, 16)))
    mask = jnp.asarray(np.arange(16)[None] < np.array([[10], [16]]))
    logits = model(tokens, mask)
    assert logits.shape == (2, 10) and logits.dtype == jnp.float32
    repadded = model(tokens.at[0, 10:].set(7), mask)  # other tokens in row 0's padding
    np.testing.assert_allclose(np.asarray(repadded), np.asarray(logits), atol=1e-5)
