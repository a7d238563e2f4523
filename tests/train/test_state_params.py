"""Non-gradient parameters (StateParam) through the Trainer: LSH rotations stay exactly fixed (no weight
decay, no Adam update) and routing centroids carry their EMA update from one step to the next."""

import jax
import numpy as np
import pytest

from effitrans.train.trainer import Trainer
from tests.helpers import tiny_lm_experiment


def _leaves_named(tree, name):
    return [x for p, x in jax.tree_util.tree_leaves_with_path(tree) if name in jax.tree_util.keystr(p)]


@pytest.mark.slow  # two short trainings; CI runs it
@pytest.mark.parametrize("kind,name,should_change", [("lsh", "rotations", False), ("routing", "centroids", True)])
def test_state_params_are_not_trained_by_the_optimizer(kind, name, should_change, tmp_path):
    cfg = tiny_lm_experiment(weight_decay=0.5)
    cfg.model.attention.kind = kind
    cfg.model.num_kv_heads = cfg.model.num_heads  # these families have no GQA
    trainer = Trainer(cfg, str(tmp_path), peak_gflops=1.0, verbose=False)
    state = trainer.init_state()
    before = [np.asarray(x) for x in _leaves_named(state["params"], name)]
    assert before, f"no {name} in the {kind} model"
    for step in range(2):
        state, metrics = trainer.train_step(state, step)
    after = [np.asarray(x) for x in _leaves_named(state["params"], name)]
    if should_change:
        assert not all(np.array_equal(a, b) for a, b in zip(after, before))
        # EMA of unit-norm features, not weight decay towards zero.
        assert all(np.linalg.norm(a) > 0.5 * np.linalg.norm(b) for a, b in zip(after, before))
    else:
        assert all(np.array_equal(a, b) for a, b in zip(after, before))
    assert np.isfinite(float(metrics["loss"]))
