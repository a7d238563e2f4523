"""Recovery fine-tuning of a funnelled embedding encoder, optionally distilling from the unmodified model.

After surgery (`funnel.insert`) the funnel shares every weight with the dense encoder; a short recovery
fine-tune adapts the layers after the pooling point. With `distill_weight > 0` the loss adds, to the usual
in-batch contrastive (InfoNCE) loss, the KL divergence from the dense teacher's in-batch query -> doc score
distribution to the student's (both at the training temperature), so the funnel learns to rank the batch
the way the dense model does, not only to find the positive:

    loss = InfoNCE(student) + distill_weight * KL(softmax(S_teacher / tau) || softmax(S_student / tau))

with S = q @ d.T over the batch's unit-norm embeddings, averaged over queries. The loop is the spine's
`Trainer` (retrieval task + `tasks.score_distillation`), started from the dense weights.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable

import jax
import jax.numpy as jnp

from effitrans.train.tasks import score_distillation, score_kl_rows
from effitrans.train.trainer import Trainer


def score_distillation_kl(student_q, student_d, teacher_q, teacher_d, temperature: float) -> jax.Array:
    """Mean over queries of KL(teacher || student) of the in-batch score softmaxes. Embeddings [B, E] -> []."""
    return jnp.mean(score_kl_rows(student_q, student_d, teacher_q, teacher_d, temperature))


def recover(
    trainer,
    params,
    steps: int,
    *,
    teacher_embed: Callable | None = None,
    distill_weight: float = 0.0,
    workdir: str | None = None,
    model_state: dict | None = None,
):
    """`steps` recovery updates of the funnel model of `trainer` (an effitrans Trainer on a funnel config,
    task "retrieval") starting from `params` (the dense weights, which the funnel shares), on the trainer's
    batches and optimizer schedule (steps <= config.train.steps). teacher_embed(tokens, mask) -> [B, E] is
    the unmodified dense encoder; required when distill_weight > 0. `workdir` keeps checkpoints (a rerun
    resumes; default: a temporary directory). Returns (params, metrics of the last step); with
    `model_state` (the dense model's non-trainable state, e.g. an MoE's selection bias, which training
    updates) (params, model_state, metrics)."""
    if distill_weight < 0:
        raise ValueError(f"distill_weight={distill_weight} must be >= 0")
    if distill_weight > 0 and teacher_embed is None:
        raise ValueError("distill_weight > 0 needs teacher_embed (the dense encoder's embedding function)")
    distillation = None
    if distill_weight > 0:
        teacher = lambda b: (teacher_embed(b["query"], b["query_mask"]), teacher_embed(b["doc"], b["doc_mask"]))
        temperature = trainer.config.train.contrastive_temperature
        distillation = score_distillation(teacher, weight=distill_weight, temperature=temperature)
    with tempfile.TemporaryDirectory() as tmp:
        run = Trainer(
            trainer.config,
            workdir or tmp,
            task=trainer.task,
            model=trainer.model_from(params, model_state),
            distillation=distillation,
            peak_gflops=trainer.peak_gflops,
            verbose=trainer.verbose,
        )
        out = run.train(until=steps)
        if model_state is not None:
            return out["state"]["params"], out["state"]["model_state"], out["history"][-1]
        return out["state"]["params"], out["history"][-1]
