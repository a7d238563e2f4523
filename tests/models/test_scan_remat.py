"""config.model.scan_layers and config.model.remat: the same loss and gradients as the unrolled stack."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from effitrans.registry import build_model
from effitrans.schema import ConfigError
from tests.helpers import tiny_model_config


def _loss_and_grads(cfg, tokens):
    model = build_model(cfg, seed=3)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    @jax.jit
    def run(params):
        def loss_fn(params):
            logits, _ = nnx.merge(graphdef, params, rest)(tokens)
            return jnp.mean(jax.nn.log_softmax(logits)[..., 0] ** 2)

        return jax.value_and_grad(loss_fn)(params)

    loss, grads = run(params)
    return loss, nnx.to_pure_dict(grads)


REFERENCE = {"impl": "reference"}  # the dense kernel compiles fastest; the stack is what is compared


@functools.lru_cache(maxsize=1)
def _unrolled(tokens_seed: int):
    tokens = jax.random.randint(jax.random.key(tokens_seed), (2, 12), 0, 61)
    return tokens, _loss_and_grads(tiny_model_config(num_layers=2, attention=REFERENCE), tokens)


@pytest.mark.parametrize(
    "scan_layers, remat",
    [
        pytest.param(True, "none", marks=pytest.mark.slow),
        pytest.param(False, "full", marks=pytest.mark.slow),
        pytest.param(True, "dots_saveable", marks=pytest.mark.slow),  # ~9 s: CI (the default run is at its budget)
    ],
    ids=["scan", "remat", "both"],
)
def test_equal_to_the_unrolled_stack(scan_layers, remat):
    tokens, (want_loss, want_grads) = _unrolled(0)
    cfg = tiny_model_config(num_layers=2, scan_layers=scan_layers, remat=remat, attention=REFERENCE)
    loss, grads = _loss_and_grads(cfg, tokens)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
    flat_want = jax.tree_util.tree_leaves_with_path(want_grads)
    flat = dict(jax.tree_util.tree_leaves_with_path(grads))
    assert len(flat) == len(flat_want)
    for path, g in flat_want:
        # float32 up to reassociation: the scanned / rematerialised program fuses differently (seen: 7e-7).
        np.testing.assert_allclose(flat[path], g, rtol=1e-5, atol=5e-6, err_msg=jax.tree_util.keystr(path))


def test_scan_needs_homogeneous_layers():
    with pytest.raises(ConfigError, match="scan_layers=True needs homogeneous layers"):
        build_model(tiny_model_config(num_layers=2, ffn_width=[64, 32], scan_layers=True))
