"""DLinear and the seasonal-naive forecast: definitions, and DLinear trained through the Trainer."""

import jax.numpy as jnp
import numpy as np
import pytest

from effitrans.data import build_dataset
from effitrans.data.timeseries import ForecastDataset
from effitrans.models.forecast_baselines import seasonal_naive
from effitrans.registry import build_model
from effitrans.train.tasks import forecast_scores
from effitrans.train.trainer import Trainer
from tests.helpers import shipped_config


def _dlinear_config(**dlinear):
    cfg = shipped_config("dlinear_synthetic")
    cfg.model.dlinear.update(input_len=48, pred_len=12, moving_avg=13, **dlinear)
    cfg.data.update(input_len=48, pred_len=12, length=600)
    cfg.train.update(batch_size=16, steps=40, warmup_steps=2, eval_every=1000, checkpoint_every=1000, log_every=40)
    return cfg


@pytest.mark.parametrize("individual", [False, True])
def test_dlinear_is_two_linear_maps_over_the_decomposed_series(individual):
    channels = 2 if individual else 1
    model = build_model(_dlinear_config(individual=individual, num_series=channels).model)
    x = np.random.default_rng(0).normal(size=(3, 48, channels)).astype(np.float32)
    np.testing.assert_allclose(
        np.asarray(model(jnp.asarray(x))), np.broadcast_to(x.mean(1, keepdims=True), (3, 12, x.shape[2])), atol=1e-5
    )  # init: the input mean
    rng = np.random.default_rng(1)
    for name in ("w_seasonal", "b_seasonal", "w_trend", "b_trend"):
        getattr(model, name)[...] = jnp.asarray(rng.normal(size=getattr(model, name).shape).astype(np.float32))
    pad = np.concatenate([np.repeat(x[:, :1], 6, 1), x, np.repeat(x[:, -1:], 6, 1)], 1)
    trend = np.stack([pad[:, t : t + 13].mean(1) for t in range(48)], 1)  # [B, L, C]
    w = {n: np.asarray(getattr(model, n)[...]) for n in ("w_seasonal", "b_seasonal", "w_trend", "b_trend")}
    if individual:
        lin = lambda z, wk, bk: np.einsum("blc,clh->bhc", z, w[wk]) + w[bk].T
    else:
        lin = lambda z, wk, bk: np.einsum("blc,lh->bhc", z, w[wk]) + w[bk][:, None]
    expected = lin(x - trend, "w_seasonal", "b_seasonal") + lin(trend, "w_trend", "b_trend")
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(x))), expected, atol=1e-4)


def test_seasonal_naive_repeats_the_last_season():
    x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 30, 3)).astype(np.float32))
    out = np.asarray(seasonal_naive(x, 7, 16))
    for h in range(16):
        np.testing.assert_array_equal(out[:, h], np.asarray(x)[:, 30 - 7 + h % 7])
    np.testing.assert_array_equal(np.asarray(seasonal_naive(x, 1, 4)), np.repeat(np.asarray(x)[:, -1:], 4, 1))
    with pytest.raises(ValueError, match=r"period=31 must be an int in \[1, input_len=30\]"):
        seasonal_naive(x, 31, 4)
    t = np.arange(400, dtype=np.float32)
    periodic = ForecastDataset(np.sin(2 * np.pi * t / 24), input_len=48, pred_len=30, global_batch_size=8, seed=0)
    scores = forecast_scores(lambda inputs: seasonal_naive(inputs, 24, 30), periodic)
    assert scores["examples"] == periodic.num_eval_rows and scores["mse"] < 1e-8  # exact on a periodic series


@pytest.mark.slow  # ~10 s on a loaded 2-core machine (train and eval steps compile)
def test_dlinear_trains_through_the_trainer_and_beats_seasonal_naive(tmp_path):
    cfg = _dlinear_config()
    trainer = Trainer(cfg, str(tmp_path), verbose=False, prefetch=False, peak_gflops=1.0)
    before = trainer.evaluate(trainer.init_state()["params"])
    after = trainer.train()["eval"]
    assert set(after) == {"eval_loss", "eval_mse", "eval_mae", "eval_examples"}
    assert after["eval_examples"] == 120 - 12 + 1  # every window of the 120-point test split once
    naive = forecast_scores(lambda x: seasonal_naive(x, 24, 12), build_dataset(cfg.data, global_batch_size=16, seed=0))
    assert naive["examples"] == after["eval_examples"]
    assert after["eval_mse"] < 0.5 * before["eval_mse"] and after["eval_mse"] < naive["mse"], (before, after, naive)
