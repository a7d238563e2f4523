"""Dense vs MoE funnel: does a funnel cost a mixture-of-experts encoder more (or less) than a dense one?

    # the recorded run (the defaults; experiments/results/moe_funnel/, scaled down to fit a shared 2-core
    # CPU: docs/results/moe_funnel.md; ~70 min there as one process per model and seed)
    python experiments/moe_funnel.py --seeds=0,1 --steps=60 --train_batch=16 --max_eval=512 \
        --recovery_steps=15 --recover=2,4 --repeats=3
    python experiments/moe_funnel.py --seeds=0 --steps=4 --recovery_steps=2 --max_eval=64 --layers=2 \
        --repeats=1 --out=/tmp/mf  # smoke

For every seed and each of --dense (encoder_retrieval_small) and --moe (moe_encoder_retrieval_small, the
same active feed-forward parameters per token), experiments/funnel_sweep.py's sweep_depth: train the
unfunnelled encoder (--steps, same data and seed for both), then at every layer k = 1..L-1 (--layers) and
stride 2: surgery (funnel.insert) and surgery + distillation recovery (--recovery_steps, funnel.recovery),
each with its recall@1 loss paired against its own unfunnelled model on the same held-out queries, the p50
latency cut (funnel and its unfunnelled model alternated in one process) and the forward-FLOPs ratio.

The comparison: for each (method, k) and seed, per held-out query q,
    d(q) = [hit_moe(q) - hit_moe_funnel(q)] - [hit_dense(q) - hit_dense_funnel(q)]
(both models see the same queries: the eval crops are keyed on the seed), so mean(d) is MoE's recall@1
loss minus dense's, in points, with a 95% bootstrap interval over queries (effitrans.data.retrieval.
paired_bootstrap); "pooled" averages the seeds, resampling each seed's queries. Positive = the funnel costs
the MoE encoder more. Intervals cover query sampling given the trained models, not training noise; the
per-seed rows show that.

Writes --out/{results.json, tradeoff.png} (results.partial.json after every model, removed at the end).
--combine=A.json,B.json analyses runs made apart (e.g. one process per seed) together; --replot redraws.
"""

from __future__ import annotations

import copy
import datetime
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np

from effitrans import perf
from effitrans.data.retrieval import paired_bootstrap
from experiments import funnel_sweep  # the sweep whose functions this study reuses (PYTHONPATH=repo root)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ("surgery", "surgery+distill")


def hits_string(ranks) -> str:
    """Per-query recall@1 hits as '0'/'1' characters (the JSON keeps them for re-analysis)."""
    return "".join("1" if r <= 1 else "0" for r in np.asarray(ranks))


def hits_array(s: str) -> np.ndarray:
    return np.frombuffer(s.encode(), np.uint8) - ord("0")


def run_model(sweep_args, seed: int, workroot: str) -> dict:
    """One sweep_depth at stride 2 (no second depth); rows carry their per-query hits."""
    ranks = {}
    rows, _ = funnel_sweep.sweep_depth(
        sweep_args, sweep_args.depth, sweep_args.layer_list, [2], workroot, ranks_out=ranks
    )
    for r in rows:
        r["hits_at_1"] = hits_string(ranks[(r["method"], r["at_layer"], r["stride"])])
    return {"config": sweep_args.config, "seed": seed, "rows": rows}


def loss_diffs(run: dict) -> dict:
    """{(method, k): per-query recall@1 loss [n] in {-1, 0, 1} against the run's unfunnelled model}."""
    base = hits_array(next(r for r in run["rows"] if r["method"] == "dense")["hits_at_1"]).astype(np.float64)
    return {
        (r["method"], r["at_layer"]): base - hits_array(r["hits_at_1"]) for r in run["rows"] if r["method"] in METHODS
    }


def interval(diffs, samples: int) -> dict:
    mean, lo, hi = paired_bootstrap([100.0 * d for d in diffs], samples=samples)
    return {"pts": mean, "ci95_pts": [lo, hi]}


def compare(runs: list, samples: int = 4000) -> list:
    """Per (method, k): dense and MoE recall@1 loss and MoE minus dense, per seed and pooled over seeds,
    each with its 95% paired bootstrap interval; p50 and FLOPs cuts per model (mean over seeds)."""
    by = {(r["model"], r["seed"]): r for r in runs}
    seeds = sorted({s for m, s in by if (("dense", s) in by and ("moe", s) in by)})
    out = []
    if not seeds:
        return out
    keys = sorted(loss_diffs(by[("dense", seeds[0])]), key=lambda mk: (METHODS.index(mk[0]), mk[1]))
    for method, k in keys:
        per_seed, dd, dense_d, moe_d = [], [], [], []
        cut = {"dense": [], "moe": []}
        flops = {}
        for s in seeds:
            dn, mo = loss_diffs(by[("dense", s)]), loss_diffs(by[("moe", s)])
            if (method, k) not in dn or (method, k) not in mo:
                continue
            if dn[(method, k)].shape != mo[(method, k)].shape:
                raise ValueError(f"seed {s}: dense and MoE were scored on different held-out sets")
            dense_d.append(dn[(method, k)])
            moe_d.append(mo[(method, k)])
            dd.append(mo[(method, k)] - dn[(method, k)])  # [n]: difference of paired differences
            per_seed.append(
                {
                    "seed": s,
                    "dense_loss": interval([dense_d[-1]], samples),
                    "moe_loss": interval([moe_d[-1]], samples),
                    "moe_minus_dense": interval([dd[-1]], samples),
                }
            )
            for m in ("dense", "moe"):
                row = next(r for r in by[(m, s)]["rows"] if r["method"] == method and r["at_layer"] == k)
                cut[m].append(row["latency_cut_pct"])
                flops[m] = row["flops_ratio"]
        if not dd:
            continue
        out.append(
            {
                "method": method,
                "at_layer": k,
                "stride": 2,
                "seeds": [p["seed"] for p in per_seed],
                "dense_loss": interval(dense_d, samples),
                "moe_loss": interval(moe_d, samples),
                "moe_minus_dense": interval(dd, samples),
                "per_seed": per_seed,
                "dense_latency_cut_pct": float(np.mean(cut["dense"])),
                "moe_latency_cut_pct": float(np.mean(cut["moe"])),
                "dense_flops_ratio": flops["dense"],
                "moe_flops_ratio": flops["moe"],
            }
        )
    return out


def fmt(c: dict) -> str:
    lo, hi = c["ci95_pts"]
    return f"{c['pts']:+.2f} [{lo:+.2f}, {hi:+.2f}]"


def markdown(comparison: list) -> str:
    """The results page's table: pooled over seeds."""
    out = [
        "| method | k | dense loss (pts) [95%] | MoE loss (pts) [95%] | MoE - dense (pts) [95%] "
        "| MoE - dense per seed (pts) [95%] | p50 cut % dense / MoE | FLOPs x dense / MoE |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in comparison:
        seeds = "; ".join(f"s{p['seed']}: {fmt(p['moe_minus_dense'])}" for p in c["per_seed"])
        out.append(
            f"| {c['method']} | {c['at_layer']} | {fmt(c['dense_loss'])} | {fmt(c['moe_loss'])} "
            f"| {fmt(c['moe_minus_dense'])} | {seeds} "
            f"| {c['dense_latency_cut_pct']:.1f} / {c['moe_latency_cut_pct']:.1f} "
            f"| {c['dense_flops_ratio']:.2f} / {c['moe_flops_ratio']:.2f} |"
        )
    return "\n".join(out)


def plot(runs: list, comparison: list, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    colors = {"dense": "tab:blue", "moe": "tab:orange"}
    markers = {"surgery": "x", "surgery+distill": "D"}
    seed_list = sorted({r["seed"] for r in runs})
    ax = axes[0]
    for run in runs:
        hollow = seed_list.index(run["seed"]) % 2 == 1
        for r in run["rows"]:
            if r["method"] not in markers:
                continue
            c = colors[run["model"]]
            style = (
                {"c": c} if markers[r["method"]] == "x" else {"facecolors": "none" if hollow else c, "edgecolors": c}
            )
            marker = "+" if hollow and markers[r["method"]] == "x" else markers[r["method"]]
            ax.scatter(r["latency_cut_pct"], r["recall_loss_pts"], marker=marker, s=36, **style)
            ax.annotate(str(r["at_layer"]), (r["latency_cut_pct"], r["recall_loss_pts"]), fontsize=6, xytext=(2, 2),
                        textcoords="offset points")  # fmt: skip
    ax.axhline(0, c="gray", lw=0.8)
    ax.set_xlabel("p50 latency cut vs its own unfunnelled model (%)")
    ax.set_ylabel("recall@1 loss vs its own unfunnelled model (points)")
    handles = [plt.Line2D([], [], ls="", marker="o", c=c, label=m) for m, c in colors.items()]
    handles += [plt.Line2D([], [], ls="", marker=mk, c="k", label=m) for m, mk in markers.items()]
    handles += [
        plt.Line2D([], [], ls="", marker="D", mfc="none", c="k", label=f"seed {s} (+, hollow)") for s in seed_list[1::2]
    ]
    ax.legend(handles=handles, fontsize=7)
    ax.grid(alpha=0.3)
    ax = axes[1]
    for i, method in enumerate(METHODS):
        cs = [c for c in comparison if c["method"] == method]
        x = np.array([c["at_layer"] for c in cs]) + (i - 0.5) * 0.15
        y = np.array([c["moe_minus_dense"]["pts"] for c in cs])
        lo = np.array([c["moe_minus_dense"]["ci95_pts"][0] for c in cs])
        hi = np.array([c["moe_minus_dense"]["ci95_pts"][1] for c in cs])
        ax.errorbar(x, y, yerr=[y - lo, hi - y], fmt=markers[method], c="k" if i else "tab:purple", capsize=3,
                    label=f"{method}, pooled over seeds")  # fmt: skip
    ax.axhline(0, c="gray", lw=0.8)
    ax.set_xlabel("funnel layer k (stride 2)")
    ax.set_ylabel("MoE loss - dense loss (points, 95% paired CI)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.suptitle("Funnel on the dense vs the MoE retrieval encoder (equal active parameters); labels: k")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def combine(paths: list, args, argv) -> int:
    """The runs of several result files (first occurrence of each (model, seed)) analysed together."""
    runs, sources = [], []
    for path in paths:
        with open(path) as f:
            saved = json.load(f)
        sources.append({"file": path, "command": saved["command"], "date": saved["date"], "wall_s": saved["wall_s"]})
        have = {(r["model"], r["seed"]) for r in runs}
        runs += [r for r in saved["runs"] if (r["model"], r["seed"]) not in have]
    runs.sort(key=lambda r: (r["seed"], r["model"]))
    result = {
        "command": "python experiments/moe_funnel.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "sources": sources,
        "machine": perf.machine_description(),
        "runs": runs,
        "comparison": compare(runs, args.bootstrap),
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(result, f, indent=2)
    plot(runs, result["comparison"], os.path.join(args.out, "tradeoff.png"))
    print(markdown(result["comparison"]))
    return 0


def main(argv=None) -> int:
    p = funnel_sweep.parser()
    p.description = __doc__
    p.add_argument("--seeds", default="0,1", help="training seeds, each run for both models")
    p.add_argument("--dense", default="encoder_retrieval_small", help="the dense config (configs/)")
    p.add_argument("--moe", default="moe_encoder_retrieval_small", help="the MoE config of equal active params")
    p.add_argument("--models", default="dense,moe", help="which of the two to run (e.g. moe in a second process)")
    p.add_argument("--bootstrap", type=int, default=4000, help="bootstrap resamples per interval")
    p.add_argument(
        "--combine",
        default="",
        help="comma-separated results(.partial).json of runs made apart (e.g. one process per seed): "
        "write their runs' joint results.json and tradeoff.png to --out, training nothing",
    )
    p.set_defaults(
        steps=60,
        train_batch=16,
        max_eval=512,
        recovery_steps=15,
        repeats=3,
        recover="2,4",
        strides="2",
        scratch="none",
        depth2_layers=0,
        control=False,
        plain_recovery=False,
        out=os.path.join(ROOT, "experiments", "results", "moe_funnel"),
    )
    args = p.parse_args(argv)
    if args.replot:
        with open(os.path.join(args.out, "results.json")) as f:
            saved = json.load(f)
        plot(saved["runs"], saved["comparison"], os.path.join(args.out, "tradeoff.png"))
        print(markdown(saved["comparison"]))
        return 0
    if args.combine:
        return combine(args.combine.split(","), args, argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    layer_list = [int(k) for k in args.layers.split(",")] if args.layers else list(range(1, args.depth))
    command = "python experiments/moe_funnel.py " + " ".join(argv if argv is not None else sys.argv[1:])
    started = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    runs = []

    def payload() -> dict:
        comparison = compare(runs, args.bootstrap)
        return {
            "command": command,
            "date": started,
            "args": vars(args),
            "machine": perf.machine_description(),
            "wall_s": time.perf_counter() - funnel_sweep.T0,
            "runs": runs,
            "comparison": comparison,
        }

    os.makedirs(args.out, exist_ok=True)
    workroot = tempfile.mkdtemp(prefix="moe_funnel_")
    try:
        for seed in seeds:
            for model, config in (("dense", args.dense), ("moe", args.moe)):
                if model not in args.models.split(","):
                    continue
                sweep_args = copy.copy(args)
                sweep_args.config, sweep_args.seed, sweep_args.layer_list = config, seed, layer_list
                sweep_args.out = os.path.join(args.out, "partial", f"{model}_seed{seed}")
                runs.append({"model": model, **run_model(sweep_args, seed, os.path.join(workroot, f"{model}{seed}"))})
                with open(os.path.join(args.out, "results.partial.json"), "w") as f:
                    json.dump(payload(), f, indent=2)
    finally:
        shutil.rmtree(workroot, ignore_errors=True)
    result = payload()
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(result, f, indent=2)
    plot(runs, result["comparison"], os.path.join(args.out, "tradeoff.png"))
    os.remove(os.path.join(args.out, "results.partial.json"))
    shutil.rmtree(os.path.join(args.out, "partial"), ignore_errors=True)
    print(markdown(result["comparison"]))
    funnel_sweep.log(f"wrote {args.out}/results.json and tradeoff.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
