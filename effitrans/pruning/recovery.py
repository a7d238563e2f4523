"""Recovery fine-tuning of a pruned model by knowledge distillation from the unpruned teacher.

loss = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * next-token NLL

per predicted token. `distill` runs the spine's `Trainer` (optimizer, checkpoints, progress lines, NaN
checks) on the sliced student (`model=`), any `get_batch(step)` (`dataset=`) and the LM task plus
`tasks.logit_distillation`; the teacher's logits are computed per batch by a jitted forward.
`trainable="ffn"` updates only the feed-forward matrices (cheaper and what pruning changed); "all"
updates everything.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from effitrans.train.tasks import lm_task, logit_distillation, token_kl
from effitrans.train.trainer import Trainer

TRAINABLE = ("ffn", "all")


def distill_config(**overrides) -> ml_collections.ConfigDict:
    """The train keys the Trainer reads, with recovery defaults, plus the distillation knobs."""
    c = ml_collections.ConfigDict()
    c.steps = 50  # optimizer updates
    c.learning_rate = 1e-4  # peak LR (small: the student starts close to the teacher)
    c.warmup_steps = 5
    c.min_lr_ratio = 0.1
    c.weight_decay = 0.0
    c.b1 = 0.9
    c.b2 = 0.95
    c.grad_clip = 1.0
    c.alpha = 0.5  # weight of the KL term (1 - alpha on the LM loss)
    c.temperature = 1.0  # distillation temperature T
    c.trainable = "ffn"  # ffn | all
    c.log_every = 5
    c.checkpoint_every = 10**9  # only at the end (and on SIGTERM/SIGINT)
    c.keep_checkpoints = 1
    c.eval_every = 10**9
    c.seed = 0
    c.update(overrides)
    return c


def kd_loss(student_logits, teacher_logits, targets, weights, *, alpha: float, temperature: float):
    """Sums over tokens (weighted) of the distillation loss, the KL and the NLL; logits [B, T, V]."""
    kl = token_kl(student_logits, teacher_logits, temperature)  # [B, T]
    nll = optax.softmax_cross_entropy_with_integer_labels(student_logits, targets)  # [B, T]
    w = weights.astype(jnp.float32)
    loss = alpha * kl + (1.0 - alpha) * nll
    return jnp.sum(loss * w), jnp.sum(kl * w), jnp.sum(nll * w), jnp.sum(w)


def _ffn_only(params):
    return jax.tree_util.tree_map_with_path(lambda p, _: "ffn" in [str(getattr(k, "key", k)) for k in p], params)


class StepBatches:
    """A Trainer dataset over get_batch(step) -> the global batch: each process takes its rows; no held-out
    set. Missing LM weights default to ones."""

    metadata = {"name": "get_batch"}

    def __init__(self, get_batch: Callable[[int], dict]):
        self._get_batch = get_batch

    def get_batch(self, step: int, *, process_index: int = 0, process_count: int = 1) -> dict:
        batch = dict(self._get_batch(step))
        if "weights" not in batch:
            batch["weights"] = np.ones(np.shape(batch["targets"]), np.float32)
        rows = len(batch["inputs"]) // process_count
        return {k: np.asarray(v)[process_index * rows : (process_index + 1) * rows] for k, v in batch.items()}

    def eval_batches(self, process_index: int = 0, process_count: int = 1):  # noqa: ARG002 - dataset interface
        return iter(())


def distill(
    student,
    teacher,
    get_batch: Callable[[int], dict],
    cfg=None,
    *,
    log: Callable | None = print,
    workdir: str | None = None,
    peak_gflops: float | None = None,
):
    """Fine-tunes `student` (returns a new model; the argument is untouched) to match `teacher`.

    get_batch(step) -> {"inputs" [B, T], "targets" [B, T], optional "weights" [B, T]} (a pure function of the
    step, like the spine's datasets). `workdir` keeps checkpoints (a rerun resumes; default: a temporary
    directory); `log` None silences the progress lines. Returns (student, history list of per-log dicts).
    """
    cfg = distill_config() if cfg is None else cfg
    if cfg.trainable not in TRAINABLE:
        raise ValueError(f"trainable={cfg.trainable!r} is not one of {list(TRAINABLE)}")
    if not 0.0 <= cfg.alpha <= 1.0:
        raise ValueError(f"alpha={cfg.alpha} is outside [0, 1]")
    if cfg.temperature <= 0:
        raise ValueError(f"temperature={cfg.temperature} must be > 0")
    t_graph, t_state = nnx.split(teacher)
    t_logits = jax.jit(lambda state, inputs: nnx.merge(t_graph, state)(inputs)[0])
    distillation = logit_distillation(
        lambda batch: t_logits(t_state, batch["inputs"]), alpha=cfg.alpha, temperature=cfg.temperature
    )
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(
            ml_collections.ConfigDict({"train": cfg}),
            workdir or tmp,
            model=student,
            task=lm_task(),
            dataset=StepBatches(get_batch),
            distillation=distillation,
            trainable=_ffn_only if cfg.trainable == "ffn" else None,
            peak_gflops=peak_gflops,
            verbose=log is not None,
        )
        out = trainer.train()
        return trainer.model_from(out["state"]["params"], out["state"]["model_state"]), out["history"]


def token_batches(stream: np.ndarray, *, batch_size: int, seq_len: int, seed: int = 0) -> Callable[[int], dict]:
    """get_batch(step) over a 1-D token stream: random windows, a pure function of (seed, step)."""
    stream = np.asarray(stream)
    if stream.size < seq_len + 2:
        raise ValueError(f"token stream of {stream.size} tokens is too short for seq_len={seq_len}")

    def get_batch(step: int) -> dict:
        rng = np.random.default_rng([seed, step])
        starts = rng.integers(0, stream.size - seq_len - 1, size=batch_size)
        idx = starts[:, None] + np.arange(seq_len + 1)  # [B, T+1]
        w = stream[idx].astype(np.int32)
        return {"inputs": w[:, :-1], "targets": w[:, 1:], "weights": np.ones((batch_size, seq_len), np.float32)}

    return get_batch
