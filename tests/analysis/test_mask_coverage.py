"""Mask coverage: candidates, the cheapest pattern per layer above a threshold, equal-density windows, and
running a model under per-layer masks (then restoring it)."""

import jax
import numpy as np
import pytest
from flax import nnx

from effitrans.analysis import mask_coverage as mc
from effitrans.kernels import masks
from effitrans.registry import build_model
from tests.helpers import tiny_model_config


def test_candidates_and_window_density():
    c = mc.candidate_masks(64, causal=True, windows=(8, 64), sinks=(4,), strides=(16,), blocks=(32,))
    assert list(c) == [
        "window8",
        "sink4+window8",
        "chunk32",
        "sink4+chunk32",
        "strided16",
        "sink4+strided16",
        "fixed32/4",
        "full",
    ]
    assert c["sink4+window8"] == masks.GlobalTokens(4) | masks.SlidingWindow(7, 0)
    enc = mc.candidate_masks(64, causal=False, windows=(8,), blocks=())
    assert "strided16" not in enc and enc["window8"] == masks.SlidingWindow(4, 4)
    for causal in (True, False):
        support = (masks.Causal() if causal else masks.Full()).dense(50, 50)
        for w in (1, 7, 16, 60):
            want = (mc.window_mask(w, causal=causal).dense(50, 50) & support).sum() / support.sum()
            assert mc.window_density(w, 50, causal=causal) == pytest.approx(want)
    width, d = mc.window_of_density(0.3, 50, causal=True)
    assert d >= 0.3 > mc.window_density(width - 1, 50, causal=True)


def test_recommend_takes_the_cheapest_pattern_above_the_threshold():
    names = ["window8", "strided16", "window32", "full"]
    density = np.array([0.1, 0.2, 0.4, 1.0])
    coverage = np.array([[0.95, 0.5, 0.99, 1.0], [0.5, 0.91, 0.95, 1.0], [0.2, 0.3, 0.6, 1.0]])
    recs = mc.recommend(coverage, density, names, 0.9)
    assert [r["pattern"] for r in recs] == ["window8", "strided16", "full"]
    assert [r["pattern"] for r in mc.recommend(coverage, density, names, 0.96)] == ["window32", "full", "full"]
    assert [r["pattern"] for r in mc.recommend(coverage, density, names, 1.0)] == ["full"] * 3
    for bad in (0.0, 1.5, -0.1, True, "0.9"):
        with pytest.raises(ValueError, match=r"coverage threshold must be a number in \(0, 1\]"):
            mc.recommend(coverage, density, names, bad)
    with pytest.raises(ValueError, match="names must include 'full'"):
        mc.recommend(coverage[:, :3], density[:3], names[:3], 0.9)


def test_layer_masks_apply_and_restore():
    model = build_model(tiny_model_config(num_layers=2, attention=dict(impl="reference")), seed=0)
    forward = nnx.jit(lambda m, t: m(t)[0])
    tokens = jax.random.randint(jax.random.key(0), (1, 16), 0, 61)
    changed = tokens.at[0, 0].set((tokens[0, 0] + 1) % 61)
    dense = forward(model, tokens)
    with mc.layer_masks(model, [masks.SlidingWindow(0, 0), masks.SlidingWindow(0, 0)]):
        a, b = forward(model, tokens), forward(model, changed)
        # Each token sees only itself: a change at position 0 reaches no later position.
        np.testing.assert_allclose(a[0, 1:], b[0, 1:], atol=1e-5)
        assert not np.allclose(a[0, 1:], dense[0, 1:], atol=1e-3)
    np.testing.assert_array_equal(forward(model, tokens), dense)
    with pytest.raises(ValueError, match="one mask .* per layer: 2, got 1"):
        with mc.layer_masks(model, [None]):
            pass
