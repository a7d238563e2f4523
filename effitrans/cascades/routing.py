"""Routing cascades (RouteLLM, Ong et al. 2024): a router scores each query before any model runs and sends it
to the strong (expensive) model when the score is above a threshold, else to the weak one.

Routers are trained on which model was right for each training query (label 1: the strong model is needed,
i.e. it is right where the weak one is wrong): `fit_embedding_classifier` (logistic regression on the query's
embedding) and `knn_router` (similarity-weighted vote of the nearest training queries). Metrics as RouteLLM:
PGR(c), the share of the weak-strong quality gap recovered when a share c of queries goes to the strong
model; APGR, its average over c in [0, 1]; CPT(x), the least strong-call share with PGR >= x. A random
router's APGR is 0.5 in expectation; `bootstrap_interval` gives the interval to beat.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax


def needs_strong(weak_quality, strong_quality) -> np.ndarray:
    """Training labels [n]: 1 where the strong model beats the weak one on the query, else 0."""
    return (np.asarray(strong_quality) > np.asarray(weak_quality)).astype(np.float32)


def fit_embedding_classifier(embeddings, labels, *, l2: float = 1e-3, steps: int = 300, lr: float = 0.05):
    """Logistic regression on query embeddings [n, E] with labels [n] in {0, 1}, by full-batch Adam.
    Returns router(embeddings [m, E]) -> P(strong needed) float32 [m] in [0, 1], jnp throughout (it can run inside
    a jitted program, e.g. the cheap model's)."""
    x = jnp.asarray(embeddings, jnp.float32)
    y = jnp.asarray(labels, jnp.float32)
    if x.ndim != 2 or y.shape != (x.shape[0],):
        raise ValueError(f"embeddings {x.shape} and labels {y.shape}: expected [n, E] and [n]")
    mean, std = x.mean(0), x.std(0) + 1e-6
    params = {"w": jnp.zeros(x.shape[1]), "b": jnp.zeros(())}
    tx = optax.adam(lr)

    def loss(p):
        logits = ((x - mean) / std) @ p["w"] + p["b"]  # [n]
        return optax.sigmoid_binary_cross_entropy(logits, y).mean() + l2 * jnp.sum(p["w"] ** 2)

    @jax.jit
    def fit(p):
        def step(carry, _):
            p, s = carry
            g = jax.grad(loss)(p)
            u, s = tx.update(g, s, p)
            return (optax.apply_updates(p, u), s), None

        return jax.lax.scan(step, (p, tx.init(p)), None, length=steps)[0][0]

    params = fit(params)

    def router(queries):
        q = (jnp.asarray(queries, jnp.float32) - mean) / std
        return jax.nn.sigmoid(q @ params["w"] + params["b"])

    return router


def knn_router(embeddings, labels, *, k: int = 16):
    """Similarity-weighted nearest-neighbour router: a query's score is the cosine-weighted mean label of its k
    most similar training queries (negative similarities weigh 0; no positive neighbour: the mean label).
    Returns router(embeddings [m, E]) -> float32 [m] in [0, 1], jnp throughout (jittable: on a CPU it then
    runs in XLA's threads rather than beside them in BLAS's)."""
    train = np.asarray(embeddings, np.float32)
    labels = jnp.asarray(labels, jnp.float32)
    if not 1 <= k <= train.shape[0]:
        raise ValueError(f"k={k} must be in [1, number of training queries={train.shape[0]}]")
    train = jnp.asarray(train / np.maximum(np.linalg.norm(train, axis=1, keepdims=True), 1e-12))
    prior = labels.mean()

    def router(queries):
        q = jnp.asarray(queries, jnp.float32)
        q = q / jnp.maximum(jnp.linalg.norm(q, axis=1, keepdims=True), 1e-12)
        sim, nearest = jax.lax.top_k(q @ train.T, k)  # [m, k] each
        w = jnp.maximum(sim, 0.0)
        total = w.sum(1)
        return jnp.where(total > 0, (w * labels[nearest]).sum(1) / jnp.maximum(total, 1e-12), prior)

    return router


def pgr_curve(weak_quality, strong_quality, scores) -> tuple[np.ndarray, np.ndarray]:
    """(call shares c_k = k / n, PGR at each) for k = 0..n queries sent to the strong model in descending score
    order (ties: lower index first). PGR = (quality - weak mean) / (strong mean - weak mean)."""
    w, s = np.asarray(weak_quality, np.float64), np.asarray(strong_quality, np.float64)
    gap = s.mean() - w.mean()
    if gap <= 0:
        raise ValueError(f"the strong model's mean quality {s.mean():.4f} must exceed the weak one's {w.mean():.4f}")
    order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
    gains = np.concatenate([[0.0], np.cumsum((s - w)[order])]) / len(w)  # quality above weak with k strong calls
    return np.arange(len(w) + 1) / len(w), gains / gap


def apgr(weak_quality, strong_quality, scores) -> float:
    """Average PGR over the strong-call share in [0, 1] (trapezoid rule over k = 0..n)."""
    c, pgr = pgr_curve(weak_quality, strong_quality, scores)
    return float(np.sum((pgr[1:] + pgr[:-1]) / 2 * np.diff(c)))


def cpt(weak_quality, strong_quality, scores, target: float) -> float:
    """The least share of strong calls whose PGR reaches `target` (e.g. 0.5 for CPT(50%))."""
    if not 0.0 <= target <= 1.0:
        raise ValueError(f"target={target} must be in [0, 1]")
    c, pgr = pgr_curve(weak_quality, strong_quality, scores)
    return float(c[np.argmax(pgr >= target - 1e-12)])


def bootstrap_interval(statistic: Callable[[np.ndarray], float], n: int, *, samples: int = 1000, seed: int = 0,
                       level: float = 0.95) -> tuple[float, float]:  # fmt: skip
    """Percentile interval of statistic(indices [n] drawn with replacement) over `samples` resamples; resamples
    where the statistic is undefined (NaN, e.g. no quality gap left) are left out."""
    rng = np.random.default_rng(seed)
    values = [statistic(rng.integers(0, n, n)) for _ in range(samples)]
    lo, hi = np.nanquantile(values, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def random_router_apgr(weak_quality, strong_quality, *, samples: int = 1000, seed: int = 0, level: float = 0.95):
    """(lo, hi): the bootstrap interval of a random router's APGR (resampled queries, a fresh random order each)."""
    w, s = np.asarray(weak_quality), np.asarray(strong_quality)
    rng = np.random.default_rng(seed + 1)

    def stat(idx):
        return apgr(w[idx], s[idx], rng.random(len(idx))) if s[idx].mean() > w[idx].mean() else np.nan

    return bootstrap_interval(stat, len(w), samples=samples, seed=seed, level=level)


@dataclasses.dataclass
class RoutingCascade:
    """weak(inputs), strong(inputs) -> outputs [n, ...]; router(features) -> scores [n] in [0, 1]. A call routes
    each row before running any model and runs each model only on its rows; `calls` = [weak rows, strong rows]."""

    weak: Callable
    strong: Callable
    router: Callable
    threshold: float

    def __post_init__(self):
        if not 0.0 <= float(self.threshold) <= 1.0:
            raise ValueError(f"threshold={self.threshold} must be in [0, 1] (strong when score > threshold)")
        self.calls = [0, 0]

    def __call__(self, inputs, features):
        """inputs [n, ...] (what the models read), features [n, E] (what the router reads) ->
        (outputs [n, ...], to_strong bool [n])."""
        strong = np.asarray(self.router(features)) > self.threshold
        out = None
        for flag, model in ((False, self.weak), (True, self.strong)):
            rows = np.flatnonzero(strong == flag)
            if rows.size == 0:
                continue
            y = np.asarray(model(inputs[rows]))
            self.calls[int(flag)] += rows.size
            if out is None:
                out = np.zeros((len(inputs), *y.shape[1:]), y.dtype)
            out[rows] = y
        return out, strong
