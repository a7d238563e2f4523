"""Forecasters beside Autoformer: a vanilla Transformer (any attention family), a continuous-kernel CNN (CKCNN,
Romero et al., 2022) and a discrete CNN of about the same size; and a CKCNN sequence classifier.

The three forecasters read one "canvas": the window minus its mean, followed by pred_len zeros, with an
observed-indicator channel (1 on the past, 0 on the future), [B, L + H, C + 1]. A body maps it to
[B, L + H, D]; a linear head gives [B, L + H, C], whose last H steps plus the window mean are the forecast.

- `TransformerForecaster` (model.name "transformer_forecaster", group model.transformer_forecaster): Autoformer's
  embedding (circular width-3 convolution) and head around `num_layers` pre-norm Transformer blocks with the
  attention of `model.attention.kind` (dense by default), not causal, RoPE over the sample index.
- `CKCNNForecaster` ("ckcnn", model.ckcnn): `num_layers` residual blocks x += W gelu(CKConv(norm x)) with a
  centred CKConv whose kernel lives in time units (span = input_len + pred_len time units, one time unit per
  training sample). `forecast(inputs, pred_len, spacing)` reads windows sampled at any spacing.
- `CNNForecaster` ("cnn", model.cnn): the same blocks with a discrete centred filter of `kernel_size` taps
  (kernel_size = kernel_hidden + 1 gives about the CKCNN's parameter count). A discrete filter reads samples,
  not time: at another spacing it covers a different time span, which is what the resolution test measures.
- `CKCNNClassifier` ("ckcnn_classifier", model.ckcnn_classifier): token embedding, the CKCNN blocks (kernel
  stretched over the padded length), model.pooling (cls | mean), a linear head -> logits [B, num_classes].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from effitrans.layers.ckconv import CKConv, fft_conv
from effitrans.layers.embed import Embed
from effitrans.layers.params import fan_in_normal, init_param
from effitrans.layers.series import circular_conv3
from effitrans.models.autoformer import forecaster_group
from effitrans.models.transformer import Block, ffn_widths, pool
from effitrans.schema import ConfigError, Key, float_at_least, int_at_least

SHAPE_KEYS = {
    "input_len": Key(96, int_at_least(1), "L, past values read (= config.data.input_len)"),
    "pred_len": Key(24, int_at_least(1), "forecast horizon (= config.data.pred_len)"),
    "num_series": Key(1, int_at_least(1), "channels C (= the data's)"),
}
KERNEL_NET_KEYS = {
    "kernel_hidden": Key(16, int_at_least(1), "E, hidden width of the SIREN kernel net"),
    "omega_0": Key(10.0, float_at_least(0.0, strict=True), "SIREN frequency scale (smaller: smoother kernels)"),
}
TRANSFORMER_FORECASTER_KEYS = dict(SHAPE_KEYS)
CKCNN_KEYS = {**SHAPE_KEYS, **KERNEL_NET_KEYS}
CNN_KEYS = {**SHAPE_KEYS, "kernel_size": Key(17, int_at_least(1), "odd taps of each centred discrete filter")}
CKCNN_CLASSIFIER_KEYS = dict(KERNEL_NET_KEYS)
# model.name -> the keys of its model.<name> group
GROUP_KEYS = {
    "transformer_forecaster": TRANSFORMER_FORECASTER_KEYS,
    "ckcnn": CKCNN_KEYS,
    "cnn": CNN_KEYS,
    "ckcnn_classifier": CKCNN_CLASSIFIER_KEYS,
}


def check_forecasters_config(model_cfg, prefix: str = "config.model") -> None:
    """Each group exists exactly on its model; cnn filters are odd."""
    for name in GROUP_KEYS:
        group = forecaster_group(model_cfg, name, prefix)
        if name == "cnn" and group is not None and group.kernel_size % 2 == 0:
            raise ConfigError(f"{prefix}.cnn.kernel_size={group.kernel_size} must be odd (a centred filter)")


def forecast_canvas(inputs: jax.Array, pred_len: int) -> tuple[jax.Array, jax.Array]:
    """inputs [B, L, C] -> (canvas [B, L+H, C+1]: window minus its mean then H zeros, and the observed
    indicator; mean [B, 1, C])."""
    b, length, c = inputs.shape
    x = inputs.astype(jnp.float32)
    mean = jnp.mean(x, axis=1, keepdims=True)  # [B, 1, C]
    values = jnp.concatenate([x - mean, jnp.zeros((b, pred_len, c))], axis=1)  # [B, L+H, C]
    observed = jnp.concatenate([jnp.ones((length,)), jnp.zeros((pred_len,))])  # [L+H]
    return jnp.concatenate([values, jnp.broadcast_to(observed[None, :, None], (b, length + pred_len, 1))], 2), mean


class _Forecaster(nnx.Module):
    """Canvas -> body -> head; subclasses set the embedding `embed(canvas)` and `body(h, spacing)`."""

    def _init_shapes(self, model_cfg, name: str, rngs: nnx.Rngs):
        g = model_cfg[name]
        self.input_len, self.pred_len, self.num_series = g.input_len, g.pred_len, g.num_series
        self.head = init_param(rngs, (model_cfg.d_model, g.num_series), ("embed", None), fan_in_normal())
        self.head_bias = nnx.Param(jnp.zeros((g.num_series,)))

    def forecast(self, inputs: jax.Array, pred_len: int, spacing: float = 1.0) -> jax.Array:
        """inputs [B, L', C] sampled `spacing` time units apart -> [B, pred_len, C]."""
        if inputs.ndim != 3 or inputs.shape[2] != self.num_series:
            raise ValueError(f"inputs shape {inputs.shape} must be [B, L, num_series={self.num_series}]")
        if not isinstance(pred_len, int) or pred_len < 1:
            raise ValueError(f"pred_len={pred_len!r} must be an int >= 1")
        canvas, mean = forecast_canvas(inputs, pred_len)
        h = self.body(self.embed(canvas), spacing)  # [B, L+H, D]
        out = jnp.einsum("BTD,DC->BTC", h, self.head[...]) + self.head_bias[...]  # [B, L+H, C]
        return out[:, -pred_len:] + mean

    def __call__(self, inputs: jax.Array, *, training: bool = False) -> jax.Array:
        """inputs [B, input_len, C] -> forecast [B, pred_len, C] (float32); the same in training and evaluation."""
        del training
        if inputs.shape[1:] != (self.input_len, self.num_series):
            raise ValueError(
                f"inputs shape {inputs.shape} does not match input_len={self.input_len}, num_series={self.num_series}"
            )
        return self.forecast(inputs, self.pred_len)


class TransformerForecaster(_Forecaster):
    """The vanilla Transformer baseline (see the module docstring)."""

    def __init__(self, model_cfg, *, rngs: nnx.Rngs):
        check_forecasters_config(model_cfg)
        self._init_shapes(model_cfg, "transformer_forecaster", rngs)
        d = model_cfg.d_model
        self.embed_w = init_param(rngs, (3, self.num_series + 1, d), (None, None, "embed"), fan_in_normal((0, 1)))
        self.blocks = nnx.List([Block(model_cfg, w, causal=False, rngs=rngs) for w in ffn_widths(model_cfg)])
        self.norm = nnx.LayerNorm(d, rngs=rngs)

    def embed(self, canvas):
        return circular_conv3(canvas, self.embed_w[...])  # [B, T, D]

    def body(self, x, spacing):
        if spacing != 1.0:
            raise ValueError(f"spacing={spacing!r}: the Transformer forecaster reads samples at spacing 1.0 only")
        positions = jnp.broadcast_to(jnp.arange(x.shape[1], dtype=jnp.int32), x.shape[:2])  # [B, T]
        for block in self.blocks:
            x, _ = block(x, positions=positions)
        return self.norm(x)


class DiscreteConv(nnx.Module):
    """A centred discrete filter x [B, T, I] -> [B, T, O], kernel [K, I, O] (K odd), zero padding."""

    def __init__(self, in_channels: int, out_channels: int, taps: int, *, rngs: nnx.Rngs):
        if not isinstance(taps, int) or taps < 1 or taps % 2 == 0:
            raise ValueError(f"taps={taps!r} must be an odd int >= 1 (a centred filter)")
        self.kernel = init_param(rngs, (taps, in_channels, out_channels), (None, None, None), fan_in_normal((0, 1)))

    def __call__(self, x: jax.Array, spacing: float = 1.0) -> jax.Array:
        """spacing is not read: a discrete filter's taps are samples, whatever time they stand for."""
        del spacing
        return fft_conv(x, self.kernel[...], causal=False)


class ConvBlock(nnx.Module):
    """x [B, T, D] -> x + W gelu(conv(LayerNorm(x))) + b, conv a CKConv or a DiscreteConv."""

    def __init__(self, d_model: int, conv: nnx.Module, *, rngs: nnx.Rngs):
        self.norm = nnx.LayerNorm(d_model, rngs=rngs)
        self.conv = conv
        self.w_out = init_param(rngs, (d_model, d_model), ("embed", "embed"), fan_in_normal())
        self.b_out = nnx.Param(jnp.zeros((d_model,)))

    def __call__(self, x: jax.Array, spacing: float = 1.0) -> jax.Array:
        h = jax.nn.gelu(self.conv(self.norm(x), spacing))  # [B, T, D]
        return x + jnp.einsum("BTD,DE->BTE", h, self.w_out[...]) + self.b_out[...]


class _ConvForecaster(_Forecaster):
    """Pointwise embedding, `num_layers` ConvBlocks from `make_conv(rngs)`, a final LayerNorm."""

    def _init_body(self, model_cfg, make_conv, rngs: nnx.Rngs):
        d = model_cfg.d_model
        self.embed_w = init_param(rngs, (self.num_series + 1, d), (None, "embed"), fan_in_normal())
        self.blocks = nnx.List([ConvBlock(d, make_conv(rngs), rngs=rngs) for _ in range(model_cfg.num_layers)])
        self.norm = nnx.LayerNorm(d, rngs=rngs)

    def embed(self, canvas):
        return jnp.einsum("BTC,CD->BTD", canvas, self.embed_w[...])  # [B, T, D]

    def body(self, x, spacing):
        for block in self.blocks:
            x = block(x, spacing)
        return self.norm(x)


class CKCNNForecaster(_ConvForecaster):
    """The continuous-kernel CNN forecaster (see the module docstring)."""

    def __init__(self, model_cfg, *, rngs: nnx.Rngs):
        check_forecasters_config(model_cfg)
        self._init_shapes(model_cfg, "ckcnn", rngs)
        g, d = model_cfg.ckcnn, model_cfg.d_model
        span = float(g.input_len + g.pred_len)
        conv = lambda r: CKConv(d, d, g.kernel_hidden, causal=False, omega_0=g.omega_0, span=span, rngs=r)
        self._init_body(model_cfg, conv, rngs)


class CNNForecaster(_ConvForecaster):
    """The discrete CNN of the same blocks (see the module docstring)."""

    def __init__(self, model_cfg, *, rngs: nnx.Rngs):
        check_forecasters_config(model_cfg)
        self._init_shapes(model_cfg, "cnn", rngs)
        d, taps = model_cfg.d_model, model_cfg.cnn.kernel_size
        self._init_body(model_cfg, lambda r: DiscreteConv(d, d, taps, rngs=r), rngs)


class CKCNNClassifier(nnx.Module):
    """__call__(tokens [B, T], mask [B, T]) -> logits [B, num_classes] float32 (padding zeroed before every
    convolution, left out of a mean pooling)."""

    def __init__(self, model_cfg, *, rngs: nnx.Rngs):
        check_forecasters_config(model_cfg)
        g, d = model_cfg.ckcnn_classifier, model_cfg.d_model
        self.embed = Embed(model_cfg.vocab_size, d, rngs=rngs)
        conv = lambda r: CKConv(d, d, g.kernel_hidden, causal=False, omega_0=g.omega_0, rngs=r)
        self.blocks = nnx.List([ConvBlock(d, conv(rngs), rngs=rngs) for _ in range(model_cfg.num_layers)])
        self.norm = nnx.LayerNorm(d, rngs=rngs)
        self.head = init_param(rngs, (d, model_cfg.num_classes), ("embed", None), fan_in_normal())
        self.pooling = model_cfg.pooling

    def __call__(self, tokens: jax.Array, mask: jax.Array) -> jax.Array:
        m = mask.astype(jnp.float32)[..., None]  # [B, T, 1]
        x = self.embed(tokens) * m  # [B, T, D]
        for block in self.blocks:
            x = block(x) * m
        h = pool(self.norm(x), mask, self.pooling)  # [B, D]
        return jnp.einsum("BD,DC->BC", h, self.head[...]).astype(jnp.float32)
