"""`python -m effitrans.bench decode [--json PATH] [--contexts 1024,2048,4096,8192,16384] [--plot PNG]`.

Decode tokens/s and KV-cache bytes against context length for MHA, GQA, MQA, MLA naive and MLA absorbed,
on one model size, in one run. Every variant has the same width, query heads and layer count; only the
attention's key/value design differs:

    MHA  16 kv heads x 64      GQA  4 kv heads         MQA  1 kv head
    MLA  kv_lora_rank 128 + rope 32 per token (cache 12.8x smaller than MHA); naive expands the whole latent
         cache into per-head keys/values every step, absorbed attends over the latent directly.

Weights are deterministic pseudo-random values (common.build_model_fast); for each context L the cache is
filled with random values up to L (decode cost does not depend on the values, and a 16K-token prefill of
every variant would dominate the run), then `--steps` tokens are decoded greedily by `serve.decode_tokens`
(one jitted lax.scan, the decode of `serve.generate`); tokens/s = batch * steps / median wall time. The
variants of one context are timed round-robin, so load changes on a shared machine hit all of them alike.
Each row carries the MHA row of the same context from the same run as its baseline (speed-up and
cache-size ratio).
"""

from __future__ import annotations

import time

import numpy as np

from effitrans import defaults, perf
from effitrans.bench import common

VARIANTS = ("mha", "gqa", "mqa", "mla_naive", "mla_absorbed")
MODEL = dict(d_model=1024, num_heads=16, head_dim=64, num_layers=2, ffn_width=2048, vocab_size=256)
MLA = dict(kv_lora_rank=128, qk_rope_head_dim=32)


def model_config(variant: str, **overrides):
    kv = {"mha": MODEL["num_heads"], "gqa": 4, "mqa": 1}.get(variant, MODEL["num_heads"])
    m = defaults.model(**{**MODEL, **overrides}, num_kv_heads=kv)
    m.attention.impl = "xla"
    if variant.startswith("mla"):
        m.attention.kind = "latent"
        m.attention.kv_lora_rank = MLA["kv_lora_rank"]
        m.attention.qk_rope_head_dim = MLA["qk_rope_head_dim"]
        m.attention.mla_path = variant.split("_")[1]
    return m


def prepare(variant: str, context: int, *, batch: int, steps: int):
    """Builds the variant, fills its cache up to `context` and compiles its decode; returns (run, info):
    run() decodes `steps` tokens from context and returns the tokens (the cache is reset to `context`)."""
    import jax  # pylint: disable=import-outside-toplevel
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
    from flax import nnx  # pylint: disable=import-outside-toplevel

    from effitrans.attention import cache_bytes  # pylint: disable=import-outside-toplevel
    from effitrans.serve import decode_tokens  # pylint: disable=import-outside-toplevel

    model = common.build_model_fast(model_config(variant))
    cache = model.init_cache(batch, context + steps, jnp.float32)

    @jax.jit
    def fill(cache):  # pseudo-random keys/values/latents up to `context`, as if a prompt had been prefilled
        leaves, tree = jax.tree.flatten(cache)
        leaves = [
            ((jnp.arange(x.size, dtype=jnp.float32) * 0.7548776662 % 1.0) - 0.5).reshape(x.shape).astype(x.dtype)
            if jnp.issubdtype(x.dtype, jnp.floating)
            else jnp.full(x.shape, context, x.dtype)
            for x in leaves
        ]
        return jax.tree.unflatten(tree, leaves)

    holder = {"cache": fill(cache)}
    nbytes = cache_bytes(holder["cache"])
    model = nnx.split(model)  # split once: every timed call reuses it
    token = jnp.zeros((batch,), jnp.int32)

    def run():
        toks, cache = decode_tokens(model, holder["cache"], token, steps=steps)  # greedy; the cache is donated
        holder["cache"] = [c.replace(lengths=c.lengths - steps) for c in cache]  # ready to rerun at `context`
        return toks

    t0 = time.perf_counter()
    perf.block(run())  # compile + first run
    info = {
        "variant": variant,
        "context": context,
        "batch": batch,
        "steps": steps,
        "compile_and_first_s": time.perf_counter() - t0,
        "cache_bytes": nbytes,
        "cache_bytes_per_token": nbytes / batch / (context + steps),
    }
    return run, info


def measure_context(variants, context: int, *, batch: int, steps: int, repeats: int, max_seconds: float) -> list:
    """All variants at one context, timed round-robin (v1, v2, ..., v1, v2, ...) so that load changes on a
    shared machine hit every variant alike; a variant stops repeating once its timed calls pass max_seconds."""
    prepared = [prepare(v, context, batch=batch, steps=steps) for v in variants]
    times = [[] for _ in variants]
    for r in range(repeats):
        for (run, _), ts in zip(prepared, times):
            if r == 0 or sum(ts) < max_seconds:
                t0 = time.perf_counter()
                perf.block(run())
                ts.append(time.perf_counter() - t0)
    rows = []
    for (_, info), ts in zip(prepared, times):
        med = float(np.median(ts))
        rows.append(
            {
                **info,
                "median_s": med,
                "min_s": float(np.min(ts)),
                "repeats": len(ts),
                "times_s": ts,
                "tokens_per_s": batch * steps / med,
                "ms_per_token": 1e3 * med / steps,
            }
        )
    return rows


COLUMNS = [
    ("variant", "variant"),
    ("context", "context"),
    ("tokens_per_s", "tok/s"),
    ("ms_per_token", "ms/step"),
    ("speedup_vs_mha", "x MHA speed"),
    ("cache_mib", "cache MiB"),
    ("cache_x_smaller", "cache x smaller"),
    ("repeats", "reps"),
]


def add_baselines(rows: list[dict]) -> None:
    """Each row gets the same-context MHA row as baseline: speed-up and cache-size ratio."""
    mha = {r["context"]: r for r in rows if r["variant"] == "mha"}
    for r in rows:
        base = mha.get(r["context"])
        r["cache_mib"] = r["cache_bytes"] / 2**20
        r["baseline"] = "mha"
        r["baseline_tokens_per_s"] = base["tokens_per_s"] if base else None
        r["speedup_vs_mha"] = r["tokens_per_s"] / base["tokens_per_s"] if base else None
        r["cache_x_smaller"] = base["cache_bytes"] / r["cache_bytes"] if base else None


def goal(rows: list[dict]) -> dict:
    """MLA absorbed at the longest context: faster than MHA with a cache >= 10x smaller?"""
    longest = max(r["context"] for r in rows)
    a = [r for r in rows if r["variant"] == "mla_absorbed" and r["context"] == longest]
    if not a or a[0]["speedup_vs_mha"] is None:
        return {"context": longest, "met": None}
    a = a[0]
    return {
        "context": longest,
        "speedup_vs_mha": a["speedup_vs_mha"],
        "cache_x_smaller": a["cache_x_smaller"],
        "met": bool(a["speedup_vs_mha"] > 1.0 and a["cache_x_smaller"] >= 10.0),
    }


def plot(rows: list[dict], path: str) -> None:
    import matplotlib  # pylint: disable=import-outside-toplevel

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for v in VARIANTS:
        rs = sorted((r for r in rows if r["variant"] == v), key=lambda r: r["context"])
        if rs:
            ax1.plot([r["context"] for r in rs], [r["tokens_per_s"] for r in rs], marker="o", label=v)
            ax2.plot([r["context"] for r in rs], [r["cache_mib"] for r in rs], marker="o", label=v)
    for ax, label in ((ax1, "decode tokens/s"), (ax2, "KV cache MiB")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context length")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    ax1.legend()
    fig.suptitle("decode: MHA / GQA / MQA / MLA (same model size)")
    common.save_figure(fig, path)


def main(argv=None) -> int:
    parser = common.bench_parser("decode", __doc__)
    parser.add_argument("--plot", default=None, help="write a PNG of tokens/s and cache MiB vs context")
    parser.add_argument("--contexts", default="1024,2048,4096,8192,16384")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"from {list(VARIANTS)}")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=8, help="tokens decoded per timed call")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max_seconds", type=float, default=6.0, help="cap on timed seconds per measurement")
    args = parser.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    for v in variants:
        if v not in VARIANTS:
            parser.error(f"--variants: {v!r} is not one of {list(VARIANTS)}")
    contexts = [int(c) for c in args.contexts.split(",") if c]
    rows = []
    t0 = time.perf_counter()
    for ctx in contexts:
        for r in measure_context(
            variants, ctx, batch=args.batch, steps=args.steps, repeats=args.repeats, max_seconds=args.max_seconds
        ):
            rows.append(r)
            print(
                f"[decode] {r['variant']:>12} context {ctx:>6}: {r['tokens_per_s']:8.1f} tok/s, "
                f"cache {r['cache_bytes'] / 2**20:8.1f} MiB  ({time.perf_counter() - t0:.0f}s)",
                flush=True,
            )
    add_baselines(rows)
    print(common.format_table(rows, COLUMNS))
    g = goal(rows)
    print(
        f"goal (MLA absorbed at {g['context']}: faster than MHA, cache >= 10x smaller): "
        f"{'MET' if g['met'] else 'MISSED' if g['met'] is False else 'n/a'} "
        f"(x{g.get('speedup_vs_mha', float('nan')):.2f} speed, x{g.get('cache_x_smaller', float('nan')):.1f} smaller)"
    )
    common.write_json(args.json, rows, goal=g, model=MODEL, mla=MLA, batch=args.batch, steps=args.steps)
    if args.plot:
        plot(rows, args.plot)
    return 0
