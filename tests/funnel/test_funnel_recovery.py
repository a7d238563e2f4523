"""Funnel recovery: the distillation term is the KL of in-batch score softmaxes, recovery without it is the
Trainer's own contrastive step, and distilling pulls the funnel's scores towards the dense teacher's."""

import jax
import numpy as np
import pytest

from effitrans import funnel
from effitrans.funnel import recovery
from effitrans.train.trainer import Trainer
from tests.helpers import shipped_config


def test_score_distillation_kl_matches_numpy():
    rng = np.random.default_rng(0)
    sq, sd, tq, td = (rng.normal(size=(5, 3)) for _ in range(4))
    kl = float(recovery.score_distillation_kl(sq, sd, tq, td, 0.5))

    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    ls, lt = log_softmax(sq @ sd.T / 0.5), log_softmax(tq @ td.T / 0.5)
    assert kl == pytest.approx(np.mean(np.sum(np.exp(lt) * (lt - ls), -1)), rel=1e-5)
    assert float(recovery.score_distillation_kl(tq, td, tq, td, 0.5)) == pytest.approx(0.0, abs=1e-6)


def _tiny(tmp_path, model_cfg=None):
    cfg = shipped_config("encoder_retrieval_small")
    cfg.model.update(num_layers=2, d_model=32, num_heads=2, num_kv_heads=2, head_dim=16, ffn_width=48, embed_dim=16)
    cfg.model.attention.impl = "reference"
    cfg.data.query_len = cfg.data.doc_len = 16
    cfg.data.max_eval_examples = 16
    cfg.train.update(batch_size=8, steps=4, warmup_steps=1, learning_rate=1e-4, log_every=1)
    if model_cfg is not None:
        cfg.model = model_cfg
    return cfg, Trainer(cfg, str(tmp_path), peak_gflops=1.0, verbose=False)


@pytest.mark.slow  # ~60 s on 2 cores (two trainers compiled): CI runs it
def test_recovery_without_distillation_is_the_trainers_step_and_distillation_moves_towards_teacher(tmp_path):
    cfg, dense = _tiny(tmp_path / "dense")
    dense_params = dense.init_state()["params"]
    fcfg = funnel.funnel_config(cfg.model, at_layer=1, stride=2)
    _, student = _tiny(tmp_path / "funnel", fcfg)

    # distill_weight 0: the same updates as the Trainer's own train step (mean InfoNCE over the batch).
    ours, _ = recovery.recover(student, dense_params, 2)
    state = {
        "params": jax.tree.map(np.array, dense_params),
        "model_state": {},  # a dense-attention encoder has no non-trainable state
        "opt_state": student.tx.init(dense_params),
        "step": np.zeros((), np.int32),
    }
    for step in range(2):
        state, _ = student.train_step(state, step)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(state["params"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5)

    teacher = lambda toks, m: dense._embed_step(dense_params, toks, m)
    batch = student.train_batch(0)

    def kl(params):
        emb = lambda t, m: student._embed_step(params, t, m)
        return float(
            recovery.score_distillation_kl(
                emb(batch["query"], batch["query_mask"]),
                emb(batch["doc"], batch["doc_mask"]),
                teacher(batch["query"], batch["query_mask"]),
                teacher(batch["doc"], batch["doc_mask"]),
                0.05,
            )
        )

    before = kl(dense_params)
    after_params, metrics = recovery.recover(student, dense_params, 4, teacher_embed=teacher, distill_weight=10.0)
    assert np.isfinite(metrics["loss"]) and before > 0
    assert kl(after_params) < before
    with pytest.raises(ValueError, match="distill_weight > 0 needs teacher_embed"):
        recovery.recover(student, dense_params, 1, distill_weight=1.0)
