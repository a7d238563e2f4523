"""`python -m effitrans.bench gpu_check --out DIR [--dry] [--sections ...] [--masks ...]`: the accelerator check.

Writes DIR/gpu_check.json ({"machine", "dry", "sections": {name: {"rows": [...], "notes": [...]}}}) with:

  correctness  every mask kind in float32 and bfloat16, forward and gradients of each impl (xla, pallas,
               cudnn where it expresses the mask) against the dense float32 reference: max abs error of
               the output, max error of dq/dk/dv relative to the reference gradient's largest entry.
  timing       S=8192 causal bf16, B4 N16 H128 (the figures docs/accelerator.md compares): cuDNN, JAX's
               Pallas Triton `mha`, JAX's Mosaic-GPU attention (f16, forward), effitrans pallas at its
               default and at other tiles, xla; fwd and fwd+bwd ms (median of 10 after 2 warm-ups), TFLOP/s
               of the allowed pairs.
  sparse       S=16384 block-sparse rows (window, global|window, chunked, strided, fixed) on impl "auto"
               and "pallas", against cuDNN dense causal.
  lm           configs/lm_gpu.py: first step (compile) and median step time, MFU against the bf16 peak.
  moe          the dropless MoE experts (effitrans.layers.moe.experts_dropless) in bf16, forward and fwd+bwd
               with `ragged_dot` and with the tiled grouped matmul, beside the dense GLU of equal active width
               (which `grouped_matmul="auto"` should pick on a GPU), and the tiles' error against ragged_dot.

--dry: tiny shapes, GPU-only rows skipped with the reason; runs on a CPU (a test does). Every row that
fails records its error and the run goes on. scripts/gpu_check.sh is the wrapper the GPU machine runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

import numpy as np

from effitrans import perf

SECTIONS = ("correctness", "timing", "sparse", "lm", "moe")
MASK_SPECS = {
    "full": "Full()",
    "causal": "Causal()",
    "window": "SlidingWindow(255, 0)",
    "window_two_sided": "SlidingWindow(64, 32)",
    "strided": "Strided(128)",
    "fixed": "Fixed(128, 8)",
    "global_or_window": "GlobalTokens(64) | SlidingWindow(255, 0)",
    "chunked": "Chunked(512)",
    "causal_and_chunked": "Causal() & Chunked(512)",
}
# The same kinds at a scale that fits the 64-token problems of --dry.
DRY_MASK_SPECS = {
    "full": "Full()",
    "causal": "Causal()",
    "window": "SlidingWindow(15, 0)",
    "window_two_sided": "SlidingWindow(4, 2)",
    "strided": "Strided(8)",
    "fixed": "Fixed(8, 2)",
    "global_or_window": "GlobalTokens(4) | SlidingWindow(15, 0)",
    "chunked": "Chunked(16)",
    "causal_and_chunked": "Causal() & Chunked(16)",
}
SPARSE_MASKS = ("window", "global_or_window", "chunked", "strided", "fixed")


def _mask(name: str, dry: bool):
    from effitrans.kernels import masks  # pylint: disable=import-outside-toplevel

    spec = (DRY_MASK_SPECS if dry else MASK_SPECS)[name]
    return eval(spec, {k: getattr(masks, k) for k in masks.__all__})  # pylint: disable=eval-used


def _on_gpu() -> bool:
    import jax  # pylint: disable=import-outside-toplevel

    return jax.default_backend() in ("gpu", "cuda")


def _qkv(shape, dtype, seed=0):
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

    rng = np.random.RandomState(seed)
    return tuple(jnp.asarray(rng.standard_normal(shape), jnp.float32).astype(dtype) for _ in range(4))


def _fwd_and_grad(attn):
    """attn(q, k, v) -> out; returns jitted fwd(q, k, v) and fwd+bwd(q, k, v, ct) -> (dq, dk, dv)."""
    import jax  # pylint: disable=import-outside-toplevel
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

    fwd = jax.jit(attn)
    grad = jax.jit(jax.grad(lambda q, k, v, ct: jnp.sum(attn(q, k, v).astype(jnp.float32) * ct), argnums=(0, 1, 2)))
    return fwd, grad


def correctness(dry: bool, masks: list[str], dtypes: list[str]) -> dict:
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

    from effitrans import kernels  # pylint: disable=import-outside-toplevel
    from effitrans.kernels import dispatch  # pylint: disable=import-outside-toplevel

    b, s, n, h = (1, 64, 2, 32) if dry else (2, 1024, 4, 64)
    rows, notes = [], []
    for name in masks:
        mask = _mask(name, dry)
        for dtype in (jnp.dtype(d) for d in dtypes):
            q, k, v, ct = _qkv((b, s, n, h), dtype)
            ref_fwd, ref_grad = _fwd_and_grad(
                lambda q, k, v, mask=mask: kernels.attention(
                    q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), mask=mask, impl="reference"
                )
            )
            want, want_g = ref_fwd(q, k, v), ref_grad(q, k, v, ct)
            for impl in ("xla", "pallas", "cudnn"):
                row = {"mask": name, "dtype": jnp.dtype(dtype).name, "impl": impl, "seq_len": s}
                why = None
                if impl == "pallas" and not _on_gpu() and dry:
                    why = "cpu: Pallas would run in the interpreter (tests/kernels cover it there)"
                elif impl == "cudnn":
                    why = dispatch.cudnn_unsupported(
                        mask, q_len=s, kv_len=s, head_dim=h, v_head_dim=h, dtype=dtype
                    ) or (None if _on_gpu() else "needs a CUDA GPU")
                if why is not None:
                    rows.append(row | {"skipped": why})
                    continue
                try:
                    fwd, grad = _fwd_and_grad(
                        lambda q, k, v, mask=mask, impl=impl: kernels.attention(q, k, v, mask=mask, impl=impl)
                    )
                    got, got_g = fwd(q, k, v), grad(q, k, v, ct)
                    out_err = float(jnp.max(jnp.abs(got.astype(jnp.float32) - want)))
                    grad_err = max(
                        float(jnp.max(jnp.abs(g.astype(jnp.float32) - w)) / jnp.maximum(jnp.max(jnp.abs(w)), 1e-6))
                        for g, w in zip(got_g, want_g)
                    )
                    tol = (1e-4, 1e-3) if dtype == jnp.float32 else (2e-2, 3e-2)
                    rows.append(
                        row
                        | {
                            "out_max_abs": out_err,
                            "grad_max_rel": grad_err,
                            "ok": out_err <= tol[0] and grad_err <= tol[1],
                        }
                    )
                except Exception as e:  # pylint: disable=broad-except
                    rows.append(row | {"error": _error(e)})
    return {"rows": rows, "notes": notes}


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:400]


def _timed(fwd, grad, args, ct, repeats):
    import jax  # pylint: disable=import-outside-toplevel

    out = {}
    t0 = time.perf_counter()
    jax.block_until_ready(fwd(*args))
    out["fwd_compile_s"] = time.perf_counter() - t0
    out["fwd_ms"] = perf.time_fn(lambda: fwd(*args), repeats=repeats, warmup=2)["median_s"] * 1e3
    if grad is not None:
        out["fwdbwd_ms"] = perf.time_fn(lambda: grad(*args, ct), repeats=repeats, warmup=2)["median_s"] * 1e3
    return out


def _third_party(kind: str, causal: bool, dtype):
    """JAX's own Pallas GPU attention kernels: (attn(q, k, v), has_backward)."""
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

    if kind == "jax_triton_mha":
        from jax.experimental.pallas.ops.gpu import attention as triton_attention  # pylint: disable=import-outside-toplevel

        sizes = triton_attention.BlockSizes(
            block_q=128, block_k=64, block_q_dkv=64, block_kv_dkv=64, block_q_dq=64, block_kv_dq=64
        )

        def attn(q, k, v):
            return triton_attention.mha(q, k, v, None, sm_scale=q.shape[-1] ** -0.5, causal=causal, block_sizes=sizes)

        return attn, True
    from jax.experimental.pallas.ops.gpu import attention_mgpu  # pylint: disable=import-outside-toplevel

    config = attention_mgpu.TuningConfig(block_q=128, block_kv=128, max_concurrent_steps=2, causal=causal)

    def attn(q, k, v):  # Mosaic GPU takes float16
        return attention_mgpu.attention(q.astype(jnp.float16), k.astype(jnp.float16), v.astype(jnp.float16), config)

    return attn, False


def _attention_rows(b, s, n, h, dtype, mask, impls, repeats, dry):
    """One timing row per (impl, tiles) entry of `impls`: ("cudnn" | "xla" | "auto" | "pallas" | a JAX
    kernel name, block_q, block_k)."""
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

    from effitrans import kernels  # pylint: disable=import-outside-toplevel
    from effitrans.bench.attention import allowed_pairs  # pylint: disable=import-outside-toplevel
    from effitrans.kernels import dispatch, masks  # pylint: disable=import-outside-toplevel

    q, k, v, ct = _qkv((b, s, n, h), dtype)
    flop = 4.0 * b * n * h * allowed_pairs(mask, s, s)
    rows = []
    for impl, bq, bk in impls:
        row = {
            "impl": impl,
            "block_q": bq,
            "block_k": bk,
            "mask": repr(mask),
            "seq_len": s,
            "dtype": jnp.dtype(dtype).name,
        }
        gpu_only = impl in ("cudnn", "jax_triton_mha", "jax_mosaic_gpu") or (impl == "pallas" and dry)
        if gpu_only and not _on_gpu():
            rows.append(
                row | {"skipped": "needs a CUDA GPU" if impl != "pallas" else "cpu: Pallas would be interpreted"}
            )
            continue
        try:
            if impl in ("jax_triton_mha", "jax_mosaic_gpu"):
                attn, has_bwd = _third_party(impl, isinstance(mask, masks.Causal), dtype)
            else:
                if impl == "auto":
                    row["auto_picks"] = dispatch.choose_impl(
                        mask, q_len=s, kv_len=s, head_dim=h, dtype=dtype, backend=_backend(), device_kind=_device_kind()
                    ).impl

                def attn(q, k, v, impl=impl, bq=bq, bk=bk):
                    return kernels.attention(q, k, v, mask=mask, impl=impl, block_q=bq, block_k=bk)

                has_bwd = True
            fwd, grad = _fwd_and_grad(attn)
            res = _timed(fwd, grad if has_bwd else None, (q, k, v), ct, repeats)
            res["fwd_tflops"] = flop / (res["fwd_ms"] * 1e-3) / 1e12
            if "fwdbwd_ms" in res:
                res["fwdbwd_tflops"] = 3 * flop / (res["fwdbwd_ms"] * 1e-3) / 1e12
            rows.append(row | res)
        except Exception as e:  # pylint: disable=broad-except
            rows.append(row | {"error": _error(e)})
    return rows


def _backend() -> str:
    import jax  # pylint: disable=import-outside-toplevel

    return jax.default_backend()


def _device_kind() -> str:
    import jax  # pylint: disable=import-outside-toplevel

    return jax.devices()[0].device_kind


def timing(dry: bool) -> dict:
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

    from effitrans.kernels import masks  # pylint: disable=import-outside-toplevel

    b, s, n, h, repeats = (1, 256, 2, 32, 2) if dry else (4, 8192, 16, 128, 10)
    impls = [
        ("cudnn", None, None),
        ("jax_triton_mha", None, None),
        ("jax_mosaic_gpu", None, None),
        ("auto", None, None),
        ("pallas", None, None),
        ("pallas", 128, 64),
        ("pallas", 64, 64),
        ("pallas", 128, 128),
        ("xla", None, None),
    ]
    return {"rows": _attention_rows(b, s, n, h, jnp.bfloat16, masks.Causal(), impls, repeats, dry), "notes": []}


def sparse(dry: bool, names: list[str]) -> dict:
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

    from effitrans.kernels import masks  # pylint: disable=import-outside-toplevel

    b, s, n, h, repeats = (1, 256, 2, 32, 2) if dry else (4, 16384, 16, 128, 5)
    rows = _attention_rows(b, s, n, h, jnp.bfloat16, masks.Causal(), [("cudnn", None, None)], repeats, dry)
    for name in names:
        impls = [("auto", None, None)] + ([] if dry else [("pallas", None, None)])
        rows += [
            r | {"mask_name": name}
            for r in _attention_rows(b, s, n, h, jnp.bfloat16, _mask(name, dry), impls, repeats, dry)
        ]
    causal = rows[0]
    for r in rows[1:]:
        for key in ("fwd_ms", "fwdbwd_ms"):
            if key in r and key in causal:
                r[f"{key}_x_cudnn_causal"] = causal[key] / r[key]
    return {"rows": rows, "notes": []}


def lm(dry: bool) -> dict:
    try:
        import ml_collections  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    except ImportError:
        return {
            "rows": [],
            "notes": ["skipped: ml_collections is not installed (carry its wheel: see scripts/gpu_check.sh)"],
        }
    import importlib.util  # pylint: disable=import-outside-toplevel
    import tempfile  # pylint: disable=import-outside-toplevel

    import jax  # pylint: disable=import-outside-toplevel

    from effitrans.train.trainer import Trainer  # pylint: disable=import-outside-toplevel

    path = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "lm_gpu.py")
    spec = importlib.util.spec_from_file_location("lm_gpu_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config()
    if dry:
        cfg.model.update(num_layers=2, d_model=64, num_heads=2, num_kv_heads=2, head_dim=32, ffn_width=128)
        cfg.data.seq_len, cfg.train.batch_size = 64, 2
    steps = 3 if dry else 10
    dtype = cfg.model.dtype
    peak, source = perf.peak_gflops(dtype)
    row = {"config": "lm_gpu", "dtype": dtype, "peak_gflops": peak, "peak_source": source}
    launch = time.perf_counter()
    with tempfile.TemporaryDirectory() as workdir:
        trainer = Trainer(cfg, workdir, peak_gflops=peak, verbose=False)
        row["num_params"] = trainer.num_params
        state = trainer.init_state()
        batches = [trainer.global_batch(trainer.dataset.get_batch(i)) for i in range(2)]
        t0 = time.perf_counter()
        state, metrics = trainer._train_step(state, batches[0])  # pylint: disable=protected-access
        jax.block_until_ready(metrics)
        row["first_step_s"] = time.perf_counter() - t0
        row["launch_to_first_step_s"] = time.perf_counter() - launch
        times = []
        for i in range(steps):
            t0 = time.perf_counter()
            state, metrics = trainer._train_step(state, batches[i % 2])  # pylint: disable=protected-access
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - t0)
        trainer.checkpointer.close()
    local = trainer.dataset.get_batch(0)
    flops = perf.train_flops_per_step(cfg.model, cfg.train.task, {k: v.shape for k, v in local.items()})
    row["step_s"] = float(np.median(times))
    row["mfu"] = flops / row["step_s"] / 1e9 / peak
    row["loss"] = float(metrics["loss"])
    return {"rows": [row], "notes": []}


def moe(dry: bool) -> dict:
    import jax  # pylint: disable=import-outside-toplevel
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

    from effitrans.layers.glu import glu_feed_forward  # pylint: disable=import-outside-toplevel
    from effitrans.layers.moe import experts_dropless, route, tile_rows  # pylint: disable=import-outside-toplevel

    # moe_lm_small's layer (16 experts x 384, top-3) at a GPU batch; --dry: a few hundred tokens.
    t, d, e, f, k, repeats = (256, 64, 8, 32, 2, 2) if dry else (65536, 512, 16, 384, 3, 10)
    ks = jax.random.split(jax.random.key(0), 8)
    bf = jnp.bfloat16
    x = jax.random.normal(ks[0], (t, d), bf)
    r = route(x.astype(jnp.float32) @ jax.random.normal(ks[1], (d, e)), top_k=k)
    w = [
        (jax.random.normal(kk, shape) / shape[1] ** 0.5).astype(bf)
        for kk, shape in zip(ks[2:5], [(e, d, f)] * 2 + [(e, f, d)])
    ]
    dw = [
        (jax.random.normal(kk, shape) / shape[0] ** 0.5).astype(bf)
        for kk, shape in zip(ks[5:8], [(d, k * f)] * 2 + [(k * f, d)])
    ]
    ct = jax.random.normal(ks[0], (t, d), bf)
    rows, outs = [], {}
    paths = {
        "dense_glu_same_active_width": lambda x, w: glu_feed_forward(x[None], *w)[0],
        "dropless_ragged_dot": lambda x, w: experts_dropless(x, r.experts, r.weights, *w, grouped="ragged_dot"),
        "dropless_tiles": lambda x, w: experts_dropless(x, r.experts, r.weights, *w, grouped="tiles"),
    }
    for name, fn in paths.items():
        weights = dw if name.startswith("dense") else w
        fwd = jax.jit(fn)
        grad = jax.jit(lambda x, w, ct, fn=fn: jax.vjp(fn, x, w)[1](ct))
        row = {"path": name, "tokens": t, "experts": e, "top_k": k, "expert_width": f}
        try:
            row |= _timed(fwd, grad, (x, weights), ct, repeats)
            outs[name] = np.asarray(fwd(x, weights), np.float32)
        except Exception as err:  # pylint: disable=broad-except
            row["error"] = _error(err)
        rows.append(row)
    base = rows[0]
    for row in rows[1:]:
        for key in ("fwd_ms", "fwdbwd_ms"):
            if key in row and key in base:
                row[f"{key}_x_dense"] = row[key] / base[key]
    notes = [f"tile rows {tile_rows(t * k, e)}"]
    if "dropless_ragged_dot" in outs and "dropless_tiles" in outs:
        err = np.max(np.abs(outs["dropless_tiles"] - outs["dropless_ragged_dot"]))
        notes.append(f"max |tiles - ragged_dot| {err:.3g} (bf16)")
    return {"rows": rows, "notes": notes}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m effitrans.bench gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for gpu_check.json")
    parser.add_argument("--dry", action="store_true", help="tiny shapes; GPU-only rows skipped with the reason")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"from {list(SECTIONS)}")
    parser.add_argument("--masks", default=",".join(MASK_SPECS), help=f"correctness masks, from {list(MASK_SPECS)}")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="correctness dtypes, from float32,bfloat16")
    args = parser.parse_args(argv)
    sections = args.sections.split(",")
    for name in sections:
        if name not in SECTIONS:
            parser.error(f"--sections: unknown section {name!r}; allowed: {list(SECTIONS)}")
    dtypes = args.dtypes.split(",")
    for name in dtypes:
        if name not in ("float32", "bfloat16"):
            parser.error(f"--dtypes: unknown dtype {name!r}; allowed: float32, bfloat16")
    masks = args.masks.split(",")
    for name in masks:
        if name not in MASK_SPECS:
            parser.error(f"--masks: unknown mask {name!r}; allowed: {list(MASK_SPECS)}")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "gpu_check.json")
    report = {"machine": perf.machine_description(), "dry": args.dry, "sections": {}}
    runners = {
        "correctness": lambda: correctness(args.dry, masks, dtypes),
        "timing": lambda: timing(args.dry),
        "sparse": lambda: sparse(args.dry, [m for m in SPARSE_MASKS if m in masks]),
        "lm": lambda: lm(args.dry),
        "moe": lambda: moe(args.dry),
    }
    for name in sections:
        t0 = time.perf_counter()
        print(f"gpu_check: {name} ...", flush=True)
        try:
            result = runners[name]()
        except Exception as e:  # pylint: disable=broad-except
            result = {"rows": [], "notes": [f"failed: {_error(e)}"], "traceback": traceback.format_exc()[-4000:]}
        result["seconds"] = time.perf_counter() - t0
        report["sections"][name] = result
        for row in result["rows"]:
            print("  " + json.dumps(row), flush=True)
        for note in result["notes"]:
            print("  note: " + note, flush=True)
        with open(path, "w") as f:  # after every section, so a run cut short keeps what it measured
            json.dump(report, f, indent=1, default=str)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
