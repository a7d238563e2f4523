"""Parity with HF transformers' PyTorch Autoformer, layer by layer, with the same weights.

Same definition, tested here: the series decomposition, the auto-correlation layer (inference path: delays per
row by gather; training path: one delay set per batch by roll; self and cross), the seasonal layer norm and the
decoder's circular width-3 trend projection. Layers whose definition differs (docs/timeseries.md, "HF parity"):
HF's encoder and decoder layers add a LayerNorm after every attention residual and a seasonal layer norm at the
end of every layer (our layers follow the paper: one seasonal norm after each stack), its feed-forward has biases,
its value embedding is a bias-free Linear (ours the paper's circular width-3 convolution), and its cross
auto-correlation cuts the queries when the decoder is longer than the encoder (ours zero-pads the keys), and with
more than one row its delay aggregation tiles the per-row delays and weights over (batch x heads) in head-major
order while the values are batch-major, so row b's heads n use the delays of row (b N + n) mod B: the layers agree
on batches of one row, which is what the auto-correlation test compares."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch", reason="torch is not installed (pip install torch==2.13.0)")
transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install transformers)")
hf = pytest.importorskip("transformers.models.autoformer.modeling_autoformer")

from effitrans.layers.series import AutoCorrelation, circular_conv3, series_decomposition  # noqa: E402
from effitrans.models.autoformer import seasonal_layer_norm  # noqa: E402

D, N, FACTOR = 16, 4, 2
pytestmark = pytest.mark.slow  # torch and several eager JAX compiles: ~30 s on 2 loaded cores


def _config(**kw):
    return transformers.AutoformerConfig(
        d_model=D, encoder_attention_heads=N, decoder_attention_heads=N, autocorrelation_factor=FACTOR, **kw
    )


def _t(x):
    return torch.tensor(np.asarray(x))


def _copy_attention(theirs) -> AutoCorrelation:
    """Our layer with HF's q/k/v/out Linear weights: W [out, in] -> [D, N, H] (out index = n H + h)."""
    ours = AutoCorrelation(D, N, D // N, factor=float(FACTOR), rngs=nnx.Rngs(0))
    for name, proj in (("q", theirs.q_proj), ("k", theirs.k_proj), ("v", theirs.v_proj)):
        getattr(ours, f"w_{name}")[...] = jnp.asarray(proj.weight.detach().numpy().T.reshape(D, N, D // N))
        getattr(ours, f"b_{name}")[...] = jnp.asarray(proj.bias.detach().numpy().reshape(N, D // N))
    ours.w_o[...] = jnp.asarray(theirs.out_proj.weight.detach().numpy().T.reshape(N, D // N, D))
    ours.b_o[...] = jnp.asarray(theirs.out_proj.bias.detach().numpy())
    return ours


def test_series_decomposition_matches():
    x = np.random.default_rng(0).normal(size=(2, 40, 3)).astype(np.float32)
    theirs = hf.AutoformerSeriesDecompositionLayer(_config(moving_average=25))
    s_hf, t_hf = (v.numpy() for v in theirs(_t(x)))
    s, t = series_decomposition(jnp.asarray(x), 25)
    np.testing.assert_allclose(np.asarray(s), s_hf, atol=1e-5)
    np.testing.assert_allclose(np.asarray(t), t_hf, atol=1e-5)


@pytest.mark.parametrize("training", [False, True])
def test_autocorrelation_layer_matches_self_and_cross(training):
    torch.manual_seed(0)
    theirs = hf.AutoformerAttention(D, N, autocorrelation_factor=FACTOR).train(training)
    ours = _copy_attention(theirs)
    rng = np.random.default_rng(1)
    x, enc = (rng.normal(size=(1, n, D)).astype(np.float32) for n in (36, 48))  # one row: see the docstring
    with torch.no_grad():
        self_hf = theirs(_t(x))[0].numpy()
        cross_hf = theirs(_t(x), key_value_states=_t(enc))[0].numpy()  # encoder longer: keys cut to the queries
    per_row = not training
    np.testing.assert_allclose(np.asarray(ours(jnp.asarray(x), jnp.asarray(x), per_row=per_row)), self_hf, atol=1e-4)
    np.testing.assert_allclose(np.asarray(ours(jnp.asarray(x), jnp.asarray(enc), per_row=per_row)), cross_hf, atol=1e-4)


def test_seasonal_layer_norm_and_trend_projection_match():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(2, 30, D)).astype(np.float32)
    theirs = hf.AutoformerLayernorm(_config())
    with torch.no_grad():
        theirs.layernorm.weight.copy_(_t(rng.normal(size=D).astype(np.float32)))
        theirs.layernorm.bias.copy_(_t(rng.normal(size=D).astype(np.float32)))
        norm_hf = theirs(_t(x)).numpy()
    ours = nnx.LayerNorm(D, epsilon=theirs.layernorm.eps, rngs=nnx.Rngs(0))
    ours.scale[...] = jnp.asarray(theirs.layernorm.weight.detach().numpy())
    ours.bias[...] = jnp.asarray(theirs.layernorm.bias.detach().numpy())
    np.testing.assert_allclose(np.asarray(seasonal_layer_norm(jnp.asarray(x), ours)), norm_hf, atol=1e-5)
    # the decoder's trend projection: Conv1d(D -> C, width 3, circular padding, no bias), weight [C, D, 3]
    layer = hf.AutoformerDecoderLayer(_config(feature_size=2))
    w = layer.trend_projection.weight.detach().numpy()  # [C, D, 3]
    with torch.no_grad():
        conv_hf = layer.trend_projection(_t(x).permute(0, 2, 1)).transpose(1, 2).numpy()
    ours_conv = circular_conv3(jnp.asarray(x), jnp.asarray(np.transpose(w, (2, 1, 0))))  # [3, D, C]
    np.testing.assert_allclose(np.asarray(ours_conv), conv_hf, atol=1e-5)
