"""From importance scores to keep-masks, masked models (for analysis) and physically sliced models.

    keep = keep_masks(scores, ratio=0.2, scope="layer")      # one bool [F_l] per layer
    masked = mask_model(model, keep)                          # same shapes, pruned neurons' weights zeroed
    small, small_cfg = slice_model(model, model_cfg, keep)    # gate/up [D, F'], down [F', D]; per-layer widths

The sliced model computes exactly what the masked one does (a zeroed neuron contributes nothing), with
smaller matrices; `small_cfg.model.ffn_width` lists the new per-layer widths, so the model rebuilds from its
config and round-trips through the spine's orbax checkpoints (`save_pruned` / `load_pruned`).
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from effitrans.layers.params import StateVariable
from effitrans.pruning.importance import glu_blocks

SCOPES = ("layer", "global")


def check_ratio(ratio) -> float:
    """The fraction of neurons to remove, in [0, 1); ValueError naming the value otherwise."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float, np.floating)) or not 0.0 <= ratio < 1.0:
        raise ValueError(
            f"pruning ratio={ratio!r} is outside [0, 1): it is the fraction of feed-forward "
            f"neurons to remove (0 keeps all; 1 would remove every neuron)"
        )
    return float(ratio)


def keep_masks(scores: Sequence, ratio: float, *, scope: str = "layer") -> list[np.ndarray]:
    """Bool keep-masks [F_l]: remove the `ratio` fraction of lowest-scoring neurons.

    scope="layer": round(ratio * F_l) from every layer. scope="global": round(ratio * sum F_l) from all
    layers pooled by raw score (each layer keeps at least one neuron). Ties break by index (stable).
    """
    ratio = check_ratio(ratio)
    if scope not in SCOPES:
        raise ValueError(f"scope={scope!r} is not one of {list(SCOPES)}")
    scores = [np.asarray(s, np.float64).reshape(-1) for s in scores]
    if scope == "layer":
        out = []
        for s in scores:
            n_remove = min(int(round(ratio * s.size)), s.size - 1)
            keep = np.ones(s.size, bool)
            keep[np.argsort(s, kind="stable")[:n_remove]] = False
            out.append(keep)
        return out
    flat = np.concatenate(scores)
    layer_of = np.concatenate([np.full(s.size, i) for i, s in enumerate(scores)])
    n_remove = int(round(ratio * flat.size))
    keep = [np.ones(s.size, bool) for s in scores]
    left = [s.size for s in scores]
    offsets = np.cumsum([0] + [s.size for s in scores])
    removed = 0
    for j in np.argsort(flat, kind="stable"):
        if removed >= n_remove:
            break
        l = layer_of[j]
        if left[l] <= 1:
            continue
        keep[l][j - offsets[l]] = False
        left[l] -= 1
        removed += 1
    return keep


def _check_masks(model, keep: Sequence) -> list:
    blocks = glu_blocks(model)
    if len(keep) != len(blocks):
        raise ValueError(f"got {len(keep)} keep-masks for a model with {len(blocks)} layers")
    out = []
    for i, (b, k) in enumerate(zip(blocks, keep)):
        k = np.asarray(k, bool).reshape(-1)
        if k.size != b.ffn.width:
            raise ValueError(f"keep-mask {i} has {k.size} entries but layer {i} has {b.ffn.width} neurons")
        if not k.any():
            raise ValueError(f"keep-mask {i} removes every neuron of layer {i}; keep at least one")
        out.append(k)
    return out


def _clone(model):
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, jax.tree.map(lambda x: x, state))


def mask_model(model, keep: Sequence):
    """A copy of `model` whose removed neurons have zero gate/up columns and down rows (same shapes)."""
    keep = _check_masks(model, keep)
    out = _clone(model)
    for b, k in zip(glu_blocks(out), keep):
        m = jnp.asarray(k, jnp.float32)
        b.ffn.gate.set_value(b.ffn.gate[...] * m[None, :])
        b.ffn.up.set_value(b.ffn.up[...] * m[None, :])
        b.ffn.down.set_value(b.ffn.down[...] * m[:, None])
    return out


def slice_model(model, model_cfg, keep: Sequence):
    """(sliced model, its model config): gate/up [D, F'_l], down [F'_l, D] holding the kept neurons in order.

    model_cfg is the model's ConfigDict (config.model); the returned copy has ffn_width = [F'_l per layer].
    """
    keep = _check_masks(model, keep)
    out = _clone(model)
    for b, k in zip(glu_blocks(out), keep):
        idx = jnp.asarray(np.flatnonzero(k))
        b.ffn.gate.set_value(jnp.take(b.ffn.gate[...], idx, axis=1))  # [D, F']
        b.ffn.up.set_value(jnp.take(b.ffn.up[...], idx, axis=1))  # [D, F']
        b.ffn.down.set_value(jnp.take(b.ffn.down[...], idx, axis=0))  # [F', D]
    cfg = copy.deepcopy(model_cfg)
    cfg.ffn_width = [int(k.sum()) for k in keep]
    return out, cfg


def num_params(model) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param))))


def ffn_params(model) -> int:
    return int(sum(b.ffn.gate.size + b.ffn.up.size + b.ffn.down.size for b in glu_blocks(model)))


def save_pruned(directory: str, model, model_cfg, *, step: int = 0) -> str:
    """Writes the model's params (and StateVariables) with the spine's orbax Checkpointer (meta carries the
    per-layer widths) plus DIR/model_config.json, so `load_pruned(DIR)` rebuilds the sliced model from its config."""
    from effitrans.train.checkpoints import Checkpointer

    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "model_config.json"), "w") as f:
        f.write(model_cfg.to_json_best_effort())
    ckpt = Checkpointer(os.path.join(directory, "checkpoints"), keep=1, model_cfg=model_cfg)
    ckpt.save(step, _saved_state(model), force=True)
    ckpt.close()
    return directory


def load_pruned(directory: str, model_cfg=None):
    """(model, model_cfg) saved by `save_pruned`; model_cfg defaults to DIR/model_config.json."""
    import ml_collections

    from effitrans.registry import build_model
    from effitrans.train.checkpoints import Checkpointer

    if model_cfg is None:
        path = os.path.join(directory, "model_config.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} does not exist; was {directory!r} written by save_pruned?")
        with open(path) as f:
            model_cfg = ml_collections.ConfigDict(json.load(f))
        if isinstance(model_cfg.ffn_width, tuple):
            model_cfg.ffn_width = list(model_cfg.ffn_width)
    abstract = nnx.eval_shape(lambda: build_model(model_cfg, seed=0))
    graphdef, params, model_state = nnx.split(abstract, nnx.Param, StateVariable)
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _saved_state(abstract))
    ckpt = Checkpointer(os.path.join(directory, "checkpoints"), keep=1, model_cfg=model_cfg)
    step, restored, _ = ckpt.restore_latest(target)
    ckpt.close()
    if restored is None:
        raise FileNotFoundError(f"no readable checkpoint under {os.path.join(directory, 'checkpoints')}")
    nnx.replace_by_pure_dict(params, restored["params"])
    if "state" in restored:
        nnx.replace_by_pure_dict(model_state, restored["state"])
    return nnx.merge(graphdef, params, model_state), model_cfg


def _saved_state(model) -> dict:
    """{"params": ..., "state": ...}: the parameters and, when the model has any, its non-trainable
    StateVariables (an MoE's selection bias, routing centroids), which its forward pass reads too."""
    out = {"params": nnx.to_pure_dict(nnx.state(model, nnx.Param))}
    model_state = nnx.to_pure_dict(nnx.state(model, StateVariable))
    if model_state:
        out["state"] = model_state
    return out
