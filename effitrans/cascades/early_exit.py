"""Early exit (BranchyNet, DeeBERT, CALM) on effitrans stacks with `config.model.exits`.

An exit after layer l reads the residual stream after l blocks through its head (effitrans.cascades.exit_heads)
and the model's final norm and output head. At inference a row stops at the first exit whose confidence is
strictly above the threshold (so threshold 1.0 never exits and the output equals the full model's), else at
the last layer. Confidences are in [0, 1], higher is surer:

  max_prob    largest softmax probability
  margin      top-1 minus top-2 probability
  entropy     1 - H(p) / log(V)
  saturation  (1 + cos(h_l, h_{l-1})) / 2, the cosine of the states entering and leaving the exit's layer
  learned     sigmoid of the exit's confidence classifier (trained to predict agreement with the last layer)

Entry points: `exit_pass` (every exit's outputs in one full pass: training and offline simulation),
`simulate_exits` (the exit each row takes), `classify_with_exits` (encoders: exited rows are removed from the
batch, the rest run on), `decode_step_with_exits` (causal LMs, one token per row: an exited row's hidden state
is written into the skipped layers' KV caches, CALM's propagation), `calibrate_threshold` (CALM's
Learn-then-Test), `exit_task` (per-exit losses through the Trainer) and `exit_trainable` (frozen backbone).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from effitrans.cascades.exit_heads import MEASURES
from effitrans.models.transformer import pool
from effitrans.train.tasks import Task

LOGIT_MEASURES = ("max_prob", "margin", "entropy")  # measures that need the exit's output distribution
CALIBRATIONS = ("ltt", "empirical")


class ExitPass(NamedTuple):
    """Every exit's outputs, then the last layer's (X + 1 entries; X = number of exits).

    logits: [B, T, V] (LM) or [B, C] (classifier) float32; states / previous: the residual stream leaving and
    entering the exit's layer, [B, T, D] (LM) or pooled [B, D]; learned: X confidence-classifier logits [B, T]
    or [B] float32.
    """

    logits: tuple
    states: tuple
    previous: tuple
    learned: tuple


def _check_measure(measure: str) -> None:
    if measure not in MEASURES:
        raise ValueError(f"measure={measure!r} is not one of {list(MEASURES)}")


def _check_threshold(threshold):
    """A number in [0, 1]; a traced scalar (one compiled step for a whole sweep) passes unchecked."""
    if isinstance(threshold, jax.core.Tracer):
        return threshold
    if isinstance(threshold, jax.Array) and threshold.ndim == 0:
        threshold = float(threshold)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold={threshold!r} must be a number in [0, 1] (exit when confidence > threshold)")
    return float(threshold)


def exits_of(model):
    """The ExitHeads of a model built with config.model.exits (TypeError naming the model otherwise)."""
    stack = getattr(model, "stack", None)
    if stack is None or not hasattr(stack, "exits"):
        raise TypeError(f"{type(model).__name__} has no exit heads; build it with config.model.exits")
    return stack.exits


def _is_lm(model) -> bool:
    return hasattr(model, "tie_embeddings")  # CausalLM; the other model with exits is EncoderClassifier


# ---- confidence measures: pure functions, each in [0, 1] ----------------------------------------------


def max_prob(logits):
    """[..., V] -> [...]: the largest softmax probability."""
    return jnp.max(jax.nn.softmax(logits.astype(jnp.float32), axis=-1), axis=-1)


def margin(logits):
    """[..., V] -> [...]: top-1 minus top-2 softmax probability."""
    top2 = jax.lax.top_k(jax.nn.softmax(logits.astype(jnp.float32), axis=-1), 2)[0]  # [..., 2]
    return top2[..., 0] - top2[..., 1]


def entropy_confidence(logits):
    """[..., V] -> [...]: 1 - entropy / log(V) (1 for a one-hot distribution, 0 for the uniform one)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    h = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
    return 1.0 - h / math.log(logits.shape[-1])


def saturation(state, previous):
    """[..., D] x 2 -> [...]: (1 + cosine) / 2 of the states leaving and entering a layer."""
    a, b = state.astype(jnp.float32), previous.astype(jnp.float32)
    cos = jnp.sum(a * b, -1) / jnp.maximum(jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1), 1e-12)
    return (1.0 + cos) / 2.0


def confidence(measure: str, *, logits=None, state=None, previous=None, learned=None):
    """The confidence `measure` of one exit from what it needs: logits [..., V] (max_prob, margin, entropy),
    state and previous [..., D] (saturation) or the classifier's logit [...] (learned) -> [...] in [0, 1]."""
    _check_measure(measure)
    if measure == "max_prob":
        return max_prob(logits)
    if measure == "margin":
        return margin(logits)
    if measure == "entropy":
        return entropy_confidence(logits)
    if measure == "saturation":
        return saturation(state, previous)
    return jax.nn.sigmoid(learned.astype(jnp.float32))


def pass_confidences(out: ExitPass, measure: str):
    """Confidence of every exit of an ExitPass: [X, B(, T)]."""
    x = len(out.learned)
    return jnp.stack(
        [
            confidence(
                measure, logits=out.logits[i], state=out.states[i], previous=out.previous[i], learned=out.learned[i]
            )
            for i in range(x)
        ]
    )


def simulate_exits(confidences, threshold: float):
    """The exit each row takes: the first whose confidence > threshold, else X (the last layer).
    confidences [X, ...] -> int32 [...]."""
    threshold = _check_threshold(threshold)
    passed = confidences > threshold  # [X, ...]
    return jnp.where(passed.any(0), jnp.argmax(passed, axis=0), confidences.shape[0]).astype(jnp.int32)


def select_exit_outputs(outputs, exit_index):
    """outputs [X + 1, B(, T), V] (exits then the last layer), exit_index int [B(, T)] -> [B(, T), V]."""
    return jnp.take_along_axis(outputs, exit_index[None, ..., None], axis=0)[0]


def layers_run(exit_index, layers, num_layers: int):
    """How many blocks each row ran: exit_index [...] -> int32 [...] (exit i ran layers[i], the last num_layers)."""
    counts = jnp.asarray([*layers, num_layers], jnp.int32)
    return counts[exit_index]


# ---- forward passes -----------------------------------------------------------------------------------


def _readout(model, hidden, mask):
    """Final norm and output head of `hidden`: (logits [B, T, V] or [B, C] float32, features [B, T, D] or [B, D])."""
    normed = model.stack.final_norm(hidden)
    if _is_lm(model):
        return model.logits(normed), normed
    pooled = pool(normed, mask, model.pooling)  # [B, D]
    return jnp.einsum("BD,DC->BC", pooled, model.head[...].astype(pooled.dtype)).astype(jnp.float32), pooled


def _state(model, hidden, mask):
    """What the saturation measure compares: [B, T, D] (LM) or pooled [B, D]."""
    return hidden if _is_lm(model) else pool(hidden, mask, model.pooling)


def _exit_readout(model, i: int, hidden, mask):
    """Exit i: (logits, learned confidence logit) of the residual stream `hidden`."""
    heads = exits_of(model)
    logits, features = _readout(model, heads.transform(i, hidden), mask)
    return logits, heads.confidence_logit(i, features)


def _inputs(model, tokens, mask):
    """(embedded tokens [B, T, D], positions [B, T], segment_ids or None) of a full (non-cached) pass."""
    if not _is_lm(model) and mask is None:
        raise ValueError("mask=None: an encoder needs the token mask [B, T] (1 = token, 0 = padding)")
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    segment_ids = None if _is_lm(model) else mask.astype(jnp.int32)
    return model.stack.embed(tokens), positions, segment_ids


def exit_pass(model, tokens, mask=None, *, frozen_backbone: bool = False) -> ExitPass:
    """Every exit's and the last layer's outputs of tokens int [B, T] (mask [B, T] for encoders), in one pass.
    `frozen_backbone` stops gradients at the residual stream after every block, so a backward pass runs only
    through the exit heads and the readouts (the backbone's backward is never computed)."""
    heads = exits_of(model)
    x, positions, segment_ids = _inputs(model, tokens, mask)  # [B, T, D]
    exit_at = {layer: i for i, layer in enumerate(heads.layers)}
    logits, states, previous, learned = [], [], [], []
    for n, block in enumerate(model.stack.blocks, start=1):
        prev = x
        x, _ = block(x, positions=positions, segment_ids=segment_ids)
        x = jax.lax.stop_gradient(x) if frozen_backbone else x
        if n in exit_at or n == len(model.stack.blocks):
            if n in exit_at:
                lg, conf = _exit_readout(model, exit_at[n], x, mask)
                learned.append(conf)
            else:
                lg = _readout(model, x, mask)[0]
            logits.append(lg)
            states.append(_state(model, x, mask))
            previous.append(_state(model, prev, mask))
    return ExitPass(tuple(logits), tuple(states), tuple(previous), tuple(learned))


@functools.partial(jax.jit, static_argnames=("graphdef", "lo", "hi", "exit_i", "measure"))
def _classifier_segment(graphdef, state, x, mask, take, threshold, *, lo, hi, exit_i, measure):
    """Blocks lo..hi-1 of an encoder classifier for the running rows, then exit `exit_i`'s decision (None: the
    last segment, final logits). x: tokens int [B, T] when lo == 0 (embedded here), else states [b0, T, D];
    mask [b0, T] x's token mask; take int32 [b] (None: all rows, in order) the rows of x and mask that run on.
    -> (x [b, T, D], mask [b, T], exits bool [b] or None, logits [b, C] float32)."""
    m = nnx.merge(graphdef, state)
    if take is not None:
        x, mask = x.at[take].get(mode="clip"), mask.at[take].get(mode="clip")
    x = m.stack.embed(x) if lo == 0 else x
    positions = jnp.broadcast_to(jnp.arange(mask.shape[1], dtype=jnp.int32), mask.shape)
    segment_ids = mask.astype(jnp.int32)
    prev = x
    for n in range(lo, hi):
        prev = x
        x, _ = m.stack.blocks[n](x, positions=positions, segment_ids=segment_ids)
    if exit_i is None:
        return x, mask, None, _readout(m, x, mask)[0]
    logits, learned = _exit_readout(m, exit_i, x, mask)
    conf = confidence(measure, logits=logits, state=_state(m, x, mask), previous=_state(m, prev, mask), learned=learned)
    return x, mask, conf > threshold, logits


def classify_with_exits(model, tokens, mask, *, measure: str, threshold: float):
    """Encoder classification with early exit: after each exit the rows that exit leave the batch and only the
    rest run the next layers (their work is removed). The layers up to an exit and its decision are one
    compiled program; the host reads which rows exit and compacts the rest into the next power-of-two bucket
    (bucket_size), so one program compiles per (segment, bucket), as in ExitDecoder.

    tokens, mask [B, T] -> (logits [B, C] float32, exit index int [B] in 0..X, where X is the last layer)."""
    _check_measure(measure)
    threshold = jnp.float32(_check_threshold(threshold))
    heads = exits_of(model)
    if _is_lm(model):
        raise TypeError(
            "classify_with_exits needs an encoder classifier; causal LMs decode with decode_step_with_exits"
        )
    if mask is None:
        raise ValueError("mask=None: an encoder needs the token mask [B, T] (1 = token, 0 = padding)")
    graphdef, state = nnx.split(model)
    batch, num_layers = tokens.shape[0], len(model.stack.blocks)
    out = np.zeros((batch, model.head.shape[1]), np.float32)
    index = np.full((batch,), len(heads.layers), np.int32)
    running, x, take, lo = np.arange(batch), jnp.asarray(tokens), None, 0
    mask = jnp.asarray(mask)
    for i, hi in enumerate((*heads.layers, num_layers)):
        last = hi == num_layers
        x, mask, exits, logits = _classifier_segment(
            graphdef, state, x, mask, take, threshold, lo=lo, hi=hi, exit_i=None if last else i, measure=measure
        )
        logits = np.asarray(logits)[: len(running)]
        if last:
            out[running] = logits
            break
        exits = np.asarray(exits)[: len(running)]
        out[running[exits]], index[running[exits]] = logits[exits], i
        keep = np.flatnonzero(~exits)
        if keep.size == 0:
            break
        take, running, lo = _bucket_rows(keep, batch), running[keep], hi
    return jnp.asarray(out), jnp.asarray(index)


def decode_step_with_exits(model, tokens, caches, *, measure: str, threshold: float, stop_when_done: bool = False):
    """One decode step of a causal LM with early exit, one new token per row (CALM).

    A row that exits keeps its hidden state h; every later layer still writes keys/values for the token,
    computed from h (its attention runs on norm(h), the output is dropped), so later tokens find a full cache.
    Rows decide independently; an exited row costs only that propagation. With `stop_when_done` (eager: the
    decision is read on the host) the step stops running feed-forwards once every row has exited, and reads
    out only the exit it took: at batch 1 this is the per-row fast path. Without it the step is jittable.

    tokens int [B, 1], caches (one per layer, as CausalLM.init_cache) -> (logits [B, 1, V] float32, caches,
    exit index int32 [B] in 0..X, X = the last layer).
    """
    _check_measure(measure)
    threshold = _check_threshold(threshold)
    heads = exits_of(model)
    if not _is_lm(model):
        raise TypeError("decode_step_with_exits needs a causal LM; encoders classify with classify_with_exits")
    if tokens.ndim != 2 or tokens.shape[1] != 1:
        raise ValueError(f"tokens has shape {tokens.shape}; decoding with exits takes one token per row: [B, 1]")
    blocks = model.stack.blocks
    positions = caches[0].lengths[:, None]  # [B, 1]: the new token's position
    x = model.stack.embed(tokens)  # [B, 1, D]
    batch = tokens.shape[0]
    done = jnp.zeros((batch,), bool)
    out = None
    index = jnp.full((batch,), len(heads.layers), jnp.int32)
    exit_at = {layer: i for i, layer in enumerate(heads.layers)}
    caches = list(caches)
    for n, block in enumerate(blocks, start=1):
        if stop_when_done and bool(done.all()):  # propagation only: keys/values of the exited state
            _, caches[n - 1] = block.attn(block.attn_norm(x), positions=positions, cache=caches[n - 1], decode=True)
            continue
        prev = x
        x_new, caches[n - 1] = block(x, positions=positions, cache=caches[n - 1], decode=True)
        x = jnp.where(done[:, None, None], x, x_new)  # exited rows keep their state
        if n not in exit_at:
            continue
        i = exit_at[n]
        heads_out = heads.transform(i, x)
        normed = model.stack.final_norm(heads_out)
        logits = model.logits(normed) if measure in LOGIT_MEASURES else None  # [B, 1, V]
        conf = confidence(measure, logits=logits, state=x, previous=prev, learned=heads.confidence_logit(i, normed))[
            :, 0
        ]  # [B]
        newly = ~done & (conf > threshold)
        if stop_when_done and not bool(newly.any()):
            continue
        logits = model.logits(normed) if logits is None else logits
        out = logits if out is None else out
        out = jnp.where(newly[:, None, None], logits, out)
        index = jnp.where(newly, i, index)
        done = done | newly
    if not (stop_when_done and bool(done.all())):
        final = _readout(model, x, None)[0]  # [B, 1, V]
        out = final if out is None else jnp.where(done[:, None, None], out, final)
    return out, caches, index


def bucket_size(n: int, batch: int) -> int:
    """The static bucket `n` running rows of a batch of `batch` are compacted into: the smallest power of two
    >= n, capped at the batch (batch 8: 8 -> 4 -> 2 -> 1), so a decoder compiles one program per bucket."""
    if not 1 <= n <= batch:
        raise ValueError(f"n={n} running rows: expected 1..batch={batch}")
    return min(batch, 1 << (n - 1).bit_length())


def _bucket_rows(rows, batch: int):
    """rows (host ints, the batch rows to run) padded to their bucket with the out-of-range index `batch`:
    gathers clamp it (a real row's values, computed and thrown away), scatters drop it. -> int32 [bucket]."""
    size = bucket_size(len(rows), batch)
    return jnp.asarray(np.concatenate([rows, np.full(size - len(rows), batch)]).astype(np.int32))


def _take_rows(caches, rows):
    """The cache rows `rows` int32 [b] of each cache (every cache leaf has the batch on axis 0)."""
    return [jax.tree.map(lambda a: a.at[rows].get(mode="clip"), c) for c in caches]


def _put_rows(caches, rows, sub):
    """caches with the rows `rows` replaced by sub's (out-of-range padding rows are dropped)."""
    return [jax.tree.map(lambda a, s: a.at[rows].set(s, mode="drop"), c, s_) for c, s_ in zip(caches, sub, strict=True)]


def _exit_output(m, x, i):
    """Exit i's logits [b, 1, V] and final-normed state [b, 1, D]."""
    normed = m.stack.final_norm(exits_of(m).transform(i, x))
    return m.logits(normed), normed


def _exit_confidence(m, x, prev, i, measure):
    """Exit i's confidence of the states x [b, 1, D] (prev: the states entering its layer) -> (conf [b, 1],
    exit logits [b, 1, V] when the measure read them, else None: no vocabulary projection unless a row exits)."""
    heads = exits_of(m)
    if measure in LOGIT_MEASURES:
        logits, normed = _exit_output(m, x, i)
    else:
        logits, normed = None, m.stack.final_norm(heads.transform(i, x))
    return confidence(measure, logits=logits, state=x, previous=prev, learned=heads.confidence_logit(i, normed)), logits


def _propagate_kv(m, x, positions, caches, *, lo):
    """CALM's propagation: the exited states x [b, 1, D] write their keys/values into layers lo.. (attention on
    norm(x), output dropped, so XLA keeps only the key/value projections; no feed-forward). caches: those
    layers' caches for the same b rows -> the updated list."""
    caches = list(caches)
    for n in range(lo, len(m.stack.blocks)):
        block = m.stack.blocks[n]
        _, caches[n - lo] = block.attn(block.attn_norm(x), positions=positions, cache=caches[n - lo], decode=True)
    return caches


@functools.partial(jax.jit, static_argnames=("graphdef", "lo", "hi", "exit_i", "measure"))
def _segment(graphdef, state, x, take, rows, positions, caches, threshold, *, lo, hi, exit_i, measure):
    """One compiled piece of a decode step: blocks lo..hi-1 for the running rows, then exit `exit_i`'s decision
    (exit_i=None: the last segment, which reads out the final logits instead).

    x: the tokens int [B, 1] when lo == 0 (embedded here), else the previous segment's states [b0, 1, D];
    take int32 [b] (or None: all of x, in order) the rows of x that run on; rows int32 [b] their batch rows (None:
    all B rows in order); positions [B, 1]; caches [B, ...] of layers lo..hi-1 (the running rows' cache rows are
    gathered, updated and scattered back); threshold a float32 scalar.
    -> (x [b, 1, D], exits bool [b] or None, logits [b, 1, V] or None (an exit whose measure does not read
    logits projects none unless a row exits), caches)."""
    m = nnx.merge(graphdef, state)
    x = x if take is None else x.at[take].get(mode="clip")
    x = m.stack.embed(x) if lo == 0 else x
    sub = list(caches) if rows is None else _take_rows(caches, rows)
    pos = positions if rows is None else positions.at[rows].get(mode="clip")  # [b, 1]
    prev = x
    for n in range(lo, hi):
        prev = x
        x, sub[n - lo] = m.stack.blocks[n](x, positions=pos, cache=sub[n - lo], decode=True)
    caches = sub if rows is None else _put_rows(caches, rows, sub)
    if exit_i is None:
        return x, None, _readout(m, x, None)[0], caches
    conf, logits = _exit_confidence(m, x, prev, exit_i, measure)
    return x, conf[:, 0] > threshold, logits, caches


@functools.partial(jax.jit, static_argnames=("graphdef", "i", "lo"))
def _leave(graphdef, state, x, logits, take, rows, positions, caches, *, i, lo):
    """The rows of x [b0, 1, D] at `take` int32 [b'] (batch rows `rows` int32 [b'], padded out of range) exit at
    exit i: their logits (gathered from `logits` [b0, 1, V], or projected when the check did not compute them),
    and their states' keys/values written into layers lo.. (attention on norm(x), output dropped; no
    feed-forward); caches [B, ...] of layers lo.., only those rows change. -> (logits [b', 1, V], caches)."""
    m = nnx.merge(graphdef, state)
    x = x.at[take].get(mode="clip")
    out = _exit_output(m, x, i)[0] if logits is None else logits.at[take].get(mode="clip")
    sub = _propagate_kv(m, x, positions.at[rows].get(mode="clip"), _take_rows(caches, rows), lo=lo)
    return out, _put_rows(caches, rows, sub)


def _row_from(m, x, caches, positions, threshold, *, i, lo, measure):
    """Batch 1 from block lo on, exit i next: its segment, then lax.cond on the decision, so only the taken
    branch runs (leave: the exit's readout and keys/values into layers hi..; stay: the next segment and its
    exit, recursively). -> (logits [1, 1, V], caches, exit index int32 scalar)."""
    layers, num = exits_of(m).layers, len(m.stack.blocks)
    hi = layers[i] if i < len(layers) else num
    caches = list(caches)
    prev = x
    for n in range(lo, hi):
        prev = x
        x, caches[n] = m.stack.blocks[n](x, positions=positions, cache=caches[n], decode=True)
    if hi == num:
        return _readout(m, x, None)[0], caches, jnp.int32(i)
    conf, logits = _exit_confidence(m, x, prev, i, measure)

    def leave(caches):
        out = _exit_output(m, x, i)[0] if logits is None else logits
        return out, list(caches[:hi]) + _propagate_kv(m, x, positions, caches[hi:], lo=hi), jnp.int32(i)

    def stay(caches):
        return _row_from(m, x, caches, positions, threshold, i=i + 1, lo=hi, measure=measure)

    return jax.lax.cond(conf[0, 0] > threshold, leave, stay, caches)


@functools.partial(jax.jit, static_argnames=("graphdef", "measure"))
def _row_step(graphdef, state, tokens, caches, threshold, *, measure):
    """A whole decode step of one row with its exit decisions made on device (one program, no host read):
    tokens int [1, 1] -> (logits [1, 1, V], caches, exit index int32 [1])."""
    m = nnx.merge(graphdef, state)
    positions = caches[0].lengths[:, None]  # [1, 1]
    logits, caches, index = _row_from(m, m.stack.embed(tokens), caches, positions, threshold, i=0, lo=0,
                                      measure=measure)  # fmt: skip
    return logits, caches, index[None]


class ExitDecoder:
    """Compiled decode steps with early exit whose exited work is really removed, per row and in batches
    (decode_step_with_exits's math, in pieces). The layers up to an exit and the exit's decision are one jitted
    program (the first also embeds, the last also reads out); after each exit the host reads which rows exit.
    Those rows read out through their exit and write their state's keys/values into the remaining layers'
    caches (attention on the exited state, no feed-forward: one more program); the rows still running are
    compacted into the next static bucket (bucket_size: B -> ... -> 4 -> 2 -> 1, their states, positions and
    cache rows gathered, run, scattered back), so a segment costs what its running rows cost, rounded up to a
    power of two. A step in which no row exits is X + 1 programs (X exits) and X host reads; one program per
    (segment, bucket) compiles. A batch of one row needs no compaction: its decisions are made on device
    (lax.cond per exit, only the taken branch runs), one program per step. The compiled pieces are shared by
    every decoder of the same model and measure (the threshold is an argument).

    step(tokens int [B, 1], caches, active=None) -> (logits [B, 1, V] float32, caches, exit index int32 [B]);
    `active` (bool [B], host) limits the step to those rows (a serving engine's occupied slots): the others are
    not run, their caches are untouched, their logits are 0 and their index -1. Afterwards `block_rows` = the
    rows (bucket padding included) times blocks the step's segments ran (B x layers without exits; the
    propagation's attention-only layers are not counted).
    """

    def __init__(self, model, *, measure: str, threshold: float):
        _check_measure(measure)
        self.threshold = jnp.float32(_check_threshold(threshold))
        self.layers = exits_of(model).layers
        self.num_layers = len(model.stack.blocks)
        self.measure = measure
        self.graphdef, self.state = nnx.split(model)
        self.block_rows = 0

    def step(self, tokens, caches, active=None):
        """One token per row; see the class docstring."""
        g, state = self.graphdef, self.state
        batch = tokens.shape[0]
        caches = list(caches)
        if batch == 1 and (active is None or bool(np.all(active))):
            logits, caches, index = _row_step(g, state, tokens, caches, self.threshold, measure=self.measure)
            self.block_rows = int(np.asarray([*self.layers, self.num_layers])[int(index[0])])
            return logits, caches, index
        positions = caches[0].lengths[:, None]  # [B, 1]
        if active is None or np.all(active):
            running, rows = np.arange(batch), None  # None: all rows, in order (nothing gathered)
        else:
            running = np.flatnonzero(np.asarray(active, bool))  # the batch rows still running
            if running.size == 0:
                raise ValueError("active has no row set: a decode step needs at least one running row")
            rows = _bucket_rows(running, batch)
        x, take = tokens, rows  # x's rows `take` are the running rows (take None: all of x)
        index = np.full((batch,), -1 if rows is not None else len(self.layers), np.int32)
        index[running] = len(self.layers)
        pieces, lo, self.block_rows = [], 0, 0  # pieces: (batch rows, their logits [n, 1, V])
        for i, hi in enumerate((*self.layers, self.num_layers)):
            last = hi == self.num_layers
            x, exits, logits, caches[lo:hi] = _segment(
                g, state, x, take, rows, positions, caches[lo:hi], self.threshold,
                lo=lo, hi=hi, exit_i=None if last else i, measure=self.measure,
            )  # fmt: skip
            self.block_rows += x.shape[0] * (hi - lo)
            if last:
                pieces.append((running, logits[: len(running)]))
                break
            exits = np.asarray(exits)[: len(running)]
            take, lo = None, hi
            if not exits.any():
                continue
            out_local = np.flatnonzero(exits)
            out_rows = _bucket_rows(running[out_local], batch)
            out, caches[hi:] = _leave(
                g, state, x, logits, _bucket_rows(out_local, batch), out_rows, positions, caches[hi:], i=i, lo=hi
            )
            pieces.append((running[out_local], out[: len(out_local)]))
            index[running[out_local]] = i
            keep = np.flatnonzero(~exits)
            if keep.size == 0:
                break
            take, running = _bucket_rows(keep, batch), running[keep]
            rows = _bucket_rows(running, batch)
        if len(pieces) == 1 and rows is None:  # every row left at the same place, in order
            return pieces[0][1], caches, jnp.asarray(index)
        order = np.concatenate([r for r, _ in pieces])
        out = jnp.concatenate([lg for _, lg in pieces])
        full = jnp.zeros((batch, *out.shape[1:]), out.dtype).at[jnp.asarray(order)].set(out)
        return full, caches, jnp.asarray(index)


# ---- threshold calibration ----------------------------------------------------------------------------


def binomial_cdf(k: int, n: int, p: float) -> float:
    """P(Binomial(n, p) <= k), summed in log space (exact for the n of a calibration split)."""
    if k >= n:
        return 1.0
    if k < 0:
        return 0.0
    if p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 0.0
    lp, lq = math.log(p), math.log1p(-p)
    terms = [
        math.lgamma(n + 1) - math.lgamma(j + 1) - math.lgamma(n - j + 1) + j * lp + (n - j) * lq for j in range(k + 1)
    ]
    top = max(terms)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in terms))


def calibrate_threshold(thresholds, losses, *, delta: float, epsilon: float = 0.05, method: str = "ltt") -> dict:
    """Picks the lowest exit threshold whose inconsistency with the full model stays within `delta`.

    thresholds [J], strictly decreasing (from the safest); losses [J, n] in {0, 1}: example k's output at
    threshold j differs from the full model's. Both methods test the thresholds in that fixed order and stop
    at the first failure, returning the last one that passed (1.0 = never exit when none passed):
      ltt        CALM's Learn-then-Test: passes when the binomial p-value P(Binom(n, delta) <= n * risk_j)
                 <= epsilon. Guarantee: with probability >= 1 - epsilon over the draw of the calibration
                 split, the chosen threshold's expected inconsistency on new i.i.d. examples is <= delta
                 (fixed-sequence testing controls the family-wise error without a union bound).
      empirical  passes when the calibration split's own risk_j <= delta (no guarantee beyond that split).
    Returns {"threshold", "index" (-1: none passed), "risks" [J], "p_values" [J] (ltt; else None)}.
    """
    if method not in CALIBRATIONS:
        raise ValueError(f"method={method!r} is not one of {list(CALIBRATIONS)}")
    for name, v in (("delta", delta), ("epsilon", epsilon)):
        if not 0.0 < v < 1.0:
            raise ValueError(f"{name}={v!r} must be in (0, 1)")
    thresholds = np.asarray(thresholds, np.float64)
    losses = np.asarray(losses)
    if losses.ndim != 2 or losses.shape[0] != thresholds.shape[0]:
        raise ValueError(f"losses has shape {losses.shape}; expected [len(thresholds)={thresholds.shape[0]}, n]")
    if np.any(np.diff(thresholds) >= 0):
        raise ValueError(f"thresholds={thresholds.tolist()} must be strictly decreasing (safest first)")
    for t in thresholds:
        _check_threshold(float(t))
    if not np.isin(losses, (0, 1)).all():
        raise ValueError("losses must be 0/1 (1: the exit's output differs from the full model's)")
    n = losses.shape[1]
    risks = losses.mean(1)
    p_values = [binomial_cdf(int(round(r * n)), n, delta) for r in risks] if method == "ltt" else None
    index = -1
    for j in range(len(thresholds)):
        ok = p_values[j] <= epsilon if method == "ltt" else risks[j] <= delta
        if not ok:
            break
        index = j
    return {
        "threshold": 1.0 if index < 0 else float(thresholds[index]),
        "index": index,
        "risks": risks.tolist(),
        "p_values": p_values,
    }


def inconsistency_losses(out: ExitPass, measure: str, thresholds):
    """losses [J, n] for calibrate_threshold: 1 where the early-exit prediction at threshold j differs from the
    last layer's (n = every example, or every token of an LM pass, in row-major order)."""
    conf = pass_confidences(out, measure)  # [X, B(, T)]
    preds = jnp.stack([jnp.argmax(lg, -1) for lg in out.logits])  # [X + 1, B(, T)]
    rows = []
    for t in thresholds:
        pred = jnp.take_along_axis(preds, simulate_exits(conf, float(t))[None], axis=0)[0]
        rows.append(np.asarray(pred != preds[-1]).reshape(-1))
    return np.stack(rows).astype(np.int32)


# ---- training -----------------------------------------------------------------------------------------


def _example_weights(task_name: str, batch):
    return batch["weights"] if task_name == "lm" else batch["example_weights"]


def exit_task(task: Task, model_cfg) -> Task:
    """`task` with per-exit losses: training runs every exit (exit_pass) and minimises
    last-layer loss + sum_i w_i exit_i loss + distill_weight sum_i KL(last || exit_i) (last layer stopped)
    + confidence_weight sum_i BCE(learned_i, [exit_i's top-1 == last layer's top-1]).
    Evaluation scores the last layer as before. Metrics exit<l>_loss / exit<l>_accuracy per exit after layer l.
    With exits.frozen_backbone the backbone's backward pass is skipped (exit_pass(frozen_backbone=True))."""
    if task.name not in ("lm", "classification"):
        raise ValueError(f"exits train with task 'lm' or 'classification', not {task.name!r}")
    e = model_cfg.exits
    layers = [int(x) for x in e.layers]
    weights = list(e.get("loss_weights") or [1.0] * len(layers))
    distill, conf_w = float(e.get("distill_weight", 0.0)), float(e.get("confidence_weight", 1.0))
    lm = task.name == "lm"
    frozen = bool(e.get("frozen_backbone", False))

    def train_forward(model, batch):
        return exit_pass(model, batch["inputs"], None if lm else batch["mask"], frozen_backbone=frozen)

    def loss(out, batch):
        if not isinstance(out, ExitPass):
            return task.loss(out, batch)
        total, w, metrics = task.loss(out.logits[-1], batch)
        ew = _example_weights(task.name, batch).astype(jnp.float32)  # [B(, T)]
        last = jax.lax.stop_gradient(out.logits[-1])
        last_logp = jax.nn.log_softmax(last, -1)
        for i, layer in enumerate(layers):
            s, _, m = task.loss(out.logits[i], batch)
            total = total + weights[i] * s
            metrics = {**metrics, f"exit{layer}_loss": s, f"exit{layer}_accuracy": m["accuracy"]}
            if distill:
                logp = jax.nn.log_softmax(out.logits[i], -1)
                kl = jnp.sum(jnp.sum(jnp.exp(last_logp) * (last_logp - logp), -1) * ew)
                total = total + distill * kl
                metrics[f"exit{layer}_kl"] = kl
            if conf_w:
                agree = (jnp.argmax(out.logits[i], -1) == jnp.argmax(last, -1)).astype(jnp.float32)
                bce = jnp.sum(optax.sigmoid_binary_cross_entropy(out.learned[i], jax.lax.stop_gradient(agree)) * ew)
                total = total + conf_w * bce
                metrics[f"exit{layer}_confidence_bce"] = bce
        return total, w, metrics

    return Task(task.name, task.batch_keys, task.forward, loss, task.token_keys, train_forward=train_forward)


def exit_trainable(params) -> dict:
    """Frozen backbone: True for the exit heads' parameters (a path through `exits`), False elsewhere."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: any(getattr(k, "key", None) == "exits" for k in path), params
    )
