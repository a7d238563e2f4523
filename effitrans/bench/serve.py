"""`python -m effitrans.bench serve --config=configs/encoder_retrieval_small.py`: encoder inference QPS and
p50 / p90 / p99 latency at a fixed batch and sequence length, for the dense baseline, the funnel at
one third of the depth (stride 2, made by surgery from the same weights) and, when the
`transient_global` attention family is registered, the same encoder with LongT5 TGA — in one run.

Each request is one jitted forward of [--batch, --seq_len] tokens (a closed loop with one request in
flight, the shape of an embedding server at fixed batch). Variants are called round-robin, request by
request, so machine load hits all of them alike; latency percentiles are over --requests requests,
QPS counts sequences per second of the variant's own time. Randomly initialised weights (latency does
not depend on their values). Absolute times are reported, never asserted.

--seq_len takes a comma list: each length is its own round-robin, and every row carries the forward-FLOPs
cut of its variant (`flops_cut_pct`, effitrans.perf.forward_flops; not computed for TGA), the
bound a compute-bound CPU can reach. The funnel's cut grows with length (attention is quadratic in it),
so a single length says little; with --json and more than one length a PNG of cut vs length is written
next to the JSON.

    python -m effitrans.bench serve --config=configs/encoder_retrieval_small.py --seq_len 128,256,512 [--json PATH]
    ... --config.model.attention.impl=xla   (any config key, as in effitrans.main)
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import numpy as np

from effitrans import perf
from effitrans.bench import common


def variants(model_cfg, args) -> list:
    """[(name, model, flops_fn)]: dense, funnel at round(L/3) stride --stride, and TGA if registered.

    flops_fn(batch, length) -> forward FLOPs, or None where not modelled (TGA)."""
    from effitrans import funnel
    from effitrans.attention import ATTENTION_FAMILIES
    from effitrans.registry import build_model

    dense = build_model(model_cfg, seed=0)
    k = max(1, round(model_cfg.num_layers / 3))
    fcfg = funnel.funnel_config(model_cfg, at_layer=k, stride=args.stride)
    spec = funnel.spec_from_config(fcfg)
    out = [
        ("dense", dense, lambda b, t: perf.forward_flops(model_cfg, b, t)),
        (
            f"funnel L/3 (k={k}, stride {args.stride})",
            funnel.insert(dense, at_layer=k, stride=args.stride),
            lambda b, t: perf.forward_flops(fcfg, b, t, spec),
        ),
    ]
    if "transient_global" in ATTENTION_FAMILIES and model_cfg.num_heads == model_cfg.num_kv_heads:
        tga = copy.deepcopy(model_cfg)
        tga.attention.kind = "transient_global"
        tga.attention.local_radius = args.tga_radius
        tga.attention.global_block = args.tga_block
        tga.attention.relative_buckets = 32
        tga.attention.relative_max_distance = 128
        out.append((f"TGA (r={args.tga_radius}, block {args.tga_block})", build_model(tga, seed=0), None))
    else:
        print("note: attention family 'transient_global' is not registered (or the model is GQA); TGA row skipped")
    return out


def parse_lengths(text: str) -> list:
    """'128,256' -> [128, 256]; each a positive integer."""
    out = []
    for part in str(text).split(","):
        try:
            v = int(part)
        except ValueError:
            v = 0
        if v < 1:
            raise ValueError(f"--seq_len={text!r}: every length must be a positive integer (e.g. 128,256,512)")
        out.append(v)
    return out


def measure_length(runs: list, args, length: int) -> list:
    """One round-robin of --requests forwards per variant on [--batch, length] tokens -> table rows."""
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(4, 256, size=(args.batch, length)), jnp.int32)
    mask = jnp.ones_like(tokens)
    times = {r["name"]: [] for r in runs}
    compile_s = {}
    for r in runs:  # compile and warm up
        t = time.perf_counter()
        jax.block_until_ready(r["fn"](r["state"], tokens, mask))
        compile_s[r["name"]] = time.perf_counter() - t
        jax.block_until_ready(r["fn"](r["state"], tokens, mask))
    for _ in range(args.requests):
        for r in runs:
            t = time.perf_counter()
            jax.block_until_ready(r["fn"](r["state"], tokens, mask))
            times[r["name"]].append(time.perf_counter() - t)
    bts = np.asarray(times[runs[0]["name"]])
    base_flops = runs[0]["flops_fn"](args.batch, length)
    rows = []
    for r in runs:
        ts = np.asarray(times[r["name"]])
        row = {
            "variant": r["name"],
            "batch": args.batch,
            "seq_len": length,
            "requests": args.requests,
            "p50_ms": 1e3 * np.percentile(ts, 50),
            "p90_ms": 1e3 * np.percentile(ts, 90),
            "p99_ms": 1e3 * np.percentile(ts, 99),
            "qps": args.batch * len(ts) / ts.sum(),
            "compile_s": compile_s[r["name"]],
            "baseline_p50_ms": 1e3 * np.percentile(bts, 50),
            "baseline_qps": args.batch * len(bts) / bts.sum(),
        }
        row["p50_cut_pct"] = 100.0 * (1 - row["p50_ms"] / row["baseline_p50_ms"])
        row["qps_gain_pct"] = 100.0 * (row["qps"] / row["baseline_qps"] - 1)
        row["flops_cut_pct"] = (
            None if r["flops_fn"] is None else 100.0 * (1 - r["flops_fn"](args.batch, length) / base_flops)
        )
        rows.append(row)
    return rows


def plot_cuts(rows: list, path: str) -> None:
    """p50 cut vs length per variant (solid), with the FLOPs cut where modelled (dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    names = [n for n in dict.fromkeys(r["variant"] for r in rows) if n != "dense"]
    for i, name in enumerate(names):
        rs = [r for r in rows if r["variant"] == name]
        color = f"C{i}"
        ax.plot([r["seq_len"] for r in rs], [r["p50_cut_pct"] for r in rs], "o-", c=color, label=f"{name}: p50")
        if rs[0]["flops_cut_pct"] is not None:
            ax.plot([r["seq_len"] for r in rs], [r["flops_cut_pct"] for r in rs], "--", c=color, label=f"{name}: FLOPs")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length (tokens)")
    ax.set_ylabel("cut vs dense (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("Encoder serving: latency cut vs dense by length")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    import jax
    from flax import nnx

    p = argparse.ArgumentParser(
        prog="python -m effitrans.bench serve",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq_len", default="256", help="one length or a comma list, e.g. 128,256,512")
    p.add_argument("--requests", type=int, default=30)
    p.add_argument("--stride", type=int, default=2)
    p.add_argument("--tga_radius", type=int, default=32)
    p.add_argument("--tga_block", type=int, default=16)
    p.add_argument("--impl", default=None, help="override config.model.attention.impl (dense/funnel)")
    p.add_argument("--json", default=None)
    cfg, spec, rest = common.config_from_args(argv, "configs/encoder_retrieval_small.py", "effitrans.bench serve")
    args = p.parse_args(rest)
    lengths = parse_lengths(args.seq_len)
    if args.impl:
        cfg.model.attention.impl = args.impl
    runs = []
    for name, model, flops_fn in variants(cfg.model, args):
        graphdef, state = nnx.split(model)
        fn = jax.jit(lambda s, t, m, g=graphdef: nnx.merge(g, s)(t, m))
        runs.append({"name": name, "fn": fn, "state": state, "flops_fn": flops_fn})
    rows = []
    for length in lengths:
        rows += measure_length(runs, args, length)
    cols = [
        ("variant", "variant"),
        ("seq_len", "tokens"),
        ("p50_ms", "p50 ms"),
        ("p90_ms", "p90 ms"),
        ("p99_ms", "p99 ms"),
        ("qps", "QPS (seq/s)"),
        ("p50_cut_pct", "p50 cut %"),
        ("flops_cut_pct", "FLOPs cut %"),
        ("qps_gain_pct", "QPS gain %"),
    ]
    print(
        f"encoder serving, {cfg.model.num_layers} layers d={cfg.model.d_model}, batch {args.batch}, "
        f"{args.requests} requests per variant and length (round-robin)"
    )
    print(common.format_table(rows, cols))
    print(common.markdown_table(rows, cols))
    common.write_json(args.json, rows, config=spec)
    if args.json and len(lengths) > 1:
        plot_cuts(rows, os.path.splitext(args.json)[0] + ".png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
