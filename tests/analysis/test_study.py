"""The attention study: head types, chosen heads, recommendations, argument errors, and (slow) whole runs on
a tiny model and on a trained config's checkpoint, writing results.json and the three figures."""

import argparse
import json
import os

import jax
import numpy as np
import pytest

from effitrans.analysis import study
from effitrans.data import windows_batches
from effitrans.registry import build_model
from effitrans.train.trainer import Trainer
from tests.helpers import tiny_lm_experiment, tiny_model_config


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


@pytest.mark.slow  # ~40 s on 2 cores: trains 2 steps, then reads the checkpoint's attention and evaluates it
def test_cli_on_a_trained_config(tmp_path):
    config = tmp_path / "tiny.py"
    config.write_text(
        "from tests.helpers import tiny_lm_experiment\n\n\ndef get_config(arg=None):\n"
        "    return tiny_lm_experiment(steps=2)\n"
    )
    Trainer(tiny_lm_experiment(steps=2), str(tmp_path / "run"), verbose=False).train()
    out = tmp_path / "out"
    argv = [f"--config={config}", f"--workdir={tmp_path / 'run'}", f"--out={out}", "--passages=2"]
    argv += ["--eval_windows=1", "--coverage", "0.8", "--block_q=16", "--map_len=16", "--heads", "0:1"]
    assert study.main(argv) == 0
    doc = json.load(open(out / "results.json"))
    assert doc["model"]["config"] == str(config) and doc["seq_len"] == 32
    assert doc["map_heads"] == [{"why": "chosen", "layer": 0, "head": 1}]
    (rec,) = doc["recommendations"]
    assert rec["threshold"] == 0.8 and np.isfinite(rec["perplexity"]["recommended"])
