"""`python -m effitrans.bench train --config=configs/lm_small.py [--json PATH] [--config.x=y]`.

Times effitrans's jitted training step on a config's model and data and reports tokens/s and MFU, where
MFU's peak is that of the model's compute dtype: published for a known accelerator, else a matmul measured
in the same process. As the baseline, the same model written in plain JAX (raw arrays, one function,
jax.nn.dot_product_attention, the same AdamW) is timed in the same run, so the table shows what the framework
costs, not just what the machine can do.
"""

from __future__ import annotations

import json
import tempfile
import time

import numpy as np


def _median_step_time(step_fn, state, batches, steps: int, warmup: int):
    """Runs warmup + steps calls of state = step_fn(state, batch); returns (median seconds, state)."""
    import jax

    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        state, metrics = step_fn(state, batches[i % len(batches)])
        jax.block_until_ready(metrics)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return float(np.median(times)), state


def plain_jax_train_step(model_cfg, train_cfg):
    """(init(key) -> state, step(state, batch) -> (state, loss)): the causal LM of model_cfg in plain JAX."""
    import jax
    import jax.numpy as jnp
    import optax

    m = model_cfg
    d, n, k, h, v = m.d_model, m.num_heads, m.num_kv_heads, m.head_dim, m.vocab_size
    widths = [m.ffn_width] * m.num_layers if isinstance(m.ffn_width, int) else list(m.ffn_width)
    tx = optax.adamw(train_cfg.learning_rate, b1=train_cfg.b1, b2=train_cfg.b2, weight_decay=train_cfg.weight_decay)

    def init(key):
        keys = iter(jax.random.split(key, 8 * len(widths) + 2))
        normal = lambda shape, fan_in: jax.random.normal(next(keys), shape) / np.sqrt(fan_in)
        layers = [
            {
                "wq": normal((d, n * h), d),
                "wk": normal((d, k * h), d),
                "wv": normal((d, k * h), d),
                "wo": normal((n * h, d), n * h),
                "gate": normal((d, f), d),
                "up": normal((d, f), d),
                "down": normal((f, d), f),
                "n1": jnp.ones(d),
                "n2": jnp.ones(d),
            }
            for f in widths
        ]
        params = {"embed": normal((v, d), d), "layers": layers, "norm": jnp.ones(d)}
        return {"params": params, "opt": tx.init(params)}

    def rms(x, s):
        return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6) * s

    def rope(x, pos):
        freqs = 1.0 / (m.rope_base ** (jnp.arange(0, h, 2) / h))
        ang = pos[:, None] * freqs  # [T, H/2]
        sin, cos = jnp.sin(ang)[None, :, None], jnp.cos(ang)[None, :, None]
        x1, x2 = x[..., : h // 2], x[..., h // 2 :]
        return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)

    def loss_fn(params, batch):
        tokens = batch["inputs"]
        b, t = tokens.shape
        pos = jnp.arange(t, dtype=jnp.float32)
        x = params["embed"][tokens]
        for p in params["layers"]:
            y = rms(x, p["n1"])
            q = rope((y @ p["wq"]).reshape(b, t, n, h), pos)
            kk = rope((y @ p["wk"]).reshape(b, t, k, h), pos)
            vv = (y @ p["wv"]).reshape(b, t, k, h)
            a = jax.nn.dot_product_attention(q, kk, vv, is_causal=True, implementation="xla")
            x = x + a.reshape(b, t, n * h) @ p["wo"]
            y = rms(x, p["n2"])
            x = x + (jax.nn.silu(y @ p["gate"]) * (y @ p["up"])) @ p["down"]
        logits = rms(x, params["norm"]) @ params["embed"].T
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
        return jnp.sum(nll * batch["weights"]) / jnp.sum(batch["weights"])

    @jax.jit
    def step(state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(state["params"], batch)
        updates, opt = tx.update(grads, state["opt"], state["params"])
        return {"params": optax.apply_updates(state["params"], updates), "opt": opt}, loss

    return init, step


def run(config, *, steps: int = 10, warmup: int = 3, json_path=None) -> dict:
    """Times `steps` train steps (after `warmup` untimed ones) of ours and of the plain-JAX baseline."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps={steps!r} must be an int >= 1 (the median of no timed steps is NaN)")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup={warmup!r} must be an int >= 0")
    import jax

    from effitrans import perf
    from effitrans.train.trainer import Trainer

    # The peak of the dtype the model computes in: published for known accelerators, else measured now.
    dtype = config.model.get("dtype", "float32")
    peak = perf.published_peak_gflops(jax.devices()[0].device_kind, dtype) or perf.measure_matmul_gflops(dtype=dtype)
    with tempfile.TemporaryDirectory() as workdir:
        trainer = Trainer(config, workdir, peak_gflops=peak, verbose=False)
        local = [trainer.dataset.get_batch(s) for s in range(4)]
        batches = [trainer.global_batch(b) for b in local]
        flops = perf.train_flops_per_step(config.model, config.train.task, {k: v.shape for k, v in local[0].items()})
        tokens = trainer.task.tokens(local[0])
        t_ours, _ = _median_step_time(trainer._train_step, trainer.init_state(), batches, steps, warmup)
        trainer.checkpointer.close()
    rows = [{"impl": "effitrans", "step_time_s": t_ours}]
    if config.model.name == "causal_lm" and config.train.grad_accum_steps == 1:
        init, step = plain_jax_train_step(config.model, config.train)
        t_plain, _ = _median_step_time(step, init(jax.random.key(0)), batches, steps, warmup)
        rows.append({"impl": "plain JAX (baseline)", "step_time_s": t_plain})
    baseline = rows[-1]["step_time_s"]
    for r in rows:
        r["tokens_per_s"] = tokens / r["step_time_s"]
        r["model_tflop_per_step"] = flops / 1e12
        r["gflops"] = flops / r["step_time_s"] / 1e9
        r["mfu"] = r["gflops"] / peak
        r["speedup_vs_baseline"] = baseline / r["step_time_s"]
    report = {
        "machine": perf.machine_description(),
        "peak_matmul_gflops": peak,
        "steps_timed": steps,
        "config": {
            "model": config.model.to_dict(),
            "batch_size": config.train.batch_size,
            "data": config.data.to_dict(),
        },
        "rows": rows,
    }
    print(f"{config.model.get('dtype', 'float32')} peak: {peak:.1f} GFLOP/s")
    print(f"{'impl':<22}{'step ms':>10}{'tokens/s':>12}{'GFLOP/s':>10}{'MFU':>8}{'vs baseline':>13}")
    for r in rows:
        print(
            f"{r['impl']:<22}{1e3 * r['step_time_s']:>10.1f}{r['tokens_per_s']:>12,.0f}{r['gflops']:>10.1f}"
            f"{100 * r['mfu']:>7.1f}%{r['speedup_vs_baseline']:>12.2f}x"
        )
    if json_path:
        with open(json_path, "w") as f:
            json.dump(report, f, indent=1, default=str)
    return report


def main(argv) -> None:
    """Exits with code 2 and one line on stderr for a bad flag or config value, 0 after --help."""
    import sys

    from absl import flags
    from ml_collections import config_flags

    from effitrans.schema import ConfigError

    fl = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "configs/*.py file", flag_values=fl, lock_config=True)
    flags.DEFINE_integer("steps", 10, "timed steps (median reported)", lower_bound=1, flag_values=fl)
    flags.DEFINE_integer("warmup", 3, "untimed steps first (compilation)", lower_bound=0, flag_values=fl)
    flags.DEFINE_string("json", None, "write the report here", flag_values=fl)
    if any(a in ("-h", "--help", "-help", "--helpfull") for a in argv):
        print(__doc__.strip() + "\n\n" + fl.get_help())
        raise SystemExit(0)

    def fail(message: str):
        print(f"effitrans.bench train: error: {message}", file=sys.stderr)
        raise SystemExit(2)

    try:
        fl(["effitrans.bench.train", *argv])
        config = fl.config
    except (flags.Error, OSError) as e:
        fail(" ".join(str(e).split()))
    if config is None:
        fail("--config is required, e.g. --config=configs/lm_small.py")
    try:
        run(config, steps=fl.steps, warmup=fl.warmup, json_path=fl.json)
    except ConfigError as e:
        fail(str(e))
