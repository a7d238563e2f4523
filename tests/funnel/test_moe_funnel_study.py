"""experiments/moe_funnel.py's analysis: the MoE-minus-dense recall@1 loss is the difference of the two
models' paired losses on the same queries, pooled over seeds with a stratified paired bootstrap."""

import json

import numpy as np
import pytest

from effitrans.data.retrieval import paired_bootstrap, paired_recall_loss
from experiments import moe_funnel


def _run(model, seed, base, surgery, distill):
    row = lambda method, k, hits, cut: {
        "method": method,
        "at_layer": k,
        "stride": 2,
        "hits_at_1": "".join(map(str, hits)),
        "recall_loss_pts": 100.0 * (np.mean(base) - np.mean(hits)),
        "latency_cut_pct": cut,
        "flops_ratio": 0.6,
    }
    rows = [{**row("dense", None, base, 0.0), "stride": 1}]
    rows += [row("surgery", 1, surgery, 30.0 + seed), row("surgery+distill", 1, distill, 30.0 + seed)]
    return {"model": model, "seed": seed, "config": model, "rows": rows}


def test_compare_is_the_difference_of_paired_losses_pooled_over_seeds(tmp_path):
    rng = np.random.default_rng(0)
    hits = lambda p: (rng.random(200) < p).astype(int)
    runs = []
    for seed in (0, 1):
        for model, p in (("dense", 0.5), ("moe", 0.45)):
            runs.append(_run(model, seed, hits(0.55), hits(p), hits(p + 0.02)))
    comparison = moe_funnel.compare(runs, samples=300)
    assert [(c["method"], c["at_layer"]) for c in comparison] == [("surgery", 1), ("surgery+distill", 1)]
    for c in comparison:
        per_seed_diffs = []
        for s, ps in zip((0, 1), c["per_seed"]):
            row = lambda m, s=s: next(r for r in runs if r["model"] == m and r["seed"] == s)["rows"]
            loss = {}
            for m in ("dense", "moe"):
                base = moe_funnel.hits_array(row(m)[0]["hits_at_1"])
                var = moe_funnel.hits_array(next(r for r in row(m) if r["method"] == c["method"])["hits_at_1"])
                loss[m] = paired_recall_loss(2 - base, 2 - var)["loss_pts"]  # hit -> rank 1, miss -> rank 2
            assert ps["dense_loss"]["pts"] == pytest.approx(loss["dense"])
            assert ps["moe_loss"]["pts"] == pytest.approx(loss["moe"])
            assert ps["moe_minus_dense"]["pts"] == pytest.approx(loss["moe"] - loss["dense"])
            lo, hi = ps["moe_minus_dense"]["ci95_pts"]
            assert lo < ps["moe_minus_dense"]["pts"] < hi
            per_seed_diffs.append(ps["moe_minus_dense"]["pts"])
        assert c["moe_minus_dense"]["pts"] == pytest.approx(np.mean(per_seed_diffs))
        pooled = c["moe_minus_dense"]["ci95_pts"]
        widths = [p["moe_minus_dense"]["ci95_pts"][1] - p["moe_minus_dense"]["ci95_pts"][0] for p in c["per_seed"]]
        assert pooled[1] - pooled[0] < min(widths)  # two seeds' queries: a tighter interval than either alone
        assert c["dense_latency_cut_pct"] == pytest.approx(30.5) and c["moe_flops_ratio"] == 0.6
    assert "| surgery | 1 |" in moe_funnel.markdown(comparison)
    moe_funnel.plot(runs, comparison, str(tmp_path / "tradeoff.png"))
    assert (tmp_path / "tradeoff.png").stat().st_size > 0
    # A seed with only one of the two models is left out of the comparison.
    assert moe_funnel.compare(runs[:1]) == []
    # Runs made apart (one process per seed) combine into the same analysis.
    for seed in (0, 1):
        part = {"command": f"seed {seed}", "date": "d", "wall_s": 1.0, "runs": [r for r in runs if r["seed"] == seed]}
        (tmp_path / f"s{seed}.json").write_text(json.dumps(part))
    files = ",".join(str(tmp_path / f"s{seed}.json") for seed in (1, 0))
    assert moe_funnel.main([f"--combine={files}", f"--out={tmp_path / 'joint'}", "--bootstrap=300"]) == 0
    joint = json.loads((tmp_path / "joint" / "results.json").read_text())
    assert [s["command"] for s in joint["sources"]] == ["seed 1", "seed 0"]
    assert joint["comparison"] == json.loads(json.dumps(comparison))


def test_paired_bootstrap_one_stratum_is_paired_recall_loss_and_strata_weigh_equally():
    rng = np.random.default_rng(1)
    base, var = rng.integers(1, 3, 300), rng.integers(1, 3, 300)
    ref = paired_recall_loss(base, var, samples=1000)
    diff = (base <= 1).astype(float) - (var <= 1).astype(float)
    mean, lo, hi = paired_bootstrap([100 * diff], samples=1000)
    assert (mean, lo, hi) == pytest.approx((ref["loss_pts"], ref["ci_low_pts"], ref["ci_high_pts"]))
    mean, lo, hi = paired_bootstrap([np.ones(10), np.zeros(1000)], samples=200)
    assert mean == 0.5 and lo == pytest.approx(0.5) and hi == pytest.approx(0.5)  # constant within strata
    with pytest.raises(ValueError, match="non-empty list of non-empty 1-D arrays"):
        paired_bootstrap([np.zeros((2, 2))])
    with pytest.raises(ValueError, match="level=1.5 is not allowed"):
        paired_bootstrap([np.zeros(3)], level=1.5)
