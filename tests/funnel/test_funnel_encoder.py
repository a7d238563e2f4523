"""FunnelEncoder: stride 1 equals the dense encoder exactly; surgery changes no parameter; configs."""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from effitrans import funnel, perf
from effitrans.registry import build_model, validate_model_config
from effitrans.schema import ConfigError
from tests.helpers import tiny_model_config


def _embedding_cfg(**kw):
    kw.setdefault("attention", {"impl": "reference"})  # the dense kernel: fastest to compile on CPU
    return tiny_model_config(name="encoder_embedding", pooling="mean", embed_dim=16, num_layers=3, **kw)


def _run(model, tokens, mask):
    return np.asarray(jax.jit(lambda m, t, k: m(t, k))(model, tokens, mask))


def _batch(b=3, t=13, vocab=61, seed=0):
    rng = np.random.default_rng(seed)
    tokens = jnp.asarray(rng.integers(1, vocab, size=(b, t)), jnp.int32)
    lengths = np.array([t, t - 4, 2])[:b]
    mask = jnp.asarray(np.arange(t)[None, :] < lengths[:, None], jnp.int32)
    return tokens, mask


def _params(model):
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


@pytest.mark.parametrize(
    "name,pool_q_only",
    [
        ("encoder_embedding", True),
        pytest.param("encoder_embedding", False, marks=pytest.mark.slow),
        pytest.param("encoder_classifier", True, marks=pytest.mark.slow),
        ("encoder_classifier", False),
    ],
)
def test_stride_one_funnel_equals_dense_encoder_exactly(name, pool_q_only):
    cfg = (
        _embedding_cfg()
        if name == "encoder_embedding"
        else tiny_model_config(name=name, pooling="cls", num_classes=3, num_layers=3, attention={"impl": "reference"})
    )
    dense = build_model(cfg, seed=1)
    fcfg = funnel.funnel_config(cfg, at_layer=1, stride=1, pool_q_only=pool_q_only)
    fcfg.funnel.block_layers, fcfg.funnel.strides = [1, 1, 1], [1, 1]  # three blocks, never pooled
    f = build_model(fcfg, seed=1)
    assert jax.tree.map(np.shape, _params(f)) == jax.tree.map(np.shape, _params(dense))
    tokens, mask = _batch()
    np.testing.assert_array_equal(_run(f, tokens, mask), _run(dense, tokens, mask))
    hidden, pmask = jax.jit(lambda m, t, k: m.encode(t, k))(f, tokens, mask)
    dense_hidden = jax.jit(lambda m, t, k: m.encode(t, k))(dense, tokens, mask)
    real = np.asarray(mask).astype(bool)  # padding rows differ by design (key-only masking)
    np.testing.assert_array_equal(np.asarray(hidden)[real], np.asarray(dense_hidden)[real])
    np.testing.assert_array_equal(np.asarray(pmask), np.asarray(mask))


@pytest.mark.slow  # >= 8 s on 2 cores: CI runs it (keeps the default run under 10 min)
def test_surgery_changes_no_parameter_and_keeps_dense_model():
    dense = build_model(_embedding_cfg(), seed=2)
    before = jax.tree.map(np.array, _params(dense))
    tokens, mask = _batch()
    y_dense = _run(dense, tokens, mask)
    f = funnel.insert(dense, at_layer=1, stride=2, pooling="mean")
    y_funnel = _run(f, tokens, mask)
    after_dense, after_funnel = _params(dense), _params(f)
    # Same tree paths, same values, for the funnel and for the (untouched) dense model.
    assert jax.tree.structure(after_funnel) == jax.tree.structure(before)
    jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, after_funnel))
    jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, after_dense))
    np.testing.assert_array_equal(_run(dense, tokens, mask), y_dense)
    assert y_funnel.shape == y_dense.shape and not np.allclose(y_funnel, y_dense)  # pooling did something
    np.testing.assert_allclose(np.linalg.norm(y_funnel, axis=-1), 1.0, rtol=1e-5)
    # The surgery result equals the funnel built from funnel_config() and loaded with the dense weights.
    fcfg = funnel.funnel_config(_embedding_cfg(), at_layer=1, stride=2)
    g = build_model(fcfg, seed=9)
    nnx.update(g, nnx.state(dense, nnx.Param))
    np.testing.assert_array_equal(_run(g, tokens, mask), y_funnel)


@pytest.mark.slow  # >= 8 s on 2 cores: CI runs it (keeps the default run under 10 min)
def test_funnel_shapes_three_blocks_and_padding_is_ignored():
    cfg = _embedding_cfg()
    fcfg = funnel.funnel_config(cfg, at_layer=1, stride=2)
    fcfg.funnel.block_layers, fcfg.funnel.strides = [1, 1, 1], [2, 3]
    f = build_model(fcfg, seed=0)
    tokens, mask = _batch(t=13)
    hidden, pmask = jax.jit(lambda m, t, k: m.encode(t, k))(f, tokens, mask)
    assert f.spec.pooled_lengths(13) == [13, 7, 3]
    assert hidden.shape == (3, 3, 32) and pmask.shape == (3, 3)
    # Changing padded tokens changes nothing real.
    noisy = jnp.where(mask > 0, tokens, 7)
    np.testing.assert_allclose(_run(f, noisy, mask), _run(f, tokens, mask), atol=1e-6)


@pytest.mark.parametrize("kind", ["dense", pytest.param("latent", marks=pytest.mark.slow)])
def test_funnel_with_attention_kinds(kind):
    attn = {"kind": kind, "impl": "reference"}
    if kind == "latent":
        attn.update(kv_lora_rank=8, qk_rope_head_dim=4)
    cfg = funnel.funnel_config(_embedding_cfg(attention=attn), at_layer=2, stride=2)
    f = build_model(cfg, seed=0)
    tokens, mask = _batch()
    y = _run(f, tokens, mask)
    assert y.shape == (3, 16) and bool(np.all(np.isfinite(y)))


def test_bad_funnel_configs_rejected():
    cfg = funnel.funnel_config(_embedding_cfg(), at_layer=1, stride=2)
    for key, value, msg in [
        ("strides", [0], "ints >= 1"),
        ("block_layers", [2, 2], "beyond the depth"),
        ("strides", [2, 2], "expected len\\(block_layers\\) - 1"),
        ("pooling", "median", "one of"),
        ("block_layers", [0, 3], "ints >= 1"),
    ]:
        bad = copy.deepcopy(cfg)
        bad.funnel[key] = value
        with pytest.raises(ConfigError, match=msg):
            validate_model_config(bad)
    with pytest.raises(ValueError, match="at_layer=3"):
        funnel.insert(build_model(_embedding_cfg()), at_layer=3, stride=2)
    with pytest.raises(ValueError, match="stride=0"):
        funnel.insert(build_model(_embedding_cfg()), at_layer=1, stride=0)
    f = funnel.insert(build_model(_embedding_cfg()), at_layer=1, stride=8, separate_cls=False, truncate_seq=True)
    with pytest.raises(ValueError, match="leaves 0 tokens"):
        f(*_batch(t=5))


def test_forward_flops_funnel_is_cheaper():
    cfg = _embedding_cfg()
    dense = perf.forward_flops(cfg, 2, 64)
    same = perf.forward_flops(cfg, 2, 64, funnel.surgery_spec(3, at_layer=1, stride=1))
    half = perf.forward_flops(cfg, 2, 64, funnel.surgery_spec(3, at_layer=1, stride=2))
    assert same == dense and half < dense
