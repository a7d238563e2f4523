"""Autoformer (Wu et al., 2021): a decomposition encoder-decoder forecaster with auto-correlation in place of
attention and progressive trend accumulation.

`Autoformer(model_cfg)(inputs [B, L, C], training=False) -> forecast [B, pred_len, C]`:
  seasonal, trend = decompose(inputs)
  decoder seasonal input = [seasonal[-label_len:], zeros(pred_len)]; trend start = [trend[-label_len:],
  mean(inputs) x pred_len]
  encoder: per layer x += autocorr(x); x = seasonal(x); x = seasonal(x + ffn(x)); then a seasonal layer norm
  decoder: per layer x += autocorr(x); x, t1 = decompose(x); x += autocorr(x, enc); x, t2 = decompose(x);
           x, t3 = decompose(x + ffn(x)); trend += conv3(t1 + t2 + t3) (the progressive accumulation)
  forecast = (trend + linear(layer_norm(x)))[-pred_len:]
Dropout and the calendar-feature embedding of the reference code are left out (the value embedding is its
circular width-3 convolution). Config keys: `model.autoformer` (AUTOFORMER_KEYS) plus model.d_model,
num_heads, head_dim, ffn_width, ffn_activation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from effitrans.layers.glu import ACTIVATIONS
from effitrans.layers.params import fan_in_normal, init_param
from effitrans.layers.series import AutoCorrelation, circular_conv3, num_delays, series_decomposition
from effitrans.schema import ConfigError, Key, float_at_least, int_at_least

AUTOFORMER_KEYS = {
    "input_len": Key(96, int_at_least(1), "L, past values read (= config.data.input_len)"),
    "pred_len": Key(24, int_at_least(1), "forecast horizon (= config.data.pred_len)"),
    "label_len": Key(48, int_at_least(0), "last input values the decoder starts from (<= input_len)"),
    "num_series": Key(1, int_at_least(1), "channels C forecast jointly (= the data's)"),
    "moving_avg": Key(25, int_at_least(1), "odd window of the trend's moving average"),
    "factor": Key(1.0, float_at_least(0.0, strict=True), "delays K = int(factor * ln length)"),
    "encoder_layers": Key(2, int_at_least(1), "encoder layers"),
    "decoder_layers": Key(1, int_at_least(1), "decoder layers"),
}


def forecaster_group(model_cfg, name: str, prefix: str = "config.model"):
    """The model.<name> group of forecaster `name` when model.name is `name`, else None; the group must exist
    exactly then."""
    if model_cfg.name != name:
        if name in model_cfg:
            raise ConfigError(f"{prefix}.{name} is set but {prefix}.name={model_cfg.name!r} is not {name!r}")
        return None
    if name not in model_cfg:
        raise ConfigError(f"{prefix}.{name} is required when {prefix}.name={name!r} (keys: {name.upper()}_KEYS)")
    return model_cfg[name]


def check_autoformer_config(model_cfg, prefix: str = "config.model") -> None:
    """Relations: the group exists exactly on autoformer models, label_len <= input_len, an odd moving average,
    and factor gives at least one delay at the encoder's and the decoder's lengths."""
    a = forecaster_group(model_cfg, "autoformer", prefix)
    if a is None:
        return
    if a.label_len > a.input_len:
        raise ConfigError(
            f"{prefix}.autoformer.label_len={a.label_len} must be <= {prefix}.autoformer.input_len={a.input_len}"
        )
    if a.moving_avg % 2 == 0:
        raise ConfigError(f"{prefix}.autoformer.moving_avg={a.moving_avg} must be odd (a centred window)")
    for length in (a.input_len, a.label_len + a.pred_len):
        try:
            num_delays(length, a.factor)
        except ValueError as e:
            raise ConfigError(f"{prefix}.autoformer.{e}") from None


def seasonal_layer_norm(x: jax.Array, norm: nnx.LayerNorm) -> jax.Array:
    """Autoformer's layer norm for the seasonal part: LayerNorm, then the time mean removed. [B, T, D]."""
    h = norm(x)
    return h - jnp.mean(h, axis=1, keepdims=True)


class _FeedForward(nnx.Module):
    """x [B, T, D] -> act(x W1) W2, W1 [D, F], W2 [F, D] (the reference code's width-1 convolutions)."""

    def __init__(self, d_model: int, width: int, activation: str, rngs: nnx.Rngs):
        self.activation = activation
        self.w_in = init_param(rngs, (d_model, width), ("embed", "mlp"), fan_in_normal())
        self.w_out = init_param(rngs, (width, d_model), ("mlp", "embed"), fan_in_normal())

    def __call__(self, x):
        h = ACTIVATIONS[self.activation](jnp.einsum("BTD,DF->BTF", x, self.w_in[...]))  # [B, T, F]
        return jnp.einsum("BTF,FD->BTD", h, self.w_out[...])


class EncoderLayer(nnx.Module):
    def __init__(self, m, rngs: nnx.Rngs):
        a = m.autoformer
        self.kernel = a.moving_avg
        self.attn = AutoCorrelation(m.d_model, m.num_heads, m.head_dim, factor=a.factor, rngs=rngs)
        self.ffn = _FeedForward(m.d_model, m.ffn_width, m.ffn_activation, rngs)

    def __call__(self, x, *, per_row: bool):
        """x [B, L, D] -> seasonal part [B, L, D]."""
        x, _ = series_decomposition(x + self.attn(x, x, per_row=per_row), self.kernel)
        x, _ = series_decomposition(x + self.ffn(x), self.kernel)
        return x


class DecoderLayer(nnx.Module):
    def __init__(self, m, rngs: nnx.Rngs):
        a = m.autoformer
        self.kernel = a.moving_avg
        self.self_attn = AutoCorrelation(m.d_model, m.num_heads, m.head_dim, factor=a.factor, rngs=rngs)
        self.cross_attn = AutoCorrelation(m.d_model, m.num_heads, m.head_dim, factor=a.factor, rngs=rngs)
        self.ffn = _FeedForward(m.d_model, m.ffn_width, m.ffn_activation, rngs)
        self.trend_proj = init_param(rngs, (3, m.d_model, a.num_series), (None, "embed", None), fan_in_normal((0, 1)))

    def __call__(self, x, enc, *, per_row: bool):
        """x [B, T, D], enc [B, L, D] -> (seasonal [B, T, D], trend increment [B, T, C])."""
        x, t1 = series_decomposition(x + self.self_attn(x, x, per_row=per_row), self.kernel)
        x, t2 = series_decomposition(x + self.cross_attn(x, enc, per_row=per_row), self.kernel)
        x, t3 = series_decomposition(x + self.ffn(x), self.kernel)
        return x, circular_conv3(t1 + t2 + t3, self.trend_proj[...])


class Autoformer(nnx.Module):
    """The forecaster (see the module docstring); model_cfg is config.model with name 'autoformer'."""

    def __init__(self, model_cfg, *, rngs: nnx.Rngs):
        check_autoformer_config(model_cfg)
        m, a = model_cfg, model_cfg.autoformer
        if not isinstance(m.ffn_width, int):
            raise ConfigError(f"config.model.ffn_width={m.ffn_width!r} must be one int for autoformer")
        self.input_len, self.pred_len, self.label_len = a.input_len, a.pred_len, a.label_len
        self.kernel, self.num_series = a.moving_avg, a.num_series
        c, d = a.num_series, m.d_model
        self.enc_embed = init_param(rngs, (3, c, d), (None, None, "embed"), fan_in_normal((0, 1)))
        self.dec_embed = init_param(rngs, (3, c, d), (None, None, "embed"), fan_in_normal((0, 1)))
        self.encoder = nnx.List([EncoderLayer(m, rngs) for _ in range(a.encoder_layers)])
        self.decoder = nnx.List([DecoderLayer(m, rngs) for _ in range(a.decoder_layers)])
        self.enc_norm = nnx.LayerNorm(d, rngs=rngs)
        self.dec_norm = nnx.LayerNorm(d, rngs=rngs)
        self.head = init_param(rngs, (d, c), ("embed", None), fan_in_normal())
        self.head_bias = nnx.Param(jnp.zeros((c,)))

    def __call__(self, inputs: jax.Array, *, training: bool = False) -> jax.Array:
        """inputs [B, input_len, C] -> forecast [B, pred_len, C] (float32). training: one delay set for the
        batch (roll; the paper's training path), else one per row (gather), so a row's forecast never depends
        on the other rows."""
        per_row_delays = not training
        b, length, c = inputs.shape
        if (length, c) != (self.input_len, self.num_series):
            raise ValueError(
                f"inputs shape {inputs.shape} does not match input_len={self.input_len}, num_series={self.num_series}"
            )
        x = inputs.astype(jnp.float32)
        h, lab = self.pred_len, self.label_len
        seasonal, trend = series_decomposition(x, self.kernel)  # [B, L, C] each
        mean = jnp.broadcast_to(jnp.mean(x, axis=1, keepdims=True), (b, h, c))  # [B, H, C]
        trend = jnp.concatenate([trend[:, length - lab :], mean], axis=1)  # [B, lab+H, C]
        seasonal = jnp.concatenate([seasonal[:, length - lab :], jnp.zeros((b, h, c))], axis=1)

        enc = circular_conv3(x, self.enc_embed[...])  # [B, L, D]
        for layer in self.encoder:
            enc = layer(enc, per_row=per_row_delays)
        enc = seasonal_layer_norm(enc, self.enc_norm)

        dec = circular_conv3(seasonal, self.dec_embed[...])  # [B, lab+H, D]
        for layer in self.decoder:
            dec, increment = layer(dec, enc, per_row=per_row_delays)
            trend = trend + increment
        dec = seasonal_layer_norm(dec, self.dec_norm)
        out = trend + jnp.einsum("BTD,DC->BTC", dec, self.head[...]) + self.head_bias[...]  # [B, lab+H, C]
        return out[:, -h:]
