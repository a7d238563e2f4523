"""Forecasting baselines: DLinear (Zeng et al., 2023) and the seasonal-naive forecast.

DLinear: seasonal, trend = decompose(inputs); forecast = W_s seasonal + b_s + W_t trend + b_t, each W a linear map
over time [L, H] shared by the channels (or one per channel with `individual`). Initialised, as in the reference
code, to the mean of the inputs (W = 1 / L). `DLinear(model_cfg)(inputs [B, L, C], training=False) -> [B, H, C]`;
it behaves the same in training and evaluation. Config: `model.dlinear` (DLINEAR_KEYS).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from effitrans.layers.series import series_decomposition
from effitrans.models.autoformer import forecaster_group
from effitrans.schema import ConfigError, Key, boolean, int_at_least

DLINEAR_KEYS = {
    "input_len": Key(96, int_at_least(1), "L, past values read (= config.data.input_len)"),
    "pred_len": Key(24, int_at_least(1), "forecast horizon (= config.data.pred_len)"),
    "num_series": Key(1, int_at_least(1), "channels C (= the data's)"),
    "moving_avg": Key(25, int_at_least(1), "odd window of the trend's moving average"),
    "individual": Key(False, boolean, "one pair of linear maps per channel instead of one shared"),
}


def check_dlinear_config(model_cfg, prefix: str = "config.model") -> None:
    """The group exists exactly on dlinear models, and its moving average is odd."""
    d = forecaster_group(model_cfg, "dlinear", prefix)
    if d is not None and d.moving_avg % 2 == 0:
        raise ConfigError(f"{prefix}.dlinear.moving_avg={d.moving_avg} must be odd (a centred window)")


class DLinear(nnx.Module):
    """Decomposition + two linear maps over time (see the module docstring)."""

    def __init__(self, model_cfg, *, rngs: nnx.Rngs):
        del rngs  # deterministic initialisation
        check_dlinear_config(model_cfg)
        d = model_cfg.dlinear
        self.input_len, self.pred_len, self.num_series, self.kernel = (
            d.input_len,
            d.pred_len,
            d.num_series,
            d.moving_avg,
        )
        lead = (d.num_series,) if d.individual else ()
        self.individual = d.individual
        for part in ("seasonal", "trend"):
            setattr(self, f"w_{part}", nnx.Param(jnp.full((*lead, d.input_len, d.pred_len), 1.0 / d.input_len)))
            setattr(self, f"b_{part}", nnx.Param(jnp.zeros((*lead, d.pred_len))))

    def _linear(self, x, w, b):
        """x [B, L, C] -> [B, H, C] by w [L, H] (or [C, L, H]) and b [H] (or [C, H])."""
        if self.individual:
            return jnp.einsum("BLC,CLH->BHC", x, w) + b.T
        return jnp.einsum("BLC,LH->BHC", x, w) + b[:, None]

    def __call__(self, inputs: jax.Array, *, training: bool = False) -> jax.Array:
        del training  # the same in training and evaluation
        if inputs.shape[1:] != (self.input_len, self.num_series):
            raise ValueError(
                f"inputs shape {inputs.shape} does not match input_len={self.input_len}, num_series={self.num_series}"
            )
        seasonal, trend = series_decomposition(inputs.astype(jnp.float32), self.kernel)
        return self._linear(seasonal, self.w_seasonal[...], self.b_seasonal[...]) + self._linear(
            trend, self.w_trend[...], self.b_trend[...]
        )


def seasonal_naive(inputs: jax.Array, period: int, pred_len: int) -> jax.Array:
    """The last full season repeated: inputs [B, L, C] -> [B, pred_len, C], forecast[h] = inputs[L - period +
    (h mod period)]; period 1 is the naive (last value) forecast."""
    length = inputs.shape[1]
    if not isinstance(period, int) or not 1 <= period <= length:
        raise ValueError(f"period={period!r} must be an int in [1, input_len={length}]")
    if not isinstance(pred_len, int) or pred_len < 1:
        raise ValueError(f"pred_len={pred_len!r} must be an int >= 1")
    index = length - period + jnp.arange(pred_len) % period  # [H]
    return inputs[:, index]
