"""Whole-expert pruning: calibration statistics against a direct count, the sliced model against the full
model with the dropped experts' selection bias at -inf, the per-layer expert counts in the config (rebuild and
save/load round trip), and the errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from effitrans import defaults
from effitrans.layers.moe import expert_counts
from effitrans.pruning import (
    drop_experts,
    expert_importance,
    expert_statistics,
    keep_experts,
    load_pruned,
    moe_ffns,
    save_pruned,
)
from effitrans.registry import build_model, validate_model_config
from tests.helpers import tiny_model_config


def _moe_lm(gating="softmax"):
    cfg = tiny_model_config(num_layers=3)
    cfg.moe = defaults.moe(layers=[1, 2], num_experts=6, expert_width=8, top_k=2, num_shared_experts=1, gating=gating)
    return build_model(cfg, seed=0), cfg


@pytest.mark.slow  # 25-50 s of eager model builds and compiles (softmax adds the orbax round trip); CI runs it
@pytest.mark.parametrize("gating", ["softmax", "sigmoid"])
def test_dropping_experts_equals_the_full_model_that_never_selects_them(gating, tmp_path):
    model, cfg = _moe_lm(gating)
    tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, cfg.vocab_size)
    batches = [{"inputs": tokens}]
    stats = expert_statistics(model, batches)
    assert len(stats) == 2 and all(int(s["tokens"]) == 24 for s in stats)
    for s in stats:
        assert int(s["load"].sum()) == 24 * 2 and (s["output_norm"] >= 0).all()
    # layer 1's load equals a direct count of the router's choices on that layer's input
    block = model.blocks[1]
    x = model.stack.embed(tokens)
    x, _ = model.blocks[0](x, positions=jnp.broadcast_to(jnp.arange(12), tokens.shape))
    h, _ = block.attn(block.attn_norm(x), positions=jnp.broadcast_to(jnp.arange(12), tokens.shape))
    r = block.ffn.routing(block.ffn_norm(x + h).reshape(-1, cfg.d_model))
    np.testing.assert_array_equal(stats[0]["load"], expert_counts(r.experts, 6))

    keep = keep_experts(expert_importance(stats, "output_norm"), drop=[2, 1])
    assert [int(k.sum()) for k in keep] == [4, 5]
    small, small_cfg = drop_experts(model, cfg, keep)
    assert list(small_cfg.moe.num_experts) == [4, 5] and cfg.moe.num_experts == 6
    validate_model_config(small_cfg)
    assert [f.gate.shape[0] for _, f in moe_ffns(small)] == [4, 5] and small.blocks[1].ffn.router.shape == (32, 4)

    reference = nnx.clone(model)  # the full model, dropped experts never selected
    for (_, f), k in zip(moe_ffns(reference), keep):
        f.selection_bias.set_value(jnp.where(jnp.asarray(k), 0.0, -1e9))
    np.testing.assert_allclose(small(tokens)[0], reference(tokens)[0], rtol=1e-5, atol=1e-5)

    rebuilt = build_model(small_cfg, seed=3)  # the config rebuilds the sliced shapes
    shapes = lambda m: [x.shape for x in jax.tree.leaves(nnx.to_pure_dict(nnx.state(m, nnx.Param)))]
    assert shapes(rebuilt) == shapes(small)
    if gating == "softmax":  # the sliced model round-trips through save_pruned / load_pruned
        loaded, loaded_cfg = load_pruned(save_pruned(str(tmp_path / "p"), small, small_cfg))
        assert list(loaded_cfg.moe.num_experts) == [4, 5]
        np.testing.assert_allclose(loaded(tokens)[0], small(tokens)[0], rtol=1e-6, atol=1e-6)


def test_expert_pruning_errors_name_the_value_and_what_is_allowed():
    model, cfg = _moe_lm()
    scores = [np.arange(6.0), np.arange(6.0)]
    with pytest.raises(
        ValueError, match=r"drop=6 is not allowed for a layer of 6 experts: expected an int in \[0, 6\)"
    ):
        keep_experts(scores, drop=6)
    with pytest.raises(ValueError, match=r"cannot keep 1 of the 6 experts of layer 1: top_k=2 is not allowed"):
        drop_experts(model, cfg, keep_experts(scores, drop=[5, 0]))
    with pytest.raises(ValueError, match=r"criterion='size' is not one of"):
        expert_importance([], "size")
    with pytest.raises(ValueError, match=r"has no mixture-of-experts feed-forward to prune"):
        moe_ffns(build_model(tiny_model_config(), seed=0))
    bad = cfg.copy_and_resolve_references()
    with bad.unlocked():
        del bad.moe["num_experts"]
        bad.moe.num_experts = [6, 6, 6]
    from effitrans.schema import ConfigError

    with pytest.raises(ConfigError, match=r"moe\.num_experts=\[6, 6, 6\] has 3 entries for 2 MoE layers"):
        validate_model_config(bad)
