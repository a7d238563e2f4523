"""Tasks: what a batch holds, what the model makes of it, and how that is scored (as sums).

A `Task` splits scoring in two so a distillation term can reuse the student's outputs: `forward(model,
batch) -> outputs` and `loss(outputs, batch) -> (sum of per-example losses times weights, sum of weights,
{metric: sum})`; the train step divides once, after summing over micro-batches, so gradient accumulation
and sharding stay exact. A `Distillation` adds a frozen teacher's outputs and a term pulling the student
towards them. A task may choose a static `variant` per step (e.g. a MatFormer width) that `view` applies to
the parameters before the forward pass.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Hashable

import jax
import jax.numpy as jnp
import optax


@dataclasses.dataclass(frozen=True)
class Task:
    """name: lm | classification | retrieval | forecast (evaluation and FLOPs follow it); batch_keys: what a
    batch holds; token_keys: the batch arrays counted as tokens (tokens/s); variant(step) -> a hashable static
    choice (or None) and view(params, variant) -> the params the forward pass sees; variant_name labels it in
    logs; train_forward, when given, replaces forward in training steps (a model whose training pass differs)."""

    name: str
    batch_keys: tuple[str, ...]
    forward: Callable
    loss: Callable
    token_keys: tuple[str, ...]
    variant: Callable[[int], Hashable] | None = None
    view: Callable | None = None
    variant_name: str = "variant"
    train_forward: Callable | None = None

    def tokens(self, batch) -> int:
        """Tokens in one batch (for tokens/s)."""
        return int(sum(batch[k].size for k in self.token_keys))

    def scored(self, model, batch, *, training: bool = False):
        """(loss sum, weight sum, metric sums, outputs) of `model` on `batch` (training: by train_forward if set)."""
        out = (self.train_forward if training and self.train_forward is not None else self.forward)(model, batch)
        return (*self.loss(out, batch), out)


@dataclasses.dataclass(frozen=True)
class Distillation:
    """teacher(batch) -> outputs shaped like the task's forward (computed outside the step, no gradient);
    term(student_out, teacher_out, batch) -> (sum over examples weighted like the task loss, {metric: sum}).
    The step minimises task_weight * task loss + weight * term."""

    teacher: Callable
    term: Callable
    weight: float = 1.0
    task_weight: float = 1.0

    def __post_init__(self):
        for name in ("weight", "task_weight"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and v >= 0):
                raise ValueError(f"Distillation {name}={v!r} must be a number >= 0")


# ---- forward passes and losses ------------------------------------------------------------------------


def _lm_forward(model, batch):
    return model(batch["inputs"])[0]  # [B, T, V] float32


def _lm_loss(logits, batch):
    """Next-token cross-entropy in nats; batch: targets int [B, T], weights [B, T]."""
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])  # [B, T]
    w = batch["weights"].astype(jnp.float32)
    correct = (jnp.argmax(logits, -1) == batch["targets"]).astype(jnp.float32)
    return jnp.sum(nll * w), jnp.sum(w), {"accuracy": jnp.sum(correct * w)}


def _classification_forward(model, batch):
    return model(batch["inputs"], batch["mask"])  # [B, C]


def _classification_loss(logits, batch):
    """batch: labels [B], example_weights [B] (0 for padding rows)."""
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
    w = batch["example_weights"].astype(jnp.float32)
    correct = (jnp.argmax(logits, -1) == batch["labels"]).astype(jnp.float32)
    return jnp.sum(nll * w), jnp.sum(w), {"accuracy": jnp.sum(correct * w)}


def _retrieval_forward(model, batch):
    q = model(batch["query"], batch["query_mask"])  # [B, E] unit norm
    d = model(batch["doc"], batch["doc_mask"])  # [B, E]
    return q, d


def infonce_loss(q, d, weights, temperature: float):
    """In-batch contrastive (InfoNCE) sums: query i's positive is doc i, the other docs are negatives.
    q, d: [B, E]; weights [B]. Returns (loss sum, weight sum, {"accuracy": sum})."""
    scores = q @ d.T / temperature  # [B, B]
    labels = jnp.arange(q.shape[0])
    w = weights.astype(jnp.float32)
    nll = optax.softmax_cross_entropy_with_integer_labels(scores, labels)
    correct = (jnp.argmax(scores, -1) == labels).astype(jnp.float32)
    return jnp.sum(nll * w), jnp.sum(w), {"accuracy": jnp.sum(correct * w)}


def forecast_loss(forecast, batch):
    """Per-example mean squared error over horizon and channels, summed with example_weights [B];
    forecast and targets [B, H, C]. Returns (MSE sum, weight sum, {"mae": MAE sum})."""
    err = forecast.astype(jnp.float32) - batch["targets"].astype(jnp.float32)  # [B, H, C]
    w = batch["example_weights"].astype(jnp.float32)
    mse, mae = jnp.mean(err * err, axis=(1, 2)), jnp.mean(jnp.abs(err), axis=(1, 2))  # [B] each
    return jnp.sum(mse * w), jnp.sum(w), {"mae": jnp.sum(mae * w)}


def forecast_task() -> Task:
    """Forecasting: batch inputs [B, L, C], targets [B, H, C], example_weights [B]; MSE loss, MAE metric. The
    model is called model(inputs, training=...) (Autoformer picks its delays per batch in training, per row
    otherwise)."""
    keys = ("inputs", "targets", "example_weights")
    return Task(
        "forecast",
        keys,
        lambda model, batch: model(batch["inputs"], training=False),
        forecast_loss,
        ("inputs",),
        train_forward=lambda model, batch: model(batch["inputs"], training=True),
    )


def forecast_scores(forecast: Callable, dataset) -> dict:
    """Held-out {"mse", "mae", "examples"} of forecast(inputs [B, L, C]) -> [B, H, C] over dataset.eval_batches(),
    weighted like the trainer's evaluation (for parameter-free forecasts such as forecast_baselines.seasonal_naive)."""
    s = w = mae = 0.0
    for batch in dataset.eval_batches():
        bs, bw, bm = forecast_loss(forecast(jnp.asarray(batch["inputs"])), batch)
        s, w, mae = s + float(bs), w + float(bw), mae + float(bm["mae"])
    return {"mse": s / max(w, 1.0), "mae": mae / max(w, 1.0), "examples": w}


def lm_task(**fields) -> Task:
    """Causal LM: batch inputs/targets int [B, T], weights [B, T]."""
    return Task("lm", ("inputs", "targets", "weights"), _lm_forward, _lm_loss, ("inputs",), **fields)


def classification_task() -> Task:
    """Sequence classification: batch inputs [B, T], mask [B, T], labels [B], example_weights [B]."""
    keys = ("inputs", "mask", "labels", "example_weights")
    return Task("classification", keys, _classification_forward, _classification_loss, ("inputs",))


def retrieval_task(temperature: float = 0.05) -> Task:
    """Embedding retrieval trained with InfoNCE: batch query/doc [B, T] with their masks, example_weights [B]."""

    def loss(out, batch):
        q, d = out
        return infonce_loss(q, d, batch.get("example_weights", jnp.ones(q.shape[0])), temperature)

    keys = ("query", "query_mask", "doc", "doc_mask")
    return Task("retrieval", keys, _retrieval_forward, loss, ("query", "doc"))


def task_from_config(train_cfg) -> Task:
    """The task named by config.train.task."""
    if train_cfg.task == "lm":
        return lm_task()
    if train_cfg.task == "classification":
        return classification_task()
    if train_cfg.task == "retrieval":
        return retrieval_task(train_cfg.contrastive_temperature)
    if train_cfg.task == "forecast":
        return forecast_task()
    raise ValueError(
        f"config.train.task={train_cfg.task!r} is not one of ['lm', 'classification', 'retrieval', 'forecast']"
    )


def lm_loss(model, batch):
    """(NLL sum, weight sum, {"accuracy": sum}) of a causal LM on an LM batch (for evaluation code)."""
    return _lm_loss(_lm_forward(model, batch), batch)


# ---- distillation terms -------------------------------------------------------------------------------


def token_kl(student_logits, teacher_logits, temperature: float):
    """T^2 x KL(softmax(teacher / T) || softmax(student / T)) per token; logits [B, T, V] -> [B, T]."""
    t = temperature
    s_logp = jax.nn.log_softmax(student_logits.astype(jnp.float32) / t, axis=-1)  # [B, T, V]
    t_logp = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / t, axis=-1)
    return jnp.sum(jnp.exp(t_logp) * (t_logp - s_logp), axis=-1) * t * t


def logit_distillation(teacher: Callable, *, alpha: float, temperature: float) -> Distillation:
    """LM knowledge distillation: alpha x T^2 x KL(teacher || student) + (1 - alpha) x NLL per token.
    teacher(batch) -> logits [B, T, V]."""

    def term(s_logits, t_logits, batch):
        kl = jnp.sum(token_kl(s_logits, t_logits, temperature) * batch["weights"].astype(jnp.float32))
        return kl, {"kl": kl}

    return Distillation(teacher=teacher, term=term, weight=alpha, task_weight=1.0 - alpha)


def score_kl_rows(student_q, student_d, teacher_q, teacher_d, temperature: float):
    """Per query, KL(teacher || student) of the in-batch query -> doc score softmaxes. [B, E] x 4 -> [B]."""
    s = student_q @ student_d.T / temperature  # [B, B]
    t = jax.lax.stop_gradient(teacher_q @ teacher_d.T / temperature)
    log_ps, log_pt = jax.nn.log_softmax(s, -1), jax.nn.log_softmax(t, -1)
    return jnp.sum(jnp.exp(log_pt) * (log_pt - log_ps), -1)


def score_distillation(teacher: Callable, *, weight: float, temperature: float) -> Distillation:
    """Retrieval: InfoNCE + weight x KL of the in-batch score softmaxes (teacher(batch) -> (q, d) [B, E])."""

    def term(s_out, t_out, batch):
        rows = score_kl_rows(*s_out, *t_out, temperature)  # [B]
        w = batch.get("example_weights", jnp.ones(rows.shape[0])).astype(jnp.float32)
        kl = jnp.sum(rows * w)
        return kl, {"distill_kl": kl}

    return Distillation(teacher=teacher, term=term, weight=weight)


BITS_PER_NAT = 1.0 / math.log(2.0)
