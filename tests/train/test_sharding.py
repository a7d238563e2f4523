"""Mesh data=2, fsdp=2, tensor=2 on 8 fake CPU devices gives the losses of one device, with params sharded."""

import jax
import numpy as np
import pytest

from effitrans.train.trainer import Trainer
from tests.helpers import tiny_lm_experiment


def _losses(cfg, workdir, steps=3):
    trainer = Trainer(cfg, str(workdir), peak_gflops=1.0, verbose=False)
    state = trainer.init_state()
    losses = []
    for step in range(steps):
        state, metrics = trainer.train_step(state, step)
        losses.append(float(metrics["loss"]))
    return trainer, state, losses


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices: see tests/conftest.py")
@pytest.mark.slow  # >= 8 s on 2 cores: CI runs it (keeps the default run under 10 min)
def test_3d_mesh_matches_single_device_and_shards_params(tmp_path):
    single = tiny_lm_experiment()
    _, _, want = _losses(single, tmp_path / "one")

    cfg = tiny_lm_experiment()
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 2, 2, 2
    trainer, state, got = _losses(cfg, tmp_path / "mesh")
    np.testing.assert_allclose(got, want, atol=1e-5)

    params = state["params"]["stack"]
    block = params["blocks"][0]
    # rules: embed -> fsdp, heads/kv_heads/mlp -> tensor (effitrans.train.schema.DEFAULT_RULES)
    expect = {
        "gate": (("fsdp", "tensor"), (64 // 2, 128 // 2)),
        "down": (("tensor", "fsdp"), (128 // 2, 64 // 2)),
    }
    for name, (spec, shard_shape) in expect.items():
        arr = block["ffn"][name]
        assert tuple(arr.sharding.spec) == spec, name
        assert arr.addressable_shards[0].data.shape == shard_shape, name
    q = block["attn"]["q"]  # [D, N, H]: (embed, heads, None)
    assert tuple(q.sharding.spec)[:2] == ("fsdp", "tensor")
    assert q.addressable_shards[0].data.shape == (32, 2, 16)
    k = block["attn"]["k"]  # 2 kv heads split over tensor=2
    assert k.addressable_shards[0].data.shape == (32, 1, 16)
    # vocab=261 is not divisible by tensor=2: that dim is replicated, embed still split over fsdp.
    table = params["embed"]["table"]
    assert tuple(table.sharding.spec) == (None, "fsdp")
    # Adam moments follow their parameters.
    mu = state["opt_state"][1][0].mu["stack"]["blocks"][0]["ffn"]["gate"]
    assert tuple(mu.sharding.spec) == ("fsdp", "tensor")


@pytest.mark.slow  # > 10 s on 2 cores; CI runs it
def test_grad_accumulation_equals_full_batch(tmp_path):
    _, _, want = _losses(tiny_lm_experiment(), tmp_path / "full", steps=2)
    _, _, got = _losses(tiny_lm_experiment(grad_accum_steps=4), tmp_path / "accum", steps=2)
    np.testing.assert_allclose(got, want, atol=1e-5)
