"""Sequential cascades (FrugalGPT, Chen et al. 2023): call the cheapest model, score its answer, and pass the
query on to the next model when the score is not above that stage's threshold; the last model always answers.

Pure functions decide and evaluate from per-stage arrays (`cascade_stages`, `cascade_point`,
`choose_thresholds`); `crossfit_scores` scores with a trained scorer (FrugalGPT's: a small model predicting
whether a stage's answer is right) without scoring an example by a fit that saw it; `SequentialCascade` runs
real models, calling each stage only on the rows that reach it.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Sequence

import numpy as np

from effitrans.cascades.routing import fit_embedding_classifier


def _check_stages(num_stages: int, what: str) -> None:
    if num_stages < 2:
        raise ValueError(f"{what} has {num_stages} model(s); a cascade needs at least 2 (cheapest first)")


def _check_thresholds(thresholds, num_stages: int) -> list[float]:
    thresholds = [float(t) for t in thresholds]
    if len(thresholds) != num_stages - 1:
        raise ValueError(
            f"thresholds={thresholds} has {len(thresholds)} entries; expected one per stage but the last "
            f"({num_stages - 1})"
        )
    for t in thresholds:
        if not 0.0 <= t <= 1.0:
            raise ValueError(f"threshold {t} in thresholds={thresholds} must be in [0, 1] (accept when score > it)")
    return thresholds


def cascade_stages(scores, thresholds) -> np.ndarray:
    """The stage that answers each query: the first s whose score > thresholds[s], else the last.
    scores [S - 1, n] in [0, 1] (stage s's score of its own answer) -> int [n] in 0..S-1."""
    scores = np.asarray(scores, np.float64)
    thresholds = _check_thresholds(thresholds, scores.shape[0] + 1)
    _check_stages(scores.shape[0] + 1, "scores")
    accept = scores > np.asarray(thresholds)[:, None]  # [S - 1, n]
    return np.where(accept.any(0), accept.argmax(0), scores.shape[0]).astype(np.int64)


def cascade_point(quality, scores, costs, thresholds) -> dict:
    """Mean quality and mean cost of the cascade at `thresholds`.

    quality [S, n]: each model's quality on each query (e.g. 1 if correct); costs [S] per call. A query
    answered by stage s paid for stages 0..s. Returns {"quality", "cost", "calls": [S] (calls per stage)}."""
    quality, costs = np.asarray(quality, np.float64), np.asarray(costs, np.float64)
    stage = cascade_stages(scores, thresholds)
    n = quality.shape[1]
    reached = np.stack([stage >= s for s in range(quality.shape[0])])  # [S, n]: stage s was called
    return {
        "quality": float(quality[stage, np.arange(n)].mean()),
        "cost": float((reached * costs[:, None]).sum(0).mean()),
        "calls": reached.sum(1).tolist(),
    }


def choose_thresholds(quality, scores, costs, *, target: float, grid: Sequence[float] | None = None) -> dict:
    """The thresholds (one per stage but the last, from `grid`) of least mean cost whose mean quality on this
    (dev) split is >= target; ties go to higher quality. Returns cascade_point(...) | {"thresholds"}, or None
    when no grid point reaches the target. grid defaults to the scores' own quantiles (0, 0.05, ..., 1) and 1.0."""
    scores = np.asarray(scores, np.float64)
    _check_stages(scores.shape[0] + 1, "scores")
    if grid is None:
        grid = sorted(set(np.clip(np.quantile(scores, np.linspace(0, 1, 21)), 0.0, 1.0).tolist()) | {0.0, 1.0})
    best = None
    for ts in itertools.product(grid, repeat=scores.shape[0]):
        p = cascade_point(quality, scores, costs, ts)
        if p["quality"] >= target and (best is None or (p["cost"], -p["quality"]) < (best["cost"], -best["quality"])):
            best = {**p, "thresholds": list(ts)}
    return best


def crossfit_scores(features, labels, fit_on, *, folds: int = 2, seed: int = 0, fit: Callable | None = None):
    """A trained scorer's scores for every example, none from a fit that saw that example.

    features [n, F] (e.g. a stage's pooled embedding and probabilities), labels [n] in {0, 1} (1: the stage was
    right), fit_on bool [n]: the examples the scorer may learn from (the dev split, where thresholds are then
    chosen). Those are scored out of fold (`folds` random folds of fit_on, each scored by a fit on the others);
    every other example by a fit on all of fit_on. fit(features, labels) -> scorer(features) -> [m] in [0, 1]
    (default: effitrans.cascades.routing.fit_embedding_classifier, a logistic regression). -> [n] float64."""
    features, labels, fit_on = np.asarray(features), np.asarray(labels), np.asarray(fit_on, bool)
    fit = fit_embedding_classifier if fit is None else fit
    n = len(labels)
    if features.ndim != 2 or features.shape[0] != n or fit_on.shape != (n,):
        raise ValueError(
            f"features {features.shape}, labels {labels.shape}, fit_on {fit_on.shape}: expected [n, F], [n], [n]"
        )
    if folds < 2 or fit_on.sum() < folds:
        raise ValueError(f"folds={folds} must be >= 2 and at most the {int(fit_on.sum())} examples of fit_on")
    out = np.zeros(n)
    dev = np.flatnonzero(fit_on)
    fold = np.random.default_rng(seed).permutation(len(dev)) % folds
    for k in range(folds):
        held, train = dev[fold == k], dev[fold != k]
        out[held] = fit(features[train], labels[train])(features[held])
    rest = np.flatnonzero(~fit_on)
    if rest.size:
        out[rest] = fit(features[dev], labels[dev])(features[rest])
    return out


@dataclasses.dataclass
class SequentialCascade:
    """models[s](inputs) -> outputs (first axis = queries); scorers[s](outputs, inputs) -> scores [n] in [0, 1]
    for every stage but the last. Calling the cascade on a batch runs stage s only on the rows not yet
    accepted; `calls` counts the rows each stage saw."""

    models: Sequence[Callable]
    scorers: Sequence[Callable]
    thresholds: Sequence[float]

    def __post_init__(self):
        _check_stages(len(self.models), "models")
        if len(self.scorers) != len(self.models) - 1:
            raise ValueError(
                f"{len(self.scorers)} scorers for {len(self.models)} models; expected one per stage but the last"
            )
        self.thresholds = _check_thresholds(self.thresholds, len(self.models))
        self.calls = [0] * len(self.models)

    def __call__(self, inputs):
        """inputs [n, ...] -> (outputs [n, ...] from the answering stage, stage index int [n])."""
        n = len(inputs)
        rows = np.arange(n)
        out, stage = None, np.zeros(n, np.int64)
        for s, model in enumerate(self.models):
            part = inputs[rows]
            y = np.asarray(model(part))
            self.calls[s] += len(rows)
            if out is None:
                out = np.zeros((n, *y.shape[1:]), y.dtype)
            if s == len(self.models) - 1:
                accept = np.ones(len(rows), bool)
            else:
                accept = np.asarray(self.scorers[s](y, part)) > self.thresholds[s]
            out[rows[accept]], stage[rows[accept]] = y[accept], s
            rows = rows[~accept]
            if rows.size == 0:
                break
        return out, stage
