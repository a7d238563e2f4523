"""`python -m effitrans.bench serve --config=configs/encoder_retrieval_small.py`: encoder inference QPS and
p50 / p90 / p99 latency at a fixed batch and sequence length, for the dense baseline, the funnel at
one third of the depth (stride 2, made by surgery from the same weights) and, when the
`transient_global` attention family is registered, the same encoder with LongT5 TGA — in one run.

Each request is one jitted forward of [--batch, --seq_len] tokens (a closed loop with one request in
flight, the shape of an embedding server at fixed batch). Variants are called round-robin, request by
request, so machine load hits all of them alike; latency percentiles are over --requests requests,
QPS counts sequences per second of the variant's own time. Randomly initialised weights (latency does
not depend on their values). Absolute times are reported, never asserted.

    python -m effitrans.bench serve --config=configs/encoder_retrieval_small.py --seq_len 256 [--json PATH]
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import sys
import time

import numpy as np

from effitrans.bench import common


def load_config(path: str):
    sys.path.insert(0, os.path.dirname(os.path.abspath(path)))
    spec = importlib.util.spec_from_file_location("serve_bench_config", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()


def variants(model_cfg, args) -> list:
    """[(name, model)]: dense, funnel at round(L/3) stride --stride, and TGA if registered."""
    from effitrans import funnel
    from effitrans.attention import ATTENTION_FAMILIES
    from effitrans.models import build_model

    dense = build_model(model_cfg, seed=0)
    k = max(1, round(model_cfg.num_layers / 3))
    out = [("dense", dense),
           (f"funnel L/3 (k={k}, stride {args.stride})", funnel.insert(dense, at_layer=k, stride=args.stride))]
    if "transient_global" in ATTENTION_FAMILIES and model_cfg.num_heads == model_cfg.num_kv_heads:
        tga = copy.deepcopy(model_cfg)
        tga.attention.kind = "transient_global"
        tga.attention.local_radius = args.tga_radius
        tga.attention.global_block = args.tga_block
        tga.attention.relative_buckets = 32
        tga.attention.relative_max_distance = 128
        out.append((f"TGA (r={args.tga_radius}, block {args.tga_block})", build_model(tga, seed=0)))
    else:
        print("note: attention family 'transient_global' is not registered (or the model is GQA); TGA row skipped")
    return out


def main(argv=None) -> int:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    p = argparse.ArgumentParser(prog="python -m effitrans.bench serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/encoder_retrieval_small.py")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq_len", type=int, default=256)
    p.add_argument("--requests", type=int, default=30)
    p.add_argument("--stride", type=int, default=2)
    p.add_argument("--tga_radius", type=int, default=32)
    p.add_argument("--tga_block", type=int, default=16)
    p.add_argument("--impl", default=None, help="override config.model.attention.impl (dense/funnel)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    cfg = load_config(args.config)
    if args.impl:
        cfg.model.attention.impl = args.impl
    runs = []
    for name, model in variants(cfg.model, args):
        graphdef, state = nnx.split(model)
        fn = jax.jit(lambda s, t, m, g=graphdef: nnx.merge(g, s)(t, m))
        runs.append({"name": name, "fn": fn, "state": state, "times": []})
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(4, 256, size=(args.batch, args.seq_len)), jnp.int32)
    mask = jnp.ones_like(tokens)
    for r in runs:                                       # compile and warm up
        t = time.perf_counter()
        jax.block_until_ready(r["fn"](r["state"], tokens, mask))
        r["compile_s"] = time.perf_counter() - t
        jax.block_until_ready(r["fn"](r["state"], tokens, mask))
    for _ in range(args.requests):
        for r in runs:
            t = time.perf_counter()
            jax.block_until_ready(r["fn"](r["state"], tokens, mask))
            r["times"].append(time.perf_counter() - t)
    base = runs[0]
    rows = []
    for r in runs:
        ts = np.asarray(r["times"])
        row = {"variant": r["name"], "batch": args.batch, "seq_len": args.seq_len, "requests": args.requests,
               "p50_ms": 1e3 * np.percentile(ts, 50), "p90_ms": 1e3 * np.percentile(ts, 90),
               "p99_ms": 1e3 * np.percentile(ts, 99), "qps": args.batch * len(ts) / ts.sum(),
               "compile_s": r["compile_s"]}
        bts = np.asarray(base["times"])
        row["baseline_p50_ms"] = 1e3 * np.percentile(bts, 50)
        row["baseline_qps"] = args.batch * len(bts) / bts.sum()
        row["p50_cut_pct"] = 100.0 * (1 - row["p50_ms"] / row["baseline_p50_ms"])
        row["qps_gain_pct"] = 100.0 * (row["qps"] / row["baseline_qps"] - 1)
        rows.append(row)
    cols = [("variant", "variant"), ("p50_ms", "p50 ms"), ("p90_ms", "p90 ms"), ("p99_ms", "p99 ms"),
            ("qps", "QPS (seq/s)"), ("p50_cut_pct", "p50 cut %"), ("qps_gain_pct", "QPS gain %")]
    print(f"encoder serving, {cfg.model.num_layers} layers d={cfg.model.d_model}, batch {args.batch} x "
          f"{args.seq_len} tokens, {args.requests} requests per variant (round-robin)")
    print(common.format_table(rows, cols))
    print(common.markdown_table(rows, cols))
    common.write_json(args.json, rows, config=args.config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
