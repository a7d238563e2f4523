"""Losses and eval metrics per task, as sums so gradient accumulation and sharding stay exact.

Every `*_loss(model, batch)` returns (sum of per-example losses times weights, sum of weights, metric sums);
the train step divides once, after summing over micro-batches.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import optax


def lm_loss(model, batch, **_):
    """batch: inputs/targets int [B, T], weights [B, T]. Next-token cross-entropy in nats."""
    logits, _ = model(batch["inputs"])  # [B, T, V] float32
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])  # [B, T]
    w = batch["weights"].astype(jnp.float32)
    correct = (jnp.argmax(logits, -1) == batch["targets"]).astype(jnp.float32)
    return jnp.sum(nll * w), jnp.sum(w), {"accuracy": jnp.sum(correct * w)}


def classification_loss(model, batch, **_):
    """batch: inputs [B, T], mask [B, T], labels [B], example_weights [B] (0 for padding rows)."""
    logits = model(batch["inputs"], batch["mask"])  # [B, C]
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
    w = batch["example_weights"].astype(jnp.float32)
    correct = (jnp.argmax(logits, -1) == batch["labels"]).astype(jnp.float32)
    return jnp.sum(nll * w), jnp.sum(w), {"accuracy": jnp.sum(correct * w)}


def retrieval_loss(model, batch, *, temperature: float = 0.05, **_):
    """In-batch contrastive (InfoNCE) loss: query i's positive is doc i, the other docs are negatives."""
    q = model(batch["query"], batch["query_mask"])  # [B, E] unit norm
    d = model(batch["doc"], batch["doc_mask"])  # [B, E]
    scores = q @ d.T / temperature  # [B, B]
    labels = jnp.arange(q.shape[0])
    w = batch.get("example_weights", jnp.ones(q.shape[0])).astype(jnp.float32)
    nll = optax.softmax_cross_entropy_with_integer_labels(scores, labels)
    correct = (jnp.argmax(scores, -1) == labels).astype(jnp.float32)
    return jnp.sum(nll * w), jnp.sum(w), {"accuracy": jnp.sum(correct * w)}


TASK_LOSSES = {"lm": lm_loss, "classification": classification_loss, "retrieval": retrieval_loss}


def tokens_in_batch(task: str, batch) -> int:
    """Tokens processed per example batch (for tokens/s)."""
    if task == "retrieval":
        return int(batch["query"].size + batch["doc"].size)
    return int(batch["inputs"].size)


def train_flops_per_step(model_cfg, task: str, batch_shapes: dict) -> float:
    """Model FLOPs of one training step (forward + backward = 3 x forward), PaLM-style accounting.

    Forward FLOPs per token: 2 x (matmul params, embedding lookup excluded, LM head included) plus
    attention scores and values 2 x 2 x T x N x H per layer (halved when causal).
    """
    m = model_cfg
    d, n, k, h = m.d_model, m.num_heads, m.num_kv_heads, m.head_dim
    widths = [m.ffn_width] * m.num_layers if isinstance(m.ffn_width, int) else list(m.ffn_width)
    attn_params = d * (n + 2 * k) * h + n * h * d
    layer_params = sum(attn_params + 3 * d * w for w in widths)
    head_params = d * m.vocab_size if m.name == "causal_lm" else 0

    def forward(b, t, causal):
        attn = 4 * t * n * h * m.num_layers * (0.5 if causal else 1.0)
        return b * t * (2 * (layer_params + head_params) + attn)

    if task == "retrieval":
        (bq, tq), (bd, td) = batch_shapes["query"], batch_shapes["doc"]
        fwd = forward(bq, tq, False) + forward(bd, td, False)
    else:
        b, t = batch_shapes["inputs"]
        fwd = forward(b, t, m.name == "causal_lm")
    return 3.0 * fwd


BITS_PER_NAT = 1.0 / math.log(2.0)
