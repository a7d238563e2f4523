"""`python -m effitrans.bench train --config=configs/lm_small.py [--json PATH] [--config.x=y]`.

Times effitrans's jitted training step on a config's model and data and reports tokens/s and MFU, where
MFU's peak is that of the model's compute dtype: published for a known accelerator, else a matmul measured
in the same process. As the baseline, the same model written in plain JAX (raw arrays, one function,
jax.nn.dot_product_attention, the same AdamW) is timed in the same run, so the table shows what the framework
costs, not just what the machine can do. For a config with `model.moe`, the baseline is its dense twin
instead (`dense_twin`: dense GLUs of the width a token uses, so equal active parameters), and one MoE layer's
forward is split into routing, expert matmuls and dispatch.
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


def dense_twin(config):
    """The config with model.moe removed and each MoE layer's feed-forward a dense GLU of the width a token
    uses there ((top_k + shared experts) x expert_width): equal active parameters, no routing."""
    from effitrans.models.transformer import ffn_widths, moe_layers, moe_options

    twin = config.copy_and_resolve_references()
    o, layers = moe_options(config.model), moe_layers(config.model)
    active = (o["top_k"] + o["num_shared_experts"]) * o["expert_width"]
    widths = [active if i in layers else w for i, w in enumerate(ffn_widths(config.model))]
    with twin.unlocked():
        del twin.model["moe"]
        del twin.model["ffn_width"]  # an int field: per-layer widths are a list
        twin.model.ffn_width = widths
    return twin


def _time_trainer(config, peak: float, steps: int, warmup: int):
    """(median step seconds, global batches, tokens per step, model FLOPs per step) of the Trainer's step."""
    from effitrans import perf
    from effitrans.train.trainer import Trainer

    with tempfile.TemporaryDirectory() as workdir:
        trainer = Trainer(config, workdir, peak_gflops=peak, verbose=False)
        local = [trainer.dataset.get_batch(s) for s in range(4)]
        batches = [trainer.global_batch(b) for b in local]
        flops = perf.train_flops_per_step(config.model, config.train.task, {k: v.shape for k, v in local[0].items()})
        t, _ = _median_step_time(trainer._train_step, trainer.init_state(), batches, steps, warmup)
        trainer.checkpointer.close()
    return t, batches, trainer.task.tokens(local[0]), flops


def moe_breakdown(config, num_tokens: int, repeats: int = 5) -> dict:
    """Forward time of one MoE layer of `config` on [num_tokens, D] split into its parts, beside the dense GLU
    of the same active width: route (router matmul, top-k), the expert matmuls on tokens already sorted by
    expert (`ragged_dot`, and the tiled grouped matmul with its padding), and the whole dropless layer with
    each (sort, gather, scatter back and combine by difference). Seconds, medians."""
    import jax
    import jax.numpy as jnp

    from effitrans import perf
    from effitrans.layers.glu import glu_feed_forward
    from effitrans.layers.moe import ACTIVATIONS, experts_dropless, route, tile_rows
    from effitrans.models.transformer import moe_options

    o, d, act = moe_options(config.model), config.model.d_model, config.model.ffn_activation
    e, f, k = o["num_experts"], o["expert_width"], o["top_k"]
    ks = jax.random.split(jax.random.key(0), 8)
    x = jax.random.normal(ks[0], (num_tokens, d))
    router = jax.random.normal(ks[1], (d, e)) / d**0.5
    wg, wu = (jax.random.normal(kk, (e, d, f)) / d**0.5 for kk in ks[2:4])
    wd = jax.random.normal(ks[4], (e, f, d)) / f**0.5
    active = (k + o["num_shared_experts"]) * f
    dg, du = (jax.random.normal(kk, (d, active)) / d**0.5 for kk in ks[5:7])
    dd = jax.random.normal(ks[7], (active, d)) / active**0.5
    r = route(x @ router, top_k=k, gating=o["gating"])
    sizes = jnp.bincount(r.experts.reshape(-1), length=e).astype(jnp.int32)
    xs = x[jnp.argsort(r.experts.reshape(-1)) // k]  # [T*K, D] sorted by expert
    tile = tile_rows(num_tokens * k, e)

    def ragged(xs):
        h = ACTIVATIONS[act](jax.lax.ragged_dot(xs, wg, sizes)) * jax.lax.ragged_dot(xs, wu, sizes)
        return jax.lax.ragged_dot(h, wd, sizes)

    def layer(grouped):
        return jax.jit(
            lambda x: experts_dropless(
                x, *route(x @ router, top_k=k, gating=o["gating"])[:2], wg, wu, wd, act, grouped=grouped
            )
        )

    fns = {
        "dense_glu_same_active_width": jax.jit(lambda x: glu_feed_forward(x[None], dg, du, dd, act)),
        "route": jax.jit(lambda x: route(x @ router, top_k=k, gating=o["gating"]).weights),
        "expert_matmuls_ragged_dot": jax.jit(ragged),
        "dropless_layer_ragged_dot": layer("ragged_dot"),
        "dropless_layer_tiles": layer("tiles"),
    }
    args = {"expert_matmuls_ragged_dot": xs}
    t = {
        name: perf.time_fn(lambda fn=fn, a=args.get(name, x): fn(a), repeats=repeats)["median_s"]
        for name, fn in fns.items()
    }
    # The rest of the ragged_dot layer, by difference: near zero it can come out negative (timing noise).
    t["sort_gather_scatter_combine"] = t["dropless_layer_ragged_dot"] - t["route"] - t["expert_matmuls_ragged_dot"]
    t["shared_experts_estimate"] = (
        t["dense_glu_same_active_width"] * o["num_shared_experts"] / (k + o["num_shared_experts"])
    )
    return {"num_tokens": num_tokens, "tile_rows": tile, "seconds": t}


def run(config, *, steps: int = 10, warmup: int = 3, json_path=None) -> dict:
    """Times `steps` train steps (after `warmup` untimed ones) of ours and of the plain-JAX baseline."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps={steps!r} must be an int >= 1 (the median of no timed steps is NaN)")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup={warmup!r} must be an int >= 0")
    import jax

    from effitrans import perf

    # The peak of the dtype the model computes in: published for known accelerators, else measured now.
    dtype = config.model.get("dtype", "float32")
    peak = perf.published_peak_gflops(jax.devices()[0].device_kind, dtype) or perf.measure_matmul_gflops(dtype=dtype)
    t_ours, batches, tokens, flops = _time_trainer(config, peak, steps, warmup)
    breakdown = None
    rows = [{"impl": "effitrans", "step_time_s": t_ours}]
    if "moe" in config.model:  # the same model with dense GLUs of equal active width, same data
        twin = dense_twin(config)
        t_twin, _, _, flops_twin = _time_trainer(twin, peak, steps, warmup)
        rows.append({"impl": "dense twin", "step_time_s": t_twin, "flops": flops_twin})
        rows[0]["slowdown_vs_dense_twin"] = t_ours / t_twin
        breakdown = moe_breakdown(config, tokens)
    if config.model.name == "causal_lm" and config.train.grad_accum_steps == 1 and "moe" not in config.model:
        init, step = plain_jax_train_step(config.model, config.train)
        t_plain, _ = _median_step_time(step, init(jax.random.key(0)), batches, steps, warmup)
        rows.append({"impl": "plain JAX (baseline)", "step_time_s": t_plain})
    baseline = rows[-1]["step_time_s"]
    for r in rows:
        r_flops = r.pop("flops", flops)
        r["tokens_per_s"] = tokens / r["step_time_s"]
        r["model_tflop_per_step"] = r_flops / 1e12
        r["gflops"] = r_flops / r["step_time_s"] / 1e9
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
        "moe_layer_forward": breakdown,
    }
    print(f"{config.model.get('dtype', 'float32')} peak: {peak:.1f} GFLOP/s")
    print(f"{'impl':<22}{'step ms':>10}{'tokens/s':>12}{'GFLOP/s':>10}{'MFU':>8}{'vs baseline':>13}")
    for r in rows:
        print(
            f"{r['impl']:<22}{1e3 * r['step_time_s']:>10.1f}{r['tokens_per_s']:>12,.0f}{r['gflops']:>10.1f}"
            f"{100 * r['mfu']:>7.1f}%{r['speedup_vs_baseline']:>12.2f}x"
        )
    if breakdown:
        t = breakdown["seconds"]
        print(f"one MoE layer, forward on {breakdown['num_tokens']} tokens (ms; medians):")
        for name, v in t.items():
            print(f"  {name:<32}{1e3 * v:>9.2f}  {v / t['dense_glu_same_active_width']:>6.2f}x dense")
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
