"""MatFormer (Devvrit et al., 2023): nested feed-forwards. The first w neurons of every GLU layer form a
working sub-model for each w in a width set, trained jointly by sampling one width per step.

    widths = nested_widths(1536, (0.25, 0.5, 0.75, 1.0))        # [384, 768, 1152, 1536]
    model, history = train_matformer(config, widths, log=print)  # the spine's Trainer, matformer_task
    sub, sub_cfg = extract(model, config.model, 768)              # any width (need not be a trained one)
    mixed, mixed_cfg = extract(model, config.model, [384, 1536, 768, 1536])   # per-layer mix-and-match

Extraction is `slicing.slice_model` with prefix keep-masks, so a sub-model is an ordinary CausalLM with
per-layer widths in its config (it saves, loads and serves like any model).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from effitrans.models.transformer import ffn_widths
from effitrans.pruning.importance import ffn_widths_of
from effitrans.pruning.slicing import slice_model
from effitrans.train.tasks import Task, lm_loss, lm_task
from effitrans.train.trainer import Trainer


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


def matformer_task(widths: Sequence[int], seed: int) -> Task:
    """The LM task on the first w neurons of every feed-forward, w = sample_width(widths, seed, step)."""
    widths = sorted(int(w) for w in widths)
    return lm_task(
        variant=lambda step: sample_width(widths, seed, step), view=slice_prefix_params, variant_name="width"
    )


def train_matformer(
    config, widths: Sequence[int], *, model=None, log: Callable | None = print, workdir: str | None = None, **trainer_kw
):
    """Trains config.model (or `model`) with one sampled nested width per step on config.data.

    Runs the spine's `Trainer` with `matformer_task` (one compilation per width). `workdir` keeps
    checkpoints and metrics.jsonl (a rerun resumes; default: a temporary directory); `log` None silences
    the progress lines; other keywords go to the Trainer. Returns (model, history).
    """
    full = ffn_widths_of(model) if model is not None else ffn_widths(config.model)
    if len(set(full)) != 1:
        raise ValueError(f"MatFormer training needs one width in every layer, got {full}")
    widths = sorted(int(w) for w in widths)
    if not widths or widths[0] < 1 or widths[-1] > full[0]:
        raise ValueError(f"MatFormer widths={widths} must lie in [1, {full[0]}]")
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(
            config,
            workdir or tmp,
            task=matformer_task(widths, config.train.seed),
            model=model,
            verbose=log is not None,
            **trainer_kw,
        )
        out = trainer.train()
        return trainer.model_from(out["state"]["params"], out["state"]["model_state"]), out["history"]


def evaluate_lm(model, batches) -> dict:
    """Weighted next-token loss (nats), bits per token and perplexity over an iterable of LM batches."""
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
