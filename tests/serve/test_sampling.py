"""The one sampler: greedy, temperature, top-k, top-p, per-row parameters in one batch, stop tokens; checks."""

import jax
import jax.numpy as jnp
import numpy as np

from effitrans.serve import apply_stop_tokens, check_sampling, sample_tokens

PROBS = np.array([0.5, 0.3, 0.15, 0.05], np.float32)


_sample = jax.jit(lambda l, r, t, k, p: sample_tokens(l, r, temperature=t, top_k=k, top_p=p))


def _draws(n=400, temperature=1.0, top_k=0, top_p=1.0):
    """n draws from PROBS; the parameters are traced arrays, so every call reuses one compilation."""
    logits = jnp.log(jnp.broadcast_to(PROBS, (n, 4)))
    full = lambda v, dt: jnp.full((n,), v, dt)
    return np.asarray(
        _sample(
            logits, jax.random.key(0), full(temperature, jnp.float32), full(top_k, jnp.int32), full(top_p, jnp.float32)
        )
    )


def test_filters_and_mixed_rows():
    assert set(_draws(temperature=1.0).tolist()) == {0, 1, 2, 3}
    assert set(_draws(temperature=1.0, top_k=2).tolist()) == {0, 1}
    assert set(_draws(temperature=1.0, top_p=0.8).tolist()) == {0, 1}  # 0.5 + 0.3 reaches 0.8
    assert set(_draws(temperature=1.0, top_p=0.81).tolist()) == {0, 1, 2}
    assert set(_draws(temperature=1.0, top_p=0.3).tolist()) == {0}
    assert set(_draws(temperature=0.0, top_k=3).tolist()) == {0}  # greedy ignores filters
    d = _draws(temperature=1.0)
    assert abs(np.mean(d == 0) - 0.5) < 0.08  # the draw follows the probs
    # Per-row parameters: row 0 greedy, row 1 top-k 1 (argmax), row 2 unrestricted.
    logits = jnp.log(jnp.broadcast_to(PROBS, (400, 4)))
    t = jnp.tile(jnp.array([0.0, 1.0, 1.0, 1.0]), 100)
    k = jnp.tile(jnp.array([0, 1, 0, 0], jnp.int32), 100)
    p = jnp.tile(jnp.array([1.0, 1.0, 1.0, 0.5]), 100)
    out = np.asarray(_sample(logits, jax.random.key(1), t, k, p)).reshape(100, 4)
    assert set(out[:, 0]) == {0} and set(out[:, 1]) == {0} and set(out[:, 3]) == {0}
    assert len(set(out[:, 2])) > 1


def test_check_sampling_messages():
    assert check_sampling(0.0, 0, 1.0, 10) is None
    assert "temperature=-1" in check_sampling(-1, 0, 1.0, 10)
    assert "top_k=11" in check_sampling(1.0, 11, 1.0, 10)
    assert "top_p=0" in check_sampling(1.0, 0, 0, 10)


def _nucleus_reference(probs, top_p):
    """The set of token ids top-p keeps: most likely first, until the kept mass reaches top_p."""
    order = np.argsort(-probs, kind="stable")
    mass_before = np.cumsum(probs[order]) - probs[order]
    return set(order[mass_before < top_p].tolist())


def test_each_mode_against_a_reference():
    logits = jax.random.normal(jax.random.key(3), (64, 50)) * 3
    argmax = np.asarray(logits.argmax(-1))
    # Greedy: argmax, by a Python 0 (no draw, rng None) and by per-row zeros.
    np.testing.assert_array_equal(sample_tokens(logits, None), argmax)
    np.testing.assert_array_equal(
        _sample(logits, jax.random.key(0), jnp.zeros(64), jnp.zeros(64, jnp.int32), jnp.ones(64)), argmax
    )
    # Top-k: never outside each row's k most likely tokens.
    top3 = np.asarray(jax.lax.top_k(logits, 3)[1])  # [B, 3]
    for key in range(5):
        drawn = np.asarray(sample_tokens(logits, jax.random.key(key), temperature=2.0, top_k=3))
        assert all(d in row for d, row in zip(drawn, top3))
    # Top-p: the drawn set is the reference nucleus.
    probs = np.array([0.07, 0.3, 0.05, 0.1, 0.25, 0.08, 0.15], np.float32)
    tiled = jnp.log(jnp.broadcast_to(probs, (3000, 7)))
    for p in (0.2, 0.5, 0.65, 0.9):  # (masses before each rank: 0, .3, .55, .7, .8, .88, .95)
        drawn = set(np.asarray(sample_tokens(tiled, jax.random.key(1), temperature=1.0, top_p=p)).tolist())
        assert drawn == _nucleus_reference(probs, p), p
    # Temperature (the unsorted draw of a Python top_k 0 / top_p 1): frequencies follow softmax(logits / T).
    drawn = np.asarray(sample_tokens(tiled, jax.random.key(2), temperature=0.5))
    want = probs**2 / (probs**2).sum()
    np.testing.assert_allclose(np.bincount(drawn, minlength=7) / len(drawn), want, atol=0.03)


def test_stop_tokens_pad_after_the_stop():
    done = jnp.zeros(3, bool)
    steps = [[5, 7, 1], [9, 2, 7], [4, 4, 4]]
    out = []
    for t in steps:
        tok, done = apply_stop_tokens(jnp.array(t, jnp.int32), done, jnp.array([7, 9], jnp.int32), 0)
        out.append(np.asarray(tok))
    np.testing.assert_array_equal(np.stack(out), [[5, 7, 1], [9, 0, 7], [0, 0, 0]])  # columns are rows
    np.testing.assert_array_equal(done, [True, True, True])
    same, d = apply_stop_tokens(jnp.array([3, 7]), jnp.array([False, True]), jnp.zeros((0,), jnp.int32), 0)
    np.testing.assert_array_equal(same, [3, 7])  # no stop tokens: unchanged
