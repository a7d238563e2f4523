"""The forecasting pipeline: window layout, chronological splits, train-only normalisation, bad inputs."""

import sys

import numpy as np
import pytest

from effitrans.data import build_dataset, data_defaults
from effitrans.data.timeseries import (
    ForecastDataset,
    load_statsmodels_series,
    split_bounds,
    synthetic_series,
)
from effitrans.schema import ConfigError


def _ramp(length=400, channels=2):
    """values[t, c] = t + 1000 c: a window's raw values say where they came from."""
    return np.arange(length, dtype=np.float32)[:, None] + 1000.0 * np.arange(channels, dtype=np.float32)[None, :]


def _dataset(values, **kw):
    args = dict(input_len=24, pred_len=8, global_batch_size=8, seed=0)
    return ForecastDataset(values, **{**args, **kw})


def _raw(ds, x):
    return x * ds.std + ds.mean  # back to the series' own units


def test_windows_are_contiguous_and_normalised_by_the_training_part():
    ds = _dataset(_ramp())
    lo, hi = ds.bounds["train"]
    train = _ramp()[lo:hi]
    np.testing.assert_allclose(ds.mean, train.mean(0), rtol=1e-6)
    np.testing.assert_allclose(ds.std, train.std(0), rtol=1e-6)
    b = ds.get_batch(5)
    assert b["inputs"].shape == (8, 24, 2) and b["targets"].shape == (8, 8, 2) and b["inputs"].dtype == np.float32
    raw = np.concatenate([_raw(ds, b["inputs"]), _raw(ds, b["targets"])], axis=1)  # [8, 32, 2]
    np.testing.assert_allclose(np.diff(raw[:, :, 0], axis=1), 1.0, atol=1e-3)  # consecutive time steps
    np.testing.assert_allclose(raw[:, :, 1] - raw[:, :, 0], 1000.0, atol=1e-3)  # channels stay aligned


def test_no_future_value_reaches_normalisation_or_training_batches():
    values = _ramp()
    ds = _dataset(values)
    train_end = ds.bounds["train"][1]
    changed = values.copy()
    changed[train_end:] = np.random.default_rng(0).normal(1e6, 1e5, changed[train_end:].shape)
    other = _dataset(changed)
    np.testing.assert_array_equal(ds.mean, other.mean)
    np.testing.assert_array_equal(ds.std, other.std)
    for step in range(20):
        a, b = ds.get_batch(step), other.get_batch(step)
        np.testing.assert_array_equal(a["inputs"], b["inputs"])
        np.testing.assert_array_equal(a["targets"], b["targets"])
        assert _raw(ds, a["targets"])[..., 0].max() < train_end - 0.5  # the last training value is train_end - 1


def test_eval_windows_cover_the_split_once_with_targets_inside_it():
    for split in ("val", "test"):
        ds = _dataset(_ramp(), eval_split=split, eval_batch_size=16)
        start, end = ds.bounds[split]
        batches = list(ds.eval_batches())
        weights = np.concatenate([b["example_weights"] for b in batches])
        targets = np.concatenate([b["targets"] for b in batches])[weights > 0]
        inputs = np.concatenate([b["inputs"] for b in batches])[weights > 0]
        assert targets.shape[0] == end - start - 8 + 1 == ds.num_eval_rows
        first_target = np.rint(_raw(ds, targets[:, 0])[:, 0]).astype(int)
        np.testing.assert_array_equal(first_target, np.arange(start, end - 8 + 1))  # every window once, in order
        np.testing.assert_allclose(_raw(ds, inputs[:, -1])[:, 0], first_target - 1, atol=1e-3)  # inputs end before
        assert weights.shape[0] % 16 == 0 and (weights[targets.shape[0] :] == 0).all()


def test_batches_are_pure_in_seed_and_step_and_split_over_processes():
    ds = _dataset(_ramp())
    np.testing.assert_array_equal(ds.get_batch(3)["inputs"], _dataset(_ramp()).get_batch(3)["inputs"])
    assert not np.array_equal(ds.get_batch(3)["inputs"], ds.get_batch(4)["inputs"])
    parts = [ds.get_batch(3, process_index=p, process_count=4)["inputs"] for p in range(4)]
    np.testing.assert_array_equal(np.concatenate(parts), ds.get_batch(3)["inputs"])


def test_split_bounds_are_chronological_and_cover_the_series():
    b = split_bounds(2284, 0.1, 0.2)
    assert b["train"][0] == 0 and b["train"][1] == b["val"][0] and b["val"][1] == b["test"][0] and b["test"][1] == 2284
    assert b["test"][1] - b["test"][0] == 457
    with pytest.raises(ValueError, match=r"val_fraction=0.5 \+ test_fraction=0.5 must be < 1"):
        split_bounds(100, 0.5, 0.5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"pred_len": 0}, r"pred_len must be >= 1, got 0"),
        ({"pred_len": -3}, r"pred_len must be >= 1, got -3"),
        ({"input_len": 0}, r"input_len must be >= 1, got 0"),
        (
            {"input_len": 270, "pred_len": 20},
            r"input_len=270 \+ pred_len=20 = 290 .*allowed: input_len \+ pred_len <= 280",
        ),
        (
            {"input_len": 8, "pred_len": 50},
            r"pred_len=50 is longer than the val part \(40 points\); allowed: 1 <= pred_len <= 40",
        ),
        ({"eval_split": "train"}, r"eval_split='train' is not one of"),
    ],
)
def test_bad_lengths_name_the_value_and_the_allowed_range(kwargs, message):
    with pytest.raises(ValueError, match=message):
        _dataset(_ramp(), **kwargs)


def test_nan_in_a_series_is_refused_naming_where():
    values = _ramp()
    values[123, 1] = np.nan
    with pytest.raises(ValueError, match=r"1 non-finite values \(first: nan at time 123, channel 1\)"):
        _dataset(values)


def test_registry_names_the_config_key():
    cfg = data_defaults("timeseries", length=300, input_len=96, pred_len=200)
    with pytest.raises(ConfigError, match=r"config\.data\.input_len=96"):
        build_dataset(cfg, global_batch_size=4, seed=0)
    ds = build_dataset(data_defaults("timeseries", num_series=3), global_batch_size=4, seed=0)
    assert ds.get_batch(0)["inputs"].shape == (4, 96, 3) and ds.metadata["task"] == "forecast"
    assert len(ds.metadata["corpus_sha256"]) == 64


def test_synthetic_series_has_its_seasonalities():
    values, times = synthetic_series(24 * 7 * 8, num_series=2, noise=0.1, seed=1)
    assert values.shape == (1344, 2) and values.dtype == np.float32
    np.testing.assert_array_equal(values, synthetic_series(1344, num_series=2, noise=0.1, seed=1)[0])
    detrended = values - np.polyval(np.polyfit(times, values[:, 0], 2), times)[:, None]
    power = np.abs(np.fft.rfft(detrended[:, 0])) ** 2
    assert set(np.argsort(power)[-2:]) == {1344 // 24, 1344 // 168}  # the two cycles carry the most power
    irregular_values, irregular_times = synthetic_series(500, irregular=True)
    assert (np.diff(irregular_times) >= 0).all() and 0 <= irregular_times[0] and irregular_times[-1] < 500
    assert not np.allclose(irregular_times, np.arange(500))


def test_missing_statsmodels_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "statsmodels", None)  # import statsmodels now fails
    with pytest.raises(ImportError, match=r"series='co2' needs statsmodels.*effitrans\[timeseries\]"):
        load_statsmodels_series("co2")
    with pytest.raises(ConfigError, match=r"series='co2' needs statsmodels"):
        build_dataset(data_defaults("timeseries", series="co2"), global_batch_size=4, seed=0)
    with pytest.raises(ValueError, match=r"series='airline' is not a statsmodels series"):
        load_statsmodels_series("airline")


def test_statsmodels_series_load_finite_and_in_order():
    pytest.importorskip(
        "statsmodels", reason="the real series need the timeseries extra: pip install effitrans[timeseries]"
    )
    lengths = {"co2": 2284, "sunspots": 309, "elnino": 732, "nile": 100}
    for name, length in lengths.items():
        values = load_statsmodels_series(name)
        assert values.shape == (length, 1) and np.isfinite(values).all(), name
    co2 = load_statsmodels_series("co2")[:, 0]
    assert 310 < co2[0] < 320 and co2[-1] > 360  # ppm, rising from 1958 to 2001
    ds = build_dataset(
        data_defaults("timeseries", series="co2", input_len=96, pred_len=96), global_batch_size=4, seed=0
    )
    assert ds.metadata["splits"]["test"] == [1827, 2284]
