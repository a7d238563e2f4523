"""Long Range Arena ListOps: the same encoder classifier with every attention family, at equal steps.

    python experiments/lra_listops.py                 # default CPU grid (see GRIDS["cpu"]; ~18 min on 2 busy cores)
    python experiments/lra_listops.py --full          # the LRA paper's setting, for accelerators
    python experiments/lra_listops.py --kinds=dense,lsh --steps=50    # a subset / a quick check

Each kind trains in its own subprocess (so peak memory, `ru_maxrss`, is that kind's alone; it includes
the ~300 MB of the JAX runtime) through the spine's Trainer on our ListOps generator (effitrans.data,
LRA spec: depth <= 10, <= 10 arguments), then evaluates accuracy on the fixed held-out set. Step time
is the median of the logged steps after the first log row (compilation excluded). Writes
experiments/results/lra_listops/{results.json, listops.png} (accuracy vs steps/s, bubble = peak memory).

Routing note: the Trainer keeps only gradient updates of parameters, so routing centroids stay at their
initial random draw in these runs (routing by fixed random centroids); see docs/attention_families.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

OUT = os.path.join(ROOT, "experiments", "results", "lra_listops")
KINDS = ("dense", "sliding_window", "sparse_strided", "sparse_fixed", "lsh", "routing", "transient_global")

# LRA paper (Tay et al. 2021), Table 1, ListOps accuracy (%) of the families we have ("Sparse Trans." =
# Sparse Transformer, "Longformer" = sliding window + global tokens, "Reformer" = LSH). The paper's speed /
# memory table (1K-4K, TPU) is not transcribed here; compare relative numbers from the paper directly.
LRA_PAPER_LISTOPS = {"dense": 36.37, "sparse_fixed": 17.07, "sliding_window": 35.63, "lsh": 37.27}

GRIDS = {
    # 2-core CPU: short sequences, a small model, few steps (chance ~ 10 classes; majority ~ 17-20%).
    "cpu": dict(
        seq_len=256,
        min_len=64,
        max_len=250,
        num_layers=2,
        d_model=64,
        num_heads=4,
        head_dim=16,
        ffn_width=128,
        batch_size=16,
        steps=120,
        learning_rate=2e-3,
        warmup_steps=12,
        num_eval_examples=256,
        log_every=10,
    ),
    # LRA paper: lengths 500-2000, 4 layers, 512 wide, 8 heads, FFN 1024 (their ListOps model); 5K steps.
    "full": dict(
        seq_len=2048,
        min_len=500,
        max_len=2000,
        num_layers=4,
        d_model=512,
        num_heads=8,
        head_dim=64,
        ffn_width=1024,
        batch_size=32,
        steps=5000,
        learning_rate=5e-4,
        warmup_steps=1000,
        num_eval_examples=2000,
        log_every=100,
    ),
}


def family_options(kind: str, seq_len: int) -> dict:
    """Per-kind attention keys, scaled with the sequence length: those of configs/sweeps/lra_listops.py."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "lra_listops_sweep", os.path.join(ROOT, "configs", "sweeps", "lra_listops.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.family_options(kind, seq_len)


def make_config(kind: str, grid: dict, seed: int):
    from effitrans.schema import load_config

    cfg = load_config(os.path.join(ROOT, "configs", "listops_small.py"))
    m = cfg.model
    for key in ("num_layers", "d_model", "num_heads", "head_dim", "ffn_width"):
        m[key] = grid[key]
    m.num_kv_heads = grid["num_heads"]
    m.attention.kind = kind
    m.attention.update(family_options(kind, grid["seq_len"]))
    for key in ("seq_len", "min_len", "max_len", "num_eval_examples"):
        cfg.data[key] = grid[key]
    t = cfg.train
    for key in ("batch_size", "steps", "learning_rate", "warmup_steps", "log_every"):
        t[key] = grid[key]
    t.eval_every = grid["steps"]
    t.checkpoint_every = grid["steps"]
    t.seed = seed
    return cfg


def run_one(kind: str, grid: dict, seed: int, out_path: str) -> None:
    """Trains one kind in this process and writes its result row to out_path."""
    import numpy as np

    from effitrans.train.trainer import Trainer

    cfg = make_config(kind, grid, seed)
    with tempfile.TemporaryDirectory() as workdir:
        t0 = time.perf_counter()
        result = Trainer(cfg, workdir).train()
        wall = time.perf_counter() - t0
        rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    times = [r["step_time_s"] for r in rows if "step_time_s" in r][1:]  # first logged row includes compile
    step = float(np.median(times)) if times else float("nan")
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    row = {
        "kind": kind,
        "eval_accuracy": result["eval"].get("eval_accuracy"),
        "eval_loss": result["eval"].get("eval_loss"),
        "step_time_s": step,
        "steps_per_s": 1.0 / step,
        "peak_rss_mb": peak_mb,
        "wall_s": wall,
        "attention": family_options(kind, grid["seq_len"]),
    }
    with open(out_path, "w") as f:
        json.dump(row, f)


def plot(rows, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    mems = [r["peak_rss_mb"] for r in rows]
    for r in rows:
        size = 2000.0 * r["peak_rss_mb"] / max(mems)
        ax.scatter(r["steps_per_s"], 100 * r["eval_accuracy"], s=size, alpha=0.45)
        ax.annotate(
            f"{r['kind']}\n{r['peak_rss_mb']:.0f} MB",
            (r["steps_per_s"], 100 * r["eval_accuracy"]),
            ha="center",
            va="center",
            fontsize=8,
        )
    accs = [100 * r["eval_accuracy"] for r in rows]
    ax.set_ylim(min(accs) - 4, max(accs) + 4)  # room for the bubbles
    sps = [r["steps_per_s"] for r in rows]
    ax.set_xlim(min(sps) - 0.15 * (max(sps) - min(sps) + 0.1), max(sps) + 0.15 * (max(sps) - min(sps) + 0.1))
    ax.set_xlabel("training steps / s (median)")
    ax.set_ylabel("ListOps held-out accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_title(grid):
    return (
        f"ListOps, seq {grid['seq_len']}, {grid['num_layers']} layers x d{grid['d_model']}, "
        f"{grid['steps']} steps x batch {grid['batch_size']} (bubble = peak RSS)"
    )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true", help="the LRA paper's setting (accelerators)")
    p.add_argument("--kinds", default=",".join(KINDS))
    p.add_argument("--steps", type=int, default=None, help="override the grid's steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=OUT)
    p.add_argument("--replot", action="store_true", help="redraw listops.png from --out/results.json only")
    p.add_argument("--run_one", default=None, help=argparse.SUPPRESS)
    p.add_argument("--row_path", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    grid = dict(GRIDS["full" if args.full else "cpu"])
    if args.steps:
        grid["steps"] = args.steps
    if args.run_one:
        run_one(args.run_one, grid, args.seed, args.row_path)
        return
    if args.replot:
        saved = json.load(open(os.path.join(args.out, "results.json")))
        plot(saved["rows"], os.path.join(args.out, "listops.png"), plot_title(saved["grid"]))
        return
    kinds = [k for k in args.kinds.split(",") if k]
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise ValueError(f"--kinds has {bad}; allowed: {list(KINDS)}")
    os.makedirs(args.out, exist_ok=True)
    rows, t0 = [], time.perf_counter()
    for kind in kinds:
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
            row_path = f.name
        cmd = (
            [
                sys.executable,
                os.path.abspath(__file__),
                f"--run_one={kind}",
                f"--row_path={row_path}",
                f"--seed={args.seed}",
            ]
            + (["--full"] if args.full else [])
            + ([f"--steps={args.steps}"] if args.steps else [])
        )
        print(f"[lra_listops {time.perf_counter() - t0:6.0f}s] {kind} ...", flush=True)
        subprocess.run(cmd, check=True, env={**os.environ, "PYTHONPATH": ROOT}, stdout=subprocess.DEVNULL)
        rows.append(json.load(open(row_path)))
        os.unlink(row_path)
        r = rows[-1]
        print(
            f"[lra_listops {time.perf_counter() - t0:6.0f}s] {kind}: acc {100 * r['eval_accuracy']:.2f}% | "
            f"{1000 * r['step_time_s']:.1f} ms/step | peak {r['peak_rss_mb']:.0f} MB",
            flush=True,
        )
    from effitrans.perf import machine_description

    command = "python experiments/lra_listops.py " + " ".join(argv if argv is not None else sys.argv[1:])
    result = {
        "command": command.strip(),
        "machine": machine_description(),
        "grid": grid,
        "rows": rows,
        "lra_paper_listops": LRA_PAPER_LISTOPS,
    }
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(result, f, indent=2)
    plot(rows, os.path.join(args.out, "listops.png"), plot_title(grid))
    print("| kind | accuracy % | ms / step | steps / s | peak RSS MB |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['kind']} | {100 * r['eval_accuracy']:.2f} | {1000 * r['step_time_s']:.1f} | "
            f"{r['steps_per_s']:.2f} | {r['peak_rss_mb']:.0f} |"
        )


if __name__ == "__main__":
    main()
