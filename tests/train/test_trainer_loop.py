"""The training loop's hot path and its extension points: NaN found between log steps, prefetch, the cached
matmul peak, and a distillation term through the Trainer."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from effitrans import perf
from effitrans.registry import build_model
from effitrans.train.tasks import logit_distillation, token_kl
from effitrans.train.trainer import NonFiniteLossError, Trainer
from tests.helpers import tiny_lm_experiment


def _fake_measure(calls):
    def measure(**_):
        calls.append(1)
        return 123.0

    return measure


def test_peak_is_measured_once_then_read_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(perf.CACHE_DIR_ENV, str(tmp_path))
    monkeypatch.delenv(perf.PEAK_ENV, raising=False)
    calls = []
    monkeypatch.setattr(perf, "measure_matmul_gflops", _fake_measure(calls))
    assert perf.matmul_peak_gflops("float32") == (123.0, "measured")
    assert perf.matmul_peak_gflops("float32") == (123.0, "cached")
    assert len(calls) == 1
    cache = json.loads((tmp_path / "matmul_peak.json").read_text())
    assert list(cache.values()) == [123.0] and '"dtype": "float32"' in next(iter(cache))
    assert perf.matmul_peak_gflops("bfloat16") == (123.0, "measured")  # keyed by dtype
    assert len(calls) == 2
    monkeypatch.setenv(perf.PEAK_ENV, "55.5")
    assert perf.matmul_peak_gflops("float32") == (55.5, "given")
    monkeypatch.setenv(perf.PEAK_ENV, "fast")
    with pytest.raises(ValueError, match="EFFITRANS_PEAK_GFLOPS='fast' is not a positive number"):
        perf.matmul_peak_gflops("float32")


def test_a_cached_peak_only_rises(tmp_path, monkeypatch):
    monkeypatch.setenv(perf.CACHE_DIR_ENV, str(tmp_path))
    monkeypatch.delenv(perf.PEAK_ENV, raising=False)
    monkeypatch.setattr(perf, "measure_matmul_gflops", _fake_measure([]))
    perf.matmul_peak_gflops("float32")  # 123 measured while the machine was loaded
    assert perf.raise_peak("float32", 100.0) == 123.0  # slower work leaves it
    assert perf.matmul_peak_gflops("float32") == (123.0, "cached")
    assert perf.raise_peak("float32", 150.0) == 150.0  # faster work raises it, for later starts too
    assert perf.matmul_peak_gflops("float32") == (150.0, "cached")
    assert perf.matmul_peak_gflops("bfloat16")[0] == 123.0  # other dtypes keep their own


@pytest.mark.slow  # a short training run; CI runs it
def test_prefetch_gives_the_losses_of_no_prefetch_and_the_cached_peak_needs_no_matmul(tmp_path, monkeypatch):
    monkeypatch.setenv(perf.CACHE_DIR_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(perf.PEAK_ENV, raising=False)
    calls = []
    monkeypatch.setattr(perf, "measure_matmul_gflops", _fake_measure(calls))
    perf.matmul_peak_gflops("float32")  # the first start on this machine
    losses = {}
    for prefetch in (True, False):
        cfg = tiny_lm_experiment(steps=3, checkpoint_every=100, eval_every=100)
        trainer = Trainer(cfg, str(tmp_path / str(prefetch)), verbose=False, prefetch=prefetch)
        losses[prefetch] = [r["loss"] for r in trainer.train()["history"]]
        start = json.loads((tmp_path / str(prefetch) / "metrics.jsonl").read_text().splitlines()[0])
        assert start["peak_matmul_gflops"] == 123.0
    assert len(calls) == 1  # both Trainers read the cache
    assert len(losses[True]) == 3 and losses[True] == losses[False]


@pytest.mark.slow  # a short training run; CI runs it
def test_nan_between_log_steps_reports_the_range_and_keeps_the_last_finite_checkpoint(tmp_path):
    # Host checks at steps 3 (checkpoint), 4 (log), 6 (checkpoint): the NaN of step 5 is found at step 6,
    # before step 6's checkpoint is written.
    cfg = lambda: tiny_lm_experiment(steps=8, log_every=4, checkpoint_every=3, eval_every=100)
    trainer = Trainer(cfg(), str(tmp_path), peak_gflops=1.0, verbose=False)
    clean = trainer.dataset.get_batch

    def poisoned(step, **kw):
        batch = clean(step, **kw)
        if step == 4:  # the 5th update
            batch["weights"] = batch["weights"] * np.nan
        return batch

    trainer.dataset.get_batch = poisoned
    with pytest.raises(
        NonFiniteLossError, match=r"loss is nan at step 5; .*steps 5-6, .*last good checkpoint \(step 3\)"
    ):
        trainer.train()
    assert trainer.checkpointer.steps() == [3]
    fresh = Trainer(cfg(), str(tmp_path), peak_gflops=1.0, verbose=False)
    state = fresh.restore_or_init()
    assert int(state["step"]) == 3
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state["params"]))


@pytest.mark.slow  # a short training run; CI runs it
def test_nan_before_any_checkpoint_names_none(tmp_path):
    trainer = Trainer(tiny_lm_experiment(steps=2, log_every=2), str(tmp_path), peak_gflops=1.0, verbose=False)
    clean = trainer.dataset.get_batch
    trainer.dataset.get_batch = lambda step, **kw: {**clean(step, **kw), "weights": np.full((8, 32), np.nan)}
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 1; .*steps 1-2.*No checkpoint was written"):
        trainer.train()
    assert trainer.checkpointer.steps() == []


@pytest.mark.slow  # a short training run; CI runs it
def test_distillation_through_the_trainer_reduces_the_teacher_student_gap(tmp_path):
    cfg = tiny_lm_experiment(steps=8, learning_rate=1e-2, warmup_steps=1, checkpoint_every=100, eval_every=100)
    student = build_model(cfg.model, seed=0)
    teacher = build_model(cfg.model, seed=1)
    t_graph, t_state = nnx.split(teacher)
    t_logits = jax.jit(lambda s, x: nnx.merge(t_graph, s)(x)[0])
    teach = lambda batch: t_logits(t_state, batch["inputs"])
    trainer = Trainer(
        cfg,
        str(tmp_path),
        model=student,
        distillation=logit_distillation(teach, alpha=1.0, temperature=1.0),
        peak_gflops=1.0,
        verbose=False,
    )
    batch = {k: jnp.asarray(v) for k, v in trainer.dataset.get_batch(0).items()}

    def gap(model):
        return float(jnp.mean(token_kl(model(batch["inputs"])[0], teach(batch), 1.0)))

    before = gap(student)
    out = trainer.train()
    assert {"kl", "task_loss"} <= set(out["history"][-1])
    assert gap(trainer.model_from(out["state"]["params"])) < 0.7 * before
    assert gap(student) == before  # the given model is not modified
