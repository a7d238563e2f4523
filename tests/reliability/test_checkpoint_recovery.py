"""Checkpoints survive corruption, config changes and NaN: nothing is lost, nothing is silently deleted.

One test per failure seen when the workdir is abused: a corrupt newest checkpoint, a resume under another
config, a NaN/overflow stop, eval/generate on a workdir without a checkpoint, a rerun with fewer steps. The
fast tests drive `Checkpointer` on a small pytree; the end-to-end ones train the tiny LM (slow: CI).
"""

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effitrans.train.checkpoints import (
    Checkpointer,
    CheckpointError,
    IncompatibleCheckpointError,
    abstract_like,
    all_finite,
    config_diff,
    meaning,
)
from effitrans.train.trainer import NonFiniteLossError, Trainer
from tests.helpers import tiny_lm_experiment, truncate_array_files

MEANING = {"model.d_model": 8, "model.attention.kind": "mha", "data.name": "cpython_docs", "train.task": "lm"}


def _state(value: float) -> dict:
    return {"params": {"w": jnp.full((4, 8), value), "b": jnp.zeros((8,))}, "step": jnp.int32(0)}


def _abstract() -> dict:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _state(0.0))


def _checkpointer(directory, meaning=MEANING, keep=3) -> Checkpointer:
    return Checkpointer(str(directory), keep=keep, config_meaning=meaning)


def _write(directory, steps, meaning=MEANING, keep=3) -> None:
    ck = _checkpointer(directory, meaning, keep)
    for s in steps:
        ck.save(s, _state(float(s)), force=True)
    ck.close()


def _set_aside(workdir, stamps: bool = False) -> list[str]:
    """Names under checkpoints.set_aside/: "<step>-<reason>" (with "-<UTC time>" when `stamps`)."""
    d = os.path.join(workdir, "checkpoints.set_aside")
    names = sorted(os.listdir(d)) if os.path.isdir(d) else []
    return names if stamps else [n.rsplit("-", 1)[0] for n in names]


def _tree(directory) -> dict:
    """{relative path: bytes} of every file under `directory`: to show that nothing on disk changed."""
    out = {}
    for root, _, files in os.walk(directory):
        for f in files:
            path = os.path.join(root, f)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, directory)] = fh.read()
    return out


# ---- case 1: a corrupt newest checkpoint ------------------------------------------------------------------


def test_corrupt_newest_checkpoint_is_set_aside_and_its_step_can_be_saved_again(tmp_path):
    ckdir = tmp_path / "checkpoints"
    _write(ckdir, [2, 4])
    truncate_array_files(ckdir / "4" / "state")
    ck = _checkpointer(ckdir)
    step, state, _ = ck.restore_latest(_abstract())
    assert step == 2 and float(state["params"]["w"][0, 0]) == 2.0
    assert _set_aside(tmp_path) == ["4-unreadable"]
    (aside,) = _set_aside(tmp_path, stamps=True)
    assert "unreadable" in (tmp_path / "checkpoints.set_aside" / aside / "REASON.txt").read_text()
    ck.save(4, _state(4.5), force=True)  # before: orbax StepAlreadyExistsError on every rerun
    ck.close()
    step, state, _ = _checkpointer(ckdir).restore_latest(_abstract())
    assert step == 4 and float(state["params"]["w"][0, 0]) == 4.5


def test_checkpoint_with_unreadable_meta_or_non_finite_params_is_set_aside(tmp_path):
    ckdir = tmp_path / "checkpoints"
    ck = _checkpointer(ckdir)
    ck.save(2, _state(2.0), force=True)
    ck.save(4, _state(float("nan")), force=True)  # e.g. written by an older version without the check
    ck.save(6, _state(6.0), force=True)
    ck.close()
    (ckdir / "6" / "meta" / "metadata").write_text("{not json")
    step, _, _ = _checkpointer(ckdir).restore_latest(_abstract())
    assert step == 2
    assert _set_aside(tmp_path) == ["4-non-finite", "6-unreadable"]


@pytest.mark.slow  # trains the tiny LM twice (~20 s on 2 cores): CI runs it
def test_corrupt_newest_checkpoint_then_training_reaches_its_final_step(tmp_path, capsys):
    Trainer(tiny_lm_experiment(steps=4, checkpoint_every=2), str(tmp_path), peak_gflops=1.0, verbose=False).train()
    truncate_array_files(tmp_path / "checkpoints" / "4" / "state")
    trainer = Trainer(tiny_lm_experiment(steps=6, checkpoint_every=2), str(tmp_path), peak_gflops=1.0, verbose=False)
    result = trainer.train()
    trainer.checkpointer.close()
    assert int(result["state"]["step"]) == 6
    assert Checkpointer(str(tmp_path / "checkpoints"), keep=3, config_meaning={}).steps() == [2, 4, 6]
    assert _set_aside(tmp_path) == ["4-unreadable"]
    assert "checkpoint at step 4 set aside (unreadable" in capsys.readouterr().out


# ---- case 2: a resume under another config -------------------------------------------------------------


@pytest.mark.parametrize(
    "key, value",
    [("model.attention.kind", "sliding_window"), ("model.ffn_activation", "gelu"), ("data.name", "listops")],
)
def test_config_change_is_refused_listing_keys_and_leaves_disk_untouched(tmp_path, key, value):
    ckdir = tmp_path / "checkpoints"
    _write(ckdir, [1, 2, 3], keep=2)
    before = _tree(ckdir)
    changed = MEANING | {key: value}  # a key the old model did not have counts as a change too
    with pytest.raises(IncompatibleCheckpointError) as err:
        _checkpointer(ckdir, changed, keep=2).restore_latest(_abstract())
    msg = str(err.value)
    assert f"config.{key}" in msg and repr(value) in msg and "--on_config_change=start_fresh" in msg
    assert _tree(ckdir) == before and _set_aside(tmp_path) == []


def test_changed_state_layout_is_refused_not_taken_for_corruption(tmp_path):
    """Same config meaning, another optimizer (e.g. train.grad_clip switched off): arrays differ by path."""
    ckdir = tmp_path / "checkpoints"
    _write(ckdir, [1])
    other = {**_abstract(), "opt_state": {"mu": jax.ShapeDtypeStruct((4, 8), jnp.float32)}}
    with pytest.raises(IncompatibleCheckpointError, match=r"state/opt_state/mu: absent there, \(4, 8\) here"):
        _checkpointer(ckdir).restore_latest(other)
    assert _checkpointer(ckdir).steps() == [1] and _set_aside(tmp_path) == []


def test_start_fresh_sets_old_checkpoints_aside_so_cleanup_never_deletes_them(tmp_path):
    ckdir = tmp_path / "checkpoints"
    _write(ckdir, [1, 2], keep=2)
    ck = _checkpointer(ckdir, MEANING | {"model.attention.kind": "routing"}, keep=2)
    assert ck.restore_latest(_abstract(), on_config_change="start_fresh") == (None, None, None)
    for s in (1, 2, 3, 4):  # the new run's keep-2 cleanup runs over its own steps only
        ck.save(s, _state(10.0 + s), force=True)
    ck.close()
    assert ck.steps() == [3, 4]
    assert _set_aside(tmp_path) == ["1-config-changed", "2-config-changed"]
    aside = _set_aside(tmp_path, stamps=True)
    reason = (tmp_path / "checkpoints.set_aside" / aside[1] / "REASON.txt").read_text()
    assert "config.model.attention.kind='mha' there, config.model.attention.kind='routing' here" in reason


def test_load_weights_takes_matching_shapes_and_reports_the_rest(tmp_path):
    ckdir = tmp_path / "checkpoints"
    _write(ckdir, [3])
    ck = _checkpointer(ckdir, MEANING | {"model.ffn_activation": "gelu"})
    wider = {"params": {"w": jax.ShapeDtypeStruct((4, 8), jnp.float32), "b": jax.ShapeDtypeStruct((9,), jnp.float32)}}
    step, state, weights = ck.restore_latest({**_abstract(), **wider}, on_config_change="load_weights")
    assert (step, state) == (None, None)
    assert weights["step"] == 3 and weights["loaded"] == ["w"]
    np.testing.assert_array_equal(weights["values"]["w"], np.full((4, 8), 3.0))
    assert weights["fresh"] == ["b (shape (8,) there, (9,) here)"]
    assert ck.steps() == [] and len(_set_aside(tmp_path)) == 1


@pytest.mark.slow  # trains the tiny LM three times (~30 s): CI runs it
def test_trainer_refuses_another_ffn_activation_then_load_weights_resumes_the_weights(tmp_path):
    first = Trainer(tiny_lm_experiment(steps=2), str(tmp_path), peak_gflops=1.0, verbose=False).train()
    old_embed = np.asarray(jax.tree.leaves(first["state"]["params"])[0])
    cfg = tiny_lm_experiment(steps=2)
    cfg.model.ffn_activation = "gelu" if cfg.model.ffn_activation != "gelu" else "silu"
    with pytest.raises(IncompatibleCheckpointError, match=r"config\.model\.ffn_activation="):
        Trainer(cfg, str(tmp_path), peak_gflops=1.0, verbose=False).train()  # before: resumed silently
    trainer = Trainer(cfg, str(tmp_path), peak_gflops=1.0, verbose=False, on_config_change="load_weights")
    state = trainer.restore_or_init()
    assert int(state["step"]) == 0
    np.testing.assert_array_equal(np.asarray(jax.tree.leaves(state["params"])[0]), old_embed)
    old, new = jax.tree.leaves(first["state"]["params"]), jax.tree.leaves(state["params"])
    assert all(np.array_equal(a, b) for a, b in zip(old, new))  # same shapes: every array loaded
    assert _set_aside(tmp_path) == ["2-config-changed"]


# ---- case 3: NaN / overflow never checkpointed ---------------------------------------------------------


@pytest.mark.slow  # trains the tiny LM twice (~20 s): CI runs it
def test_overflowing_update_is_not_checkpointed_and_message_names_true_last_good(tmp_path):
    # lr 3.4e38 (just under float32 max): one AdamW step of lr * (+-1 + weight_decay * w) overflows some weights
    # to inf while that step's loss and gradient are finite.
    boom = dict(learning_rate=3.4e38, warmup_steps=0, checkpoint_every=1)
    with pytest.raises(
        NonFiniteLossError,
        match=r"parameters became non-finite .* at step 1; .*No checkpoint was written",
    ):
        Trainer(tiny_lm_experiment(steps=3, **boom), str(tmp_path / "none"), peak_gflops=1.0, verbose=False).train()
    assert not os.listdir(tmp_path / "none" / "checkpoints")

    # After 2 good steps the same learning rate first leaves finite but huge weights, then non-finite values:
    # whatever step that happens at, every checkpoint left on disk is finite and the newest is the one named.
    Trainer(tiny_lm_experiment(steps=2), str(tmp_path / "good"), peak_gflops=1.0, verbose=False).train()
    trainer = Trainer(tiny_lm_experiment(steps=8, **boom), str(tmp_path / "good"), peak_gflops=1.0, verbose=False)
    with pytest.raises(NonFiniteLossError, match=r"The last good checkpoint \(step (\d+)\) is intact") as err:
        trainer.train()
    trainer.checkpointer.wait()
    named = int(re.search(r"last good checkpoint \(step (\d+)\)", str(err.value)).group(1))
    steps = trainer.checkpointer.steps()
    assert steps[-1] == named >= 2
    abstract = abstract_like(trainer.abstract_state, trainer.state_shardings)
    for step in steps:
        assert all_finite(trainer.checkpointer._restore(step, abstract)), f"checkpoint {step} is not finite"


# ---- case 5 and the fewer-steps probe: nothing silently done -------------------------------------------


def test_eval_without_checkpoint_is_an_error_not_random_weights(tmp_path):
    trainer = Trainer(tiny_lm_experiment(), str(tmp_path), peak_gflops=1.0, verbose=False)
    with pytest.raises(CheckpointError, match=r"no usable checkpoint in .*train first"):
        trainer.restore_or_init(require_checkpoint=True)


@pytest.mark.slow  # trains the tiny LM (~10 s): CI runs it
def test_rerun_with_fewer_steps_than_the_checkpoint_is_an_error(tmp_path):
    Trainer(tiny_lm_experiment(steps=4), str(tmp_path), peak_gflops=1.0, verbose=False).train()
    with pytest.raises(CheckpointError, match=r"at step 4, past the config\.train\.steps=2: nothing to train"):
        Trainer(tiny_lm_experiment(steps=2), str(tmp_path), peak_gflops=1.0, verbose=False).train()


def test_meaning_leaves_out_what_may_change_on_resume():
    cfg = tiny_lm_experiment()
    before = meaning(cfg)
    cfg.train.update(steps=1000, learning_rate=1e-4, log_every=7)
    cfg.data.update(eval_batch_size=4, max_eval_batches=9)
    cfg.mesh.update(data=2)
    assert meaning(cfg) == before
    assert before["model.d_model"] == 64 and before["data.seq_len"] == 32 and before["train.task"] == "lm"
    cfg.data.seq_len = 64
    assert config_diff(before, meaning(cfg)) == ["config.data.seq_len=32 there, config.data.seq_len=64 here"]
