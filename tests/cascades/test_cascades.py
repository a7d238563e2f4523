"""Sequential (FrugalGPT) and routing (RouteLLM) cascades: they route exactly as their thresholds say (counted
calls), refuse a cascade of one model and thresholds outside [0, 1], and the routing metrics match hand
computations; the `cascade` config group refuses bad values with the key, the value and what is allowed."""

import importlib.util
import os

import numpy as np
import pytest

from effitrans import defaults
from effitrans.cascades import routing as rt
from effitrans.cascades import sequential as sq
from effitrans.cascades.config import check_cascade_config, exit_layers_of
from effitrans.schema import ConfigError, load_config
from tests.helpers import ROOT


class CountingModel:
    """A stand-in model: returns `value` per row and remembers which rows it saw."""

    def __init__(self, value):
        self.value, self.seen = value, []

    def __call__(self, rows):
        self.seen.extend(np.asarray(rows).tolist())
        return np.full((len(rows),), self.value, np.float32)


def test_sequential_cascade_calls_each_stage_only_on_the_rows_that_reach_it():
    inputs = np.arange(6)
    scores = {0: np.array([0.9, 0.1, 0.6, 0.2, 0.8, 0.4]), 1: np.array([0.7, 0.2, 0.9, 0.6, 0.3, 0.55])}
    models = [CountingModel(10.0), CountingModel(20.0), CountingModel(30.0)]
    scorers = [lambda y, x, s=s: scores[s][x] for s in (0, 1)]
    cascade = sq.SequentialCascade(models, scorers, thresholds=[0.5, 0.5])
    out, stage = cascade(inputs)
    np.testing.assert_array_equal(stage, [0, 2, 0, 1, 0, 1])  # stage 1 scores 0.2, 0.6, 0.4 -> 0.55
    np.testing.assert_array_equal(out, [10, 30, 10, 20, 10, 20])
    assert cascade.calls == [6, 3, 1]
    assert models[1].seen == [1, 3, 5] and models[2].seen == [1]
    pure = sq.cascade_stages(np.stack([scores[0], scores[1]]), [0.5, 0.5])
    np.testing.assert_array_equal(pure, stage)
    assert sq.cascade_stages(np.stack([scores[0], scores[1]]), [1.0, 1.0]).tolist() == [2] * 6  # 1.0: never accept
    assert sq.cascade_stages(np.stack([scores[0], scores[1]]), [0.0, 0.0]).tolist() == [0] * 6


def test_sequential_cascade_refuses_one_model_and_bad_thresholds():
    with pytest.raises(ValueError, match=r"models has 1 model\(s\); a cascade needs at least 2"):
        sq.SequentialCascade([CountingModel(1.0)], [], thresholds=[])
    with pytest.raises(ValueError, match=r"threshold 1\.5 in thresholds=\[1\.5\] must be in \[0, 1\]"):
        sq.SequentialCascade([CountingModel(1.0), CountingModel(2.0)], [lambda y, x: y], thresholds=[1.5])
    with pytest.raises(ValueError, match=r"thresholds=\[0\.5, 0\.5\] has 2 entries; expected one per stage"):
        sq.cascade_stages(np.zeros((1, 3)), [0.5, 0.5])


def test_cascade_point_and_threshold_choice_trade_cost_for_quality():
    quality = np.array([[1, 0, 1, 0], [1, 1, 1, 1]], np.float64)  # cheap right on 0 and 2
    scores = np.array([[0.9, 0.2, 0.8, 0.6]])
    costs = [1.0, 10.0]
    p = sq.cascade_point(quality, scores, costs, [0.5])  # accepts 0, 2, 3 -> query 3 wrong
    assert p == {"quality": 0.75, "cost": (1 * 4 + 10 * 1) / 4, "calls": [4, 1]}
    best = sq.choose_thresholds(quality, scores, costs, target=1.0, grid=[0.0, 0.5, 0.7, 1.0])
    assert best["thresholds"] == [0.7] and best["cost"] == (4 + 20) / 4 and best["quality"] == 1.0
    assert sq.choose_thresholds(quality, scores, costs, target=1.1) is None


def test_routing_cascade_runs_only_the_routed_model_per_row():
    weak, strong = CountingModel(1.0), CountingModel(2.0)
    feats = np.array([[0.1], [0.9], [0.5], [0.7]])
    cascade = rt.RoutingCascade(weak, strong, router=lambda f: f[:, 0], threshold=0.6)
    out, to_strong = cascade(np.arange(4), feats)
    np.testing.assert_array_equal(to_strong, [False, True, False, True])
    np.testing.assert_array_equal(out, [1, 2, 1, 2])
    assert cascade.calls == [2, 2] and weak.seen == [0, 2] and strong.seen == [1, 3]
    with pytest.raises(ValueError, match=r"threshold=-0\.1 must be in \[0, 1\]"):
        rt.RoutingCascade(weak, strong, router=lambda f: f, threshold=-0.1)


def test_pgr_apgr_and_cpt_match_hand_computation():
    weak = np.array([0, 0, 1, 0], np.float64)  # mean 0.25
    strong = np.array([1, 1, 1, 0], np.float64)  # mean 0.75: gap 0.5, gains on queries 0 and 1
    perfect = np.array([0.9, 0.8, 0.1, 0.2])
    c, pgr = rt.pgr_curve(weak, strong, perfect)
    np.testing.assert_allclose(c, [0, 0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(pgr, [0, 0.5, 1.0, 1.0, 1.0])
    assert rt.apgr(weak, strong, perfect) == pytest.approx((0.25 + 0.75 + 1 + 1) / 4)
    assert rt.cpt(weak, strong, perfect, 0.5) == 0.25 and rt.cpt(weak, strong, perfect, 0.8) == 0.5
    worst = -perfect
    assert rt.apgr(weak, strong, worst) < 0.5 < rt.apgr(weak, strong, perfect)
    with pytest.raises(ValueError, match="must exceed the weak one's"):
        rt.pgr_curve(strong, weak, perfect)
    # Resamples where the statistic is undefined (NaN: no gap left) are left out of the interval.
    lo, hi = rt.bootstrap_interval(lambda idx: np.nan if idx[0] % 2 else 1.0, 10, samples=50)
    assert (lo, hi) == (1.0, 1.0)


def test_trained_routers_beat_the_random_routers_interval_on_a_learnable_split():
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(400, 8))
    hard = emb[:, 0] > 0.3  # the weak model fails on "hard" queries, the strong one mostly not
    weak = (~hard).astype(np.float64)
    strong = np.where(rng.random(400) < 0.9, 1.0, weak)
    labels = rt.needs_strong(weak, strong)
    train, test = slice(0, 300), slice(300, 400)
    lo, hi = rt.random_router_apgr(weak[test], strong[test], samples=200)
    assert lo < 0.5 < hi
    for router in (rt.fit_embedding_classifier(emb[train], labels[train]), rt.knn_router(emb[train], labels[train])):
        scores = router(emb[test])
        assert scores.shape == (100,) and ((scores >= 0) & (scores <= 1)).all()
        assert rt.apgr(weak[test], strong[test], scores) > hi
        assert rt.cpt(weak[test], strong[test], scores, 0.5) < 0.5


def test_crossfit_scores_never_score_an_example_with_a_fit_that_saw_it():
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(200, 4))
    right = (feats[:, 0] > 0).astype(np.float64)  # the stage is right exactly when feature 0 is positive
    dev = np.arange(200) < 120

    def memoriser(f, y):  # scores 1 on the examples it was fitted on, 0.5 on any other
        seen = {tuple(row) for row in f}
        return lambda q: np.asarray([1.0 if tuple(row) in seen else 0.5 for row in q])

    np.testing.assert_array_equal(sq.crossfit_scores(feats, right, dev, fit=memoriser), 0.5)  # nothing leaks
    scores = sq.crossfit_scores(feats, right, dev)  # the logistic regression learns the rule
    assert ((scores > 0.5) == (right > 0))[dev].mean() > 0.9 and ((scores > 0.5) == (right > 0))[~dev].mean() > 0.9
    with pytest.raises(ValueError, match=r"folds=1 must be >= 2"):
        sq.crossfit_scores(feats, right, dev, folds=1)
    with pytest.raises(ValueError, match=r"features \(200, 4\), labels \(199,\)"):
        sq.crossfit_scores(feats, right[:199], dev)


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"stages": [[4, 64]]}, r"config\.cascade\.stages=\[\[4, 64\]\] is a cascade of 1 model; a cascade needs at "
         r"least 2"),
        ({"stages": [[1, 32], [4]]}, r"stages=\[\[1, 32\], \[4\]\] is not allowed: expected a list of \[num_layers, "
         r"d_model\] pairs"),
        ({"thresholds": [1.5]}, r"thresholds=\[1\.5\] is not allowed: expected None \(chosen on the dev split\) or a "
         r"list of numbers in \[0, 1\]"),
        ({"thresholds": [-0.1]}, r"thresholds=\[-0\.1\] is not allowed"),
        ({"thresholds": [0.5, 0.5]}, r"thresholds=\[0\.5, 0\.5\] has 2 entries; expected one per stage but the last "
         r"\(1 for 2 stages\)"),
        ({"routers": ["oracle"]}, r"routers=\['oracle'\] is not allowed: expected a non-empty list of distinct names "
         r"from \['embedding_classifier', 'knn'\]"),
        ({"scorer": "saturation"}, r"scorer='saturation' is not allowed: expected one of \['max_prob', 'margin', "
         r"'entropy', 'trained'\]"),
        ({"exit_measures": ["max_prob", "vibes"]}, r"exit_measures=\['max_prob', 'vibes'\] is not allowed"),
        ({"exit_layers": [2, 4]}, r"exit_layers=\[2, 4\] must be strictly increasing layer counts in 1\.\.3 \(the "
         r"last stage has 4 layers\)"),
        ({"stages": [[1, 32], [1, 64]]}, r"the last stage has 1 layer, so it has no room for an exit"),
        ({"delta": 0.0}, r"delta=0\.0 is not allowed: expected a number in \(0, 1\)"),
        ({"epsilon": 1.0}, r"epsilon=1\.0 is not allowed: expected a number in \(0, 1\)"),
        ({"calibration": "bonferroni"}, r"calibration='bonferroni' is not allowed: expected one of \['ltt', "
         r"'empirical'\]"),
        ({"knn_k": 0}, r"knn_k=0 is not allowed: expected an int >= 1"),
        ({"router": "knn"}, r"config\.cascade\.router is not a known config key"),
    ],
)  # fmt: skip
def test_bad_cascade_configs_name_the_key_the_value_and_what_is_allowed(overrides, match):
    cfg = defaults.cascade(**overrides)
    with pytest.raises(ConfigError, match=match):
        check_cascade_config(cfg)


def test_the_shipped_cascade_config_validates_and_takes_overrides():
    cfg = load_config(os.path.join(ROOT, "configs", "cascades_listops.py:cascade.knn_k=8,cascade.scorer=margin"))
    check_cascade_config(cfg.cascade)
    assert cfg.cascade.knn_k == 8 and cfg.cascade.scorer == "margin"
    assert exit_layers_of(cfg.cascade) == [1, 2, 3]  # default: after every layer of the last stage but its last
    three = defaults.cascade(stages=[[1, 16], [2, 32], [6, 64]], thresholds=[0.8, 0.6], exit_layers=[2, 4])
    check_cascade_config(three)
    assert exit_layers_of(three) == [2, 4]


def test_the_experiment_refuses_a_bad_cascade_config_before_any_work(capsys):
    spec = importlib.util.spec_from_file_location(
        "cascades_experiment", os.path.join(ROOT, "experiments", "cascades.py")
    )
    experiment = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(experiment)
    with pytest.raises(SystemExit) as e:
        experiment.main(["--parts=listops", "--config.cascade.knn_k=0"])
    assert e.value.code == 2
    assert "config.cascade.knn_k=0 is not allowed: expected an int >= 1" in capsys.readouterr().err
