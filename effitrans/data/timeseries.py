"""Forecasting windows over time series: input_len past values -> pred_len future values (numpy only).

A series is float [T, C] (C channels, forecast jointly). It is split chronologically into train / validation /
test parts (fractions 1 - val - test, val, test of T, as in the Autoformer protocol); each channel is
normalised with the mean and standard deviation of the training part only. A window of split s has its
targets inside s; its inputs may reach back into the part before s (the Autoformer protocol), never forward.

Batches: {"inputs": float32 [b, input_len, C], "targets": float32 [b, pred_len, C], "example_weights": float32
[b]}, normalised. Training batches draw window starts from (seed, step); the held-out set is every window of
`eval_split` in order (stride 1), the last batch padded with rows of weight 0.

Series: "synthetic" (`synthetic_series`: trend + several seasonalities + noise) or a real series shipped inside
statsmodels (`STATSMODELS_SERIES`; needs the optional extra ``pip install effitrans[timeseries]``).
"""

from __future__ import annotations

import functools
import hashlib

import numpy as np
from absl import logging

from effitrans.data import batching

TAG_FORECAST_TRAIN = 0x75E7
TAG_SYNTHETIC_SERIES = 0x75E8
SPLITS = ("train", "val", "test")
SYNTHETIC_PERIODS = (24, 168)  # daily and weekly cycles of an hourly series
STATSMODELS_SERIES = ("co2", "sunspots", "elnino", "nile")


def synthetic_series(
    length: int,
    *,
    num_series: int = 1,
    periods: tuple[int, ...] = SYNTHETIC_PERIODS,
    noise: float = 0.1,
    seed: int = 0,
    irregular: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """A seeded series of `num_series` channels: a linear-plus-quadratic trend, one sine per period (random
    amplitude and phase per channel) and Gaussian noise of std `noise`.

    With `irregular`, the sample times are sorted uniform draws over [0, length) instead of 0, 1, ...

    Returns:
      (values float32 [length, num_series], times float64 [length]).
    """
    length = batching.check_int("length", length, minimum=2)
    num_series = batching.check_int("num_series", num_series, minimum=1)
    if not periods or any(not (isinstance(p, (int, float)) and p > 0) for p in periods):
        raise ValueError(f"periods={periods!r} must be a non-empty tuple of positive numbers")
    if not (isinstance(noise, (int, float)) and noise >= 0):
        raise ValueError(f"noise={noise!r} must be a number >= 0")
    rng = batching.make_rng(TAG_SYNTHETIC_SERIES, batching.check_int("seed", seed, minimum=0))
    times = np.sort(rng.uniform(0.0, length, length)) if irregular else np.arange(length, dtype=np.float64)
    u = times[:, None] / length  # [T, 1] in [0, 1)
    slope, curve = rng.normal(0.0, 1.0, (2, num_series))  # [C] each
    values = slope * u + curve * u * u  # [T, C]
    for period in periods:
        amplitude = rng.uniform(0.5, 1.5, num_series)  # [C]
        phase = rng.uniform(0.0, 2 * np.pi, num_series)
        values = values + amplitude * np.sin(2 * np.pi * times[:, None] / period + phase)
    values = values + noise * rng.normal(0.0, 1.0, values.shape)
    return values.astype(np.float32), times


def load_statsmodels_series(name: str) -> np.ndarray:
    """A real series shipped inside statsmodels' datasets, float32 [T, 1] in time order.

    co2: Mauna Loa weekly CO2 (2,284 weeks; its 59 missing weeks are linearly interpolated); sunspots: yearly
    sunspot activity (309 years); elnino: monthly sea temperature 1950-2010 (732 months); nile: yearly Nile flow
    (100 years).

    Raises:
      ValueError: an unknown name. ImportError: statsmodels is not installed (the `timeseries` extra).
    """
    if name not in STATSMODELS_SERIES:
        raise ValueError(f"series={name!r} is not a statsmodels series; allowed {list(STATSMODELS_SERIES)}")
    try:
        from statsmodels import datasets
    except ImportError as e:
        raise ImportError(
            f"series={name!r} needs statsmodels, which is not installed: pip install 'effitrans[timeseries]' "
            f"(or series='synthetic')"
        ) from e
    frame = getattr(datasets, name).load_pandas().data
    if name == "co2":
        values = frame["co2"].to_numpy(np.float64)
        missing = int(np.isnan(values).sum())
        values = frame["co2"].interpolate(limit_direction="both").to_numpy(np.float64)
        logging.info("co2: %d missing weeks linearly interpolated", missing)
    elif name == "sunspots":
        values = frame["SUNACTIVITY"].to_numpy(np.float64)
    elif name == "elnino":
        values = frame.drop(columns="YEAR").to_numpy(np.float64).reshape(-1)  # rows are years, columns months
    else:
        values = frame["volume"].to_numpy(np.float64)
    return values.astype(np.float32)[:, None]


def resampled_windows(
    values: np.ndarray, starts: np.ndarray, input_len: int, pred_len: int, spacing: float
) -> tuple[np.ndarray, np.ndarray]:
    """Forecast windows of a series resampled at another rate. values [T, C] sampled at times 0..T-1 -> (inputs
    [n, L/s, C], targets [n, H/s, C]) by linear interpolation at spacing s (s = 0.5: twice the rate); window i's
    targets begin at time starts[i], its inputs cover the input_len time units before, so the windows cover the
    same times at every spacing. input_len / s and pred_len / s must be whole numbers."""
    if not (isinstance(spacing, (int, float)) and spacing > 0):
        raise ValueError(f"spacing={spacing!r} must be a number > 0 (time units per sample)")
    n_in, n_out = input_len / spacing, pred_len / spacing
    if n_in != int(n_in) or n_out != int(n_out) or n_out < 1:
        raise ValueError(
            f"input_len={input_len} and pred_len={pred_len} must be whole multiples of spacing={spacing} (>= 1 sample)"
        )
    starts = np.asarray(starts, np.float64)
    if starts.size and (starts.min() < input_len or starts.max() + pred_len > values.shape[0] - 1):
        raise ValueError(
            f"starts must lie in [input_len={input_len}, T - 1 - pred_len={values.shape[0] - 1 - pred_len}] "
            f"(the windows inside the series); got [{starts.min()}, {starts.max()}]"
        )
    times = starts[:, None] + spacing * np.arange(-int(n_in), int(n_out))[None, :]  # [n, L/s + H/s]
    grid = np.arange(values.shape[0], dtype=np.float64)
    full = np.stack([np.interp(times, grid, values[:, c]) for c in range(values.shape[1])], -1)  # [n, ., C]
    return full[:, : int(n_in)].astype(np.float32), full[:, int(n_in) :].astype(np.float32)


def split_bounds(length: int, val_fraction: float, test_fraction: float) -> dict[str, tuple[int, int]]:
    """[start, end) of each chronological split of a series of `length` points."""
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not (isinstance(value, (int, float)) and 0 < value < 1):
            raise ValueError(f"{name}={value!r} must be in (0, 1)")
    if val_fraction + test_fraction >= 1:
        raise ValueError(
            f"val_fraction={val_fraction} + test_fraction={test_fraction} must be < 1 (the rest is training data)"
        )
    n_test, n_val = int(round(length * test_fraction)), int(round(length * val_fraction))
    n_train = length - n_val - n_test
    return {"train": (0, n_train), "val": (n_train, n_train + n_val), "test": (n_train + n_val, length)}


def fit_normalisation(values: np.ndarray, train_end: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (mean, std) of values[:train_end] only; values [T, C] -> ([C], [C]). A constant channel
    gets std 1."""
    train = values[:train_end].astype(np.float64)
    mean, std = train.mean(0), train.std(0)
    return mean.astype(np.float32), np.where(std > 0, std, 1.0).astype(np.float32)


class ForecastDataset(batching.BatchedDataset):
    """Forecasting windows over one multichannel series (see the module docstring).

    Args:
      values: float [T, C] (or [T]) in time order, finite.
      input_len: L, past values the model reads; pred_len: H, future values it forecasts.
      val_fraction, test_fraction: the chronological split (training gets the rest).
      eval_split: "val" | "test", what eval_batches iterates.
      global_batch_size, seed, eval_batch_size: see batching.BatchedDataset.
      series_name: recorded in the metadata.

    Raises:
      ValueError: naming the argument, its value and the allowed range: NaN or inf in the series, lengths < 1,
        input_len + pred_len longer than the training part, pred_len longer than the evaluated part.
    """

    name = "timeseries"
    task = "forecast"

    def __init__(
        self,
        values: np.ndarray,
        *,
        input_len: int = 96,
        pred_len: int = 24,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        eval_split: str = "val",
        series_name: str = "array",
        **common,
    ):
        super().__init__(**common)
        values = np.asarray(values, np.float32)
        if values.ndim == 1:
            values = values[:, None]
        if values.ndim != 2 or values.shape[0] < 2 or values.shape[1] < 1:
            raise ValueError(f"values must be [T, C] with T >= 2 and C >= 1, got shape {values.shape}")
        bad = ~np.isfinite(values)
        if bad.any():
            t, c = np.argwhere(bad)[0]
            raise ValueError(
                f"series {series_name!r} has {int(bad.sum())} non-finite values (first: {values[t, c]} at time {t}, "
                f"channel {c}); fill or drop them first (allowed: finite values only)"
            )
        self.input_len = batching.check_int("input_len", input_len, minimum=1)
        self.pred_len = batching.check_int("pred_len", pred_len, minimum=1)
        if eval_split not in ("val", "test"):
            raise ValueError(f"eval_split={eval_split!r} is not one of ['val', 'test']")
        self.eval_split, self.series_name = eval_split, series_name
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.bounds = split_bounds(values.shape[0], val_fraction, test_fraction)
        n_train = self.bounds["train"][1]
        if self.input_len + self.pred_len > n_train:
            raise ValueError(
                f"input_len={self.input_len} + pred_len={self.pred_len} = {self.input_len + self.pred_len} is longer "
                f"than the training part ({n_train} of {values.shape[0]} points); allowed: input_len + pred_len <= "
                f"{n_train}"
            )
        for split in ("val", "test"):
            start, end = self.bounds[split]
            if self.pred_len > end - start:
                raise ValueError(
                    f"pred_len={self.pred_len} is longer than the {split} part ({end - start} points); allowed: "
                    f"1 <= pred_len <= {min(e - s for s, e in (self.bounds['val'], self.bounds['test']))}"
                )
        self.mean, self.std = fit_normalisation(values, n_train)
        self.values = (values - self.mean) / self.std  # [T, C] normalised
        self.raw_sha256 = hashlib.sha256(np.ascontiguousarray(values).tobytes()).hexdigest()

    @property
    def num_series(self) -> int:
        return int(self.values.shape[1])

    def window_starts(self, split: str) -> np.ndarray:
        """int64 [n] input starts of every window of `split`: targets inside the split, inputs ending where the
        targets begin (so inputs may reach back into the previous split, never forward)."""
        if split not in SPLITS:
            raise ValueError(f"split={split!r} is not one of {list(SPLITS)}")
        start, end = self.bounds[split]
        first = max(start - self.input_len, 0)  # the train split's first window starts at 0
        return np.arange(first, end - self.input_len - self.pred_len + 1, dtype=np.int64)

    def _windows(self, starts: np.ndarray) -> dict:
        L, H = self.input_len, self.pred_len
        idx = starts[:, None] + np.arange(L + H)[None, :]  # [k, L+H]
        full = self.values[idx]  # [k, L+H, C]
        return {
            "inputs": full[:, :L],
            "targets": full[:, L:],
            "example_weights": np.ones(starts.shape[0], np.float32),
        }

    def get_batch(self, step: int, *, process_index: int = 0, process_count: int = 1) -> dict:
        """Training batch of `step`, a pure function of (seed, step): window starts drawn uniformly (with
        replacement) from the training windows; this process's rows."""
        step = batching.check_int("step", step, minimum=0)
        rows = batching.local_rows(self.global_batch_size, process_index, process_count)
        starts = self.window_starts("train")
        rng = batching.make_rng(TAG_FORECAST_TRAIN, self.seed, step)
        picked = starts[rng.integers(0, starts.shape[0], self.global_batch_size)]  # [B]
        return self._windows(picked[rows])

    @functools.cached_property
    def _eval_starts(self) -> np.ndarray:
        return self.window_starts(self.eval_split)

    @property
    def num_eval_rows(self) -> int:
        return int(self._eval_starts.shape[0])

    def _eval_rows(self, indices: np.ndarray) -> dict:
        return self._windows(self._eval_starts[indices])

    def _eval_padding(self, k: int) -> dict:
        c = self.num_series
        return {
            "inputs": np.zeros((k, self.input_len, c), np.float32),
            "targets": np.zeros((k, self.pred_len, c), np.float32),
            "example_weights": np.zeros(k, np.float32),
        }

    @property
    def metadata(self) -> dict:
        return self._metadata(
            ("input_len", "pred_len", "val_fraction", "test_fraction", "eval_split", "num_series"),
            series=self.series_name,
            length=int(self.values.shape[0]),
            splits={k: list(v) for k, v in self.bounds.items()},
            normalisation={"mean": self.mean.tolist(), "std": self.std.tolist()},
            corpus_sha256=self.raw_sha256,
        )


def build_forecast_dataset(
    *, series: str = "synthetic", length: int = 2000, num_series: int = 1, noise: float = 0.1, **kwargs
) -> ForecastDataset:
    """A ForecastDataset over `series`: "synthetic" (`length` points of `num_series` channels with noise std
    `noise`, generated from seed 0) or one of STATSMODELS_SERIES (length, num_series, noise unused)."""
    if series == "synthetic":
        values, _ = synthetic_series(length, num_series=num_series, noise=noise)
    elif series in STATSMODELS_SERIES:
        values = load_statsmodels_series(series)
    else:
        raise ValueError(f"series={series!r} is not one of {['synthetic', *STATSMODELS_SERIES]}")
    return ForecastDataset(values, series_name=series, **kwargs)
