"""Recovery fine-tuning of a pruned model by knowledge distillation from the unpruned teacher.

loss = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * next-token NLL

per predicted token. It reuses the spine's optimizer (`effitrans.train.optimizer.make_optimizer`: AdamW,
warmup + cosine, global-norm clipping) and its step structure (a pure params pytree, the model rebuilt with
`nnx.merge` inside one jitted step). The teacher's logits are computed inside the same step (no storage).
`trainable="ffn"` updates only the feed-forward matrices (cheaper and what pruning changed); "all" updates
everything.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from effitrans.train.optimizer import make_optimizer

TRAINABLE = ("ffn", "all")


def distill_config(**overrides) -> ml_collections.ConfigDict:
    """The train keys make_optimizer reads, with recovery defaults, plus the distillation knobs."""
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
    c.update(overrides)
    return c


def kd_loss(student_logits, teacher_logits, targets, weights, *, alpha: float, temperature: float):
    """Sums over tokens (weighted) of the distillation loss, the KL and the NLL; logits [B, T, V]."""
    t = temperature
    s_logp = jax.nn.log_softmax(student_logits.astype(jnp.float32) / t, axis=-1)  # [B, T, V]
    t_logp = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / t, axis=-1)
    kl = jnp.sum(jnp.exp(t_logp) * (t_logp - s_logp), axis=-1) * t * t  # [B, T]
    nll = optax.softmax_cross_entropy_with_integer_labels(student_logits, targets)  # [B, T]
    w = weights.astype(jnp.float32)
    loss = alpha * kl + (1.0 - alpha) * nll
    return jnp.sum(loss * w), jnp.sum(kl * w), jnp.sum(nll * w), jnp.sum(w)


def _is_trainable(path, trainable: str) -> bool:
    if trainable == "all":
        return True
    return "ffn" in [str(getattr(p, "key", p)) for p in path]


def distill(student, teacher, get_batch: Callable[[int], dict], cfg=None, *, log: Callable | None = print):
    """Fine-tunes `student` (returns a new model; the argument is untouched) to match `teacher`.

    get_batch(step) -> {"inputs" [B, T], "targets" [B, T], optional "weights" [B, T]} (a pure function of the
    step, like the spine's datasets). Returns (student, history list of per-log dicts).
    """
    cfg = distill_config() if cfg is None else cfg
    if cfg.trainable not in TRAINABLE:
        raise ValueError(f"trainable={cfg.trainable!r} is not one of {list(TRAINABLE)}")
    if not 0.0 <= cfg.alpha <= 1.0:
        raise ValueError(f"alpha={cfg.alpha} is outside [0, 1]")
    if cfg.temperature <= 0:
        raise ValueError(f"temperature={cfg.temperature} must be > 0")
    s_graph, s_state = nnx.split(student, nnx.Param)
    t_graph, t_state = nnx.split(teacher, nnx.Param)
    params = nnx.to_pure_dict(s_state)
    flags = jax.tree_util.tree_map_with_path(lambda p, _: _is_trainable(p, cfg.trainable), params)
    train_p = jax.tree.map(lambda x, f: x if f else None, params, flags)
    frozen_p = jax.tree.map(lambda x, f: None if f else x, params, flags)
    tx = make_optimizer(cfg)
    opt_state = tx.init(train_p)

    def merge(tp, fp):
        return jax.tree.map(lambda a, b: a if b is None else b, tp, fp, is_leaf=lambda x: x is None)

    @jax.jit
    def step_fn(train_p, opt_state, frozen_p, t_state, batch):
        weights = batch.get("weights", jnp.ones(batch["targets"].shape, jnp.float32))
        t_logits, _ = nnx.merge(t_graph, t_state)(batch["inputs"])
        t_logits = jax.lax.stop_gradient(t_logits)

        def loss_fn(tp):
            s_logits, _ = nnx.merge(s_graph, merge(tp, frozen_p))(batch["inputs"])
            total, kl, nll, w = kd_loss(
                s_logits, t_logits, batch["targets"], weights, alpha=cfg.alpha, temperature=cfg.temperature
            )
            w = jnp.maximum(w, 1.0)
            return total / w, (kl / w, nll / w)

        (loss, (kl, nll)), grads = jax.value_and_grad(loss_fn, has_aux=True)(train_p)
        updates, opt_state = tx.update(grads, opt_state, train_p)
        return optax.apply_updates(train_p, updates), opt_state, {"loss": loss, "kl": kl, "nll": nll}

    history = []
    start = time.perf_counter()
    for step in range(cfg.steps):
        batch = {k: jnp.asarray(v) for k, v in get_batch(step).items()}
        train_p, opt_state, m = step_fn(train_p, opt_state, frozen_p, t_state, batch)
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            m = {k: float(v) for k, v in jax.device_get(m).items()}
            el = time.perf_counter() - start
            row = {"step": done, **m, "elapsed_s": el}
            history.append(row)
            if log is not None:
                log(
                    f"[recovery] step {done}/{cfg.steps} | loss {m['loss']:.4f} | kl {m['kl']:.4f} | "
                    f"nll {m['nll']:.4f} | {el / done:.2f} s/step | ETA {el / done * (cfg.steps - done):.0f} s"
                )
    s_state = nnx.State(s_state) if not isinstance(s_state, nnx.State) else s_state
    nnx.replace_by_pure_dict(s_state, merge(train_p, frozen_p))
    return nnx.merge(s_graph, s_state), history


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
