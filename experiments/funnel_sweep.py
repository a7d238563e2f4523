"""Funnel sweep: latency / FLOPs vs retrieval quality of funnels on encoder_retrieval_small (or --config).

    # the recorded run (76 min on a quiet 2-core CPU; experiments/results/funnel_sweep/)
    python experiments/funnel_sweep.py --steps=200 --train_batch=32 --recovery_steps=40 --recover=stride2 \
        --scratch=stride2 --max_eval=1024 --repeats=10
    python experiments/funnel_sweep.py --steps=20 --recovery_steps=5 --depth2_layers=3 --out=/tmp/fs  # smoke

Defaults are scaled down further (40 steps at batch 16, 256 held-out pairs, 10 recovery steps, recovery
and from-scratch training at k = round(L/3) only; --recover=all / --scratch=all for every layer).

1. Train the unfunnelled encoder (--config, default encoder_retrieval_small; e.g.
   moe_encoder_retrieval_small, whose non-trainable state, the experts' selection bias, travels with its
   weights; `--steps`, shortened from its 600; --seed; --pairing, default the config's "crops") and rank
   --max_eval held-out pairs spread over the split. Every later row's recall@1
   loss is paired against these ranks on the same queries, with a 95% bootstrap interval
   (effitrans.data.retrieval.paired_recall_loss).
   Control (--control, default on): the dense model continued for --recovery_steps at --recovery_lr
   ("dense+recovery"), the yardstick for recovered funnels (a recovery's effect includes that of the extra
   training itself).
2. For every funnel layer k in 1..L-1 and stride in --strides: surgery (effitrans.funnel.insert, no
   retraining), surgery + recovery (--recovery_steps of the normal contrastive training from the dense
   weights; --no-plain_recovery skips it), surgery + distillation (the same plus --distill_weight x KL to
   the dense model's in-batch scores, effitrans.funnel.recovery), and (--scratch) the same funnel trained
   from scratch for --steps.
3. Latency: median of the jitted embedding forward on one [--batch, 64] batch, funnel and dense
   alternated call by call in the same process (the machine is shared, so load hits both alike);
   forward FLOPs from effitrans.perf.forward_flops.
4. Second depth (--depth2_layers, default 3): train it the same way and check the layer/stride rule
   (k = round(L/3), stride 2) against the other layers, surgery + recovery.

Writes experiments/results/funnel_sweep/{results.json, tradeoff.png} (or --out) with the command line.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from effitrans import funnel, perf
from effitrans.data.retrieval import metrics_from_ranks, paired_recall_loss, retrieval_ranks
from effitrans.funnel import recovery as funnel_recovery
from effitrans.schema import load_config
from effitrans.train.trainer import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[funnel_sweep {time.perf_counter() - T0:7.1f}s] {msg}", flush=True)


def base_config(args, num_layers: int):
    cfg = load_config(os.path.join(ROOT, "configs", f"{args.config}.py"))
    if num_layers != cfg.model.num_layers and "moe" in cfg.model and cfg.model.moe.layers is not None:
        cfg.model.moe.layers = [i for i in cfg.model.moe.layers if i < num_layers]
    cfg.model.num_layers = num_layers
    cfg.train.seed = args.seed
    cfg.model.attention.impl = args.impl
    cfg.train.batch_size = args.train_batch
    cfg.data.eval_batch_size = args.batch  # eval and latency share one compiled shape
    cfg.data.max_eval_examples = args.max_eval
    cfg.data.pairing = args.pairing
    if args.lr is not None:
        cfg.train.learning_rate = args.lr
    cfg.train.steps = args.steps
    cfg.train.eval_every = cfg.train.checkpoint_every = args.steps
    cfg.train.warmup_steps = max(1, min(50, args.steps // 10))
    cfg.train.log_every = max(1, args.steps // 5)
    return cfg


def with_model(cfg, model_cfg, *, steps=None, lr=None):
    out = copy.deepcopy(cfg)
    out.model = model_cfg
    if steps is not None:
        out.train.steps = steps
        out.train.eval_every = out.train.checkpoint_every = steps
        out.train.warmup_steps = max(1, steps // 10)
        out.train.log_every = max(1, steps // 3)
    if lr is not None:
        out.train.learning_rate = lr
    return out


def quality(trainer, params, base_ranks=None, model_state=None) -> tuple:
    """({recall_at_1, mrr} in %, plus the paired recall@1 loss vs base_ranks with its 95% bootstrap CI
    when given, effitrans.data.retrieval.paired_recall_loss), ranks of the held-out queries."""
    ranks = retrieval_ranks(*trainer.eval_embeddings(params, model_state))
    m = metrics_from_ranks(ranks, ks=(1,))
    out = {"recall_at_1": 100.0 * m["recall_at_1"], "mrr": 100.0 * m["mrr"]}
    if base_ranks is not None:
        paired = paired_recall_loss(base_ranks, ranks)
        out.update(
            recall_loss_pts=paired["loss_pts"],
            loss_ci95_pts=[paired["ci_low_pts"], paired["ci_high_pts"]],
            queries_lost=paired["base_only"],
            queries_gained=paired["variant_only"],
        )
    return out, ranks


def describe(r: dict) -> str:
    lo, hi = r["loss_ci95_pts"]
    return (
        f"recall@1 {r['recall_at_1']:.2f} (loss {r['recall_loss_pts']:+.2f} pts, 95% CI [{lo:+.2f}, {hi:+.2f}]) "
        f"MRR {r['mrr']:.2f}"
    )


def paired_latency(fn_a, fn_b, repeats: int) -> tuple:
    """Median seconds of fn_a() and fn_b(), called alternately (both compiled and warmed first)."""
    for f in (fn_a, fn_b):
        jax.block_until_ready(f())
        jax.block_until_ready(f())
    ta, tb = [], []
    for _ in range(repeats):
        for f, acc in ((fn_a, ta), (fn_b, tb)):
            t = time.perf_counter()
            jax.block_until_ready(f())
            acc.append(time.perf_counter() - t)
    return float(np.median(ta)), float(np.median(tb))


def save_partial(args, rows) -> None:
    """Rows so far to --out/results.partial.json, so a crash or kill loses at most one sweep point."""
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.partial.json"), "w") as f:
        json.dump({"args": vars(args), "rows": rows}, f, indent=2)


def sweep_depth(args, num_layers: int, layers, strides, workroot: str, done_rows=(), ranks_out=None) -> tuple:
    """Dense training, then surgery (and surgery + recovery) rows for every (layer, stride). Returns (rows,
    the dense model's held-out ranks); `ranks_out`, a dict, also receives every row's ranks [n] keyed by
    (method, at_layer, stride)."""
    cfg = base_config(args, num_layers)
    log(f"depth {num_layers}: training the {args.config} model for {args.steps} steps (seed {args.seed})")
    dense_trainer = Trainer(cfg, os.path.join(workroot, f"dense{num_layers}"), peak_gflops=1.0, verbose=False)
    out = dense_trainer.train()
    dense_params, dense_state = out["state"]["params"], out["state"]["model_state"]
    base, base_ranks = quality(dense_trainer, dense_params, model_state=dense_state)
    log(f"depth {num_layers} dense: recall@1 {base['recall_at_1']:.2f} MRR {base['mrr']:.2f}")
    ranks_out = {} if ranks_out is None else ranks_out
    ranks_out[("dense", None, 1)] = base_ranks
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(4, 256, size=(args.batch, cfg.data.query_len)), jnp.int32)
    mask = jnp.ones_like(tokens)
    teacher = lambda toks, m: dense_trainer._embed_step(dense_params, toks, m, dense_state)  # the unmodified encoder
    dense_fn = lambda: teacher(tokens, mask)
    dense_flops = perf.forward_flops(cfg.model, args.batch, cfg.data.query_len)
    # Recovery carries the non-trainable state (an MoE's selection bias) when the model has any.
    state_kw = {"model_state": dense_state} if dense_state else {}

    def recovered(trainer, **kw):
        """(params, model_state) after --recovery_steps of funnel_recovery.recover from the dense weights."""
        out = funnel_recovery.recover(trainer, dense_params, args.recovery_steps, **state_kw, **kw)
        return (out[0], out[1]) if state_kw else (out[0], None)

    def measured(trainer, method, at_layer, stride, params, model_state=None) -> dict:
        q, ranks = quality(trainer, params, base_ranks, model_state=model_state)
        ranks_out[(method, at_layer, stride)] = ranks
        return {"depth": num_layers, "method": method, "at_layer": at_layer, "stride": stride, **q}

    rows = [
        {
            "depth": num_layers,
            "method": "dense",
            "at_layer": None,
            "stride": 1,
            **base,
            "flops_ratio": 1.0,
            "latency_cut_pct": 0.0,
        }
    ]
    if args.recovery_steps > 0 and args.control:
        # Control: the dense model given the same extra steps as a recovery, so a recovered funnel's gain
        # from training longer is not mistaken for the funnel's quality.
        ctrl = Trainer(
            with_model(cfg, cfg.model, steps=args.recovery_steps, lr=args.recovery_lr),
            os.path.join(workroot, f"ctrl{num_layers}"),
            peak_gflops=1.0,
            verbose=False,
        )
        row = measured(ctrl, "dense+recovery", None, 1, *recovered(ctrl))
        rows.append({**row, "flops_ratio": 1.0, "latency_cut_pct": 0.0})
        log(f"depth {num_layers} dense + {args.recovery_steps} recovery steps (control): {describe(row)}")
    for stride in strides:
        for k in layers:
            fmodel = funnel.funnel_config(cfg.model, at_layer=k, stride=stride)
            spec = funnel.spec_from_config(fmodel)
            flops = perf.forward_flops(fmodel, args.batch, cfg.data.query_len, spec) / dense_flops
            rtrainer = Trainer(
                with_model(cfg, fmodel, steps=max(1, args.recovery_steps), lr=args.recovery_lr),
                os.path.join(workroot, f"rec{num_layers}_{k}_{stride}"),
                peak_gflops=1.0,
                verbose=False,
            )
            funnel_fn = lambda rtrainer=rtrainer: rtrainer._embed_step(dense_params, tokens, mask, dense_state)
            t_dense, t_funnel = paired_latency(dense_fn, funnel_fn, args.repeats)
            lat = {
                "latency_ms": 1e3 * t_funnel,
                "dense_latency_ms": 1e3 * t_dense,
                "latency_cut_pct": 100.0 * (1 - t_funnel / t_dense),
                "flops_ratio": flops,
            }
            rows.append({**measured(rtrainer, "surgery", k, stride, dense_params, dense_state), **lat})
            if args.recover[:1].isdigit():  # a list of layers: recover there only
                in_rule = k in [int(x) for x in args.recover.split(",")]
            else:
                in_rule = (
                    args.recover == "all"
                    or k == round(num_layers / 3)
                    or (args.recover == "stride2" and stride == 2)
                    or num_layers != args.depth
                )
            do_recover = args.recovery_steps > 0 and in_rule
            n_new = 1
            if do_recover and args.plain_recovery:
                rows.append({**measured(rtrainer, "surgery+recovery", k, stride, *recovered(rtrainer)), **lat})
                n_new += 1
            if do_recover and args.distill_weight > 0:
                params = recovered(rtrainer, teacher_embed=teacher, distill_weight=args.distill_weight)
                rows.append({**measured(rtrainer, "surgery+distill", k, stride, *params), **lat})
                n_new += 1
            for r in rows[-n_new:]:
                log(
                    f"depth {num_layers} k={k} s={stride} {r['method']:>16}: {describe(r)} "
                    f"| p50 {r['latency_ms']:.2f} ms vs dense {r['dense_latency_ms']:.2f} ms: "
                    f"cut {r['latency_cut_pct']:.1f}% | FLOPs x{flops:.2f}"
                )
            save_partial(args, list(done_rows) + rows)
    return rows, base_ranks


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    markers = {"surgery": "x", "surgery+recovery": "o", "surgery+distill": "D", "scratch": "s"}
    colors = {2: "tab:blue", 4: "tab:red"}
    for ax, key, label in (
        (axes[0], "latency_cut_pct", "p50 latency cut vs dense (%)"),
        (axes[1], "flops_ratio", "forward FLOPs / dense"),
    ):
        for r in rows:
            if r["method"] == "dense+recovery" and r["depth"] == rows[0]["depth"]:
                ax.axhline(r["recall_loss_pts"], ls=":", c="tab:green", lw=1.0)
            if r["method"] in ("dense", "dense+recovery"):
                continue
            color = colors.get(r["stride"], "k")
            if r.get("loss_ci95_pts"):  # paired 95% CI as a thin bar
                ax.plot([r[key]] * 2, r["loss_ci95_pts"], c=color, lw=0.6, alpha=0.4)
            if markers[r["method"]] == "x":
                ax.scatter(
                    r[key],
                    r["recall_loss_pts"],
                    marker="x",
                    s=40,
                    c=color,
                    alpha=1.0 if r["depth"] == rows[0]["depth"] else 0.4,
                )
            else:
                first = r["depth"] == rows[0]["depth"]
                ax.scatter(
                    r[key],
                    r["recall_loss_pts"],
                    marker=markers[r["method"]],
                    s=40,
                    facecolors=color if first else "none",
                    edgecolors=color,
                )
            ax.annotate(
                f"{r['at_layer']}",
                (r[key], r["recall_loss_pts"]),
                fontsize=6,
                xytext=(2, 2),
                textcoords="offset points",
            )
        ax.axhline(1.5, ls="--", c="gray", lw=0.8)
        ax.set_xlabel(label)
        ax.set_ylabel("recall@1 loss vs dense (points)")
        ax.grid(alpha=0.3)
    axes[0].axvline(35, ls=":", c="gray", lw=0.8)
    handles = [plt.Line2D([], [], ls="", marker=m, c="k", label=n) for n, m in markers.items()]
    handles += [plt.Line2D([], [], ls="", marker="o", c=c, label=f"stride {s}") for s, c in colors.items()]
    handles += [plt.Line2D([], [], ls="", marker="o", mfc="none", c="k", label="second depth (hollow / faint)")]
    handles += [plt.Line2D([], [], ls=":", c="tab:green", label="dense + the same recovery steps (control)")]
    axes[1].legend(handles=handles, fontsize=7)
    fig.suptitle("Funnel on encoder_retrieval_small: quality loss vs cost (labels: funnel layer k)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def loss_cell(r: dict) -> str:
    ci = r.get("loss_ci95_pts")
    return f"{r['recall_loss_pts']:+.2f}" + (f" [{ci[0]:+.1f}, {ci[1]:+.1f}]" if ci else "")


def markdown_rows(rows) -> str:
    """The README table of a sweep's rows (also printed by --replot)."""
    out = [
        "| depth | k | stride | method | recall@1 % | loss (pts) [95% CI] | MRR % | p50 ms funnel / dense "
        "| p50 cut % | FLOPs x |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        dense = r["method"].startswith("dense")
        out.append(
            " | ".join(
                [
                    "",
                    str(r["depth"]),
                    "-" if dense else str(r["at_layer"]),
                    "-" if dense else str(r["stride"]),
                    r["method"],
                    f"{r['recall_at_1']:.2f}",
                    "-" if r["method"] == "dense" else loss_cell(r),
                    f"{r['mrr']:.2f}",
                    "-" if dense else f"{r['latency_ms']:.0f} / {r['dense_latency_ms']:.0f}",
                    "-" if dense else f"{r['latency_cut_pct']:.1f}",
                    f"{r['flops_ratio']:.2f}",
                    "",
                ]
            ).strip()
        )
    return "\n".join(out)


def parser() -> argparse.ArgumentParser:
    """The sweep's flags (experiments/moe_funnel.py starts from their defaults)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--config",
        default="encoder_retrieval_small",
        help="the unfunnelled encoder, a name under configs/ (e.g. moe_encoder_retrieval_small)",
    )
    p.add_argument("--seed", type=int, default=0, help="config.train.seed: initialisation and data order")
    p.add_argument("--steps", type=int, default=40, help="dense (and from-scratch) training steps")
    p.add_argument("--recovery_steps", type=int, default=10)
    p.add_argument("--recovery_lr", type=float, default=3e-4)
    p.add_argument(
        "--control",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the dense model given --recovery_steps more steps (the dense+recovery row)",
    )
    p.add_argument(
        "--plain_recovery",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the surgery+recovery rows (contrastive recovery without distillation)",
    )
    p.add_argument(
        "--distill_weight",
        type=float,
        default=1.0,
        help="also recover with InfoNCE + w * KL to the dense model's in-batch scores "
        "(effitrans.funnel.recovery); 0 skips those rows",
    )
    p.add_argument(
        "--recover",
        default="l3",
        help="all | stride2 (every layer at stride 2) | l3 (k = round(L/3) "
        "only) | a list of layers, e.g. 2,4 (there only); the second depth recovers at every point",
    )
    p.add_argument("--max_eval", type=int, default=256, help="held-out pairs scored (config: 512)")
    p.add_argument("--train_batch", type=int, default=16, help="training batch (config: 32)")
    p.add_argument("--impl", default="reference", help="attention kernel (reference compiles fastest on CPU)")
    p.add_argument("--strides", default="2,4")
    p.add_argument("--layers", default="", help="funnel layers k to sweep, e.g. 2 (default: every layer 1..L-1)")
    p.add_argument(
        "--scratch",
        default="l3",
        help="all | stride2 (every layer at stride 2, k = L/3 at the others) | l3 (only k = round(L/3)) | none",
    )
    p.add_argument("--pairing", default="crops", help="retrieval pairs: crops (config default) | halves")
    p.add_argument("--lr", type=float, default=None, help="training learning rate (default: the config's)")
    p.add_argument("--batch", type=int, default=32, help="latency batch (x 64 tokens); = eval batch, one compile")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--depth2_layers", type=int, default=3, help="second depth for the rule check; 0 skips")
    p.add_argument("--out", default=os.path.join(ROOT, "experiments", "results", "funnel_sweep"))
    p.add_argument(
        "--replot",
        action="store_true",
        help="only redraw tradeoff.png from --out/results.json and print its markdown table",
    )
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.replot:
        with open(os.path.join(args.out, "results.json")) as f:
            rows = json.load(f)["rows"]
        plot(rows, os.path.join(args.out, "tradeoff.png"))
        print(markdown_rows(rows))
        return 0
    strides = [int(s) for s in args.strides.split(",")]
    workroot = tempfile.mkdtemp(prefix="funnel_sweep_")
    try:
        l3 = max(1, round(args.depth / 3))
        layers = [int(k) for k in args.layers.split(",")] if args.layers else list(range(1, args.depth))
        rows, base_ranks = sweep_depth(args, args.depth, layers, strides, workroot)
        if args.scratch != "none":
            for stride in strides:
                every = args.scratch == "all" or (args.scratch == "stride2" and stride == 2)
                for k in [k for k in (range(1, args.depth) if every else [l3]) if k in layers]:
                    cfg = base_config(args, args.depth)
                    fmodel = funnel.funnel_config(cfg.model, at_layer=k, stride=stride)
                    t = Trainer(
                        with_model(cfg, fmodel),
                        os.path.join(workroot, f"scr_{k}_{stride}"),
                        peak_gflops=1.0,
                        verbose=False,
                    )
                    trained = t.train()["state"]
                    q, _ = quality(t, trained["params"], base_ranks, model_state=trained["model_state"])
                    ref = next(r for r in rows if r["at_layer"] == k and r["stride"] == stride)
                    row = {
                        **{
                            kk: ref[kk]
                            for kk in (
                                "depth",
                                "at_layer",
                                "stride",
                                "latency_ms",
                                "dense_latency_ms",
                                "latency_cut_pct",
                                "flops_ratio",
                            )
                        },
                        "method": "scratch",
                        **q,
                    }
                    rows.append(row)
                    log(f"depth {args.depth} k={k} s={stride} scratch: {describe(q)}")
                    save_partial(args, rows)
        if args.depth2_layers:
            d2 = args.depth2_layers
            k2 = max(1, round(d2 / 3))
            layers2 = sorted({1, k2, max(1, round(2 * d2 / 3)), d2 - 1} & set(range(1, d2)))
            rows += sweep_depth(args, d2, layers2, [2], workroot, done_rows=rows)[0]
    finally:
        shutil.rmtree(workroot, ignore_errors=True)
    os.makedirs(args.out, exist_ok=True)
    payload = {
        "command": "python experiments/funnel_sweep.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "args": vars(args),
        "machine": perf.machine_description(),
        "wall_s": time.perf_counter() - T0,
        "rows": rows,
    }
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(payload, f, indent=2)
    plot(rows, os.path.join(args.out, "tradeoff.png"))
    if os.path.exists(os.path.join(args.out, "results.partial.json")):
        os.remove(os.path.join(args.out, "results.partial.json"))
    print(markdown_rows(rows))
    log(f"wrote {args.out}/results.json and tradeoff.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
