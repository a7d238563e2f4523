"""A funnel around an MoE encoder: stride-1 surgery equals the unfunnelled model, pooled padding routes to no
expert (and takes no capacity slot), the FLOP model counts the active experts at the pooled lengths, and
recovery carries the experts' selection bias."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effitrans import defaults, funnel, perf
from effitrans.pruning import expert_statistics
from effitrans.registry import build_model
from tests.helpers import tiny_model_config


def _embedding_cfg(**kw):
    kw = {"name": "encoder_embedding", "pooling": "mean", "embed_dim": 16, "num_layers": 3, **kw}
    return tiny_model_config(attention={"impl": "reference"}, **kw)


def _moe_embedding_cfg(**moe):
    cfg = _embedding_cfg()
    cfg.moe = defaults.moe(
        **{"layers": [1, 2], "num_experts": 4, "expert_width": 8, "top_k": 2, "num_shared_experts": 1, **moe}
    )
    return cfg


def _batch(seed=0, lengths=(13, 9, 3), t=13):
    """Real lengths are CLS + an even count, so no stride-2 window mixes real and padding tokens."""
    rng = np.random.default_rng(seed)
    tokens = jnp.asarray(rng.integers(1, 61, size=(len(lengths), t)), jnp.int32)
    mask = jnp.asarray(np.arange(t)[None, :] < np.array(lengths)[:, None], jnp.int32)
    return tokens, mask


def _embed(model, tokens, mask):
    return np.asarray(model(tokens, mask))  # eager: quicker than compiling a tiny model


class _Recorder:
    """A block that returns its input and records the token_mask it was given."""

    def __init__(self, seen):
        self.seen = seen

    def __call__(self, x, *, token_mask, **kw):
        self.seen.append(np.asarray(token_mask))
        return x, None


class _Stack:
    def __init__(self, n):
        self.seen = []
        self.blocks = [_Recorder(self.seen) for _ in range(n)]

    def embed(self, tokens):
        return jnp.zeros((*tokens.shape, 4))  # [B, T, D]


def test_every_block_gets_the_pooled_sequences_token_mask():
    # What an MoE layer routes: real tokens at full length, then pooled tokens covering any real token.
    stack = _Stack(3)
    tokens, mask = _batch()
    funnel.funnel_forward(stack, funnel.surgery_spec(3, at_layer=1, stride=2), tokens, mask)
    full, pooled1, pooled2 = stack.seen
    np.testing.assert_array_equal(full, np.asarray(mask) > 0)
    # CLS kept apart, then windows of 2: rows of 13, 9 and 3 real tokens cover 7, 5 and 2 pooled tokens.
    assert pooled1.shape == (3, 7) and pooled1.sum(1).tolist() == [7, 5, 2]
    np.testing.assert_array_equal(pooled1[:, :2], True)
    np.testing.assert_array_equal(pooled2, pooled1)


@pytest.fixture(scope="module")
def capacity_model():
    """Capacity dispatch at factor 0.5 drops assignments: a routed padding token would take slots from real
    ones, so the real tokens' outputs would depend on what the padding holds. One build for the module."""
    return build_model(_moe_embedding_cfg(dispatch="capacity", capacity_factor=0.5), seed=0)


@pytest.mark.slow  # a tiny MoE built and run eagerly (~1 min on 2 shared cores): CI runs it
def test_stride1_surgery_on_an_moe_encoder_equals_the_unfunnelled_model(capacity_model):
    model = capacity_model
    tokens, mask = _batch()
    want = _embed(model, tokens, mask)
    got = _embed(funnel.insert(model, at_layer=1, stride=1), tokens, mask)  # MoE layers 1, 2 in the funnel
    np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.slow  # ~1 min on 2 shared cores (test_every_block_gets_... is the fast representative)
def test_pooled_padding_reaches_no_expert_and_takes_no_capacity_slot(capacity_model):
    fmodel = funnel.insert(capacity_model, at_layer=1, stride=2)  # both MoE layers (1, 2) run pooled
    tokens, mask = _batch()
    other = jnp.where(mask > 0, tokens, (tokens * 7 + 3) % 60 + 1)  # same real tokens, other padding
    assert not np.array_equal(np.asarray(other), np.asarray(tokens))
    np.testing.assert_allclose(_embed(fmodel, other, mask), _embed(fmodel, tokens, mask), atol=1e-6)

    stats = expert_statistics(
        fmodel, [{"tokens": tokens, "mask": mask}], forward=lambda m, b: m(b["tokens"], b["mask"])
    )
    # Pooled real tokens: CLS + ceil(12/2), CLS + 8/2, CLS + 2/2 = 7 + 5 + 2 (unpooled: 13 + 9 + 3 = 25).
    assert [int(s["tokens"]) for s in stats] == [14, 14]
    assert [int(s["load"].sum()) for s in stats] == [14 * 2, 14 * 2]  # top-2 each


def test_flop_model_counts_active_experts_at_the_pooled_lengths():
    moe = _moe_embedding_cfg(expert_width=8, top_k=2, num_shared_experts=1)  # 3 x 8 = 24 active neurons
    moe.ffn_width = 24
    dense = _embedding_cfg(ffn_width=24)
    fm, fd = (funnel.funnel_config(c, at_layer=1, stride=2) for c in (moe, dense))
    spec = funnel.spec_from_config(fm)
    pooled = spec.pooled_lengths(16)[1]  # layers 1 and 2 run pooled
    assert pooled == 9
    router = 2 * 4 * pooled * 32 * 4 * 2  # 2 x batch x T' x D x E, in MoE layers 1 and 2
    assert perf.forward_flops(fm, 4, 16, spec) == perf.forward_flops(fd, 4, 16, spec) + router
    assert perf.forward_flops(fm, 4, 16, spec) < perf.forward_flops(moe, 4, 16)


@pytest.mark.slow  # two tiny MoE Trainers compiled (~1-4 min on 2 shared cores): CI runs it
def test_recovery_carries_and_updates_the_moe_selection_bias(tmp_path):
    from effitrans.funnel import recovery
    from effitrans.train.trainer import Trainer
    from tests.helpers import shipped_config

    cfg = shipped_config("moe_encoder_retrieval_small")
    cfg.model.update(num_layers=2, d_model=32, num_heads=2, num_kv_heads=2, head_dim=16, ffn_width=48, embed_dim=16)
    cfg.model.moe.update(layers=[1], expert_width=8, bias_update_rate=0.01)
    cfg.model.attention.impl = "reference"
    cfg.data.query_len = cfg.data.doc_len = 16
    cfg.data.max_eval_examples = 16
    cfg.train.update(batch_size=8, steps=3, warmup_steps=1, log_every=1)
    dense = Trainer(cfg, str(tmp_path / "dense"), peak_gflops=1.0, verbose=False)
    state = dense.init_state()
    fcfg = cfg.copy_and_resolve_references()
    fcfg.model = funnel.funnel_config(cfg.model, at_layer=1, stride=2)
    student = Trainer(fcfg, str(tmp_path / "funnel"), peak_gflops=1.0, verbose=False)
    with pytest.raises(ValueError, match="non-trainable state"):
        recovery.recover(student, state["params"], 1)
    params, model_state, metrics = recovery.recover(student, state["params"], 3, model_state=state["model_state"])
    assert np.isfinite(metrics["loss"])
    bias0 = jax.tree.leaves(state["model_state"])
    bias1 = jax.tree.leaves(model_state)
    assert len(bias1) == 1 and bias1[0].shape == (8,)
    assert not np.array_equal(np.asarray(bias0[0]), np.asarray(bias1[0]))  # the funnel's loads moved it
    q, d = student.eval_embeddings(params, model_state)
    assert q.shape == (16, 16) and np.isfinite(q).all() and np.isfinite(d).all()
