"""`python -m effitrans.bench autocorrelation [--seq_lens 512,...,8192] [--json PATH]`: how the auto-correlation
mechanism's cost grows with the length L, against dense attention, in one run.

Per length, batch 1, --heads x --head_dim, float32, compiled once and timed with perf.time_fn (median):
- `autocorrelation`: effitrans.layers.series.autocorrelation_attention (FFT correlation, top int(c ln L) delays,
  time-delay aggregation), with one delay set per row (the gather path) and per batch (the roll path);
- `dense`: effitrans.kernels.attention (the blockwise `xla` kernel, non-causal; it never materialises L x L
  logits but does L^2 work).
The exponent of each is the slope of log(time) over log(L) fitted by least squares (`fit_exponent`). Goal:
auto-correlation <= 1.2 (O(L log L)); dense about 2. Timings on a shared machine are noisy; the fit is
over every length.
"""

from __future__ import annotations

import math

import numpy as np

from effitrans import perf
from effitrans.bench import common

COLUMNS = [
    ("seq_len", "L"),
    ("autocorrelation_gather_ms", "autocorr gather ms"),
    ("autocorrelation_roll_ms", "autocorr roll ms"),
    ("dense_ms", "dense ms"),
    ("dense_over_autocorrelation", "dense / gather"),
]
GOAL_EXPONENT = 1.2


def fit_exponent(lengths, times) -> float:
    """Least-squares slope of log(times) over log(lengths): time ~ L^slope."""
    lengths, times = np.asarray(lengths, float), np.asarray(times, float)
    if lengths.shape != times.shape or lengths.size < 2 or (lengths <= 0).any() or (times <= 0).any():
        raise ValueError(f"need >= 2 positive (length, time) pairs; got lengths={lengths}, times={times}")
    return float(np.polyfit(np.log(lengths), np.log(times), 1)[0])


def time_lengths(seq_lens, *, heads: int, head_dim: int, factor: float, max_seconds: float) -> list[dict]:
    """One row per length: median ms of the auto-correlation (gather and roll paths) and of dense attention."""
    import jax  # pylint: disable=import-outside-toplevel
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

    from effitrans import kernels  # pylint: disable=import-outside-toplevel
    from effitrans.layers.series import autocorrelation_attention  # pylint: disable=import-outside-toplevel

    fns = {
        "autocorrelation_gather": jax.jit(
            lambda q, k, v: autocorrelation_attention(q, k, v, factor=factor, per_row=True)
        ),
        "autocorrelation_roll": jax.jit(
            lambda q, k, v: autocorrelation_attention(q, k, v, factor=factor, per_row=False)
        ),
        "dense": jax.jit(lambda q, k, v: kernels.attention(q, k, v, mask=kernels.masks.Full(), impl="xla")),
    }
    rows = []
    for length in seq_lens:
        keys = jax.random.split(jax.random.key(length), 3)
        q, k, v = (jax.random.normal(key, (1, length, heads, head_dim), jnp.float32) for key in keys)
        row = {"seq_len": length, "delays": int(factor * math.log(length))}
        for name, fn in fns.items():
            t = perf.time_fn(lambda fn=fn, q=q, k=k, v=v: fn(q, k, v), repeats=5, max_seconds=max_seconds)
            row[f"{name}_ms"] = 1e3 * t["median_s"]
        row["dense_over_autocorrelation"] = row["dense_ms"] / row["autocorrelation_gather_ms"]
        print(common.format_table([row], COLUMNS).splitlines()[-1], flush=True)
        rows.append(row)
    return rows


def main(argv=None) -> int:
    parser = common.bench_parser("autocorrelation", __doc__)
    parser.add_argument("--seq_lens", default="512,1024,2048,4096,8192", help="comma-separated lengths L")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head_dim", type=int, default=64)
    parser.add_argument("--factor", type=float, default=1.0, help="c: top int(c ln L) delays")
    parser.add_argument("--max_seconds", type=float, default=3.0, help="about this long timing each program")
    args = parser.parse_args(argv)
    seq_lens = [int(s) for s in args.seq_lens.split(",")]
    if len(seq_lens) < 2 or min(seq_lens) < 2:
        raise ValueError(f"--seq_lens={args.seq_lens!r} must name at least two lengths >= 2 (an exponent is fitted)")
    rows = time_lengths(
        seq_lens, heads=args.heads, head_dim=args.head_dim, factor=args.factor, max_seconds=args.max_seconds
    )
    print(common.format_table(rows, COLUMNS))
    exponents = {
        name: fit_exponent(seq_lens, [r[f"{name}_ms"] for r in rows])
        for name in ("autocorrelation_gather", "autocorrelation_roll", "dense")
    }
    # what exact L log L and L^2 costs give over the same lengths (the reference the fits are read against)
    reference = {"L_log_L": fit_exponent(seq_lens, [n * math.log(n) for n in seq_lens]), "L_squared": 2.0}
    goal = {"autocorrelation_exponent_max": GOAL_EXPONENT, "met": exponents["autocorrelation_gather"] <= GOAL_EXPONENT}
    print(
        "fitted exponents (time ~ L^x):",
        {k: round(v, 3) for k, v in exponents.items()},
        "goal:",
        goal,
        "reference:",
        reference,
    )
    common.write_json(args.json, rows, exponents=exponents, reference_exponents=reference, goal=goal, shape=vars(args))
    return 0
