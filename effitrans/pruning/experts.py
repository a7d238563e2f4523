"""Pruning whole experts of mixture-of-experts feed-forwards (effitrans.layers.moe).

    stats = expert_statistics(model, batches)              # per MoE layer: load, output norm over calibration
    scores = expert_importance(stats, "load")              # [E_l] per MoE layer; higher = keep
    keep = keep_experts(scores, drop=2)                     # bool [E_l]: the 2 lowest-scoring experts go
    small, small_cfg = drop_experts(model, model_cfg, keep)

Criteria: "load" (the share of the calibration tokens' assignments the expert received: an expert the router
never picks costs nothing to remove), "output_norm" (mean over tokens of the norm of what the expert adds to
the residual stream, weight included: load and size of contribution together), "random".

A dropped expert is removed from the router too (its column of the router, its selection bias), so each token
picks its top-k among the kept experts: with normalised top-k weights (the default) the sliced model computes
exactly what the full model computes with the dropped experts' selection bias at -inf (tests/pruning). The
sliced config lists the kept experts per MoE layer (`model.moe.num_experts = [E'_l, ...]`), so the model
rebuilds from its config and `save_pruned` / `load_pruned` round-trip it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from effitrans.layers.moe import ExpertStatistics, MoEFeedForward, moe_problems
from effitrans.pruning.slicing import _clone

EXPERT_CRITERIA = ("load", "output_norm", "random")


def moe_ffns(model) -> list[tuple[int, MoEFeedForward]]:
    """(layer index, MoEFeedForward) of every MoE layer of a model with `.blocks`; ValueError when there is none."""
    blocks = getattr(model, "blocks", None) or []
    out = [(i, b.ffn) for i, b in enumerate(blocks) if isinstance(getattr(b, "ffn", None), MoEFeedForward)]
    if not out:
        raise ValueError(
            f"{type(model).__name__} has no mixture-of-experts feed-forward to prune: expert pruning needs "
            f"config.model.moe (effitrans.layers.moe)"
        )
    return out


def _lm_forward(model, batch):
    return model(jnp.asarray(batch["inputs"]))


def expert_statistics(model, batches: Iterable[dict], forward: Callable | None = None) -> list[dict]:
    """Per MoE layer {"load": assignments [E], "output_norm": summed norms [E], "tokens": real tokens} over
    the calibration batches. forward(model, batch) runs the model (default: a causal LM on batch["inputs"]);
    padding tokens (segment id 0) are not counted."""
    forward = forward or _lm_forward
    layers = moe_ffns(model)
    for _, ffn in layers:
        ffn.record_experts = True
    try:
        graphdef, state = nnx.split(model)

        @jax.jit
        def stats(state, batch):
            m = nnx.merge(graphdef, state)
            forward(m, batch)
            return [ffn.expert_stats.get_value() for _, ffn in moe_ffns(m)]

        total = None
        for batch in batches:
            s = jax.device_get(stats(state, batch))
            total = s if total is None else [{k: t[k] + u[k] for k in t} for t, u in zip(total, s)]
    finally:
        for _, ffn in layers:
            ffn.record_experts = False
            if isinstance(getattr(ffn, "expert_stats", None), ExpertStatistics):
                del ffn.expert_stats
    if total is None:
        raise ValueError("expert_statistics got no calibration batches")
    return [{k: np.asarray(v) for k, v in t.items()} for t in total]


def expert_importance(stats: Sequence[dict], criterion: str = "load", *, key: jax.Array | None = None) -> list:
    """Scores [E_l] per MoE layer from `expert_statistics` (higher = keep); see the module docstring."""
    if criterion not in EXPERT_CRITERIA:
        raise ValueError(f"criterion={criterion!r} is not one of {list(EXPERT_CRITERIA)}")
    if criterion == "random":
        keys = jax.random.split(jax.random.key(0) if key is None else key, len(stats))
        return [np.asarray(jax.random.uniform(k, s["load"].shape), np.float32) for k, s in zip(keys, stats)]
    out = []
    for s in stats:
        n = max(float(s["tokens"]), 1.0)
        v = s["load"] / n if criterion == "load" else s["output_norm"] / n
        out.append(np.asarray(v, np.float32))
    return out


def keep_experts(scores: Sequence, drop) -> list[np.ndarray]:
    """Bool keep-masks [E_l]: the `drop` lowest-scoring experts of each MoE layer go (an int for every layer
    or one per layer). Ties break by index (stable)."""
    drops = [drop] * len(scores) if np.isscalar(drop) else list(drop)
    if len(drops) != len(scores):
        raise ValueError(f"drop={drop!r} has {len(drops)} entries for {len(scores)} MoE layers")
    out = []
    for s, d in zip(scores, drops):
        s = np.asarray(s).reshape(-1)
        if isinstance(d, bool) or not isinstance(d, (int, np.integer)) or not 0 <= d < s.size:
            raise ValueError(
                f"drop={d!r} is not allowed for a layer of {s.size} experts: expected an int in [0, {s.size})"
            )
        keep = np.ones(s.size, bool)
        keep[np.argsort(s, kind="stable")[:d]] = False
        out.append(keep)
    return out


def drop_experts(model, model_cfg, keep: Sequence):
    """(sliced model, its model config): each MoE layer keeps the experts its bool mask [E_l] marks, in order
    (router [D, E'], gate/up [E', D, F], down [E', F, D], selection bias [E']). ValueError when a layer would
    keep fewer experts than top_k or a count its expert groups do not divide."""
    layers = moe_ffns(model)
    if len(keep) != len(layers):
        raise ValueError(f"got {len(keep)} keep-masks for a model with {len(layers)} MoE layers")
    keep = [np.asarray(k, bool).reshape(-1) for k in keep]
    for (i, ffn), k in zip(layers, keep):
        if k.size != ffn.num_experts:
            raise ValueError(f"the keep-mask of layer {i} has {k.size} entries for its {ffn.num_experts} experts")
        for _, msg in moe_problems(int(k.sum()), ffn.top_k, ffn.num_groups, ffn.top_groups, ffn.capacity_factor):
            raise ValueError(f"cannot keep {int(k.sum())} of the {k.size} experts of layer {i}: {msg}")
    out = _clone(model)
    for (_, ffn), k in zip(moe_ffns(out), keep):
        idx = jnp.asarray(np.flatnonzero(k))
        ffn.router.set_value(jnp.take(ffn.router[...], idx, axis=1))  # [D, E']
        for name in ("gate", "up", "down"):
            p = getattr(ffn, name)
            p.set_value(jnp.take(p[...], idx, axis=0))  # [E', ...]
        ffn.selection_bias.set_value(jnp.take(ffn.selection_bias[...], idx, axis=0))  # [E']
        ffn.num_experts = int(k.sum())
    cfg = copy.deepcopy(model_cfg)
    with cfg.unlocked():
        del cfg.moe["num_experts"]  # an int field: per-layer counts are a list
        cfg.moe.num_experts = [int(k.sum()) for k in keep]
    return out, cfg
