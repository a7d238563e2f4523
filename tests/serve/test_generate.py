"""generate() and decode_tokens(): greedy output equals a full-forward argmax decode, one compilation per shape,
stop tokens, argument checks."""

import importlib
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from effitrans.registry import build_model
from effitrans.serve import decode_tokens, generate
from tests.helpers import tiny_model_config

_generate = importlib.import_module("effitrans.serve.generate")  # the module (the package exports the function)


def _full_forward_greedy(model, prompt, n_new):
    """The reference: n_new greedy tokens, each the argmax of a full forward pass over everything so far (no
    cache); the sequence is right-padded to its final width, where causal attention never looks."""
    seq = np.zeros((prompt.shape[0], prompt.shape[1] + n_new), np.int32)
    seq[:, : prompt.shape[1]] = prompt
    forward = nnx.jit(lambda m, t: m(t)[0])  # [B, T, V]
    for t in range(prompt.shape[1], seq.shape[1]):
        seq[:, t] = np.asarray(forward(model, jnp.asarray(seq)))[:, t - 1].argmax(-1)
    return seq


def test_greedy_generate_equals_full_forward_argmax_decode():
    model = build_model(tiny_model_config(), seed=4)
    prompt = jax.random.randint(jax.random.key(2), (2, 5), 0, 61)
    np.testing.assert_array_equal(generate(model, prompt, max_new_tokens=6), _full_forward_greedy(model, prompt, 6))


def test_generate_compiles_once_per_shape(caplog):
    model = build_model(tiny_model_config(), seed=5)
    prompt = jax.random.randint(jax.random.key(3), (2, 5), 0, 61)  # the shapes of the test above
    fns = (_generate._prefill, _generate._decode)

    def run(m, p, **kw):
        before = [f._cache_size() for f in fns]
        caplog.clear()
        with caplog.at_level(logging.WARNING), jax.log_compiles():
            jax.block_until_ready(generate(m, p, max_new_tokens=6, **kw))
        compiled = [r.getMessage() for r in caplog.records if "Compiling" in r.getMessage()]
        return [f._cache_size() - b for f, b in zip(fns, before)], compiled

    added, _ = run(model, prompt)
    assert added[0] <= 1 and added[1] <= 1  # at most one prefill and one decode program (0 if already cached)
    # Same shapes again, other prompt values and other weights of the same structure: nothing compiles.
    other = build_model(tiny_model_config(), seed=6)
    assert run(other, prompt + 1) == ([0, 0], [])
    # Sampled mode is one more program per step function; other sampling values reuse it.
    added, _ = run(model, prompt, temperature=0.7, top_k=5, rng=jax.random.key(1))
    assert added[0] <= 1 and added[1] <= 1
    assert run(model, prompt, temperature=1.3, top_k=9, top_p=0.9, rng=jax.random.key(2)) == ([0, 0], [])


def test_stop_tokens_stop_and_pad():
    model = build_model(tiny_model_config(), seed=4)
    prompt = jax.random.randint(jax.random.key(2), (2, 5), 0, 61)
    free = np.asarray(generate(model, prompt, max_new_tokens=6))[:, 5:]  # [B, 6]
    stop = int(free[0, 2])
    cut = [list(row).index(stop) if stop in row else 6 for row in free]  # each row's first stop token
    got = np.asarray(generate(model, prompt, max_new_tokens=6, stop_tokens=[stop], pad_id=60))[:, 5:]
    for row, f, c in zip(got, free, cut):
        np.testing.assert_array_equal(row[: c + 1], f[: c + 1])  # up to and including the stop token
        assert (row[c + 1 :] == 60).all()
    assert cut[0] <= 2


def test_decode_tokens_continues_a_prefilled_cache():
    model = build_model(tiny_model_config(), seed=4)
    prompt = jax.random.randint(jax.random.key(2), (2, 5), 0, 61)
    want = np.asarray(generate(model, prompt, max_new_tokens=6))
    prefill = nnx.jit(lambda m, t: m(t, cache=m.init_cache(2, 11), decode=True)[1])
    cache = prefill(model, prompt[:, :4])  # the prompt but its last token
    tokens, cache = decode_tokens(nnx.split(model), cache, prompt[:, 4], steps=5)  # generate's decode shapes
    np.testing.assert_array_equal(tokens, want[:, 5:10])
    np.testing.assert_array_equal(cache[0].lengths, [9, 9])


def test_argument_checks():
    model = build_model(tiny_model_config(), seed=4)
    prompt = jnp.zeros((1, 3), jnp.int32)
    with pytest.raises(ValueError, match="top_k=62"):
        generate(model, prompt, max_new_tokens=2, temperature=1.0, top_k=62)
    with pytest.raises(ValueError, match="top_p=0"):
        generate(model, prompt, max_new_tokens=2, temperature=1.0, top_p=0)
    with pytest.raises(ValueError, match="temperature=-1"):
        generate(model, prompt, max_new_tokens=2, temperature=-1)
    with pytest.raises(ValueError, match="stop_tokens"):
        generate(model, prompt, max_new_tokens=2, stop_tokens=[1.5])
    with pytest.raises(ValueError, match="max_new_tokens=0"):
        generate(model, prompt, max_new_tokens=0)
    with pytest.raises(ValueError, match="steps=0"):
        decode_tokens(model, model.init_cache(1, 4), prompt[:, 0], steps=0)
    with pytest.raises(TypeError, match="nnx.Module"):
        generate("model", prompt, max_new_tokens=2)
