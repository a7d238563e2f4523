"""Performance accounting: timing, the machine's matmul peak (measured once, cached), model FLOPs, machine.

MFU = model FLOPs per step / step time / peak, the peak of the dtype the model computes in (`peak_gflops`):
$EFFITRANS_PEAK_GFLOPS if set; else the published dense peak of a known accelerator (PUBLISHED_PEAKS_TFLOPS:
H100/H200/A100, TPU v4/v5e/v5p/v6e); else a matmul in that dtype measured on this machine:
`matmul_peak_gflops` measures it once per machine and dtype and keeps it in a small JSON file
($EFFITRANS_CACHE_DIR, else $XDG_CACHE_HOME/effitrans, else ~/.cache/effitrans). The FLOP model is
PaLM-style: 2 x matmul parameters per token plus the attention scores and values, backward = 2 x forward.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from absl import logging

PEAK_ENV = "EFFITRANS_PEAK_GFLOPS"
CACHE_DIR_ENV = "EFFITRANS_CACHE_DIR"


def block(x):
    """Waits for every array in the pytree `x` (jax.block_until_ready, tolerant of non-arrays)."""
    import jax

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

    Used as the machine's practical peak: efficiency numbers are "% of a matmul measured on this machine".
    """
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32).astype(dtype)
    f = jax.jit(lambda a, b: a @ b)
    stats = time_fn(lambda: f(a, b), repeats=repeats, warmup=2)
    return 2 * n**3 / stats["median_s"] / 1e9


# Published dense (no sparsity) peak TFLOP/s of one device (jax Device: a GPU, a TPU chip) per compute dtype,
# from the vendors' data sheets: NVIDIA H100/H200 SXM (H100 PCIe lower), A100; Google Cloud TPU v4, v5e,
# v5p, v6e system-architecture pages. float32 on NVIDIA is the TF32 tensor-core rate (XLA's default for
# float32 dots on GPU); TPUs publish bf16 only, so their float32 peak is measured. Matched as substrings
# of Device.device_kind, first match wins (so "TPU v5 lite" is tested before "TPU v5").
PUBLISHED_PEAKS_TFLOPS = (
    ("H100 PCIe", {"bfloat16": 756.0, "float16": 756.0, "float32": 378.0}),
    ("H100", {"bfloat16": 989.4, "float16": 989.4, "float32": 494.7}),
    ("H200", {"bfloat16": 989.4, "float16": 989.4, "float32": 494.7}),
    ("A100", {"bfloat16": 312.0, "float16": 312.0, "float32": 156.0}),
    ("TPU v4", {"bfloat16": 275.0}),
    ("TPU v5 lite", {"bfloat16": 197.0}),
    ("TPU v5e", {"bfloat16": 197.0}),
    ("TPU v5", {"bfloat16": 459.0}),
    ("TPU v6 lite", {"bfloat16": 918.0}),
    ("TPU v6e", {"bfloat16": 918.0}),
)


def published_peak_gflops(device_kind: str, dtype: str) -> float | None:
    """The published dense peak in GFLOP/s of `device_kind` (Device.device_kind) in `dtype`, or None."""
    for kind, peaks in PUBLISHED_PEAKS_TFLOPS:
        if kind in str(device_kind):
            value = peaks.get(str(dtype))
            return None if value is None else value * 1e3
    return None


def peak_gflops(dtype: str = "float32", device_kind: str | None = None) -> tuple[float, str]:
    """(GFLOP/s, source) of the peak MFU is measured against for compute in `dtype` on this machine.

    source: "given" ($EFFITRANS_PEAK_GFLOPS), "published <device kind> <dtype> dense" (the table above),
    or "measured" / "cached" (a `dtype` matmul on this machine, `matmul_peak_gflops`). device_kind defaults
    to the first device's.
    """
    if not os.environ.get(PEAK_ENV):
        if device_kind is None:
            import jax

            device_kind = jax.devices()[0].device_kind
        published = published_peak_gflops(device_kind, dtype)
        if published is not None:
            return published, f"published {device_kind} {dtype} dense"
    return matmul_peak_gflops(dtype)


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (ru_maxrss; KiB on Linux)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1024.0 if sys.platform != "darwin" else rss / 2**20


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_description() -> dict:
    """Host, CPU, memory, JAX backend and devices: enough to compare runs across machines."""
    import jax

    mem_gb = None
    try:
        mem_gb = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    return {
        "host": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "memory_gb": mem_gb,
        "load_avg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def peak_cache_path() -> str:
    """The JSON file holding measured peaks: {machine key: GFLOP/s}."""
    root = os.environ.get(CACHE_DIR_ENV)
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(xdg, "effitrans")
    return os.path.join(root, "matmul_peak.json")


def _peak_key(dtype: str) -> str:
    """What the peak depends on: the machine (host, CPU, devices, backend, jax version) and the dtype."""
    import jax

    ident = {
        "host": platform.node(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": [d.device_kind for d in jax.devices()],
        "dtype": str(dtype),
    }
    return json.dumps(ident, sort_keys=True)


def matmul_peak_gflops(dtype: str = "float32") -> tuple[float, str]:
    """(GFLOP/s, where it came from: "given" | "cached" | "measured") of a `dtype` matmul on this machine.

    $EFFITRANS_PEAK_GFLOPS gives the value directly; otherwise the cache file is read, and on a miss the
    peak is measured once (measure_matmul_gflops) and written there. An unwritable cache only logs.
    """
    given = os.environ.get(PEAK_ENV)
    if given:
        try:
            value = float(given)
        except ValueError:
            value = float("nan")
        if not value > 0:
            raise ValueError(f"${PEAK_ENV}={given!r} is not a positive number of GFLOP/s")
        return value, "given"
    path, key = peak_cache_path(), _peak_key(dtype)
    cache = _read_peaks(path)
    if isinstance(cache.get(key), (int, float)) and cache[key] > 0:
        return float(cache[key]), "cached"
    value = measure_matmul_gflops(dtype=dtype)
    _write_peak(path, cache, key, value)
    return value, "measured"


def raise_peak(dtype: str, gflops: float) -> float:
    """Records that this machine ran `dtype` matmul work at `gflops`: a measured peak only ever rises, so a
    peak cached while the machine was loaded is corrected by the first faster run. Returns the new peak."""
    path, key = peak_cache_path(), _peak_key(dtype)
    cache = _read_peaks(path)
    old = cache.get(key)
    if isinstance(old, (int, float)) and old >= gflops:
        return float(old)
    _write_peak(path, cache, key, float(gflops))
    return float(gflops)


def _read_peaks(path: str) -> dict:
    """The cache file's {machine key: GFLOP/s}; {} when it is missing, unreadable or not a mapping."""
    try:
        with open(path) as f:
            cache = json.load(f)
    except (OSError, json.JSONDecodeError):
        return {}
    return cache if isinstance(cache, dict) else {}


def _write_peak(path: str, cache: dict, key: str, value: float) -> None:
    cache = {**cache, key: value}
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(cache, f, indent=1)
        os.replace(tmp, path)
    except OSError as e:
        logging.warning("could not write the matmul peak cache %s: %s", path, e)


def _widths(model_cfg) -> list[int]:
    w = model_cfg.ffn_width
    return [int(w)] * model_cfg.num_layers if isinstance(w, int) else [int(x) for x in w]


def forward_flops(model_cfg, batch: int, length: int, spec=None) -> float:
    """Forward FLOPs of `model_cfg` on [batch, length] tokens, PaLM-style.

    Per layer: 2 x T_q x (q, o projections + the feed-forward params a token uses: the GLU, or an MoE layer's
    router, top_k routed and shared experts) + 2 x T_kv x (k, v projections) + 4 x T_q x T_kv x
    N x H for scores and values (halved for a causal LM); the LM head (2 x D x V per token) for causal_lm;
    the embedding lookup is free. `spec` (a funnel.FunnelSpec) gives each layer's pooled lengths.
    """
    m = model_cfg
    d, n, k, h = m.d_model, m.num_heads, m.num_kv_heads, m.head_dim
    causal_lm = m.name == "causal_lm"
    lengths_q, lengths_kv = [length] * m.num_layers, [length] * m.num_layers
    if spec is not None:
        seq = spec.pooled_lengths(length)
        layer = 0
        for b, nl in enumerate(spec.block_layers):
            for j in range(nl):
                lengths_q[layer] = seq[b]
                lengths_kv[layer] = seq[b - 1] if (b > 0 and j == 0 and spec.pool_q_only) else seq[b]
                layer += 1
    ffn = [3 * d * w for w in _widths(m)]  # GLU params a token uses, per layer
    if "moe" in m:  # router + the top_k routed and the shared experts a token uses
        from effitrans.layers.moe import MOE_KEYS  # jax-free import of this module otherwise
        from effitrans.schema import value

        o = {key: value(m.moe, MOE_KEYS, key) for key in MOE_KEYS}
        layers = sorted(range(m.num_layers) if o["layers"] is None else o["layers"])
        experts = o["num_experts"] if isinstance(o["num_experts"], (list, tuple)) else [o["num_experts"]] * len(layers)
        for i, e in zip(layers, experts):
            ffn[i] = 3 * d * o["expert_width"] * (o["top_k"] + o["num_shared_experts"]) + d * e
    total = 0.0
    for f, tq, tkv in zip(ffn, lengths_q, lengths_kv):
        total += 2 * tq * (d * n * h + n * h * d + f)  # q, o projections and the feed-forward
        total += 2 * tkv * (2 * d * k * h)  # k, v projections
        total += 4 * tq * tkv * n * h * (0.5 if causal_lm else 1.0)  # scores and values
    if causal_lm:
        total += 2 * length * d * m.vocab_size  # LM head
    return float(batch * total)


def train_flops_per_step(model_cfg, task: str, batch_shapes: dict) -> float:
    """Model FLOPs of one training step (forward + backward = 3 x forward) on batches of these shapes."""
    if task == "retrieval":
        (bq, tq), (bd, td) = batch_shapes["query"], batch_shapes["doc"]
        return 3.0 * (forward_flops(model_cfg, bq, tq) + forward_flops(model_cfg, bd, td))
    b, t = batch_shapes["inputs"]
    return 3.0 * forward_flops(model_cfg, b, t)
