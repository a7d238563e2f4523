"""MatFormer (Devvrit et al., 2023): nested feed-forwards. The first w neurons of every GLU layer form a
working sub-model for each w in a width set, trained jointly by sampling one width per step.

    widths = nested_widths(1536, (0.25, 0.5, 0.75, 1.0))        # [384, 768, 1152, 1536]
    model, history = train_matformer(config, widths, log=print)  # spine dataset, optimizer, lm_loss
    sub, sub_cfg = extract(model, config.model, 768)              # any width (need not be a trained one)
    mixed, mixed_cfg = extract(model, config.model, [384, 1536, 768, 1536])   # per-layer mix-and-match

Extraction is `slicing.slice_model` with prefix keep-masks, so a sub-model is an ordinary CausalLM with
per-layer widths in its config (it saves, loads and serves like any model).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from effitrans.pruning.importance import ffn_widths_of
from effitrans.pruning.slicing import slice_model


def nested_widths(full: int, fractions: Sequence[float]) -> list[int]:
    """Sorted distinct widths round(f * full) for f in (0, 1]."""
    out = set()
    for f in fractions:
        if not 0.0 < f <= 1.0:
            raise ValueError(f"MatFormer width fraction={f!r} is outside (0, 1]")
        out.add(max(1, int(round(f * full))))
    return sorted(out)


def prefix_masks(model, widths: int | Sequence[int]) -> list[np.ndarray]:
    """Keep-masks keeping the first widths[l] neurons of layer l (an int applies to every layer)."""
    full = ffn_widths_of(model)
    if isinstance(widths, (int, np.integer)):
        widths = [int(widths)] * len(full)
    if len(widths) != len(full):
        raise ValueError(f"got {len(widths)} per-layer widths for a model with {len(full)} layers")
    out = []
    for i, (w, f) in enumerate(zip(widths, full)):
        if not 1 <= w <= f:
            raise ValueError(f"width {w} for layer {i} is outside [1, {f}]")
        m = np.zeros(f, bool)
        m[:w] = True
        out.append(m)
    return out


def extract(model, model_cfg, widths: int | Sequence[int]):
    """(sub-model, its config) keeping the first widths[l] neurons of each layer."""
    return slice_model(model, model_cfg, prefix_masks(model, widths))


def slice_prefix_params(params: dict, width: int) -> dict:
    """A pure param dict with every ffn gate/up cut to [:, :width] and down to [:width] (differentiable)."""

    def cut(path, x):
        keys = [str(getattr(p, "key", p)) for p in path]
        if "ffn" in keys:
            if keys[-1] in ("gate", "up"):
                return x[:, :width]
            if keys[-1] == "down":
                return x[:width]
        return x

    return jax.tree_util.tree_map_with_path(cut, params)


def sample_width(widths: Sequence[int], seed: int, step: int) -> int:
    """The width trained at `step`: a pure function of (seed, step), uniform over `widths`."""
    return int(widths[np.random.default_rng([seed, step, 7]).integers(len(widths))])


def train_matformer(config, widths: Sequence[int], *, model=None, log: Callable | None = print, eval_batches: int = 4):
    """Trains config.model (or `model`) with one sampled nested width per step on config.data.

    Reuses the spine's dataset (`build_dataset`), optimizer (`make_optimizer`) and LM loss (`lm_loss`).
    Returns (model, history).
    """
    from effitrans.data import build_dataset
    from effitrans.registry import build_model
    from effitrans.train.optimizer import make_optimizer
    from effitrans.train.tasks import lm_loss

    model = build_model(config.model, seed=config.train.seed) if model is None else model
    full = ffn_widths_of(model)
    if len(set(full)) != 1:
        raise ValueError(f"MatFormer training needs one width in every layer, got {full}")
    widths = sorted(int(w) for w in widths)
    if not widths or widths[0] < 1 or widths[-1] > full[0]:
        raise ValueError(f"MatFormer widths={widths} must lie in [1, {full[0]}]")
    data = build_dataset(config.data, global_batch_size=config.train.batch_size, seed=config.train.seed)
    tx = make_optimizer(config.train)
    graphdef, state = nnx.split(model, nnx.Param)
    params = nnx.to_pure_dict(state)
    opt_state = tx.init(params)

    def loss(p, batch, width):
        s, w, _ = lm_loss(nnx.merge(graphdef, slice_prefix_params(p, width)), batch)
        return s / jnp.maximum(w, 1.0)

    steps = {}

    def step_for(width):
        if width not in steps:

            def f(params, opt_state, batch):
                l, g = jax.value_and_grad(loss)(params, batch, width)
                updates, opt_state = tx.update(g, opt_state, params)
                return optax.apply_updates(params, updates), opt_state, l

            steps[width] = jax.jit(f, donate_argnums=(0, 1))
        return steps[width]

    history = []
    start = time.perf_counter()
    total = config.train.steps
    for step in range(total):
        width = sample_width(widths, config.train.seed, step)
        batch = {k: jnp.asarray(v) for k, v in data.get_batch(step).items()}
        params, opt_state, l = step_for(width)(params, opt_state, batch)
        done = step + 1
        if done % config.train.log_every == 0 or done == total:
            el = time.perf_counter() - start
            row = {"step": done, "width": width, "loss": float(l), "elapsed_s": el}
            history.append(row)
            if log is not None:
                log(
                    f"[matformer] step {done}/{total} | width {width} | loss {row['loss']:.4f} | "
                    f"{el / done:.2f} s/step | ETA {el / done * (total - done):.0f} s"
                )
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state), history


def evaluate_lm(model, batches) -> dict:
    """Weighted next-token loss (nats), bits per token and perplexity over an iterable of LM batches."""
    from effitrans.train.tasks import lm_loss

    graphdef, state = nnx.split(model)

    @jax.jit
    def f(state, batch):
        s, w, _ = lm_loss(nnx.merge(graphdef, state), batch)
        return s, w

    s_tot, w_tot = 0.0, 0.0
    for batch in batches:
        s, w = jax.device_get(f(state, {k: jnp.asarray(v) for k, v in batch.items()}))
        s_tot += float(s)
        w_tot += float(w)
    if w_tot == 0:
        raise ValueError("evaluation batches hold no weighted tokens")
    loss = s_tot / w_tot
    return {"loss": loss, "bits": loss / np.log(2.0), "perplexity": float(np.exp(loss)), "tokens": w_tot}
