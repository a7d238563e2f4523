"""AdamW with linear warmup and cosine decay, global-norm clipping; decay only on matrices."""

from __future__ import annotations

import jax
import optax


def learning_rate_schedule(train_cfg) -> optax.Schedule:
    """0 -> learning_rate over warmup_steps, then cosine to learning_rate * min_lr_ratio at `steps`."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=train_cfg.learning_rate,
        warmup_steps=min(train_cfg.warmup_steps, train_cfg.steps),
        decay_steps=max(train_cfg.steps, train_cfg.warmup_steps + 1),
        end_value=train_cfg.learning_rate * train_cfg.min_lr_ratio,
    )


def make_optimizer(train_cfg, *, trainable=None) -> optax.GradientTransformation:
    """Gradient accumulation happens in the train step (exact, by summing micro-batch gradients), not here.

    trainable(params) -> a tree of bools like params: leaves marked False are frozen (zero updates, no
    optimizer moments, left out of the clipping norm)."""
    # Norm scales and other vectors are not decayed (standard practice for Transformers).
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
    parts = []
    if train_cfg.grad_clip is not None:
        parts.append(optax.clip_by_global_norm(train_cfg.grad_clip))
    parts.append(
        optax.adamw(
            learning_rate_schedule(train_cfg),
            b1=train_cfg.b1,
            b2=train_cfg.b2,
            weight_decay=train_cfg.weight_decay,
            mask=decay_mask,
        )
    )
    tx = optax.chain(*parts)
    if trainable is None:
        return tx
    labels = lambda params: jax.tree.map(lambda t: "train" if t else "frozen", trainable(params))
    return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
