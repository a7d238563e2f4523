"""Exit heads on intermediate layers (`config.model.exits`): the keys, their checks and the parameters.

An exit after layer `l` (1 <= l < num_layers) reads the residual stream after the first `l` blocks and
turns it into the model's output through the model's own final norm and output head. With `head="shared"`
that is all (no parameters of its own, as in CALM); with `head="own"` the exit first adds a small learned
residual adapter h + norm(h) W (W [D, D] initialised to zero, so an untrained own head equals the shared one).
Every exit also carries a learned confidence classifier, sigmoid(w . final_norm(h) + b), trained to predict
whether the exit's prediction equals the last layer's (CALM's consistency oracle).

This module imports only layers and schema, so the models can build exit heads without an import circle;
the forward passes, confidence measures and calibration are in effitrans.cascades.early_exit.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from effitrans.layers import RMSNorm, init_param
from effitrans.schema import NOT_SET, ConfigError, Key, boolean, float_at_least, float_in, is_number, one_of

HEADS = ("shared", "own")
MEASURES = ("max_prob", "margin", "entropy", "saturation", "learned")
EXIT_MODELS = ("causal_lm", "encoder_classifier")


def _layer_list(v):
    ok = isinstance(v, (list, tuple)) and v and all(isinstance(x, int) and not isinstance(x, bool) for x in v)
    return None if ok else "a non-empty list of layer counts (ints)"


def _weight_list(v):
    ok = v is None or (isinstance(v, (list, tuple)) and all(is_number(x) and x >= 0 for x in v))
    return None if ok else "None (every exit 1.0) or a list of numbers >= 0, one per exit"


EXIT_KEYS = {
    "layers": Key(NOT_SET, _layer_list, "exit after this many blocks, each in 1..num_layers-1, increasing", object),
    "head": Key("shared", one_of(*HEADS), "shared: the final norm + output head | own: + a zero-init adapter"),
    "loss_weights": Key(None, _weight_list, "per-exit loss weights (the last layer's loss has weight 1)", object),
    "distill_weight": Key(0.0, float_at_least(0.0), "weight of KL(last layer || exit) per exit (teacher stopped)"),
    "confidence_weight": Key(1.0, float_at_least(0.0), "weight of the learned confidence classifier's BCE"),
    "frozen_backbone": Key(False, boolean, "train only the exit heads (own adapters, confidence classifiers)"),
    "measure": Key("max_prob", one_of(*MEASURES), "confidence measure deciding an exit at inference"),
    "threshold": Key(1.0, float_in(0.0, 1.0, hi_open=False), "exit when confidence > threshold; 1.0 never exits"),
}


def exit_layers(model_cfg) -> tuple[int, ...]:
    """The exit layer counts of model_cfg.exits ((), without an exits group)."""
    if "exits" not in model_cfg:
        return ()
    return tuple(int(x) for x in model_cfg.exits.layers)


def check_exit_config(model_cfg, prefix: str = "config.model") -> None:
    """model.exits names increasing layers inside the stack, on a model that has exits, with one weight per exit."""
    if "exits" not in model_cfg:
        return
    e, n = model_cfg.exits, model_cfg.num_layers
    if model_cfg.name not in EXIT_MODELS:
        raise ConfigError(f"{prefix}.exits is set but {prefix}.name={model_cfg.name!r}; exits exist for {EXIT_MODELS}")
    if "layers" not in e:
        raise ConfigError(f"{prefix}.exits.layers is required: the layer counts after which an exit reads out")
    layers = list(e.layers)
    for x in layers:
        if not 1 <= x < n:
            raise ConfigError(
                f"{prefix}.exits.layers={layers} names layer {x}, but {prefix}.num_layers={n}: allowed exits are "
                f"1..{n - 1} (after layer {n} the model's own output is the last exit)"
            )
    if sorted(set(layers)) != layers:
        raise ConfigError(f"{prefix}.exits.layers={layers} must be strictly increasing")
    weights = e.get("loss_weights")
    if weights is not None and len(weights) != len(layers):
        raise ConfigError(
            f"{prefix}.exits.loss_weights={list(weights)} has {len(weights)} entries; expected one per exit "
            f"({len(layers)}: {layers})"
        )
    if e.get("frozen_backbone") and e.get("head", "shared") == "shared" and not e.get("confidence_weight", 1.0):
        raise ConfigError(
            f"{prefix}.exits.frozen_backbone=True with head='shared' and confidence_weight=0 leaves nothing to "
            f"train; set head='own' or confidence_weight > 0"
        )


class ExitHeads(nnx.Module):
    """The parameters of the exits of one stack: per exit an optional adapter (own head) and a confidence
    classifier. `layers`: the exit layer counts; `measure`, `threshold`: the config's inference decision
    (exits.measure, exits.threshold); adapter [X, D, D], confidence_w [X, D], confidence_b [X]."""

    def __init__(self, model_cfg, *, rngs: nnx.Rngs):
        e, d = model_cfg.exits, model_cfg.d_model
        self.layers = exit_layers(model_cfg)
        self.own = e.get("head", "shared") == "own"
        self.measure = str(e.get("measure", EXIT_KEYS["measure"].default))
        self.threshold = float(e.get("threshold", EXIT_KEYS["threshold"].default))
        x = len(self.layers)
        if self.own:
            self.norms = nnx.List([RMSNorm(d, eps=model_cfg.norm_eps, rngs=rngs) for _ in range(x)])
            self.adapter = init_param(rngs, (x, d, d), (None, "embed", None), nnx.initializers.zeros)
        self.confidence_w = init_param(rngs, (x, d), (None, "embed"), nnx.initializers.zeros)
        self.confidence_b = init_param(rngs, (x,), (None,), nnx.initializers.zeros)

    def transform(self, i: int, hidden: jax.Array) -> jax.Array:
        """Exit i's hidden state before the shared final norm: [..., D] -> [..., D] (unchanged when shared)."""
        if not self.own:
            return hidden
        a = self.adapter[i].astype(hidden.dtype)  # [D, D]
        return hidden + jnp.einsum("...D,DE->...E", self.norms[i](hidden), a)

    def confidence_logit(self, i: int, normed: jax.Array) -> jax.Array:
        """The learned classifier's logit from exit i's final-normed hidden state: [..., D] -> [...] float32.
        Its training signal stops at the classifier (the state is a fixed input to it)."""
        w = self.confidence_w[i].astype(jnp.float32)  # [D]
        features = jax.lax.stop_gradient(normed.astype(jnp.float32))
        return jnp.einsum("...D,D->...", features, w) + self.confidence_b[i]
