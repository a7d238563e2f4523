"""Mask coverage: candidates, the cheapest pattern per layer above a threshold, equal-density windows, and
running a model under per-layer masks (then restoring it)."""

import argparse
import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

from effitrans.analysis import mask_coverage as mc
from effitrans.analysis import study
from effitrans.data import windows_batches
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


def _fake_stats(num_layers=3, num_heads=2):
    names = ["window8", "full"]
    stats = []
    for layer in range(num_layers):
        st = {key: np.zeros(num_heads) for key in ("entropy", "distance", "sink", "band", "periodic")}
        st["period"] = np.zeros(num_heads, np.int64)
        st["periodic_lift"] = np.zeros(num_heads)
        st["coverage"] = np.array([[0.95 if layer else 0.5] * num_heads, [1.0] * num_heads])
        st["density"] = np.array([0.2, 1.0])
        st["names"] = names
        stats.append(st)
    stats[2]["sink"][1] = 0.9
    stats[1]["band"][0] = 0.8
    stats[0]["periodic"][1], stats[0]["periodic_lift"][1] = 0.3, 5.0
    return stats


def test_study_picks_heads_types_and_recommendations():
    stats = _fake_stats()
    assert study.head_types(stats) == {"sink": [[2, 1]], "local": [[1, 0]], "periodic": [[0, 1]]}
    assert study.chosen_heads(stats)[:3] == [("sink", 2, 1), ("local", 1, 0), ("periodic", 0, 1)]
    assert study.chosen_heads(stats, ["2:1"]) == [("chosen", 2, 1)]
    with pytest.raises(ValueError, match=r"layer 3 out of range; allowed 0..2"):
        study.chosen_heads(stats, ["3:0"])
    with pytest.raises(ValueError, match=r"head 2 out of range; allowed 0..1"):
        study.chosen_heads(stats, ["0:2"])
    (rec,) = study.recommendations(stats, [0.9], 64, causal=True)
    assert [r["pattern"] for r in rec["per_layer"]] == ["full", "window8", "window8"]
    assert rec["density"] == pytest.approx((1.0 + 0.2 + 0.2) / 3)
    assert rec["window"]["density"] >= rec["density"]


def test_cli_rejects_bad_arguments(capsys):
    for argv, msg in (
        (["--model=smollm2", "--coverage", "1.5"], "coverage threshold must be a number in (0, 1]"),
        (["--config=configs/lm_tiny.py"], "--config needs --workdir"),
        ([], "one of the arguments --model --config is required"),
    ):
        with pytest.raises(SystemExit) as e:
            study.parse_args(argv)
        assert e.value.code == 2 and msg in capsys.readouterr().err


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


@pytest.mark.slow  # ~20 s on 2 cores: compiles the model forward under three mask sets, draws three figures
def test_study_run_writes_results_and_plots(tmp_path):
    model = build_model(tiny_model_config(num_layers=2), seed=0)
    stream = np.asarray(jax.random.randint(jax.random.key(1), (400,), 0, 61), np.int32)
    calib = windows_batches(stream, 2, 32, batch=2)[0]["inputs"]
    held_out = windows_batches(stream[::-1].copy(), 2, 32, batch=2)
    args = argparse.Namespace(
        coverage=[0.5, 0.9], block_q=16, sink=2, band=2, batch=1, heads=None, map_len=16, out=str(tmp_path)
    )
    doc = study.run(model, calib, held_out, args=args, meta={"model": {"name": "tiny"}})
    saved = json.load(open(tmp_path / "results.json"))
    assert saved["seq_len"] == 32 and saved["causal"] and len(saved["layers"]) == 2
    assert saved["density"]["full"] == 1.0 and saved["layers"][0]["coverage"]["full"] == pytest.approx(1.0, abs=1e-5)
    for rec in saved["recommendations"]:
        assert len(rec["per_layer"]) == 2 and set(rec["perplexity"]) == {"dense", "recommended", "window"}
        assert all(np.isfinite(list(rec["perplexity"].values())))
    assert [os.path.basename(p) for p in doc["plots"]] == ["maps.png", "stats.png", "coverage.png"]
    assert all(os.path.getsize(p) > 1000 for p in doc["plots"])
