"""Recovery fine-tuning of a funnelled embedding encoder, optionally distilling from the unmodified model.

After surgery (`funnel.insert`) the funnel shares every weight with the dense encoder; a short recovery
fine-tune adapts the layers after the pooling point. With `distill_weight > 0` the loss adds, to the usual
in-batch contrastive (InfoNCE) loss, the KL divergence from the dense teacher's in-batch query -> doc score
distribution to the student's (both at the training temperature), so the funnel learns to rank the batch
the way the dense model does, not only to find the positive:

    loss = InfoNCE(student) + distill_weight * KL(softmax(S_teacher / tau) || softmax(S_student / tau))

with S = q @ d.T over the batch's unit-norm embeddings, averaged over queries.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx


def score_distillation_kl(student_q, student_d, teacher_q, teacher_d, temperature: float) -> jax.Array:
    """Mean over queries of KL(teacher || student) of the in-batch score softmaxes. Embeddings [B, E] -> []."""
    s = student_q @ student_d.T / temperature  # [B, B]
    t = jax.lax.stop_gradient(teacher_q @ teacher_d.T / temperature)
    log_ps, log_pt = jax.nn.log_softmax(s, -1), jax.nn.log_softmax(t, -1)
    return jnp.mean(jnp.sum(jnp.exp(log_pt) * (log_pt - log_ps), -1))


def make_recovery_step(
    graphdef, tx: optax.GradientTransformation, *, temperature: float, distill_weight: float
) -> Callable:
    """Jitted step(params, opt_state, batch, teacher_q, teacher_d) -> (params, opt_state, metrics).

    batch: the retrieval batch dict ("query", "query_mask", "doc", "doc_mask"); teacher_q / teacher_d:
    the dense model's embeddings of the same batch [B, E] (computed outside, no gradient)."""

    def loss_fn(params, batch, teacher_q, teacher_d):
        model = nnx.merge(graphdef, params)
        q = model(batch["query"], batch["query_mask"])  # [B, E] unit norm
        d = model(batch["doc"], batch["doc_mask"])
        scores = q @ d.T / temperature
        nce = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(scores, jnp.arange(q.shape[0])))
        kl = score_distillation_kl(q, d, teacher_q, teacher_d, temperature)
        return nce + distill_weight * kl, {"infonce": nce, "distill_kl": kl}

    @jax.jit
    def step(params, opt_state, batch, teacher_q, teacher_d):
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, teacher_q, teacher_d)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, {"loss": loss, **aux}

    return step


def recover(trainer, params, steps: int, *, teacher_embed: Callable | None = None, distill_weight: float = 0.0):
    """`steps` recovery updates of the funnel model of `trainer` (an effitrans Trainer on a funnel config,
    task "retrieval") starting from `params` (the dense weights, which the funnel shares), on the trainer's
    batches and optimizer schedule. teacher_embed(tokens, mask) -> [B, E] is the unmodified dense encoder;
    required when distill_weight > 0. Returns (params, last metrics)."""
    if distill_weight < 0:
        raise ValueError(f"distill_weight={distill_weight} must be >= 0")
    if distill_weight > 0 and teacher_embed is None:
        raise ValueError("distill_weight > 0 needs teacher_embed (the dense encoder's embedding function)")
    step_fn = make_recovery_step(
        trainer.graphdef,
        trainer.tx,
        distill_weight=distill_weight,
        temperature=trainer.config.train.contrastive_temperature,
    )
    params = jax.tree.map(jnp.copy, params)
    opt_state = trainer.tx.init(params)
    metrics = {}
    for step in range(steps):
        batch = trainer.train_batch(step)
        if teacher_embed is not None:
            tq, td = teacher_embed(batch["query"], batch["query_mask"]), teacher_embed(batch["doc"], batch["doc_mask"])
        else:
            b = batch["query"].shape[0]
            tq = td = jnp.zeros((b, 1), jnp.float32)  # unused (weight 0)
        params, opt_state, metrics = step_fn(params, opt_state, batch, tq, td)
    return params, jax.device_get(metrics)
