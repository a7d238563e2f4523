"""`python -m effitrans.bench attention [--json PATH] [--seq_lens 1024,4096,16384] [--impls ...]`.

Two sections (--sections, default both): `kernels`, below, and `families`: every attention family as a
layer at 1K/4K/8K with time and memory, and the 8K encoder goal check of dense vs transient_global
(effitrans/bench/attention_families.py). With --json PATH, a PNG of the families is written beside it.

Kernels: one row per implementation x mask x sequence length, with forward and forward+backward time (median
after compile and warm-up), useful GFLOP/s (only allowed query-key pairs count: 4*B*N*H*pairs for
the forward, 3x that for forward+backward, recomputation not counted), that as a percentage of a
float32 matmul measured in the same run, peak memory (ru_maxrss of a fresh process per
measurement) and speed-ups over jax.nn.dot_product_attention(implementation="xla") and over our
dense `reference`, both measured in the same run.

The dense baselines compute all S x S pairs whatever the mask, so jax.nn is measured once per
length (is_causal=True) and serves every mask; dense runs above --dense_max_len are skipped with the
reason printed (their S x S float32 logits alone are B*N*S^2*4 bytes). Pallas rows are measured only
on a GPU/TPU backend: interpret mode on CPU runs the kernel body in Python-level emulation and is far
too slow to time.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from effitrans import perf
from effitrans.bench import attention_families as families_bench
from effitrans.bench import common

MASK_SPECS = {
    "causal": "Causal()",
    "window256": "SlidingWindow(left=255, right=0)",
    "strided128": "Strided(stride=128)",
    "global64+window256": "GlobalTokens(n=64) | SlidingWindow(left=255, right=0)",
}

COLUMNS = [
    ("impl", "impl"),
    ("mask", "mask"),
    ("seq_len", "S"),
    ("fwd_ms", "fwd ms"),
    ("fwdbwd_ms", "fwd+bwd ms"),
    ("fwd_gflops", "fwd GF/s"),
    ("fwdbwd_gflops", "f+b GF/s"),
    ("fwd_pct_matmul", "fwd %mm"),
    ("fwdbwd_pct_matmul", "f+b %mm"),
    ("fwd_peak_mb", "fwd peak MB"),
    ("fwdbwd_peak_mb", "f+b peak MB"),
    ("fwd_x_jax", "fwd x jax"),
    ("fwdbwd_x_jax", "f+b x jax"),
    ("fwd_x_ref", "fwd x ref"),
    ("fwdbwd_x_ref", "f+b x ref"),
    ("matmul_gflops", "mm GF/s"),
]


def make_mask(name: str):
    from effitrans.kernels import masks  # pylint: disable=import-outside-toplevel

    return eval(MASK_SPECS[name], {k: getattr(masks, k) for k in masks.__all__})  # pylint: disable=eval-used


def allowed_pairs(mask, q_len: int, kv_len: int, chunk: int = 1024) -> int:
    """Number of allowed (query, key) pairs, counted in row chunks (never a full S x S array)."""
    kv = np.arange(kv_len)[None, :]
    total = 0
    for start in range(0, q_len, chunk):
        q = np.arange(start, min(start + chunk, q_len))[:, None]
        total += int(np.broadcast_to(mask.mask_fn(q, kv), (q.shape[0], kv_len)).sum())
    return total


def _worker(spec: dict) -> dict:
    """Runs in a fresh process: times forward, then forward+backward, of one configuration."""
    import jax  # pylint: disable=import-outside-toplevel
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

    from effitrans import kernels  # pylint: disable=import-outside-toplevel

    b, s, n, h = spec["batch"], spec["seq_len"], spec["heads"], spec["head_dim"]
    rng = np.random.RandomState(0)
    q, k, v, ct = (jnp.asarray(rng.standard_normal((b, s, n, h)), jnp.float32) for _ in range(4))
    if spec["impl"] == "jax_dense":

        def attn(q, k, v):
            return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")
    else:
        mask = make_mask(spec["mask"])

        def attn(q, k, v):
            return kernels.attention(
                q, k, v, mask=mask, impl=spec["impl"], block_q=spec.get("block_q"), block_k=spec.get("block_k")
            )

    # A matmul measured in this process right before the timings: the machine is shared, so the
    # % of matmul figure compares against the same load conditions.
    out = {"matmul_gflops": perf.measure_matmul_gflops(repeats=3)}
    fwd = jax.jit(attn)
    fwdbwd = jax.jit(jax.grad(lambda q, k, v: jnp.sum(attn(q, k, v) * ct), argnums=(0, 1, 2)))
    stats = perf.time_fn(lambda: fwd(q, k, v), repeats=spec["repeats"], max_seconds=spec["max_seconds"])
    out["fwd_s"] = stats["median_s"]
    out["fwd_repeats"] = stats["repeats"]
    out["fwd_peak_mb"] = perf.peak_rss_mb()
    if spec.get("fwdbwd", True):
        stats = perf.time_fn(lambda: fwdbwd(q, k, v), repeats=spec["repeats"], max_seconds=spec["max_seconds"])
        out["fwdbwd_s"] = stats["median_s"]
        out["fwdbwd_repeats"] = stats["repeats"]
        out["fwdbwd_peak_mb"] = perf.peak_rss_mb()
    return out


def _measure(spec: dict, timeout: float) -> dict:
    return common.run_json_subprocess("effitrans.bench.attention", ["--worker", json.dumps(spec)], timeout=timeout)


def _ratio(num, den):
    return None if num is None or den is None or den == 0 else num / den


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m effitrans.bench attention", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", default=None, help='write {"machine", "rows"} here')
    parser.add_argument("--seq_lens", default="1024,4096,16384")
    parser.add_argument(
        "--impls",
        default=None,
        help="comma list of reference,xla,pallas (default: reference,xla plus pallas on GPU/TPU)",
    )
    parser.add_argument("--masks", default=",".join(MASK_SPECS), help=f"from {list(MASK_SPECS)}")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per measurement")
    parser.add_argument(
        "--max_seconds", type=float, default=8.0, help="fewer repeats (>= 1) for measurements slower than this in total"
    )
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head_dim", type=int, default=64)
    parser.add_argument("--block_q", type=int, default=None)
    parser.add_argument("--block_k", type=int, default=None)
    parser.add_argument(
        "--dense_max_len", type=int, default=4096, help="skip dense baselines (jax.nn, reference) above this length"
    )
    parser.add_argument("--timeout", type=float, default=600.0, help="per-measurement seconds")
    parser.add_argument("--sections", default="kernels,families", help="kernels, families, or both")
    parser.add_argument(
        "--families",
        default=",".join(families_bench.FAMILY_KEYS),
        help=f"attention kinds for the families section, from {list(families_bench.FAMILY_KEYS)}",
    )
    parser.add_argument("--family_seq_lens", default="1024,4096,8192")
    parser.add_argument(
        "--goal_seq_len",
        type=int,
        default=8192,
        help="length of the dense vs transient_global encoder check (0 skips it)",
    )
    parser.add_argument("--goal_repeats", type=int, default=5, help="alternating rounds of the goal check")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--family_worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--goal_worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker is not None:
        print(json.dumps(_worker(json.loads(args.worker))))
        return 0
    if args.family_worker is not None:
        print(json.dumps(families_bench.layer_worker(json.loads(args.family_worker))))
        return 0
    if args.goal_worker is not None:
        print(json.dumps(families_bench.goal_worker(json.loads(args.goal_worker))))
        return 0
    sections = args.sections.split(",")
    for section in sections:
        if section not in ("kernels", "families"):
            parser.error(f"--sections: unknown section {section!r}; allowed: kernels, families")

    import jax  # pylint: disable=import-outside-toplevel

    accel = jax.default_backend() in ("gpu", "tpu", "cuda", "rocm")
    impls = args.impls.split(",") if args.impls else ["reference", "xla"] + (["pallas"] if accel else [])
    for impl in impls:
        if impl not in ("reference", "xla", "pallas"):
            parser.error(f"--impls: unknown impl {impl!r}; allowed: reference, xla, pallas")
    if "pallas" in impls and not accel:
        print(
            "pallas: skipped: backend is cpu, where the kernel runs in interpret mode (a Python-level "
            "emulation) which is far too slow to time."
        )
        impls = [i for i in impls if i != "pallas"]
    mask_names = args.masks.split(",")
    for m in mask_names:
        if m not in MASK_SPECS:
            parser.error(f"--masks: unknown mask {m!r}; allowed: {list(MASK_SPECS)}")
    seq_lens = [int(x) for x in args.seq_lens.split(",")]

    machine = perf.machine_description()
    peak = perf.measure_matmul_gflops()
    print(
        f"machine: {machine['cpu']} x{machine['cpu_count']}, backend {machine['backend']}, "
        f"load {machine['load_avg']}; float32 matmul: {peak:.1f} GFLOP/s"
    )
    base = dict(
        batch=args.batch,
        heads=args.heads,
        head_dim=args.head_dim,
        repeats=args.repeats,
        max_seconds=args.max_seconds,
        block_q=args.block_q,
        block_k=args.block_k,
    )
    b, n, h = args.batch, args.heads, args.head_dim
    rows, notes = [], []
    for s in seq_lens if "kernels" in sections else []:
        dense_ok = s <= args.dense_max_len
        jax_res = {}
        if dense_ok:
            jax_res = _measure(dict(base, impl="jax_dense", mask="causal", seq_len=s), args.timeout)
            if "error" in jax_res:
                notes.append(f"jax.nn S={s}: {jax_res['error']}")
            else:
                rows.append(
                    dict(
                        impl="jax.nn(xla)",
                        mask="causal(dense)",
                        seq_len=s,
                        fwd_ms=jax_res["fwd_s"] * 1e3,
                        fwdbwd_ms=jax_res["fwdbwd_s"] * 1e3,
                        matmul_gflops=jax_res.get("matmul_gflops"),
                        fwd_peak_mb=jax_res["fwd_peak_mb"],
                        fwdbwd_peak_mb=jax_res["fwdbwd_peak_mb"],
                    )
                )
        else:
            gb = b * n * s * s * 4 / 2**30
            notes.append(
                f"S={s}: dense baselines (jax.nn, reference) skipped: S x S float32 logits are "
                f"{gb:.1f} GiB per copy (fwd+bwd keeps several) and would take minutes per "
                f"call here; raise --dense_max_len to force."
            )
        for mname in mask_names:
            mask = make_mask(mname)
            pairs = allowed_pairs(mask, s, s)
            fwd_flop = 4.0 * b * n * h * pairs
            ref_res = None
            for impl in impls:
                if impl == "reference" and not dense_ok:
                    continue
                print(f"  measuring {impl} {mname} S={s} ...", flush=True)
                res = _measure(dict(base, impl=impl, mask=mname, seq_len=s), args.timeout)
                if "error" in res:
                    notes.append(f"{impl} {mname} S={s}: {res['error']}")
                    continue
                if impl == "reference":
                    ref_res = res
                row = dict(
                    impl=impl,
                    mask=mname,
                    seq_len=s,
                    allowed_frac=pairs / (s * s),
                    fwd_ms=res["fwd_s"] * 1e3,
                    fwdbwd_ms=res.get("fwdbwd_s", np.nan) * 1e3,
                    fwd_gflops=fwd_flop / res["fwd_s"] / 1e9,
                    fwdbwd_gflops=3 * fwd_flop / res["fwdbwd_s"] / 1e9,
                    fwd_peak_mb=res["fwd_peak_mb"],
                    fwdbwd_peak_mb=res.get("fwdbwd_peak_mb"),
                    jax_fwd_ms=jax_res.get("fwd_s", np.nan) * 1e3 if jax_res else None,
                    jax_fwdbwd_ms=jax_res.get("fwdbwd_s", np.nan) * 1e3 if jax_res else None,
                    ref_fwd_ms=ref_res["fwd_s"] * 1e3 if ref_res else None,
                    ref_fwdbwd_ms=ref_res["fwdbwd_s"] * 1e3 if ref_res else None,
                    matmul_gflops=res.get("matmul_gflops", peak),
                    repeats=res["fwd_repeats"],
                    block_q=args.block_q,
                    block_k=args.block_k,
                )
                row["fwd_pct_matmul"] = 100 * row["fwd_gflops"] / row["matmul_gflops"]
                row["fwdbwd_pct_matmul"] = 100 * row["fwdbwd_gflops"] / row["matmul_gflops"]
                row["fwd_x_jax"] = _ratio(row["jax_fwd_ms"], row["fwd_ms"])
                row["fwdbwd_x_jax"] = _ratio(row["jax_fwdbwd_ms"], row["fwdbwd_ms"])
                row["fwd_x_ref"] = _ratio(row["ref_fwd_ms"], row["fwd_ms"])
                row["fwdbwd_x_ref"] = _ratio(row["ref_fwdbwd_ms"], row["fwdbwd_ms"])
                rows.append(row)
    family_rows, goal_rows = [], []
    if "families" in sections:
        family_rows, goal_rows, family_notes = families_bench.run(args)
        notes += family_notes
    if rows:
        print()
        print(common.format_table(rows, COLUMNS))
        print(
            f'\nfloat32 2048^3 matmul: {peak:.1f} GFLOP/s at the start; "mm GF/s" is the same matmul '
            "measured inside each measurement's process (the basis of %mm). "
            f"B={b} N={n} H={h} float32. "
            "x jax / x ref: speed-up over jax.nn.dot_product_attention(implementation='xla') / "
            "reference, same run."
        )
    families_bench.print_tables(family_rows, goal_rows)
    for note in notes:
        print("note:", note)
    common.write_json(
        args.json,
        rows,
        machine,
        matmul_gflops=peak,
        notes=notes,
        family_rows=family_rows,
        goal_rows=goal_rows,
        config=vars(args)
        | {
            "impls": impls,
            "masks": mask_names,
            "sections": sections,
            "family_keys": {k: families_bench.family_keys(k, 8192) for k in families_bench.FAMILY_KEYS},
        },
    )
    if args.json and len({r["seq_len"] for r in family_rows}) > 1:
        families_bench.plot(family_rows, args.json.rsplit(".", 1)[0] + "_families.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
