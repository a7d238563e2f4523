"""Non-trainable state (StateVariable): LSH rotations and routing centroids are outside every optimizer over
nnx.Param (a host project's `nnx.Optimizer(wrt=nnx.Param)` and the Trainer's), a forward pass and
`Trainer.evaluate` never change them, the Trainer's train steps carry the centroids' EMA step (rotations
stay exactly fixed: no weight decay, no Adam update), and a checkpoint round-trip keeps them."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from effitrans.layers.params import StateVariable, commit_updates
from effitrans.registry import build_model
from effitrans.train.trainer import Trainer
from tests.helpers import tiny_lm_experiment, tiny_model_config

STATE_OF = {"lsh": "rotations", "routing": "centroids"}


def _leaves_named(tree, name):
    return [x for p, x in jax.tree_util.tree_leaves_with_path(tree) if name in jax.tree_util.keystr(p)]


def _copy(tree):
    return jax.tree.map(lambda x: np.array(x), tree)


def _lm_trainer(kind, tmp_path, **train):
    cfg = tiny_lm_experiment(**train)
    cfg.model.attention.kind = kind
    cfg.model.num_kv_heads = cfg.model.num_heads  # these families have no GQA
    return Trainer(cfg, str(tmp_path), peak_gflops=1.0, verbose=False)


@pytest.mark.slow  # builds and compiles two models (~30 s); CI runs it
@pytest.mark.parametrize("kind", ["lsh", "routing"])
def test_optimizer_over_params_leaves_state_untouched(kind):
    model = build_model(tiny_model_config(num_layers=1, num_kv_heads=4, attention=dict(kind=kind)))
    tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, 61)
    state_before = _copy(nnx.to_pure_dict(nnx.state(model, StateVariable)))
    params_before = _copy(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    assert _leaves_named(state_before, STATE_OF[kind]), f"no {STATE_OF[kind]} in the {kind} model"
    assert not _leaves_named(params_before, STATE_OF[kind])  # not a Param
    opt = nnx.Optimizer(model, optax.adamw(1e-2, weight_decay=0.5), wrt=nnx.Param)
    assert not _leaves_named(nnx.to_pure_dict(nnx.state(opt.opt_state)), STATE_OF[kind])  # no Adam moments

    def loss(m):
        logits, _ = m(tokens)
        return jnp.mean(jax.nn.logsumexp(logits, axis=-1))

    @nnx.jit  # one compilation; eager dispatch of these families' ops is slow
    def step(model, opt):
        opt.update(model, nnx.grad(loss)(model))

    for _ in range(3):
        step(model, opt)
    np.testing.assert_equal(nnx.to_pure_dict(nnx.state(model, StateVariable)), state_before)
    after = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(params_before)))


@pytest.mark.slow  # ~11 s on 2 cores; CI runs it
def test_forward_pass_leaves_centroids_unchanged_until_committed():
    model = build_model(tiny_model_config(num_kv_heads=4, attention=dict(kind="routing")))
    tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, 61)
    before = _copy(nnx.to_pure_dict(nnx.state(model, StateVariable)))
    forward = nnx.jit(lambda m, t: m(t)[0])  # a jitted forward writes back what it changes, like an eager one
    first = forward(model, tokens)
    second = forward(model, tokens)
    np.testing.assert_equal(nnx.to_pure_dict(nnx.state(model, StateVariable)), before)
    np.testing.assert_array_equal(np.asarray(first), np.asarray(second))
    assert commit_updates(model) == 2  # one per layer
    after = nnx.to_pure_dict(nnx.state(model, StateVariable))
    assert all(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(before)))


@pytest.mark.slow  # two short trainings; CI runs it
@pytest.mark.parametrize("kind,name,should_change", [("lsh", "rotations", False), ("routing", "centroids", True)])
def test_state_params_are_not_trained_by_the_optimizer(kind, name, should_change, tmp_path):
    trainer = _lm_trainer(kind, tmp_path, weight_decay=0.5)
    state = trainer.init_state()
    before = [np.asarray(x) for x in _leaves_named(state["model_state"], name)]
    assert before, f"no {name} in the {kind} model"
    assert not _leaves_named(state["params"], name) and not _leaves_named(state["opt_state"], name)
    for step in range(2):
        state, metrics = trainer.train_step(state, step)
    after = [np.asarray(x) for x in _leaves_named(state["model_state"], name)]
    if should_change:
        assert not all(np.array_equal(a, b) for a, b in zip(after, before))
        # EMA of unit-norm features, not weight decay towards zero.
        assert all(np.linalg.norm(a) > 0.5 * np.linalg.norm(b) for a, b in zip(after, before))
    else:
        assert all(np.array_equal(a, b) for a, b in zip(after, before))
    assert np.isfinite(float(metrics["loss"]))


@pytest.mark.slow  # a short training and a restore; CI runs it
def test_evaluate_leaves_centroids_and_checkpoint_keeps_them(tmp_path):
    trainer = _lm_trainer("routing", tmp_path, steps=2, checkpoint_every=2)
    state = trainer.train()["state"]
    trained = _copy(state["model_state"])
    with pytest.raises(ValueError, match="model_state"):
        trainer.evaluate(state["params"])  # the centroids must be given
    first = trainer.evaluate(state["params"], state["model_state"])
    assert trainer.evaluate(state["params"], state["model_state"]) == first  # eval did not move them
    np.testing.assert_equal(_copy(state["model_state"]), trained)
    init = _copy(trainer.init_state()["model_state"])
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(trained), jax.tree.leaves(init)))
    restored = _lm_trainer("routing", tmp_path, steps=2, checkpoint_every=2).restore_or_init()
    assert int(restored["step"]) == 2
    np.testing.assert_equal(_copy(restored["model_state"]), trained)
