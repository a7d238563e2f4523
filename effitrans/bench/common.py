"""Shared benchmark helpers: timing, matmul peak, machine description, tables, JSON, subprocesses.

Every `python -m effitrans.bench <what>` subcommand prints a human table and, with --json PATH,
writes {"machine": machine_description(), "rows": [...]}; each row carries its baselines measured in
the same run. Nothing here asserts absolute times.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np


def block(x):
    """Waits for every array in the pytree `x` (jax.block_until_ready, tolerant of non-arrays)."""
    import jax  # pylint: disable=import-outside-toplevel

    return jax.block_until_ready(x)


def time_fn(fn: Callable[[], Any], *, repeats: int = 3, warmup: int = 1, max_seconds: float | None = None) -> dict:
    """Median wall time of `fn()` (which must return arrays to wait on), after `warmup` calls.

    The first warm-up call includes compilation and is reported separately as `first_s`. When
    `max_seconds` is set, repeats are reduced so that the timed calls take about that long in total
    (at least one), which keeps slow dense baselines from dominating a benchmark run.

    Returns {"median_s", "min_s", "first_s", "repeats", "times_s"}.
    """
    first = None
    for i in range(max(1, warmup)):
        t0 = time.perf_counter()
        block(fn())
        if i == 0:
            first = time.perf_counter() - t0
    n = repeats
    if max_seconds is not None and first is not None:
        n = int(max(1, min(repeats, max_seconds // max(first / 2, 1e-9))))
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        block(fn())
        times.append(time.perf_counter() - t0)
    return {
        "median_s": float(np.median(times)),
        "min_s": float(np.min(times)),
        "first_s": first,
        "repeats": n,
        "times_s": times,
    }


def measure_matmul_gflops(n: int = 2048, repeats: int = 5, dtype: str = "float32") -> float:
    """Median GFLOP/s of an n x n @ n x n matmul (2 n^3 flops) on the default device, measured now.

    Used as the machine's practical peak: efficiency numbers are "% of a matmul measured in the same
    run", so they stay meaningful on a loaded or throttled machine.
    """
    import jax  # pylint: disable=import-outside-toplevel
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32).astype(dtype)
    f = jax.jit(lambda a, b: a @ b)
    stats = time_fn(lambda: f(a, b), repeats=repeats, warmup=2)
    return 2 * n**3 / stats["median_s"] / 1e9


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (ru_maxrss; KiB on Linux)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1024.0 if sys.platform != "darwin" else rss / 2**20


def machine_description() -> dict:
    """Host, CPU, memory, JAX backend and devices: enough to compare runs across machines."""
    import jax  # pylint: disable=import-outside-toplevel

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_gb = None
    try:
        mem_gb = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    return {
        "host": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "memory_gb": mem_gb,
        "load_avg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value != value:  # NaN
            return "-"
        if abs(value) >= 100:
            return f"{value:.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.2f}"
    return str(value)


def format_table(rows: Sequence[dict], columns: Sequence[tuple[str, str]]) -> str:
    """Plain-text table; columns are (row key, header). Missing values print as '-'."""
    cells = [[header for _, header in columns]]
    cells += [[_fmt(row.get(key)) for key, _ in columns] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) if j else c.ljust(w) for j, (c, w) in enumerate(zip(r, widths))) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(rows: Sequence[dict], columns: Sequence[tuple[str, str]]) -> str:
    """The same table in GitHub markdown (for docs)."""
    out = ["| " + " | ".join(h for _, h in columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    out += ["| " + " | ".join(_fmt(r.get(k)) for k, _ in columns) + " |" for r in rows]
    return "\n".join(out)


def write_json(path: str | None, rows: Iterable[dict], machine: dict | None = None, **extra: Any) -> None:
    """Writes {"machine": ..., "rows": [...], **extra} to `path` (no-op when path is None)."""
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    payload = {"machine": machine if machine is not None else machine_description(), "rows": list(rows), **extra}
    with open(path, "w") as f:
        json.dump(payload, f, indent=2, default=float)
    print(f"wrote {path}")


def bench_parser(name: str, doc: str) -> argparse.ArgumentParser:
    """The parser of `python -m effitrans.bench NAME` (help: the benchmark module's docstring), with --json."""
    parser = argparse.ArgumentParser(
        prog=f"python -m effitrans.bench {name}", description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", default=None, help='write {"machine", "rows"} here')
    return parser


def save_figure(fig, path: str) -> None:
    """Lays out a matplotlib figure and writes it as a PNG to `path` (creating its folder)."""
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def run_json_subprocess(module: str, args: Sequence[str], timeout: float | None = None) -> dict:
    """Runs `python -m module args...` in a fresh process; its last stdout line must be JSON.

    A fresh process per measurement makes peak-memory (ru_maxrss) numbers independent of what ran
    before. Returns the parsed dict, or {"error": ...} when the process fails or times out.
    """
    cmd = [sys.executable, "-m", module, *args]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f}s"}
    lines = [l for l in proc.stdout.strip().splitlines() if l.strip()]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": f"exit {proc.returncode}: " + " | ".join(tail)}
    try:
        return json.loads(lines[-1])
    except json.JSONDecodeError:
        return {"error": f"bad output: {lines[-1][:200]}"}


def build_model_fast(model_cfg):
    """The model of `model_cfg` with deterministic pseudo-random weights (uniform, fan-in scaled) written by
    one small compiled function. Decode speed does not depend on the weight values, and drawing them with
    the real initialisers compiles one threefry program per weight shape, which on a small shared CPU costs
    more than the measurement itself."""
    import jax  # pylint: disable=import-outside-toplevel
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
    from flax import nnx  # pylint: disable=import-outside-toplevel

    from effitrans.registry import build_model  # pylint: disable=import-outside-toplevel

    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: build_model(model_cfg)))

    @jax.jit
    def fill(state):
        leaves, tree = jax.tree.flatten(state)
        out = []
        for i, x in enumerate(leaves):
            v = jnp.arange(x.size, dtype=jnp.float32) * 0.6180339887 + 0.1234 * i  # golden-ratio sequence
            scale = 3.46 / max(x.shape[0] if x.ndim else 1, 1) ** 0.5  # ~unit variance / fan-in
            out.append((((v % 1.0) - 0.5) * scale).reshape(x.shape).astype(x.dtype))
        return jax.tree.unflatten(tree, out)

    return nnx.merge(graphdef, fill(abstract))
