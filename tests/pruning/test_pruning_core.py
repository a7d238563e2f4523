"""Pruning logic on tiny random models: importance, masks, sliced == masked, checkpoints, recovery,
MatFormer extraction, bad inputs."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from effitrans import pruning
from effitrans.registry import build_model
from tests.helpers import tiny_model_config

WIDTHS = [48, 40]


def _model(widths=WIDTHS, seed=0):
    cfg = tiny_model_config(ffn_width=list(widths))
    return build_model(cfg, seed=seed), cfg


@nnx.jit
def _logits(model, tokens):
    return model(tokens)[0]


@nnx.jit
def _masked(model, tokens, masks):
    return pruning.masked_forward(model, tokens, masks)


def _tokens(n=3, t=12, vocab=61, seed=1):
    return np.random.default_rng(seed).integers(0, vocab, size=(n, t)).astype(np.int32)


def test_masked_forward_without_masks_equals_model():
    model, _ = _model()
    tok = jnp.asarray(_tokens())
    ref = _logits(model, tok)
    np.testing.assert_allclose(np.asarray(_masked(model, tok, None)), np.asarray(ref), atol=1e-5)


@pytest.mark.parametrize("criterion", [c for c in pruning.CRITERIA if c != "random"])
def test_zero_down_row_has_zero_importance(criterion):
    model, _ = _model()
    model.blocks[0].ffn.down[...] = model.blocks[0].ffn.down[...].at[5].set(0.0)
    model.blocks[1].ffn.down[...] = model.blocks[1].ffn.down[...].at[0].set(0.0)
    scores = pruning.neuron_importance(model, _tokens(), criterion, batch_size=2)
    assert [s.shape for s in scores] == [(48,), (40,)]
    assert scores[0][5] == 0.0 and scores[1][0] == 0.0
    assert (np.delete(scores[0], 5) > 0).all()


def test_rmax_matches_definition():
    """r_max(h) = max over tokens of ||a_h(x) W_down[h, :]||_2, computed here the slow way."""
    model, _ = _model()
    tok = _tokens(n=2, t=8)
    scores = pruning.neuron_importance(model, tok, "rmax", batch_size=1)
    _, acts = nnx.jit(lambda m, t: pruning.masked_forward(m, t, return_acts=True))(model, jnp.asarray(tok))
    for layer, (a, s) in enumerate(zip(acts, scores)):
        down = np.asarray(model.blocks[layer].ffn.down[...])  # [F, D]
        contrib = np.asarray(a)[..., :, None] * down[None, None]  # [B, T, F, D]
        expect = np.linalg.norm(contrib, axis=-1).max(axis=(0, 1))
        np.testing.assert_allclose(s, expect, rtol=1e-5, atol=1e-7)


def test_taylor_matches_finite_difference():
    """Zeroing a neuron changes the loss by about -a.dL/da (first order); the score is its magnitude."""
    model, _ = _model(widths=[16, 16])
    tok = _tokens(n=1, t=10)
    scores = pruning.neuron_importance(model, tok, "taylor", batch_size=1)
    import optax

    def loss(masks):
        logits = _masked(model, jnp.asarray(tok[:, :-1]), [jnp.asarray(m) for m in masks])
        return float(optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(tok[:, 1:])).mean())

    ones = [np.ones(16, np.float32), np.ones(16, np.float32)]
    eps = 0.05
    for h in (0, 7):
        lo, hi = [x.copy() for x in ones], [x.copy() for x in ones]
        lo[1][h], hi[1][h] = 1 - eps, 1 + eps
        fd = (loss(hi) - loss(lo)) / (2 * eps)  # central difference: d loss / d mask_h
        np.testing.assert_allclose(scores[1][h], abs(fd), rtol=5e-2, atol=2e-5)


def test_keep_masks_layer_and_global():
    scores = [np.arange(10.0), np.arange(10.0) + 100]
    keep = pruning.keep_masks(scores, 0.3)
    assert [k.sum() for k in keep] == [7, 7] and not keep[0][:3].any() and keep[0][3:].all()
    keep = pruning.keep_masks(scores, 0.5, scope="global")
    # 10 of 20 removed: layer 0 keeps only its best neuron, so the tenth comes from layer 1.
    assert keep[0].sum() == 1 and keep[0][9] and keep[1].sum() == 9 and not keep[1][0]
    assert all(k.all() for k in pruning.keep_masks(scores, 0.0))


@pytest.mark.slow  # >= 8 s on 2 cores: CI runs it (keeps the default run under 10 min)
def test_sliced_equals_masked_and_is_smaller():
    model, cfg = _model()
    tok = jnp.asarray(_tokens())
    scores = pruning.neuron_importance(model, np.asarray(tok), "rmax")
    keep = pruning.keep_masks(scores, 0.4)
    masked = pruning.mask_model(model, keep)
    small, small_cfg = pruning.slice_model(model, cfg, keep)
    assert small_cfg.ffn_width == [29, 24] and cfg.ffn_width == WIDTHS
    assert [b.ffn.width for b in small.blocks] == [29, 24] and [b.ffn.width for b in model.blocks] == WIDTHS
    a = _logits(masked, tok)
    b = _logits(small, tok)
    c = _masked(model, tok, [jnp.asarray(k, jnp.float32) for k in keep])
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5)
    np.testing.assert_allclose(np.asarray(c), np.asarray(a), atol=1e-5)
    assert pruning.num_params(small) == pruning.num_params(model) - 3 * 32 * (19 + 16)
    # Decoding with the KV cache works on the sliced model.
    from effitrans.serve.generate import generate

    out = generate(small, tok[:1, :4], max_new_tokens=3)
    assert out.shape == (1, 7)


def test_pruned_model_checkpoint_round_trip(tmp_path):
    model, cfg = _model()
    keep = pruning.keep_masks(pruning.neuron_importance(model, None, "magnitude"), 0.25)
    small, small_cfg = pruning.slice_model(model, cfg, keep)
    pruning.save_pruned(str(tmp_path / "pruned"), small, small_cfg)
    loaded, loaded_cfg = pruning.load_pruned(str(tmp_path / "pruned"))
    assert list(loaded_cfg.ffn_width) == small_cfg.ffn_width
    tok = jnp.asarray(_tokens())
    np.testing.assert_array_equal(np.asarray(_logits(loaded, tok)), np.asarray(_logits(small, tok)))


@pytest.mark.slow  # >= 8 s on 2 cores: CI runs it (keeps the default run under 10 min)
def test_distill_reduces_kl():
    teacher, cfg = _model(widths=[32, 32])
    keep = pruning.keep_masks(pruning.neuron_importance(teacher, None, "random"), 0.5)
    student, _ = pruning.slice_model(teacher, cfg, keep)
    stream = np.random.default_rng(0).integers(0, 61, size=400)
    fixed = pruning.token_batches(stream, batch_size=2, seq_len=16)(0)
    get_batch = lambda step: fixed  # one batch: the test checks the optimisation, not data
    dcfg = pruning.distill_config(steps=12, learning_rate=1e-2, warmup_steps=1, log_every=1, alpha=1.0)
    new, hist = pruning.distill(student, teacher, get_batch, dcfg, log=None)
    assert len(hist) == 12

    def kl(model):
        b = fixed
        s, k, _, w = pruning.kd_loss(
            _logits(model, b["inputs"]),
            _logits(teacher, b["inputs"]),
            b["targets"],
            b["weights"],
            alpha=1.0,
            temperature=1.0,
        )
        return float(k / w)

    assert kl(new) < 0.8 * kl(student)
    # Only the feed-forward weights moved.
    np.testing.assert_array_equal(np.asarray(new.stack.embed.table[...]), np.asarray(student.stack.embed.table[...]))
    assert not np.allclose(np.asarray(new.blocks[0].ffn.up[...]), np.asarray(student.blocks[0].ffn.up[...]))


def test_matformer_extract_mix_and_match():
    model, cfg = _model(widths=[48, 48])
    assert pruning.nested_widths(48, (0.25, 0.5, 1.0)) == [12, 24, 48]
    sub, sub_cfg = pruning.extract(model, cfg, [12, 48])
    assert sub_cfg.ffn_width == [12, 48]
    masks = [np.r_[np.ones(12), np.zeros(36)].astype(np.float32), np.ones(48, np.float32)]
    tok = jnp.asarray(_tokens())
    np.testing.assert_allclose(
        np.asarray(_logits(sub, tok)), np.asarray(_masked(model, tok, [jnp.asarray(m) for m in masks])), atol=1e-5
    )


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5, "0.2", True])
def test_bad_ratio(ratio):
    with pytest.raises(ValueError, match=r"ratio=.*outside \[0, 1\)"):
        pruning.keep_masks([np.ones(4)], ratio)


def test_bad_inputs():
    model, _ = _model()
    with pytest.raises(ValueError, match="calibration tokens"):
        pruning.neuron_importance(model, np.zeros((0, 8), np.int32), "rmax")
    with pytest.raises(ValueError, match="criterion='nope' is not one of"):
        pruning.neuron_importance(model, _tokens(), "nope")
    with pytest.raises(ValueError, match="scope="):
        pruning.keep_masks([np.ones(4)], 0.5, scope="model")

    class NoGLU:
        blocks = [type("B", (), {"ffn": object()})()]

    with pytest.raises(ValueError, match="needs GLUFeedForward"):
        pruning.neuron_importance(NoGLU(), _tokens(), "rmax")
    with pytest.raises(ValueError, match="needs a model with `.blocks`"):
        pruning.neuron_importance(object(), _tokens(), "rmax")
