"""Early exit: config checks, exits equal to the full model when they never fire, the first exit when they
always fire, confidence measures, Learn-then-Test calibration on a case with a known answer, per-exit
losses through the Trainer and the frozen-backbone mode."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from effitrans import defaults
from effitrans.cascades import early_exit as ee
from effitrans.registry import build_model, validate_model_config
from effitrans.schema import ConfigError
from effitrans.train.trainer import Trainer
from tests.helpers import tiny_lm_experiment, tiny_model_config


def lm_with_exits(num_layers=4, **exits):
    cfg = tiny_model_config(num_layers=num_layers)
    cfg.exits = defaults.exits(**{"layers": list(range(1, num_layers)), **exits})
    return cfg


def classifier_with_exits(num_layers=4, **exits):
    cfg = tiny_model_config(num_layers=num_layers, name="encoder_classifier", pooling="mean", num_classes=5)
    cfg.exits = defaults.exits(**{"layers": list(range(1, num_layers)), **exits})
    return cfg


def _randomise_exit_heads(model, seed=1):
    """Give own adapters and confidence classifiers non-zero weights (they start at zero)."""
    heads = model.stack.exits
    names = ("confidence_w", "confidence_b") + (("adapter",) if heads.own else ())
    for i, name in enumerate(names):
        param = getattr(heads, name)
        param.set_value(0.3 * jax.random.normal(jax.random.key(seed + i), param.shape))


@pytest.mark.parametrize(
    "exits, match",
    [
        ({"layers": [0, 2]}, r"exits\.layers=\[0, 2\] names layer 0, but config\.model\.num_layers=4: allowed exits "
         r"are 1\.\.3"),
        ({"layers": [2, 4]}, r"names layer 4, but config\.model\.num_layers=4"),
        ({"layers": [3, 1]}, r"exits\.layers=\[3, 1\] must be strictly increasing"),
        ({"layers": [1, 2], "loss_weights": [1.0]}, r"loss_weights=\[1\.0\] has 1 entries; expected one per exit"),
        ({"layers": [1], "threshold": 1.5}, r"exits\.threshold=1\.5 is not allowed: expected a number in \[0, 1\]"),
        ({"layers": [1], "threshold": -0.1}, r"exits\.threshold=-0\.1 is not allowed"),
        ({"layers": [1], "measure": "vibes"}, r"exits\.measure='vibes' is not allowed: expected one of"),
        ({"layers": [1], "head": "shared", "frozen_backbone": True, "confidence_weight": 0.0},
         r"leaves nothing to train"),
    ],
)  # fmt: skip
def test_bad_exit_configs_name_the_key_the_value_and_what_is_allowed(exits, match):
    cfg = tiny_model_config(num_layers=4)
    cfg.exits = defaults.exits(**exits)
    with pytest.raises(ConfigError, match=match):
        validate_model_config(cfg)


def test_exits_need_layers_and_a_model_that_has_them():
    cfg = tiny_model_config(num_layers=4)
    cfg.exits = defaults.exits()
    with pytest.raises(ConfigError, match=r"exits\.layers is required"):
        validate_model_config(cfg)
    cfg = tiny_model_config(num_layers=2, name="encoder_embedding", pooling="mean", embed_dim=8)
    cfg.exits = defaults.exits(layers=[1])
    with pytest.raises(ConfigError, match=r"exits is set but config\.model\.name='encoder_embedding'"):
        validate_model_config(cfg)


def test_threshold_and_measure_arguments_are_checked():
    model = nnx.eval_shape(lambda: build_model(lm_with_exits()))  # the checks come before any arithmetic
    caches = None
    tok = jnp.zeros((1, 1), jnp.int32)
    with pytest.raises(ValueError, match=r"threshold=1\.2 must be a number in \[0, 1\]"):
        ee.decode_step_with_exits(model, tok, caches, measure="max_prob", threshold=1.2)
    with pytest.raises(ValueError, match=r"measure='x' is not one of"):
        ee.decode_step_with_exits(model, tok, caches, measure="x", threshold=0.5)
    with pytest.raises(TypeError, match="has no exit heads"):
        ee.exit_pass(nnx.eval_shape(lambda: build_model(tiny_model_config())), tok)


@pytest.mark.parametrize("measure", ["max_prob", "margin", "entropy", "saturation", "learned"])
def test_confidences_lie_in_the_unit_interval_and_order_sensibly(measure):
    logits = jnp.array([[10.0, 0.0, 0.0], [1.0, 1.0, 1.0], [2.0, 1.0, 0.0]])
    state = jnp.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    prev = jnp.array([[1.0, 0.0], [-1.0, 0.0], [1.0, 1.0]])
    c = ee.confidence(measure, logits=logits, state=state, previous=prev, learned=jnp.array([3.0, -3.0, 0.0]))
    assert c.shape == (3,) and bool(jnp.all((c >= 0) & (c <= 1)))
    assert c[0] > c[1]  # a peaked / saturated / confident row beats a flat / flipped / unsure one
    if measure in ("margin", "entropy", "saturation"):
        assert c[1] == pytest.approx(0.0, abs=1e-6)


def test_simulated_exits_take_the_first_exit_above_the_threshold():
    conf = jnp.array([[0.2, 0.9, 0.5], [0.8, 0.95, 0.5]])  # [X=2, B=3]
    np.testing.assert_array_equal(ee.simulate_exits(conf, 0.7), [1, 0, 2])
    np.testing.assert_array_equal(ee.simulate_exits(conf, 1.0), [2, 2, 2])  # 1.0: never
    np.testing.assert_array_equal(ee.simulate_exits(conf, 0.0), [0, 0, 0])  # 0.0: the first exit
    np.testing.assert_array_equal(ee.layers_run(jnp.array([1, 0, 2]), (2, 4), 6), [4, 2, 6])


@pytest.mark.slow  # eager model passes: tens of seconds on 2 loaded cores
@pytest.mark.parametrize("head", ["shared", "own"])
def test_never_exit_equals_the_full_model_exactly_logits_and_cache(head):
    model = build_model(lm_with_exits(head=head))
    _randomise_exit_heads(model)
    tokens = jax.random.randint(jax.random.key(0), (2, 5), 0, 61)
    out = ee.exit_pass(model, tokens)
    np.testing.assert_array_equal(out.logits[-1], model(tokens)[0])
    assert len(out.logits) == 4 and out.logits[0].shape == (2, 5, 61)

    full_caches, exit_caches = model.init_cache(2, 8), model.init_cache(2, 8)
    _, full_caches = model(tokens[:, :4], cache=full_caches, decode=True)  # prefill
    _, exit_caches = model(tokens[:, :4], cache=exit_caches, decode=True)
    ref, full_caches = model(tokens[:, 4:], cache=full_caches, decode=True)
    for measure in ("max_prob", "learned"):
        got, caches, index = ee.decode_step_with_exits(
            model, tokens[:, 4:], exit_caches, measure=measure, threshold=1.0
        )
        np.testing.assert_array_equal(got, ref)
        np.testing.assert_array_equal(index, [3, 3])
        for a, b in zip(jax.tree.leaves(caches), jax.tree.leaves(full_caches), strict=True):
            np.testing.assert_array_equal(a, b)


@pytest.mark.slow  # eager model passes: tens of seconds on 2 loaded cores
def test_always_exit_stops_at_the_first_exit_and_propagates_keys_and_values():
    model = build_model(lm_with_exits(layers=[2, 3]))
    tokens = jax.random.randint(jax.random.key(1), (1, 4), 0, 61)
    caches = model.init_cache(1, 6)
    _, caches = model(tokens[:, :3], cache=caches, decode=True)
    logits, new, index = ee.decode_step_with_exits(
        model, tokens[:, 3:], caches, measure="max_prob", threshold=0.0, stop_when_done=True
    )
    assert int(index[0]) == 0
    np.testing.assert_allclose(logits, ee.exit_pass(model, tokens).logits[0][:, 3:], atol=1e-5)
    assert all(int(c.lengths[0]) == 4 for c in new)  # every layer got the token's keys/values
    # Layers 3 and 4 hold keys/values of the exited state (after 2 blocks), not of their own inputs.
    exited = ee.exit_pass(model, tokens).states[0][:, 3:]  # [1, 1, D]
    for layer in (2, 3):
        block = model.stack.blocks[layer]
        k = block.attn._qkv(block.attn_norm(exited), jnp.array([[3]]))[1]  # [1, 1, K, H]
        np.testing.assert_allclose(new[layer].k[:, 3], k[:, 0], atol=1e-5)
        assert new[layer].k.shape == caches[layer].k.shape  # later tokens' attention keeps its shapes


@pytest.mark.slow  # eager model passes: tens of seconds on 2 loaded cores
def test_batched_exits_equal_per_row_exits():
    model = build_model(lm_with_exits(num_layers=4))
    _randomise_exit_heads(model)
    tokens = jax.random.randint(jax.random.key(2), (4, 6), 0, 61)
    conf = ee.pass_confidences(ee.exit_pass(model, tokens[:, :6]), "learned")[:, :, 5]  # [X, B]
    threshold = float(jnp.median(conf))  # some rows exit early, some late
    caches = model.init_cache(4, 8)
    _, caches = model(tokens[:, :5], cache=caches, decode=True)
    step = jax.jit(lambda m, t, c: ee.decode_step_with_exits(m, t, c, measure="learned", threshold=threshold))
    batched, bcaches, bindex = nnx.jit(lambda m, t, c: ee.decode_step_with_exits(
        m, t, c, measure="learned", threshold=threshold))(model, tokens[:, 5:], caches)  # fmt: skip
    del step
    assert len(set(np.asarray(bindex).tolist())) > 1
    for r in range(4):
        row_caches = jax.tree.map(lambda a, r=r: a[r : r + 1], caches)
        logits, rcaches, index = ee.decode_step_with_exits(
            model, tokens[r : r + 1, 5:], row_caches, measure="learned", threshold=threshold, stop_when_done=True
        )
        assert int(index[0]) == int(bindex[r])
        np.testing.assert_allclose(logits[0], batched[r], atol=1e-5)
        for a, b in zip(jax.tree.leaves(rcaches), jax.tree.leaves(bcaches), strict=True):
            np.testing.assert_allclose(a[0], b[r], atol=1e-5)


@pytest.mark.slow  # eager model passes: tens of seconds on 2 loaded cores
def test_classifier_exits_remove_exited_rows_and_match_the_simulation():
    model = build_model(classifier_with_exits(head="own"))
    _randomise_exit_heads(model)
    tokens = jax.random.randint(jax.random.key(3), (6, 7), 0, 61)
    mask = jnp.ones((6, 7), jnp.int32).at[:3, 5:].set(0)
    out = ee.exit_pass(model, tokens, mask)
    np.testing.assert_allclose(out.logits[-1], model(tokens, mask), atol=1e-6)
    for measure in ("margin", "saturation"):
        conf = ee.pass_confidences(out, measure)
        threshold = float(jnp.median(conf))
        expect = ee.simulate_exits(conf, threshold)
        logits, index = ee.classify_with_exits(model, tokens, mask, measure=measure, threshold=threshold)
        np.testing.assert_array_equal(index, expect)
        np.testing.assert_allclose(logits, ee.select_exit_outputs(jnp.stack(out.logits), expect), atol=1e-5)
    logits, index = ee.classify_with_exits(model, tokens, mask, measure="max_prob", threshold=1.0)
    np.testing.assert_array_equal(logits, nnx.jit(lambda m, t, k: m(t, k))(model, tokens, mask))  # compiled as one
    assert (np.asarray(index) == 3).all()
    _, index = ee.classify_with_exits(model, tokens, mask, measure="max_prob", threshold=0.0)
    assert (np.asarray(index) == 0).all()


def test_binomial_cdf_matches_closed_forms():
    assert ee.binomial_cdf(0, 100, 0.1) == pytest.approx(0.9**100, rel=1e-9)
    assert ee.binomial_cdf(1, 3, 0.5) == pytest.approx(0.5, rel=1e-12)
    assert ee.binomial_cdf(5, 5, 0.3) == 1.0


def test_calibration_picks_the_threshold_its_guarantee_says():
    # n = 100 examples; risks 0, 0.02, 0.05, 0.08, 0.2 at thresholds 0.9 .. 0.1 (safest first).
    thresholds = [0.9, 0.7, 0.5, 0.3, 0.1]
    losses = np.zeros((5, 100), np.int32)
    for j, k in enumerate((0, 2, 5, 8, 20)):
        losses[j, :k] = 1
    # LTT with delta 0.1, epsilon 0.05: p-values P(Binom(100, 0.1) <= k) = 2.7e-5, 1.9e-3, 0.058 ... -> the
    # third fails, so the second (0.7) is the lowest threshold with a certified risk <= 0.1.
    ltt = ee.calibrate_threshold(thresholds, losses, delta=0.1, epsilon=0.05)
    assert ltt["threshold"] == 0.7 and ltt["index"] == 1
    assert ltt["p_values"][2] == pytest.approx(0.0576, abs=5e-4) and ltt["p_values"][1] < 0.05
    emp = ee.calibrate_threshold(thresholds, losses, delta=0.1, method="empirical")
    assert emp["threshold"] == 0.3  # risk 0.08 <= 0.1, then 0.2 fails
    none = ee.calibrate_threshold(thresholds, np.ones((5, 100), np.int32), delta=0.1)
    assert none["threshold"] == 1.0 and none["index"] == -1
    with pytest.raises(ValueError, match="strictly decreasing"):
        ee.calibrate_threshold([0.1, 0.5], losses[:2], delta=0.1)
    with pytest.raises(ValueError, match=r"threshold=1\.5 must be a number in \[0, 1\]"):
        ee.calibrate_threshold([1.5, 0.5], losses[:2], delta=0.1)
    with pytest.raises(ValueError, match=r"delta=0 must be in \(0, 1\)"):
        ee.calibrate_threshold(thresholds, losses, delta=0)


@pytest.mark.slow  # eager model passes: tens of seconds on 2 loaded cores
def test_inconsistency_losses_count_disagreements_with_the_last_layer():
    model = build_model(classifier_with_exits())
    tokens = jax.random.randint(jax.random.key(4), (5, 6), 0, 61)
    out = ee.exit_pass(model, tokens, jnp.ones((5, 6), jnp.int32))
    losses = ee.inconsistency_losses(out, "max_prob", [1.0, 0.0])
    assert losses.shape == (2, 5) and losses[0].sum() == 0  # never exiting never disagrees
    first = np.asarray(jnp.argmax(out.logits[0], -1) != jnp.argmax(out.logits[-1], -1))
    np.testing.assert_array_equal(losses[1], first)


@pytest.mark.slow  # eager model passes: tens of seconds on 2 loaded cores
def test_exit_losses_train_through_the_trainer_and_the_frozen_backbone_stays_put(tmp_path):
    cfg = tiny_lm_experiment(steps=2)
    cfg.model.num_layers = 3
    cfg.model.exits = defaults.exits(layers=[1, 2], head="own", loss_weights=[0.5, 1.0], distill_weight=0.5,
                                     frozen_backbone=True)  # fmt: skip
    trainer = Trainer(cfg, str(tmp_path), verbose=False)
    start = trainer.init_state()
    before = jax.device_get(start["params"])
    result = trainer.train()
    row = result["history"][-1]
    for key in ("exit1_loss", "exit2_accuracy", "exit1_kl", "exit2_confidence_bce"):
        assert np.isfinite(row[key]), key
    after = jax.device_get(result["state"]["params"])
    np.testing.assert_array_equal(after["stack"]["blocks"][0]["ffn"]["up"], before["stack"]["blocks"][0]["ffn"]["up"])
    assert not np.array_equal(after["stack"]["exits"]["adapter"], before["stack"]["exits"]["adapter"])
    assert not np.array_equal(after["stack"]["exits"]["confidence_w"], before["stack"]["exits"]["confidence_w"])


@pytest.mark.slow  # one compile, still ~60 s on 2 loaded cores
def test_jitted_never_exit_step_equals_the_model_and_always_exit_takes_the_first_exit():
    """The eager tests' claims again in one compiled program (exact: the same program computes both)."""
    model = build_model(lm_with_exits(num_layers=2))
    tokens = jax.random.randint(jax.random.key(5), (2, 3), 0, 61)

    @nnx.jit
    def run(model, tokens):
        caches = model.init_cache(2, 4)
        _, caches = model(tokens[:, :2], cache=caches, decode=True)
        ref, ref_caches = model(tokens[:, 2:], cache=caches, decode=True)
        never = ee.decode_step_with_exits(model, tokens[:, 2:], caches, measure="entropy", threshold=1.0)
        always = ee.decode_step_with_exits(model, tokens[:, 2:], caches, measure="entropy", threshold=0.0)
        return ref, ref_caches, never, always, ee.exit_pass(model, tokens).logits[0][:, 2:]

    ref, ref_caches, (logits, caches, index), (first, _, first_index), exit1 = run(model, tokens)
    np.testing.assert_array_equal(logits, ref)
    for a, b in zip(jax.tree.leaves(caches), jax.tree.leaves(ref_caches), strict=True):
        np.testing.assert_array_equal(a, b)
    assert index.tolist() == [1, 1] and first_index.tolist() == [0, 0]
    np.testing.assert_allclose(first, exit1, atol=1e-5)


@pytest.mark.slow  # compiles a program per segment: ~1 min on 2 loaded cores
@pytest.mark.parametrize("measure", ["learned", "max_prob"])
def test_exit_decoder_skips_work_but_equals_the_masked_step(measure):
    model = build_model(lm_with_exits(num_layers=4, layers=[1, 3]))
    _randomise_exit_heads(model)
    tokens = jax.random.randint(jax.random.key(6), (3, 5), 0, 61)
    conf = ee.pass_confidences(ee.exit_pass(model, tokens), measure)[:, :, 4]  # [X, B]
    caches = model.init_cache(3, 6)
    _, caches = model(tokens[:, :4], cache=caches, decode=True)
    for threshold in (0.0, float(jnp.median(conf)), 1.0):
        decoder = ee.ExitDecoder(model, measure=measure, threshold=threshold)
        want, want_caches, want_index = ee.decode_step_with_exits(
            model, tokens[:, 4:], caches, measure=measure, threshold=threshold
        )
        got, got_caches, got_index = decoder.step(tokens[:, 4:], caches)
        np.testing.assert_array_equal(got_index, want_index)
        np.testing.assert_allclose(got, want, atol=1e-5)
        for a, b in zip(jax.tree.leaves(got_caches), jax.tree.leaves(want_caches), strict=True):
            np.testing.assert_allclose(a, b, atol=1e-5)


def test_running_rows_compact_into_halving_power_of_two_buckets():
    assert [ee.bucket_size(n, 8) for n in range(1, 9)] == [1, 2, 4, 4, 8, 8, 8, 8]
    assert [ee.bucket_size(n, 6) for n in range(1, 7)] == [1, 2, 4, 4, 6, 6]  # capped at the batch
    for n in (0, 9):
        with pytest.raises(ValueError, match=rf"n={n} running rows: expected 1\.\.batch=8"):
            ee.bucket_size(n, 8)


@pytest.mark.slow  # compiles a program per (segment, bucket): ~1-2 min on 2 loaded cores
def test_compacted_batch_decode_equals_per_row_decode_and_no_exit_equals_the_full_model():
    model = build_model(lm_with_exits(num_layers=4, layers=[1, 2, 3]))
    _randomise_exit_heads(model)
    batch = 8
    tokens = jax.random.randint(jax.random.key(7), (batch, 5), 0, 61)
    caches = model.init_cache(batch, 6)
    _, caches = model(tokens[:, :4], cache=caches, decode=True)

    ref, ref_caches = nnx.jit(lambda m, t, c: m(t, cache=c, decode=True))(model, tokens[:, 4:], caches)
    never = ee.ExitDecoder(model, measure="learned", threshold=1.0)
    got, got_caches, index = never.step(tokens[:, 4:], caches)
    np.testing.assert_array_equal(got, ref)  # no exit: the model's own blocks, bit for bit
    for a, b in zip(jax.tree.leaves(got_caches), jax.tree.leaves(ref_caches), strict=True):
        np.testing.assert_array_equal(a, b)
    assert (np.asarray(index) == 3).all() and never.block_rows == batch * 4

    row_step = nnx.jit(lambda m, t, c, th, measure: ee.decode_step_with_exits(m, t, c, measure=measure, threshold=th),
                       static_argnames="measure")  # fmt: skip
    for measure in ("learned", "max_prob"):
        conf = ee.pass_confidences(ee.exit_pass(model, tokens), measure)[:, :, 4]  # [X, B]
        threshold = float(jnp.quantile(conf, 0.6))  # rows leave at different exits
        decoder = ee.ExitDecoder(model, measure=measure, threshold=threshold)
        got, got_caches, index = decoder.step(tokens[:, 4:], caches)
        layers = np.asarray(ee.layers_run(index, (1, 2, 3), 4))
        assert len(set(np.asarray(index).tolist())) > 2
        # Exited rows' work is removed: the running rows only, rounded up to their power-of-two bucket.
        assert decoder.block_rows < batch * 4 and decoder.block_rows >= layers.sum()
        for r in range(batch):
            row_caches = jax.tree.map(lambda a, r=r: a[r : r + 1], caches)
            want, want_caches, want_index = row_step(model, tokens[r : r + 1, 4:], row_caches, threshold, measure)
            assert int(want_index[0]) == int(index[r]), (measure, r)
            np.testing.assert_allclose(got[r], want[0], atol=1e-5)
            for a, b in zip(jax.tree.leaves(got_caches), jax.tree.leaves(want_caches), strict=True):
                np.testing.assert_allclose(a[r], b[0], atol=1e-5)
    always = ee.ExitDecoder(model, measure="max_prob", threshold=0.0)
    _, _, index = always.step(tokens[:, 4:], caches)
    assert (np.asarray(index) == 0).all() and always.block_rows == batch  # one block, then propagation only


@pytest.mark.slow  # compiles a program per measure and compares each row with the jitted masked step
@pytest.mark.parametrize("measure", ["learned", "max_prob"])
def test_one_row_decides_on_device_and_equals_the_masked_step(measure):
    model = build_model(lm_with_exits(num_layers=4, layers=[1, 2, 3]))
    _randomise_exit_heads(model)
    tokens = jax.random.randint(jax.random.key(9), (8, 5), 0, 61)
    conf = ee.pass_confidences(ee.exit_pass(model, tokens), measure)[:, :, 4]  # [X, B]
    threshold = float(jnp.quantile(conf, 0.5))  # rows leave at every exit and the last layer
    caches = model.init_cache(8, 6)
    _, caches = model(tokens[:, :4], cache=caches, decode=True)
    decoder = ee.ExitDecoder(model, measure=measure, threshold=threshold)
    masked = nnx.jit(lambda m, t, c, th: ee.decode_step_with_exits(m, t, c, measure=measure, threshold=th))
    seen = set()
    for r in range(8):  # batch 1: one program, lax.cond at each exit
        row = jax.tree.map(lambda a, r=r: a[r : r + 1], caches)
        got, got_caches, index = decoder.step(tokens[r : r + 1, 4:], row)
        want, want_caches, want_index = masked(model, tokens[r : r + 1, 4:], row, threshold)
        assert int(index[0]) == int(want_index[0]) and decoder.block_rows == [1, 2, 3, 4][int(index[0])]
        np.testing.assert_allclose(got, want, atol=1e-5)
        for a, b in zip(jax.tree.leaves(got_caches), jax.tree.leaves(want_caches), strict=True):
            np.testing.assert_allclose(a, b, atol=1e-5)
        seen.add(int(index[0]))
    assert seen == {0, 1, 2, 3}  # every branch was taken
