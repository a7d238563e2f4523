"""The attention-families part of `python -m effitrans.bench attention`.

Two measurements, both bidirectional (encoder) attention at d_model 512, 8 heads x 64, batch 1, float32:

1. Every family (`FAMILY_KEYS`: dense plus the five sparse / routed / TGA families) as one attention
   layer (projections included) at each length of --family_seq_lens (default 1K/4K/8K): forward and
   forward+backward (gradients of x and of every parameter) time, and memory, each in a fresh process:
   `temp MB` is XLA's compiled temporary-buffer size of that program (exact, load-independent; the
   S x S logits of dense attention would show here), `peak MB` the process's resident-set high-water mark
   (ru_maxrss, includes the ~0.3-0.5 GB JAX runtime).
2. The goal check at --goal_seq_len (default 8K): an encoder (`ENCODER`: 4 blocks, FFN 2048) with dense
   and with transient_global attention, and their attention layers alone, compiled in one process and
   timed alternately call by call (the machine is shared, so load hits both alike). Goals: encoder
   forward with TGA >= 10% faster end to end (the tutorial's 2B-model TPU result), the TGA layer alone
   >= 3x faster than the dense layer.

The dense baseline is our blockwise `xla` kernel (the fastest dense attention on CPU: it never
materialises S x S logits); family keys are chosen so every family is linear or near-linear in S
(routing: one cluster per 256 tokens; LSH: 128-token chunks), as in the papers' long-sequence settings.
"""

from __future__ import annotations

import json
import math

import numpy as np

from effitrans import defaults, perf
from effitrans.bench import common
from effitrans.registry import validate_model_config

LAYER = dict(d_model=512, num_heads=8, num_kv_heads=8, head_dim=64)
ENCODER = dict(LAYER, num_layers=4, ffn_width=2048)

# Keys per kind; a callable gets the sequence length (routing keeps ~256 tokens per cluster).
FAMILY_KEYS = {
    "dense": {"impl": "xla"},
    "sliding_window": {"impl": "xla", "window_left": 256, "window_right": 256, "num_global": 16},
    "sparse_strided": {"impl": "xla", "stride": 128},
    "sparse_fixed": {"impl": "xla", "block": 128, "summary": 16},
    "lsh": {"n_buckets": 32, "n_hashes": 2, "chunk_len": 128},
    "routing": {"impl": "xla", "num_clusters": lambda s: max(1, s // 256), "num_local_heads": 4, "local_window": 128},
    "transient_global": {"local_radius": 127, "global_block": 16},
}

COLUMNS = [
    ("kind", "kind"),
    ("seq_len", "S"),
    ("fwd_ms", "fwd ms"),
    ("fwdbwd_ms", "fwd+bwd ms"),
    ("fwd_x_dense", "fwd x dense"),
    ("fwdbwd_x_dense", "f+b x dense"),
    ("fwd_temp_mb", "fwd temp MB"),
    ("fwdbwd_temp_mb", "f+b temp MB"),
    ("fwd_peak_mb", "fwd peak MB"),
    ("fwdbwd_peak_mb", "f+b peak MB"),
    ("keys", "keys"),
]
GOAL_COLUMNS = [
    ("what", "what"),
    ("dense_ms", "dense ms"),
    ("tga_ms", "TGA ms"),
    ("speedup", "dense / TGA"),
    ("faster_pct", "TGA faster %"),
    ("goal", "goal"),
    ("met", "met"),
]


def family_keys(kind: str, seq_len: int) -> dict:
    return {k: (v(seq_len) if callable(v) else v) for k, v in FAMILY_KEYS[kind].items()}


def model_config(kind: str, seq_len: int, **overrides):
    """The default model with the bench shape and `kind`'s keys (validated like any config)."""
    cfg = defaults.model(**{**LAYER, **overrides})
    cfg.attention.kind = kind
    cfg.attention.update(family_keys(kind, seq_len))
    validate_model_config(cfg)
    return cfg


def _compiled_temp_mb(jitted, *args) -> float | None:
    """XLA's temporary-buffer bytes of the compiled program (None where the backend does not report it)."""
    try:
        analysis = jitted.lower(*args).compile().memory_analysis()
        return float(analysis.temp_size_in_bytes) / 2**20
    except Exception:  # pylint: disable=broad-except
        return None


def _layer_fns(kind: str, seq_len: int, batch: int):
    """(fwd(params, x), fwdbwd(params, x), params, x) of one attention layer of `kind`, jitted."""
    import jax  # pylint: disable=import-outside-toplevel
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
    from flax import nnx  # pylint: disable=import-outside-toplevel

    from effitrans.attention import build_attention  # pylint: disable=import-outside-toplevel

    cfg = model_config(kind, seq_len)
    layer = build_attention(cfg, causal=False, rngs=nnx.Rngs(0), dtype=jnp.float32)
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)
    x = jax.random.normal(jax.random.key(1), (batch, seq_len, cfg.d_model), jnp.float32)
    positions = jnp.broadcast_to(jnp.arange(seq_len, dtype=jnp.int32), (batch, seq_len))
    ct = jax.random.normal(jax.random.key(2), x.shape, jnp.float32)

    def forward(params, x):
        y, _ = nnx.merge(graphdef, params, rest)(x, positions=positions)
        return y

    fwd = jax.jit(forward)
    fwdbwd = jax.jit(jax.grad(lambda p, x: jnp.sum(forward(p, x) * ct), argnums=(0, 1)))
    return fwd, fwdbwd, params, x


def _encoder_fn(kind: str, seq_len: int, batch: int):
    """(fwd(tokens, mask), tokens, mask): the classifier encoder of `kind` (weights: common.build_model_fast)."""
    import jax  # pylint: disable=import-outside-toplevel
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
    from flax import nnx  # pylint: disable=import-outside-toplevel

    cfg = model_config(kind, seq_len, **{k: v for k, v in ENCODER.items() if k not in LAYER})
    cfg.name, cfg.pooling, cfg.num_classes = "encoder_classifier", "cls", 10
    model = common.build_model_fast(cfg)
    graphdef, state = nnx.split(model)
    fwd = jax.jit(lambda state, tokens, mask: nnx.merge(graphdef, state)(tokens, mask))
    tokens = jax.random.randint(jax.random.key(3), (batch, seq_len), 0, cfg.vocab_size)
    mask = jnp.ones((batch, seq_len), bool)
    return (lambda: fwd(state, tokens, mask)), cfg


def layer_worker(spec: dict) -> dict:
    """Fresh process: one family at one length: times and memory of forward, then forward+backward."""
    fwd, fwdbwd, params, x = _layer_fns(spec["kind"], spec["seq_len"], spec["batch"])
    out = {"fwd_temp_mb": _compiled_temp_mb(fwd, params, x)}
    stats = perf.time_fn(lambda: fwd(params, x), repeats=spec["repeats"], max_seconds=spec["max_seconds"])
    out.update(fwd_s=stats["median_s"], fwd_repeats=stats["repeats"], fwd_peak_mb=perf.peak_rss_mb())
    out["fwdbwd_temp_mb"] = _compiled_temp_mb(fwdbwd, params, x)
    stats = perf.time_fn(lambda: fwdbwd(params, x), repeats=spec["repeats"], max_seconds=spec["max_seconds"])
    out.update(fwdbwd_s=stats["median_s"], fwdbwd_repeats=stats["repeats"], fwdbwd_peak_mb=perf.peak_rss_mb())
    return out


def goal_worker(spec: dict) -> dict:
    """Fresh process: dense vs TGA encoder forward and layer forward at one length, timed alternately."""
    s, b, repeats = spec["seq_len"], spec["batch"], spec["repeats"]
    runs = {}
    for kind in ("dense", "transient_global"):
        enc, _ = _encoder_fn(kind, s, b)
        fwd, _, params, x = _layer_fns(kind, s, b)
        runs[("encoder", kind)] = enc
        runs[("layer", kind)] = lambda fwd=fwd, params=params, x=x: fwd(params, x)
    times = {key: [] for key in runs}
    for fn in runs.values():  # compile + warm up
        perf.block(fn())
    for _ in range(repeats):
        for key, fn in runs.items():
            stats = perf.time_fn(fn, repeats=1, warmup=0)
            times[key].append(stats["median_s"])
    return {f"{what}_{kind}_s": float(np.median(ts)) for (what, kind), ts in times.items()} | {
        f"{what}_{kind}_times_s": ts for (what, kind), ts in times.items()
    }


def run(args) -> tuple[list[dict], list[dict], list[str]]:
    """Both measurements; returns (family rows, goal rows, notes)."""
    kinds = args.families.split(",")
    for kind in kinds:
        if kind not in FAMILY_KEYS:
            raise SystemExit(f"--families: unknown kind {kind!r}; allowed: {list(FAMILY_KEYS)}")
    seq_lens = [int(x) for x in args.family_seq_lens.split(",")] if args.family_seq_lens else []
    rows, notes = [], []
    base = dict(batch=args.batch, repeats=args.repeats, max_seconds=args.max_seconds)
    for s in seq_lens:
        dense = None
        for kind in kinds:
            print(f"  measuring family {kind} S={s} ...", flush=True)
            res = common.run_json_subprocess(
                "effitrans.bench.attention",
                ["--family_worker", json.dumps(dict(base, kind=kind, seq_len=s))],
                timeout=args.timeout,
            )
            if "error" in res:
                notes.append(f"family {kind} S={s}: {res['error']}")
                continue
            row = dict(
                kind=kind,
                seq_len=s,
                fwd_ms=res["fwd_s"] * 1e3,
                fwdbwd_ms=res["fwdbwd_s"] * 1e3,
                fwd_temp_mb=res["fwd_temp_mb"],
                fwdbwd_temp_mb=res["fwdbwd_temp_mb"],
                fwd_peak_mb=res["fwd_peak_mb"],
                fwdbwd_peak_mb=res["fwdbwd_peak_mb"],
                repeats=res["fwd_repeats"],
                keys=",".join(f"{k}={v}" for k, v in family_keys(kind, s).items() if k != "impl"),
            )
            if kind == "dense":
                dense = row
            if dense is not None:
                row["fwd_x_dense"] = dense["fwd_ms"] / row["fwd_ms"]
                row["fwdbwd_x_dense"] = dense["fwdbwd_ms"] / row["fwdbwd_ms"]
            rows.append(row)
    goal_rows = []
    if args.goal_seq_len:
        s = args.goal_seq_len
        print(
            f"  measuring encoder dense vs transient_global S={s} (alternating, {args.goal_repeats} rounds) ...",
            flush=True,
        )
        res = common.run_json_subprocess(
            "effitrans.bench.attention",
            ["--goal_worker", json.dumps(dict(batch=args.batch, seq_len=s, repeats=args.goal_repeats))],
            timeout=args.timeout * 2,
        )
        if "error" in res:
            notes.append(f"goal S={s}: {res['error']}")
        else:
            for what, goal in (("encoder", 1.10), ("layer", 3.0)):
                d, t = res[f"{what}_dense_s"], res[f"{what}_transient_global_s"]
                goal_rows.append(
                    dict(
                        what=f"{what} forward S={s}",
                        dense_ms=d * 1e3,
                        tga_ms=t * 1e3,
                        speedup=d / t,
                        faster_pct=100 * (1 - t / d),
                        goal=(">= 10% faster" if what == "encoder" else ">= 3x"),
                        met=bool(d / t >= goal),
                        dense_times_s=res[f"{what}_dense_times_s"],
                        tga_times_s=res[f"{what}_transient_global_times_s"],
                    )
                )
    return rows, goal_rows, notes


def print_tables(rows, goal_rows) -> None:
    if rows:
        print()
        print(common.format_table(rows, COLUMNS))
        print(
            "\nOne attention layer (projections included), bidirectional, B=1, D=512, 8 heads x 64, float32; "
            "x dense: speed-up over the dense layer (xla blockwise kernel) at the same S, same run; temp MB: "
            "XLA's compiled temporary buffers; peak MB: process RSS high-water mark."
        )
    if goal_rows:
        print()
        print(common.format_table(goal_rows, GOAL_COLUMNS))
        print(
            f"Encoder: {ENCODER['num_layers']} blocks, D={ENCODER['d_model']}, FFN {ENCODER['ffn_width']} (GLU), "
            "classifier head; medians of alternating calls in one process."
        )


def plot(rows, path: str) -> None:
    """Time (fwd+bwd) and temp memory vs sequence length, one line per family (log-log)."""
    import matplotlib  # pylint: disable=import-outside-toplevel

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for kind in dict.fromkeys(r["kind"] for r in rows):
        rs = sorted((r for r in rows if r["kind"] == kind), key=lambda r: r["seq_len"])
        s = [r["seq_len"] for r in rs]
        axes[0].plot(s, [r["fwdbwd_ms"] for r in rs], marker="o", label=kind)
        axes[1].plot(s, [r["fwdbwd_temp_mb"] or math.nan for r in rs], marker="o", label=kind)
    for ax, title in zip(axes, ("forward+backward time (ms)", "forward+backward XLA temp memory (MB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("attention families, one layer, D=512, 8x64 heads, bidirectional, CPU float32")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")
