"""Model cascades measured on two tasks: early exit, a sequential cascade (FrugalGPT) and routers (RouteLLM).

    python experiments/cascades.py                      # listops and smollm2 (CPU-sized)
    python experiments/cascades.py --parts=listops      # one part: listops | smollm2 | smollm2_trained
    python experiments/cascades.py --parts=listops --config=configs/cascades_listops.py --config.cascade.knn_k=16

listops: the stages of config.cascade (effitrans.cascades.config; default configs/cascades_listops.py: a
1-layer d=32 and a 4-layer d=64 encoder classifier, the last with exits after layers 1, 2, 3 with own heads,
trained jointly) trained through the Trainer on short ListOps; the held-out examples are split in half, a dev
half (threshold calibration, cascade thresholds, router training) and a test half (every reported figure).
Cost is forward FLOPs per example (perf.forward_flops; an exit pays for the layers it ran and its head)
relative to the last stage. Early exit per confidence measure (cascade.exit_measures): a threshold sweep and
the calibrated threshold (cascade.calibration, delta, epsilon). Sequential: the stages in order, each scored
by cascade.scorer on its own logits, thresholds fixed (cascade.thresholds) or chosen on dev for the last
stage's accuracy - cascade.quality_gap. Routing (cascade.routers): routers on the first stage's pooled
embedding (its cost counted), trained on which of the first and last stage was right on the dev half,
APGR / CPT against a random router's 95% bootstrap interval.

smollm2: SmolLM2-135M with shared-head exits (final norm + LM head, no training: CALM's shared head) after
layers --smollm2_exits; held-out CPython docs text decoded token by token (teacher forcing) with
decode_step_with_exits, so an exited token's state fills the skipped layers' KV caches and later tokens see
that error; top-1 agreement with the full model, held-out NLL, and decode tokens/s at batch 1 and 8 with
ExitDecoder (exited rows leave the batch: the running rows are compacted into power-of-two buckets).
smollm2_trained: the same with own-head adapters and learned confidence classifiers trained first with the
backbone frozen (--smollm2_train_*; or loaded with --smollm2_heads), exits decided by the classifier.
smollm2_speed: decode tokens/s only, of loaded trained heads at --smollm2_speed_thresholds: teacher-forced with
ExitDecoder, and free-running greedy generation through effitrans.serve.ServingEngine(early_exit=...) against
the same engine running every layer (batch 1 and 8).

Writes experiments/results/cascades/{results.json, listops.png, smollm2.png, smollm2_trained.png}.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from effitrans import defaults, perf
from effitrans.bench.common import config_from_args
from effitrans.cascades import early_exit as ee
from effitrans.cascades import routing as rt
from effitrans.cascades import sequential as sq
from effitrans.cascades.config import check_cascade_config, exit_layers_of
from effitrans.schema import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

OUT = os.path.join(ROOT, "experiments", "results", "cascades")
DEFAULT_CONFIG = os.path.join(ROOT, "configs", "cascades_listops.py")
T0 = time.perf_counter()
MEASURES = ("max_prob", "margin", "entropy", "saturation", "learned")
# Thresholds, safest first; dense near 1, where saturation (cosines of consecutive residual states) lives.
SWEEP = [1.0, 0.99995, 0.9999, 0.9995, 0.999, 0.998, 0.995, *np.round(np.linspace(0.99, 0.0, 34), 4).tolist()]


def log(msg: str) -> None:
    print(f"[cascades {time.perf_counter() - T0:7.1f}s] {msg}", flush=True)


def pareto(points):
    """The (cost, quality) points no other point beats on both, by cost."""
    front, best = [], -np.inf
    for c, q in sorted(points, key=lambda p: (p[0], -p[1])):
        if q > best:
            front.append((c, q))
            best = q
    return front


# ---- listops -------------------------------------------------------------------------------------------


def listops_config(args, *, layers: int, d_model: int, exit_layers=None):
    data = defaults.data(
        "listops",
        seq_len=args.seq_len,
        min_len=8,
        max_len=args.seq_len - 2,
        max_depth=args.max_depth,
        max_args=args.max_args,
        num_eval_examples=args.eval_examples,
    )
    model = defaults.model(
        name="encoder_classifier",
        num_layers=layers,
        d_model=d_model,
        num_heads=4,
        num_kv_heads=4,
        head_dim=d_model // 4,
        ffn_width=2 * d_model,
        pooling="cls",
        num_classes=10,
    )
    if exit_layers:
        model.exits = defaults.exits(layers=list(exit_layers), head="own", distill_weight=0.5)
    train = defaults.train(
        task="classification",
        steps=args.steps,
        batch_size=32,
        learning_rate=2e-3,
        warmup_steps=args.steps // 10,
        checkpoint_every=args.steps,
        eval_every=args.steps,
        log_every=max(1, args.steps // 5),
    )
    return defaults.experiment(model, data, train, defaults.mesh())


def train_encoder(cfg, name):
    from effitrans.train.trainer import Trainer

    with tempfile.TemporaryDirectory() as workdir:
        trainer = Trainer(cfg, workdir, verbose=False)
        t = time.perf_counter()
        result = trainer.train()
        log(f"{name}: trained {cfg.train.steps} steps in {time.perf_counter() - t:.0f}s, eval {result['eval']}")
        model = trainer.model_from(result["state"]["params"], result["state"]["model_state"])
        batches = list(trainer.dataset.eval_batches())
    return model, batches


def listops_outputs(cheap, large, batches):
    """Per held-out example: labels [n], each cheap stage's logits [n, C] and pooled embedding [n, D_s], the
    large stage's ExitPass, and the inputs (tokens, mask) [n, T]."""
    run_cheap = nnx.jit(lambda m, t, k: (m(t, k), m.pooled(t, k)))
    run_large = nnx.jit(lambda m, t, k: ee.exit_pass(m, t, k))
    labels, logits, emb, passes, tokens, masks = [], [[] for _ in cheap], [[] for _ in cheap], [], [], []
    for b in batches:
        keep = np.asarray(b["example_weights"]) > 0
        t, k = jnp.asarray(b["inputs"]), jnp.asarray(b["mask"])
        for s, model in enumerate(cheap):
            lg, e = run_cheap(model, t, k)
            logits[s].append(np.asarray(lg)[keep])
            emb[s].append(np.asarray(e)[keep])
        out = run_large(large, t, k)
        labels.append(np.asarray(b["labels"])[keep])
        passes.append(jax.tree.map(lambda x, keep=keep: np.asarray(x)[keep], out))
        tokens.append(np.asarray(b["inputs"])[keep])
        masks.append(np.asarray(b["mask"])[keep])
    cat = lambda xs: np.concatenate(xs)
    large_pass = jax.tree.map(lambda *xs: cat(xs), *passes)
    return cat(labels), [cat(lg) for lg in logits], [cat(e) for e in emb], large_pass, (cat(tokens), cat(masks))


def _scorer_features(logits, pooled):
    """What the trained scorer reads: [pooled embedding, softmax probabilities] [n, D + C] (jnp: traceable)."""
    return jnp.concatenate([pooled, jax.nn.softmax(logits, -1)], 1)


def stage_scores(c, cheap_logits, cheap_emb, q_stages, dev, seed):
    """(scores [S - 1, n]: each cheap stage's score of its own answers by cascade.scorer, runtime scorers:
    scorer[s](logits, pooled) -> [m], jnp, run inside stage s's program when the cascade runs).
    "trained": a logistic regression on [pooled embedding, probabilities] predicting that the stage is right,
    cross-fitted on the dev half (sequential.crossfit_scores: no dev example is scored by a fit that saw it;
    the rest by a fit on all of dev, which is also the runtime scorer)."""
    if c.scorer != "trained":
        measure = lambda lg, _=None: ee.confidence(c.scorer, logits=lg)
        return np.stack([np.asarray(measure(jnp.asarray(lg))) for lg in cheap_logits]), [measure] * len(cheap_logits)
    feats = [np.asarray(_scorer_features(lg, e)) for lg, e in zip(cheap_logits, cheap_emb, strict=True)]
    scores = np.stack([sq.crossfit_scores(f, q, dev, seed=seed) for f, q in zip(feats, q_stages, strict=False)])
    fits = [rt.fit_embedding_classifier(f[dev], q[dev]) for f, q in zip(feats, q_stages, strict=False)]
    return scores, [lambda lg, e, fit=fit: fit(_scorer_features(lg, e)) for fit in fits]


def exit_costs(cfg_large, seq_len):
    """FLOPs per example after each exit and of the whole large model (a head is d x C: negligible)."""
    per_layer = perf.forward_flops(cfg_large.model, 1, seq_len) / cfg_large.model.num_layers
    return [per_layer * n for n in (*cfg_large.model.exits.layers, cfg_large.model.num_layers)]


def run_listops(args, results):
    c = args.cascade
    stages = [list(st) for st in c.stages]
    exit_layers = exit_layers_of(c)
    cfgs = [
        listops_config(args, layers=layers, d_model=d, exit_layers=exit_layers if s == len(stages) - 1 else None)
        for s, (layers, d) in enumerate(stages)
    ]
    models = []
    for s, (cfg, (layers, d)) in enumerate(zip(cfgs, stages, strict=True)):
        model, batches = train_encoder(cfg, f"stage {s} ({layers} layers, d={d})")
        models.append(model)
    large_cfg, num_layers = cfgs[-1], stages[-1][0]
    labels, cheap_logits, cheap_emb, lp, inputs = listops_outputs(models[:-1], models[-1], batches)
    s_emb = cheap_emb[0]  # what the routers read
    os.makedirs(OUT, exist_ok=True)  # the raw outputs, to redo the analysis without training
    np.savez(
        os.path.join(OUT, "listops_outputs.npz"),
        labels=labels,
        **{f"stage{s}_embedding": e for s, e in enumerate(cheap_emb)},
        **{f"stage{s}_logits": lg for s, lg in enumerate(cheap_logits)},
        **{f"large_{k}_{i}": np.asarray(v) for k in lp._fields for i, v in enumerate(getattr(lp, k))},
    )
    n = len(labels)
    dev, test = np.arange(n) < n // 2, np.arange(n) >= n // 2
    costs_exit = exit_costs(large_cfg, args.seq_len)
    c_large = costs_exit[-1]
    flops = [perf.forward_flops(cfg.model, 1, args.seq_len) for cfg in cfgs[:-1]] + [c_large]
    c_small = flops[0]
    q_stages = [(lg.argmax(-1) == labels).astype(float) for lg in cheap_logits]
    q_stages.append((lp.logits[-1].argmax(-1) == labels).astype(float))
    q_small, q_large = q_stages[0], q_stages[-1]
    acc = lambda q, m: float(q[m].mean())
    log(f"n={n} (dev {dev.sum()}, test {test.sum()}): stage accuracies {[acc(q, test) for q in q_stages]}")
    part = {
        "config": {
            "cascade": c.to_dict(),
            **{k: getattr(args, k) for k in ("steps", "seq_len", "max_depth", "max_args", "eval_examples")},
        },
        "examples": {"dev": int(dev.sum()), "test": int(test.sum())},
        "stages": [
            {"layers": st[0], "d_model": st[1], "accuracy": acc(q, test), "cost": f / c_large, "flops": f}
            for st, q, f in zip(stages, q_stages, flops, strict=True)
        ],
        "small": {"accuracy": acc(q_small, test), "cost": c_small / c_large, "flops": c_small},
        "large": {"accuracy": acc(q_large, test), "cost": 1.0, "flops": c_large},
        "exit_accuracy": [acc((lg.argmax(-1) == labels).astype(float), test) for lg in lp.logits],
        "exit_layers": [*exit_layers, num_layers],
    }
    stacked = np.stack(lp.logits)
    layer_counts = np.asarray(part["exit_layers"])
    part["early_exit"] = {}
    for measure in c.exit_measures:
        conf = np.asarray(ee.pass_confidences(ee.ExitPass(*jax.tree.map(jnp.asarray, tuple(lp))), measure))
        curve = []
        for t in SWEEP:
            idx = np.asarray(ee.simulate_exits(jnp.asarray(conf), t))
            pred = np.take_along_axis(stacked, idx[None, :, None], 0)[0].argmax(-1)
            curve.append(
                {
                    "threshold": t,
                    "accuracy": acc((pred == labels).astype(float), test),
                    "layers": float(layer_counts[idx][test].mean()),
                    "cost": float(np.asarray(costs_exit)[idx][test].mean() / c_large),
                }
            )
        dev_pass = ee.ExitPass(*jax.tree.map(lambda x: jnp.asarray(x[dev]), tuple(lp)))
        losses = ee.inconsistency_losses(dev_pass, measure, SWEEP)
        cal = ee.calibrate_threshold(SWEEP, losses, delta=c.delta, epsilon=c.epsilon, method=c.calibration)
        chosen = curve[SWEEP.index(cal["threshold"])] if cal["threshold"] in SWEEP else curve[0]
        part["early_exit"][measure] = {
            "curve": curve,
            "calibrated": {**chosen, "dev_risk": cal["risks"][max(cal["index"], 0)]},
        }
        log(
            f"exit {measure}: {c.calibration} threshold {chosen['threshold']} -> acc {chosen['accuracy']:.4f}, "
            f"layers {chosen['layers']:.2f} / {num_layers}"
        )

    # Sequential: the stages in order, each cheap stage scored by the scorer on its own logits; a query answered
    # by stage s paid for stages 0..s (cascade_point adds the per-call costs up).
    score, runtime_scorers = stage_scores(c, cheap_logits, cheap_emb, q_stages, dev, args.seed)  # [S - 1, n]
    quality = np.stack(q_stages)
    costs = [f / c_large for f in flops]  # per call
    ts = lambda t: [t] * (len(stages) - 1)  # the sweep: one threshold for every cheap stage
    seq_curve = [{"threshold": t, **sq.cascade_point(quality[:, test], score[:, test], costs, ts(t))} for t in SWEEP]
    target = acc(q_large, dev) - c.quality_gap
    if c.thresholds is None:
        chosen = sq.choose_thresholds(quality[:, dev], score[:, dev], costs, target=target)
    else:
        chosen = {
            **sq.cascade_point(quality[:, dev], score[:, dev], costs, list(c.thresholds)),
            "thresholds": list(c.thresholds),
        }
    test_point = sq.cascade_point(quality[:, test], score[:, test], costs, chosen["thresholds"]) if chosen else None
    part["sequential"] = {"curve": seq_curve, "target": target, "dev_choice": chosen, "test_at_dev_choice": test_point}
    log(f"sequential ({c.scorer}): thresholds {chosen and chosen['thresholds']} -> test {test_point}")

    # Routing: routers on the small model's embedding; route to the large model when score > threshold.
    labels_route = rt.needs_strong(q_small, q_large)
    fit = {
        "embedding_classifier": lambda: rt.fit_embedding_classifier(s_emb[dev], labels_route[dev]),
        "knn": lambda: rt.knn_router(s_emb[dev], labels_route[dev], k=c.knn_k),
    }
    routers = {name: fit[name]() for name in c.routers}
    if q_large[test].mean() <= q_small[test].mean():
        part["routing"] = {"skipped": "the large model is not better than the small one on the test half"}
        routers = {}
    else:
        lo, hi = rt.random_router_apgr(q_small[test], q_large[test], samples=args.bootstrap)
        part["routing"] = {"random_apgr_interval": [lo, hi]}
    qs, ql = q_small[test], q_large[test]
    for name, router in routers.items():
        scores = np.asarray(router(s_emb[test]))
        share, pgr = rt.pgr_curve(q_small[test], q_large[test], scores)
        a = rt.apgr(q_small[test], q_large[test], scores)
        boot = rt.bootstrap_interval(
            lambda idx, s=scores: rt.apgr(qs[idx], ql[idx], s[idx]) if ql[idx].mean() > qs[idx].mean() else np.nan,
            int(test.sum()),
            samples=args.bootstrap,
        )
        part["routing"][name] = {
            "apgr": a,
            "apgr_interval": boot,
            "beats_random": bool(a > hi),
            "cpt50": rt.cpt(q_small[test], q_large[test], scores, 0.5),
            "cpt80": rt.cpt(q_small[test], q_large[test], scores, 0.8),
            "curve": [
                {
                    "strong_share": float(ci),
                    "pgr": float(p),
                    "accuracy": float(acc(q_small, test) + p * (acc(q_large, test) - acc(q_small, test))),
                    "cost": float(c_small / c_large + ci),
                }
                for ci, p in zip(share[::4], pgr[::4])
            ],
        }
        log(
            f"router {name}: APGR {a:.3f} {boot} vs random [{lo:.3f}, {hi:.3f}]; CPT50 "
            f"{part['routing'][name]['cpt50']:.3f} CPT80 {part['routing'][name]['cpt80']:.3f}"
        )
    if chosen and args.latency_batches:
        part["latency"] = latency_costs(
            args, models, inputs, (dev, test), quality, score, chosen["thresholds"], runtime_scorers, routers, part,
            labels, s_emb,
        )  # fmt: skip
    results["listops"] = part


def _bucketed(fn, size):
    """fn(tokens, mask) (jitted) on n <= size rows padded to ee.bucket_size(n, size) rows (one compile per
    bucket); -> its outputs as numpy arrays of the n rows (read back: a timing includes the device work)."""

    def run(tokens, mask):
        n = len(tokens)
        pad = ee.bucket_size(n, size) - n
        if pad:
            tokens, mask = (np.concatenate([a, np.repeat(a[-1:], pad, 0)]) for a in (tokens, mask))
        return [np.array(o)[:n] for o in fn(jnp.asarray(tokens), jnp.asarray(mask))]  # writable copies

    return run


def router_threshold(scores, share: float) -> float:
    """The score threshold sending about `share` of the queries (those scored above it) to the strong model."""
    ordered = np.sort(np.asarray(scores, np.float64))[::-1]
    k = int(round(share * len(ordered)))
    return float(ordered[k]) if k < len(ordered) else -np.inf


def latency_costs(args, models, inputs, split, quality, score, thresholds, scorers, routers, part, labels, embedding):
    """part["latency"]: listops_latency's measured costs per batch size, with the sequential cascade's and the
    routers' quality and cost as predicted from the per-stage latencies (cascade_point with measured costs;
    router: first stage + router + share x last stage) next to the measured run. Each router runs at its
    CPT(80%) share of the test half (the point of its curve the table reports). split: (dev, test) bool [n];
    embedding [n, E]: what the routers read."""
    dev, test = split
    route_t = {
        name: router_threshold(np.asarray(r(embedding[test])), part["routing"][name]["cpt80"])
        for name, r in routers.items()
    }
    exit_points = {}
    for measure, e in part["early_exit"].items():
        exit_points[f"{measure}_calibrated"] = (measure, e["calibrated"]["threshold"])
        within = [p for p in e["curve"] if p["accuracy"] >= part["large"]["accuracy"] - 0.01]
        best = min(within, key=lambda p: p["layers"])  # the goal's point: fewest layers within 1 pt (test sweep)
        exit_points[f"{measure}_within_1pt"] = (measure, best["threshold"])
    raw = listops_latency(args, models, inputs, test, thresholds, scorers, routers, route_t, exit_points)
    out = {}
    for size, r in raw.items():
        cost, answers = r["cost"], r.pop("answers")
        stage_cost = [cost[f"stage{s}"] for s in range(len(models))]
        row = {**r, "stage_cost": stage_cost}
        predicted = sq.cascade_point(quality[:, test], score[:, test], stage_cost, thresholds)
        dev_choice = sq.choose_thresholds(
            quality[:, dev], score[:, dev], stage_cost, target=part["sequential"]["target"]
        )
        row["sequential"] = {
            "thresholds": list(thresholds),
            "measured_cost": cost["sequential"],
            "measured_accuracy": float((answers["sequential"] == labels[test]).mean()),
            "predicted": predicted,
            "curve": [
                {
                    "threshold": p["threshold"],
                    **sq.cascade_point(
                        quality[:, test], score[:, test], stage_cost, [p["threshold"]] * len(thresholds)
                    ),
                }
                for p in part["sequential"]["curve"]
            ],
            "dev_choice_by_latency": dev_choice,
            "test_at_latency_choice": dev_choice
            and sq.cascade_point(quality[:, test], score[:, test], stage_cost, dev_choice["thresholds"]),
        }
        row["routing"] = {
            name: {
                "strong_share": answers[f"router_{name}_strong_share"],
                "measured_cost": cost[f"router_{name}"],
                "predicted_cost": stage_cost[0] + cost[f"router_{name}_only"] + answers[f"router_{name}_strong_share"],
                "measured_accuracy": float((answers[f"router_{name}"] == labels[test]).mean()),
            }
            for name in routers
        }
        row["early_exit"] = {
            name: {
                "measure": measure,
                "threshold": threshold,
                "measured_cost": cost[f"exit_{name}"],
                "measured_accuracy": float((answers[f"exit_{name}"] == labels[test]).mean()),
                "flops_cost": next(
                    p["cost"] for p in part["early_exit"][measure]["curve"] if p["threshold"] == threshold
                ),
                "layers": next(
                    p["layers"] for p in part["early_exit"][measure]["curve"] if p["threshold"] == threshold
                ),
            }
            for name, (measure, threshold) in exit_points.items()
        }
        out[size] = row
    return out


def listops_latency(args, models, inputs, test, seq_thresholds, stage_scorers, routers, route_thresholds,
                    exit_points):  # fmt: skip
    """Measured cost on this machine: seconds per test example of each stage, each router and, run for real,
    the sequential cascade at its dev-chosen thresholds and each router at its dev-chosen threshold, at each
    batch size of --latency_batches (the test half in chunks of that many queries; a cascade's later stage runs
    only on the rows that reach it, padded to a power-of-two bucket). Variants alternate per round; medians of
    --repeats rounds. Costs are relative to the last stage alone, in the same rounds.

    stage_scorers[s](logits, pooled) -> score [n] (cheap stages); routers: {name: router(embeddings)};
    route_thresholds: {name: threshold}; exit_points: {name: (measure, threshold)}: the last stage alone with
    early exit (classify_with_exits: exited rows leave, the rest compacted into power-of-two buckets)."""
    tokens, mask = (a[test] for a in inputs)
    out = {}
    for size in args.latency_batches:
        out[str(size)] = _latency_at(
            size, args.repeats, models, tokens, mask, seq_thresholds, stage_scorers, routers, route_thresholds,
            exit_points,
        )  # fmt: skip
        log(f"latency at batch {size}: cost vs the last stage {out[str(size)]['cost']}")
    return out


def _latency_at(size, repeats, models, tokens, mask, seq_thresholds, stage_scorers, routers, route_thresholds,
                exit_points):  # fmt: skip
    """listops_latency at one batch size."""
    n, last = len(tokens), len(models) - 1

    def cheap(m, t, k, score):  # one program: logits [b, C], pooled [b, D], the stage's score of its answers [b]
        logits, pooled = m(t, k), m.pooled(t, k)
        return logits, pooled, score(logits, pooled)

    cheap_fn = nnx.jit(cheap, static_argnames="score")
    large_fn = nnx.jit(lambda m, t, k: (m(t, k),))
    stages = [
        _bucketed(
            functools.partial(cheap_fn, m, score=stage_scorers[s]) if s < last else functools.partial(large_fn, m),
            size,
        )
        for s, m in enumerate(models)
    ]
    routers = {name: jax.jit(r) for name, r in routers.items()}

    def scored(s):  # stage s as SequentialCascade wants it: logits [n, C] and the stage's score in one array
        def run(x):
            res = stages[s](x[:, 0], x[:, 1].astype(mask.dtype))
            score = res[2] if s < last else np.zeros(len(x))
            return np.concatenate([res[0], score[:, None]], 1)

        return run

    cascade = sq.SequentialCascade([scored(s) for s in range(last + 1)], [lambda y, x: y[:, -1]] * last, seq_thresholds)
    x_all = np.stack([tokens, mask.astype(tokens.dtype)], 1)  # [n, 2, T]: what SequentialCascade hands a stage
    chunks = [slice(i, min(i + size, n)) for i in range(0, n, size)]
    answers = {}

    def run_cascade():
        answers["sequential"] = np.concatenate([cascade(x_all[ch])[0][:, :-1].argmax(-1) for ch in chunks])

    def run_router(name):
        def run():
            pred, strong_rows = [], 0
            for ch in chunks:
                logits, pooled, _ = stages[0](tokens[ch], mask[ch])
                strong = np.flatnonzero(np.asarray(routers[name](pooled)) > route_thresholds[name])
                if strong.size:
                    logits[strong] = stages[last](tokens[ch][strong], mask[ch][strong])[0]
                pred.append(logits.argmax(-1))
                strong_rows += strong.size
            answers[f"router_{name}"] = np.concatenate(pred)
            answers[f"router_{name}_strong_share"] = strong_rows / n

        return run

    def run_stage(s):
        return lambda: [stages[s](tokens[ch], mask[ch]) for ch in chunks]

    emb = [stages[0](tokens[ch], mask[ch])[1] for ch in chunks]
    variants = {f"stage{s}": run_stage(s) for s in range(last + 1)}
    variants["sequential"] = run_cascade
    variants.update({f"router_{name}": run_router(name) for name in routers})
    variants.update(
        {f"router_{name}_only": (lambda r=r: [np.asarray(r(e)) for e in emb]) for name, r in routers.items()}
    )

    def run_exits(name, measure, threshold):  # the last stage alone with early exit (classify_with_exits)
        def run():
            pred = [
                np.asarray(ee.classify_with_exits(models[last], tokens[ch], mask[ch], measure=measure,
                                                  threshold=threshold)[0]).argmax(-1)
                for ch in chunks
            ]  # fmt: skip
            answers[f"exit_{name}"] = np.concatenate(pred)

        return run

    variants.update({f"exit_{name}": run_exits(name, *point) for name, point in exit_points.items()})
    for b in sorted({ee.bucket_size(k, size) for k in range(1, size + 1)}):  # compile every bucket
        for f in stages:
            f(tokens[:b], mask[:b])
    times = {k: [] for k in variants}
    for _ in range(repeats + 1):  # round 0 warms up
        for k, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    sec = {k: float(np.median(v[1:])) / n for k, v in times.items()}
    large = sec[f"stage{last}"]
    calls = [c // (repeats + 1) for c in cascade.calls]
    return {"seconds_per_example": sec, "cost": {k: v / large for k, v in sec.items()}, "sequential_calls": calls,
            "answers": answers}  # fmt: skip


# ---- SmolLM2 -------------------------------------------------------------------------------------------


def smollm2_with_exits(layers, head="shared"):
    """SmolLM2-135M (import_gguf) with exits after `layers` (`head`: shared | own); exit heads at their zero
    init (an untrained own head equals the shared one)."""
    from effitrans.models import import_gguf
    from effitrans.registry import build_model

    model, tok, cfg = import_gguf.load_with_config()
    cfg.exits = defaults.exits(layers=list(layers), head=head)
    abstract = nnx.eval_shape(lambda: build_model(cfg))
    graphdef, state = nnx.split(abstract)
    pure = nnx.to_pure_dict(state)
    loaded = nnx.to_pure_dict(nnx.state(model))
    pure = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), pure)
    if head == "own":  # the adapters' norms start at SmolLM2's RMSNorm init (scale 1)
        pure["stack"]["exits"]["norms"] = jax.tree.map(jnp.ones_like, pure["stack"]["exits"]["norms"])
    pure = {**pure, "stack": {**pure["stack"], **{k: v for k, v in loaded["stack"].items()}}} | {
        k: v for k, v in loaded.items() if k != "stack"
    }
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state), tok, cfg


def smollm2_streams(tok):
    """(training stream, held-out stream): the CPython docs' training and validation documents, tokenized."""
    from effitrans.data import load_corpus, split_documents

    corpus = load_corpus()
    train_idx, val_idx = split_documents(corpus, 0.05)
    enc = lambda idx: np.concatenate([np.asarray(tok.encode(corpus.documents[i]).ids + [0], np.int32) for i in idx])
    return enc(train_idx), enc(val_idx)


def smollm2_text(stream, length, rows, seed):
    starts = np.random.default_rng(seed).integers(0, stream.size - length - 1, rows)
    return np.stack([stream[s : s + length + 1] for s in starts])  # [rows, length + 1]


def train_exits(model, cfg, stream, args):
    """Own-head adapters + confidence classifiers of SmolLM2's exits, trained through the Trainer with the
    backbone frozen (exits.frozen_backbone: only the exit heads move, the backbone's backward is skipped) on
    random windows of the training documents: KL(last layer || exit) per exit and the classifiers' BCE."""
    import ml_collections

    from effitrans.pruning.recovery import StepBatches, token_batches
    from effitrans.train.trainer import Trainer

    steps = args.smollm2_train_steps
    cfg.exits.update(
        frozen_backbone=True, loss_weights=[0.0] * len(cfg.exits.layers), distill_weight=1.0, confidence_weight=1.0
    )
    train = defaults.train(
        task="lm",
        steps=steps,
        batch_size=args.smollm2_train_batch,
        learning_rate=args.smollm2_train_lr,
        warmup_steps=max(1, steps // 10),
        weight_decay=0.0,
        checkpoint_every=10**9,
        eval_every=10**9,
        log_every=max(1, steps // 10),
    )
    get_batch = token_batches(stream, batch_size=args.smollm2_train_batch, seq_len=args.smollm2_train_len, seed=1)
    t = time.perf_counter()
    with tempfile.TemporaryDirectory() as workdir:
        trainer = Trainer(
            ml_collections.ConfigDict({"train": train, "model": cfg}),
            workdir,
            model=model,
            dataset=StepBatches(get_batch),
            verbose=False,
        )
        out = trainer.train()
        model = trainer.model_from(out["state"]["params"], out["state"]["model_state"])
    seconds = time.perf_counter() - t
    history = out["history"]
    log(f"SmolLM2 exits trained: {steps} steps in {seconds:.0f}s; last {history[-1]}")
    heads = nnx.to_pure_dict(nnx.state(model.stack.exits))
    os.makedirs(OUT, exist_ok=True)
    np.savez(os.path.join(OUT, "smollm2_exit_heads.npz"), **{k: np.asarray(v) for k, v in _flat(heads).items()})
    tokens = int(train.batch_size * args.smollm2_train_len)
    return model, {"steps": steps, "seconds": seconds, "tokens_per_step": tokens, "history": history}


def load_exit_heads(model, path):
    """Sets model's exit heads to those train_exits saved in `path`."""
    saved = np.load(path)
    state = nnx.state(model.stack.exits)
    pure = nnx.to_pure_dict(state)
    flat = _flat(pure)
    if set(flat) != set(saved.files):
        raise ValueError(f"{path} holds {sorted(saved.files)}; this model's exit heads are {sorted(flat)}")
    nnx.replace_by_pure_dict(state, _unflat({k: jnp.asarray(saved[k]) for k in saved.files}, pure))
    nnx.update(model.stack.exits, state)


def _unflat(flat, like, prefix=""):
    return {
        k: _unflat(flat, v, f"{prefix}{k}.") if isinstance(v, dict) else flat[f"{prefix}{k}"] for k, v in like.items()
    }


def _flat(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def teacher_forced(model, text, *, measure, thresholds, prefill):
    """Decode text [B, L + 1] token by token after a prefill, with exits, once per threshold (one compiled
    step: the threshold is an argument): {threshold: (argmax, NLL of the next token, exit index)}, each
    [B, L - prefill]."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def prefill_fn(state, toks):
        m = nnx.merge(graphdef, state)
        caches = m.init_cache(toks.shape[0], text.shape[1])
        return m(toks, cache=caches, decode=True)[1]

    @jax.jit
    def step(state, tok, caches, target, threshold):
        m = nnx.merge(graphdef, state)
        logits, caches, idx = ee.decode_step_with_exits(m, tok, caches, measure=measure, threshold=threshold)
        logp = jax.nn.log_softmax(logits[:, 0], -1)
        return jnp.argmax(logits[:, 0], -1), -jnp.take_along_axis(logp, target[:, None], 1)[:, 0], idx, caches

    toks = jnp.asarray(text)
    out = {}
    for threshold in thresholds:
        caches = prefill_fn(state, toks[:, :prefill])
        preds, nll, idx = [], [], []
        for t in range(prefill, text.shape[1] - 1):
            p, n, i, caches = step(state, toks[:, t : t + 1], caches, toks[:, t + 1], jnp.float32(threshold))
            preds.append(p), nll.append(n), idx.append(i)  # noqa: B018
        out[threshold] = (np.stack(preds, 1), np.stack(nll, 1), np.stack(idx, 1))
    return out


def decode_speed(model, text, *, measure, threshold, prefill, repeats):
    """Tokens/s of teacher-forced decoding of text [B, L + 1] after a prefill: the full model's jitted step and
    ExitDecoder's (exited rows compacted out of the batch), interleaved per round (medians), plus the mean layers
    the exit decoder ran per token and its block share (rows x blocks its segments ran, bucket padding
    included, over batch x layers)."""
    graphdef, state = nnx.split(model)
    full_step = jax.jit(lambda state, tok, caches: nnx.merge(graphdef, state)(tok, cache=caches, decode=True))
    prefill_fn = jax.jit(
        lambda state, toks: nnx.merge(graphdef, state)(
            toks, cache=nnx.merge(graphdef, state).init_cache(toks.shape[0], text.shape[1]), decode=True
        )[1]
    )
    decoder = ee.ExitDecoder(model, measure=measure, threshold=threshold)
    toks = jnp.asarray(text)
    counts = np.asarray([*decoder.layers, decoder.num_layers])
    steps = range(prefill, text.shape[1] - 1)

    def run_full():
        caches = prefill_fn(state, toks[:, :prefill])
        for t in steps:
            logits, caches = full_step(state, toks[:, t : t + 1], caches)
        return jax.block_until_ready(logits)

    def run_exit():
        caches, used, rows = prefill_fn(state, toks[:, :prefill]), [], []
        for t in steps:
            logits, caches, idx = decoder.step(toks[:, t : t + 1], caches)
            used.append(counts[np.asarray(idx)])
            rows.append(decoder.block_rows)
        jax.block_until_ready(logits)
        return float(np.mean(used)), float(np.mean(rows)) / (text.shape[0] * decoder.num_layers)

    run_full(), run_exit()  # compile
    times = ([], [])
    layers = block_share = None
    for _ in range(repeats):
        for i, fn in enumerate((run_full, run_exit)):
            t0 = time.perf_counter()
            r = fn()
            times[i].append(time.perf_counter() - t0)
            layers, block_share = r if i == 1 else (layers, block_share)
    tokens = text.shape[0] * len(steps)
    full_s, exit_s = float(np.median(times[0])), float(np.median(times[1]))
    return {
        "batch": int(text.shape[0]),
        "measure": measure,
        "threshold": threshold,
        "full_tokens_per_s": tokens / full_s,
        "exit_tokens_per_s": tokens / exit_s,
        "speedup": full_s / exit_s,
        "layers": layers,
        "block_share": block_share,
        "rounds": repeats,
    }


def engine_speed(model, prompts, *, measure, threshold, new_tokens, repeats):
    """Greedy generation through effitrans.serve.ServingEngine, every layer vs early_exit (per-row exits inside
    the continuous batch, exited rows compacted out), for the prompts int [B, P] as B requests in B rows,
    alternated per round (medians after one warm-up round each). Tokens/s count generated tokens (the first,
    from the prefill, included) over the wall time of the whole run, prefill included. Agreement: the share of
    generated positions where the exit engine's token equals the full one's (greedy continuations diverge
    after a first difference, so this is stricter than teacher-forced agreement)."""
    from effitrans.serve import Request, ServingEngine

    batch, max_len = prompts.shape[0], prompts.shape[1] + new_tokens
    full = ServingEngine(model, max_batch=batch, max_len=max_len)
    exiting = ServingEngine(
        model, max_batch=batch, max_len=max_len, early_exit={"measure": measure, "threshold": threshold}
    )
    requests = [Request(p.tolist(), max_new_tokens=new_tokens) for p in prompts]
    times, outputs = ([], []), [None, None]
    for r in range(repeats + 1):  # round 0 compiles
        for i, engine in enumerate((full, exiting)):
            t0 = time.perf_counter()
            out = engine.generate(requests)
            if r:
                times[i].append(time.perf_counter() - t0)
            outputs[i] = [o.tokens for o in out]
    tokens = batch * new_tokens
    full_s, exit_s = float(np.median(times[0])), float(np.median(times[1]))
    same = np.asarray(outputs[0]) == np.asarray(outputs[1])  # [B, new_tokens]
    stats = exiting.exit_stats()
    return {
        "batch": batch,
        "prompt": int(prompts.shape[1]),
        "new_tokens": new_tokens,
        "measure": measure,
        "threshold": threshold,
        "full_tokens_per_s": tokens / full_s,
        "exit_tokens_per_s": tokens / exit_s,
        "speedup": full_s / exit_s,
        "agreement": float(same.mean()),
        "first_difference": float(np.mean([np.argmin(row) if not row.all() else new_tokens for row in same])),
        "layers": stats["mean_layers"],
        "block_share": stats["block_share"],
        "rounds": repeats,
    }


def run_smollm2(args, results, *, trained=False):
    """Part smollm2 (shared-head exits, untrained) or smollm2_trained (own heads + confidence classifiers
    trained with the backbone frozen; decisions by the learned classifier)."""
    key = "smollm2_trained" if trained else "smollm2"
    layers = [int(x) for x in args.smollm2_exits.split(",")]
    model, tok, cfg = smollm2_with_exits(layers, head="own" if trained else "shared")
    n_layers = cfg.num_layers
    train_stream, val_stream = smollm2_streams(tok)
    text = smollm2_text(val_stream, args.smollm2_len, args.smollm2_rows, args.seed)
    log(f"SmolLM2: {n_layers} layers, exits after {layers}; text {text.shape}")
    training = None
    if trained and args.smollm2_heads:  # heads of an earlier run (smollm2_exit_heads.npz)
        load_exit_heads(model, args.smollm2_heads)
        training = {"loaded_from": args.smollm2_heads}
    elif trained:
        model, training = train_exits(model, cfg, train_stream, args)
    # One full pass gives every exit's outputs (no KV error) for calibration and the sweep.
    full_pass = nnx.jit(lambda m, t: ee.exit_pass(m, t))(model, jnp.asarray(text[:, :-1]))
    counts = np.asarray([*layers, n_layers])
    preds = jnp.stack([jnp.argmax(lg, -1) for lg in full_pass.logits])  # [X + 1, B, L]
    full_pred = np.asarray(preds[-1])  # [B, L]
    half = text.shape[0] // 2
    part = {
        "exit_layers": layers,
        "num_layers": n_layers,
        "text": list(text.shape),
        "exit_agreement": [float((np.asarray(p) == full_pred).mean()) for p in preds],
        "training": training,
    }
    decode_measure = "learned" if trained else "max_prob"
    part["sweep"] = {}
    for measure in ("max_prob", "saturation", "learned") if trained else ("max_prob", "saturation"):
        conf = ee.pass_confidences(full_pass, measure)
        rows = []
        for t in SWEEP[:7] + SWEEP[7::3]:
            idx = np.asarray(ee.simulate_exits(conf, t))
            pred = np.take_along_axis(np.asarray(preds), idx[None], 0)[0]
            rows.append(
                {
                    "threshold": t,
                    "agreement": float((pred == full_pred)[half:].mean()),
                    "layers": float(counts[idx][half:].mean()),
                }
            )
        dev_pass = jax.tree.map(lambda x: x[:half], full_pass)
        losses = ee.inconsistency_losses(dev_pass, measure, SWEEP)
        cal = ee.calibrate_threshold(SWEEP, losses, delta=0.05, epsilon=args.cascade.epsilon)
        emp = ee.calibrate_threshold(SWEEP, losses, delta=0.05, method="empirical")
        part["sweep"][measure] = {
            "curve": rows,
            "ltt_threshold": cal["threshold"],
            "empirical_threshold": emp["threshold"],
        }
        log(f"SmolLM2 {measure}: delta 0.05 thresholds LTT {cal['threshold']}, empirical {emp['threshold']}; {rows}")
    # Real decoding with KV propagation at the decode measure's calibrated thresholds (test half of the rows);
    # speed at each measure's empirically calibrated threshold.
    picks = {part["sweep"][decode_measure][k] for k in ("ltt_threshold", "empirical_threshold")}
    test = text[half:]
    prefill = args.smollm2_len // 2
    thresholds = sorted(picks | set(args.smollm2_thresholds) | {1.0}, reverse=True)
    decoded = teacher_forced(model, test, measure=decode_measure, thresholds=thresholds, prefill=prefill)
    ref_pred, ref_nll, _ = decoded[1.0]
    rows = []
    conf_decode = ee.pass_confidences(full_pass, decode_measure)
    for t in thresholds:
        pred, nll, idx = decoded[t]
        all_idx = ee.simulate_exits(conf_decode, t)  # [B, L]: no KV error
        sim = np.take_along_axis(np.asarray(preds), np.asarray(all_idx)[None], 0)[0][half:, prefill:]
        sim_idx = np.asarray(all_idx)[half:, prefill:]
        rows.append(
            {
                "threshold": t,
                "agreement": float((pred == ref_pred).mean()),
                "agreement_without_kv_error": float((sim == full_pred[half:, prefill:]).mean()),
                "nll": float(nll.mean()),
                "full_nll": float(ref_nll.mean()),
                "layers": float(counts[idx].mean()),
                "layers_without_kv_error": float(counts[sim_idx].mean()),
            }
        )
        log(f"SmolLM2 decode {decode_measure} > {t}: {rows[-1]}")
    part["decode_measure"] = decode_measure
    part["decode"] = rows
    results[key] = part
    write(results)  # the quality figures survive a failure of the timing below
    speed = []
    for measure in (decode_measure, "max_prob") if trained else ("max_prob", "saturation"):
        t = part["sweep"][measure]["empirical_threshold"]
        for batch in (1, 8):
            speed.append(
                decode_speed(model, test[:batch], measure=measure, threshold=t, prefill=prefill, repeats=args.repeats)
            )
            log(f"SmolLM2 decode speed: {speed[-1]}")
        part["speed"] = speed
        write(results)


def run_smollm2_speed(args, results):
    """Part smollm2_speed: decode tokens/s of the trained exits (--smollm2_heads) decided by the learned
    classifier at --smollm2_speed_thresholds, batch 1 and 8, on the smollm2_trained part's test windows."""
    if not args.smollm2_heads:
        raise ValueError("--parts=smollm2_speed needs --smollm2_heads=<smollm2_exit_heads.npz of smollm2_trained>")
    layers = [int(x) for x in args.smollm2_exits.split(",")]
    model, tok, _ = smollm2_with_exits(layers, head="own")
    load_exit_heads(model, args.smollm2_heads)
    text = smollm2_text(smollm2_streams(tok)[1], args.smollm2_len, args.smollm2_rows, args.seed)
    test, prefill = text[text.shape[0] // 2 :], args.smollm2_len // 2
    part = results["smollm2_speed"] = {"heads": args.smollm2_heads, "exit_layers": layers, "speed": [], "engine": []}
    for t in args.smollm2_speed_thresholds:
        for batch in (1, 8):
            row = decode_speed(
                model, test[:batch], measure="learned", threshold=t, prefill=prefill, repeats=args.repeats
            )
            part["speed"].append(row)
            log(f"SmolLM2 decode speed: {row}")
            write(results)
    for t in args.smollm2_speed_thresholds:  # the serving engine, free-running greedy generation
        for batch in (1, 8):
            row = engine_speed(
                model, test[:batch, :prefill], measure="learned", threshold=t, new_tokens=args.smollm2_new_tokens,
                repeats=args.repeats,
            )  # fmt: skip
            part["engine"].append(row)
            log(f"SmolLM2 serving engine: {row}")
            write(results)


# ---- output --------------------------------------------------------------------------------------------


def write(results):
    """results.json, keeping the part(s) another run of this script wrote since this one started."""
    os.makedirs(OUT, exist_ok=True)
    results["elapsed_s"] = time.perf_counter() - T0
    path = os.path.join(OUT, "results.json")
    if os.path.exists(path):
        done = set(results.get("parts_run", ()))
        old = json.load(open(path))
        results.update({k: v for k, v in old.items() if k in PARTS and k not in done})
    with open(os.path.join(OUT, "results.json"), "w") as f:
        json.dump(results, f, indent=1, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))


def _finish(plt, fig, ax, xlabel, ylabel, title, name):
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(OUT, f"{name}.png"), dpi=120)
    plt.close(fig)


def plot_latency(plt, r):
    """listops_latency.png: the sequential cascade's cost in FLOPs and in measured latency at each batch size,
    the measured runs (stars: sequential at its dev-chosen thresholds; triangles: routers at CPT(80%);
    diamonds: the last stage with early exit at each measure's calibrated and within-1-point thresholds) and
    the single stages at their measured cost."""
    fig, ax = plt.subplots(figsize=(8, 5.5))
    sc = r["sequential"]["curve"]
    ax.plot([p["cost"] for p in sc], [p["quality"] for p in sc], "--", color="gray", lw=1, label="sequential, FLOPs")
    for (size, row), color in zip(r["latency"].items(), ("C0", "C1", "C2", "C3"), strict=False):
        curve = row["sequential"]["curve"]
        ax.plot([p["cost"] for p in curve], [p["quality"] for p in curve], "-", color=color, lw=1,
                label=f"sequential, latency at batch {size}")  # fmt: skip
        seq = row["sequential"]
        ax.scatter(seq["measured_cost"], seq["measured_accuracy"], marker="*", s=120, color=color, zorder=4,
                   label=f"sequential run, batch {size}")  # fmt: skip
        for name, rr in row["routing"].items():
            marker = {"knn": "v"}.get(name, "^")
            ax.scatter(rr["measured_cost"], rr["measured_accuracy"], marker=marker, s=60, color=color, zorder=4,
                       label=f"router {name} run, batch {size}")  # fmt: skip
        for st, c in zip(r["stages"], row["stage_cost"], strict=True):
            ax.scatter(c, st["accuracy"], marker="o", s=40, color=color, zorder=3)
        exits = list(row.get("early_exit", {}).values())
        if exits:
            ax.scatter([e["measured_cost"] for e in exits], [e["measured_accuracy"] for e in exits], marker="D", s=30,
                       color=color, zorder=4, label=f"early exit runs (each measure), batch {size}")  # fmt: skip
    ax.axhline(r["large"]["accuracy"], color="gray", ls=":", lw=1)
    title = "ListOps cascades: cost as measured latency (dots: single stages) vs FLOPs"
    _finish(plt, fig, ax, "cost per example / the last stage's (same measure)", "test accuracy", title,
            "listops_latency")  # fmt: skip


def plot(results):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if "listops" in results:
        r = results["listops"]
        fig, ax = plt.subplots(figsize=(8, 5.5))
        points = []
        for name, key in (("small", "small"), ("large", "large")):
            ax.scatter(r[key]["cost"], r[key]["accuracy"], s=80, zorder=3, label=f"{name} encoder")
            points.append((r[key]["cost"], r[key]["accuracy"]))
        for measure, e in r["early_exit"].items():
            xs, ys = [p["cost"] for p in e["curve"]], [p["accuracy"] for p in e["curve"]]
            ax.plot(xs, ys, ".-", lw=1, ms=3, label=f"early exit ({measure})")
            ax.scatter(e["calibrated"]["cost"], e["calibrated"]["accuracy"], marker="*", s=90, zorder=4)
            points += list(zip(xs, ys, strict=True))
        sc = r["sequential"]["curve"]
        ax.plot([p["cost"] for p in sc], [p["quality"] for p in sc], "s-", ms=3, lw=1, label="sequential small->large")
        points += [(p["cost"], p["quality"]) for p in sc]
        for name in ("embedding_classifier", "knn"):
            if name not in r["routing"]:
                continue
            cv = r["routing"][name]["curve"]
            ax.plot([p["cost"] for p in cv], [p["accuracy"] for p in cv], "--", lw=1, label=f"router: {name}")
            points += [(p["cost"], p["accuracy"]) for p in cv]
        front = pareto(points)
        ax.plot(*zip(*front, strict=True), "k:", lw=2, label="Pareto frontier")
        stages = " -> ".join(f"{st['layers']}x{st['d_model']}" for st in r["stages"])
        title = f"ListOps: cascades of encoders {stages} (layers x width; stars: LTT-calibrated exits)"
        _finish(plt, fig, ax, "cost: forward FLOPs per example / large model's", "test accuracy", title, "listops")
        if "latency" in r:
            plot_latency(plt, r)
    for key in ("smollm2", "smollm2_trained"):
        if key not in results:
            continue
        r = results[key]
        fig, ax = plt.subplots(figsize=(8, 5.5))
        n = r["num_layers"]
        for measure, s in r["sweep"].items():
            ax.plot(
                [p["layers"] / n for p in s["curve"]],
                [p["agreement"] for p in s["curve"]],
                ".-",
                label=f"exits, {measure} (no KV error)",
            )
        d = r["decode"]
        label = f"decode with KV propagation ({r.get('decode_measure', 'max_prob')})"
        ax.plot([p["layers"] / n for p in d], [p["agreement"] for p in d], "o-", label=label)
        ax.scatter([1.0], [1.0], s=80, label="SmolLM2-135M (all layers)")
        ax.axhline(0.95, color="gray", ls=":", lw=1)
        heads = "trained own-head" if key == "smollm2_trained" else "shared-head"
        title = f"SmolLM2-135M {heads} early exits on held-out CPython docs"
        _finish(
            plt,
            fig,
            ax,
            f"cost: mean layers run per token / {n}",
            "top-1 agreement with the full model",
            title,
            key,
        )


PARTS = {
    "listops": run_listops,
    "smollm2": run_smollm2,
    "smollm2_trained": lambda args, results: run_smollm2(args, results, trained=True),
    "smollm2_speed": run_smollm2_speed,
}


def main(argv=None):
    global OUT
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="listops,smollm2")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--seq_len", type=int, default=48)
    p.add_argument("--max_depth", type=int, default=3)
    p.add_argument("--max_args", type=int, default=4)
    p.add_argument("--eval_examples", type=int, default=2048)
    p.add_argument("--bootstrap", type=int, default=500)
    p.add_argument("--smollm2_exits", default="15,20,24,27")
    p.add_argument("--smollm2_len", type=int, default=64)
    p.add_argument("--smollm2_rows", type=int, default=16)
    p.add_argument("--smollm2_thresholds", type=float, nargs="*", default=[0.9])
    p.add_argument("--smollm2_train_steps", type=int, default=200, help="smollm2_trained: exit-head training steps")
    p.add_argument("--smollm2_train_batch", type=int, default=8)
    p.add_argument("--smollm2_train_len", type=int, default=32)
    p.add_argument("--smollm2_train_lr", type=float, default=2e-3)
    p.add_argument("--smollm2_heads", default="", help="smollm2_trained: load these trained heads (npz), no training")
    p.add_argument("--smollm2_speed_thresholds", type=float, nargs="*", default=[0.3], help="smollm2_speed")
    p.add_argument(
        "--smollm2_new_tokens", type=int, default=24, help="smollm2_speed: serving-engine tokens per request"
    )
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--latency_batches", type=int, nargs="*", default=[1, 64], help="listops: measured-cost batch sizes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=OUT, help="results folder")
    argv = sys.argv[1:] if argv is None else list(argv)
    config, spec, rest = config_from_args(argv, DEFAULT_CONFIG, "cascades.py")
    try:
        check_cascade_config(config.cascade)
    except ConfigError as e:
        print(f"cascades.py: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    args = p.parse_args(rest)
    OUT = args.out
    from effitrans.perf import machine_description

    results = {
        "command": "python " + " ".join([os.path.relpath(__file__, ROOT), *argv]),
        "machine": machine_description(),
        "args": vars(args),
        "config": {"spec": spec, **config.to_dict()},
    }
    args.cascade = config.cascade
    results["parts_run"] = args.parts.split(",")
    for part in args.parts.split(","):
        PARTS[part](args, results)
        write(results)
        plot(results)
    log(f"wrote {OUT}")


if __name__ == "__main__":
    main()
