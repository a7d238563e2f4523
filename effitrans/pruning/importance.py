"""Importance of each GLU feed-forward neuron, from forward (and, for Taylor, backward) passes over
calibration text.

Neuron h of layer l has activation a_h(x) = act(x . W_gate[:, h]) * (x . W_up[:, h]) (the input of the
down projection) and writes a_h(x) * W_down[h, :] into the residual stream. Criteria (each returns one
score per neuron; higher = more important, pruning removes the lowest):

    rmax       max_t ||a_h(x_t) W_down[h]||_2 = max_t |a_h(x_t)| * ||W_down[h]||_2   (the tutorial's r_max)
    mean       mean_t |a_h(x_t)| * ||W_down[h]||_2
    l2         sqrt(mean_t a_h(x_t)^2) * ||W_down[h]||_2
    wanda      ||a_h||_2 over tokens * ||W_down[h]||_1     (Wanda's |W| * ||X|| on the neuron's output row)
    taylor     |sum_t a_h(x_t) dL/da_h(x_t)|                (first-order Taylor, LLM-Pruner style: the loss
                                                             change of zeroing the neuron)
    magnitude  ||W_gate[:, h]||_2 * ||W_up[:, h]||_2 * ||W_down[h]||_2   (weights only: the neuron's path norm)
    random     uniform(0, 1) from an explicit key

All criteria but `random` give exactly 0 to a neuron whose down-projection row is zero.

`masked_forward(model, tokens, masks)` is the one pure forward used here: the model's own modules, with
each layer's activations a [B, T, F] multiplied by a keep mask [F] (so gradients w.r.t. the mask give
the Taylor score, and a 0/1 mask gives the masked model).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from effitrans.layers.glu import GLUFeedForward, glu_hidden

ACTIVATION_CRITERIA = ("rmax", "mean", "l2", "wanda")
CRITERIA = ("rmax", "mean", "l2", "wanda", "taylor", "magnitude", "random")


def glu_blocks(model) -> list:
    """The model's blocks, checked to be pre-norm blocks with GLU feed-forwards; ValueError otherwise."""
    blocks = getattr(model, "blocks", None)
    if blocks is None or len(blocks) == 0:
        raise ValueError(
            f"cannot prune {type(model).__name__}: neuron pruning needs a model with `.blocks` "
            f"whose `.ffn` is a GLUFeedForward (e.g. effitrans.models.CausalLM)"
        )
    for i, b in enumerate(blocks):
        if not isinstance(getattr(b, "ffn", None), GLUFeedForward):
            raise ValueError(
                f"cannot prune block {i} of {type(model).__name__}: its feed-forward is "
                f"{type(getattr(b, 'ffn', None)).__name__}, neuron pruning needs GLUFeedForward"
            )
    return list(blocks)


def ffn_widths_of(model) -> list[int]:
    return [b.ffn.width for b in glu_blocks(model)]


def masked_forward(model, tokens: jax.Array, masks: Sequence | None = None, *, return_acts: bool = False):
    """tokens int [B, T] -> logits [B, T, V] float32 (and per-layer activations a [B, T, F_l]).

    masks: None or one keep-mask [F_l] per layer (0/1 or soft), multiplied into the activations.
    """
    blocks = glu_blocks(model)
    stack = model.stack
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)  # [B, T]
    x = stack.embed(tokens)  # [B, T, D]
    acts = []
    for i, block in enumerate(blocks):
        h, _ = block.attn(block.attn_norm(x), positions=positions)
        x = x + h
        ffn = block.ffn
        c = lambda p, ffn=ffn: p[...].astype(ffn.dtype)
        a = glu_hidden(block.ffn_norm(x).astype(ffn.dtype), c(ffn.gate), c(ffn.up), ffn.activation)  # [B, T, F]
        if masks is not None and masks[i] is not None:
            a = a * jnp.asarray(masks[i], a.dtype)
        acts.append(a)
        x = x + jnp.einsum("BTF,FD->BTD", a, c(ffn.down))  # [B, T, D]
    logits = model.logits(stack.final_norm(x))  # [B, T, V]
    return (logits, acts) if return_acts else logits


def check_calibration(tokens) -> np.ndarray:
    """Calibration tokens as int32 [N, T] with T >= 2; ValueError when there are none."""
    arr = np.asarray(tokens)
    if arr.ndim == 1:
        arr = arr[None]
    if arr.ndim != 2 or arr.size == 0 or arr.shape[1] < 2:
        raise ValueError(
            f"calibration tokens must be int [num_sequences >= 1, length >= 2] with at least one "
            f"token to predict; got shape {arr.shape}"
        )
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"calibration tokens must be integers, got dtype {arr.dtype}")
    return arr.astype(np.int32)


def _batches(tokens: np.ndarray, batch_size: int):
    for i in range(0, tokens.shape[0], batch_size):
        yield jnp.asarray(tokens[i : i + batch_size])


def activation_statistics(model, tokens, *, batch_size: int = 4) -> list[dict]:
    """Per layer {"max_abs", "sum_abs", "sum_sq"} [F] over every calibration token, plus "count"."""
    tokens = check_calibration(tokens)
    graphdef, state = nnx.split(model)

    @jax.jit
    def stats(state, batch):
        _, acts = masked_forward(nnx.merge(graphdef, state), batch, return_acts=True)
        return [
            {
                "max_abs": jnp.max(jnp.abs(a), axis=(0, 1)),
                "sum_abs": jnp.sum(jnp.abs(a), axis=(0, 1)),
                "sum_sq": jnp.sum(jnp.square(a.astype(jnp.float32)), axis=(0, 1)),
            }
            for a in acts
        ]

    total = None
    count = 0
    for batch in _batches(tokens, batch_size):
        s = jax.device_get(stats(state, batch))
        count += batch.shape[0] * batch.shape[1]
        if total is None:
            total = s
        else:
            total = [
                {
                    "max_abs": np.maximum(t["max_abs"], u["max_abs"]),
                    "sum_abs": t["sum_abs"] + u["sum_abs"],
                    "sum_sq": t["sum_sq"] + u["sum_sq"],
                }
                for t, u in zip(total, s)
            ]
    for t in total:
        t["count"] = count
    return total


def taylor_scores(model, tokens, *, batch_size: int = 4) -> list[np.ndarray]:
    """|sum over calibration tokens of a_h dL/da_h| per neuron (L = mean next-token NLL of each batch)."""
    tokens = check_calibration(tokens)
    graphdef, state = nnx.split(model)
    widths = ffn_widths_of(model)

    @jax.jit
    def grad_masks(state, batch):
        def loss(masks):
            logits = masked_forward(nnx.merge(graphdef, state), batch[:, :-1], masks)
            return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()

        return jax.grad(loss)([jnp.ones((w,), jnp.float32) for w in widths])

    total = [np.zeros((w,), np.float64) for w in widths]
    for batch in _batches(tokens, batch_size):
        g = jax.device_get(grad_masks(state, batch))
        total = [t + np.asarray(x, np.float64) for t, x in zip(total, g)]
    return [np.abs(t).astype(np.float32) for t in total]


def _down_norms(model, order) -> list[np.ndarray]:
    return [np.linalg.norm(np.asarray(b.ffn.down[...], np.float32), ord=order, axis=1) for b in glu_blocks(model)]


def scores_from_statistics(model, stats: list[dict], criterion: str) -> list[np.ndarray]:
    """One of ACTIVATION_CRITERIA from precomputed `activation_statistics`."""
    if criterion not in ACTIVATION_CRITERIA:
        raise ValueError(f"criterion={criterion!r} is not one of {list(ACTIVATION_CRITERIA)}")
    l2_rows, l1_rows = _down_norms(model, 2), _down_norms(model, 1)
    out = []
    for s, w2, w1 in zip(stats, l2_rows, l1_rows):
        n = max(s["count"], 1)
        if criterion == "rmax":
            v = s["max_abs"] * w2
        elif criterion == "mean":
            v = s["sum_abs"] / n * w2
        elif criterion == "l2":
            v = np.sqrt(s["sum_sq"] / n) * w2
        else:  # wanda
            v = np.sqrt(s["sum_sq"]) * w1
        out.append(np.asarray(v, np.float32))
    return out


def magnitude_scores(model) -> list[np.ndarray]:
    out = []
    for b in glu_blocks(model):
        g = np.linalg.norm(np.asarray(b.ffn.gate[...], np.float32), axis=0)  # [F]
        u = np.linalg.norm(np.asarray(b.ffn.up[...], np.float32), axis=0)  # [F]
        d = np.linalg.norm(np.asarray(b.ffn.down[...], np.float32), axis=1)  # [F]
        out.append((g * u * d).astype(np.float32))
    return out


def random_scores(model, key: jax.Array) -> list[np.ndarray]:
    widths = ffn_widths_of(model)
    keys = jax.random.split(key, len(widths))
    return [np.asarray(jax.random.uniform(k, (w,)), np.float32) for k, w in zip(keys, widths)]


def neuron_importance(
    model,
    tokens=None,
    criterion: str = "rmax",
    *,
    key: jax.Array | None = None,
    batch_size: int = 4,
    stats: list | None = None,
) -> list[np.ndarray]:
    """Scores [F_l] per layer for `criterion` (see the module docstring); higher = keep.

    tokens: calibration ids int [N, T] (not needed for magnitude / random); stats: reuse a previous
    `activation_statistics` result (so several criteria share one calibration pass).
    """
    if criterion not in CRITERIA:
        raise ValueError(f"criterion={criterion!r} is not one of {list(CRITERIA)}")
    glu_blocks(model)
    if criterion == "magnitude":
        return magnitude_scores(model)
    if criterion == "random":
        return random_scores(model, jax.random.key(0) if key is None else key)
    if tokens is None and stats is None:
        raise ValueError(f"criterion={criterion!r} needs calibration tokens (int [N, T])")
    if criterion == "taylor":
        return taylor_scores(model, tokens, batch_size=batch_size)
    if stats is None:
        stats = activation_statistics(model, tokens, batch_size=batch_size)
    return scores_from_statistics(model, stats, criterion)
