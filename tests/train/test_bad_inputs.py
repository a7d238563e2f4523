"""Every bad input stops early with one message naming the key or path, the value and what is allowed."""

import subprocess
import sys

import jax
import numpy as np
import pytest

from effitrans.config_validation import ConfigError, validate_config
from effitrans.train.checkpoints import IncompatibleCheckpointError
from effitrans.train.trainer import NonFiniteLossError, Trainer
from tests.helpers import ROOT, subprocess_env, tiny_lm_experiment


def test_unknown_config_key_in_file():
    cfg = tiny_lm_experiment()
    with cfg.model.unlocked():
        cfg.model.num_head = 4
    with pytest.raises(ConfigError, match=r"config\.model\.num_head is not a known config key"):
        validate_config(cfg)


def test_unknown_config_key_on_command_line():
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "effitrans.main",
            "--config=configs/lm_tiny.py",
            "--workdir=/tmp/x",
            "--config.model.num_kv_head=2",
        ],
        cwd=ROOT,
        env=subprocess_env(),
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2  # a user error: one line, exit code 2
    assert "--config.model.num_kv_head=2" in out.stderr and "does not exist" in out.stderr
    assert "Traceback" not in out.stderr


def test_heads_not_divisible_by_kv_heads():
    cfg = tiny_lm_experiment()
    cfg.model.num_kv_heads = 3
    with pytest.raises(
        ConfigError,
        match=r"config\.model\.num_kv_heads=3 must divide config\.model\.num_heads=4 "
        r"\(allowed: \[1, 2, 4\]\)",
    ):
        validate_config(cfg)


def test_bad_values_name_key_and_allowed_set():
    cfg = tiny_lm_experiment()
    cfg.model.attention.impl = "cuda"
    with pytest.raises(
        ConfigError,
        match=r"config\.model\.attention\.impl='cuda' is not allowed: expected one of "
        r"\['reference', 'xla', 'pallas', 'cudnn', 'auto'\]",
    ):
        validate_config(cfg)
    cfg = tiny_lm_experiment()
    cfg.model.attention.block_q = 12
    with pytest.raises(ConfigError, match=r"block_q=12 .* positive multiple of 8"):
        validate_config(cfg)


def test_batch_not_divisible_by_data_parallel():
    cfg = tiny_lm_experiment(batch_size=6)
    cfg.mesh.data, cfg.mesh.fsdp = 2, 2
    with pytest.raises(ConfigError, match=r"config\.train\.batch_size=6 .* data x fsdp = 4"):
        validate_config(cfg, num_devices=8)


def test_mesh_larger_than_devices():
    cfg = tiny_lm_experiment(batch_size=16)
    cfg.mesh.data = 16
    with pytest.raises(ConfigError, match=r"= 16 devices, but only 8 are available"):
        validate_config(cfg, num_devices=8)


def test_corpus_path_without_text(tmp_path):
    (tmp_path / "notes.bin").write_bytes(b"")
    cfg = tiny_lm_experiment()
    cfg.data.corpus_path = str(tmp_path)
    with pytest.raises(ValueError, match=str(tmp_path)):
        Trainer(cfg, str(tmp_path / "work"), peak_gflops=1.0, verbose=False)


@pytest.mark.slow  # >= 8 s on 2 cores: CI runs it (keeps the default run under 10 min)
def test_checkpoint_from_incompatible_config(tmp_path):
    Trainer(tiny_lm_experiment(steps=2), str(tmp_path), peak_gflops=1.0, verbose=False).train()
    cfg = tiny_lm_experiment(steps=4)
    cfg.model.ffn_width = 96
    trainer = Trainer(cfg, str(tmp_path), peak_gflops=1.0, verbose=False)
    with pytest.raises(IncompatibleCheckpointError, match=r"config\.model\.ffn_width=128.*config\.model\.ffn_width=96"):
        trainer.train()


@pytest.mark.slow  # >= 8 s on 2 cores: CI runs it (keeps the default run under 10 min)
def test_nan_loss_stops_with_step_and_keeps_last_good_checkpoint(tmp_path):
    trainer = Trainer(tiny_lm_experiment(steps=6, checkpoint_every=2), str(tmp_path), peak_gflops=1.0, verbose=False)
    clean = trainer.dataset.get_batch

    def poisoned(step, **kw):
        batch = clean(step, **kw)
        if step == 4:  # the 5th update sees a NaN weight -> NaN loss
            batch["weights"] = batch["weights"] * np.nan
        return batch

    trainer.dataset.get_batch = poisoned
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 5; .*last good checkpoint \(step 4\)"):
        trainer.train()
    trainer.checkpointer.wait()
    assert trainer.checkpointer.steps()[-1] == 4
    fresh = Trainer(tiny_lm_experiment(steps=6, checkpoint_every=2), str(tmp_path), peak_gflops=1.0, verbose=False)
    state = fresh.restore_or_init()
    assert int(state["step"]) == 4
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state["params"]))
