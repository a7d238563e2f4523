"""ServingEngine with early exit: per-row exits inside continuous batching generate exactly what each request
decoded alone with exits generates, remove work, and never exiting equals the plain engine."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from effitrans.cascades import early_exit as ee
from effitrans.registry import build_model
from effitrans.serve import Request, ServingEngine
from tests.cascades.test_early_exit import _randomise_exit_heads, lm_with_exits
from tests.helpers import tiny_model_config

PROMPTS = [[1, 2, 3], [5, 6, 7, 8, 9, 10, 11], [4], [9, 8, 7, 6, 5], [12, 13]]
NEW = [6, 4, 7, 5, 6]


def _alone(model, prompt, n_new, *, measure, threshold):
    """Greedy tokens and exit indices of one request decoded by itself (batch 1) with decode_step_with_exits."""
    prefill = nnx.jit(lambda m, t, c: m(t, cache=c, decode=True))
    step = nnx.jit(
        lambda m, t, c, th: ee.decode_step_with_exits(m, t, c, measure=measure, threshold=th),
    )
    logits, caches = prefill(model, jnp.asarray([prompt], jnp.int32), model.init_cache(1, 16))
    tokens, exits = [int(logits[0, -1].argmax())], []
    while len(tokens) < n_new:
        logits, caches, index = step(model, jnp.asarray([[tokens[-1]]], jnp.int32), caches, threshold)
        tokens.append(int(logits[0, 0].argmax()))
        exits.append(int(index[0]))
    return tokens, exits


@pytest.mark.slow  # compiles a program per (segment, bucket) and a per-row reference: ~1-2 min on 2 cores
def test_engine_exits_per_row_inside_continuous_batching():
    model = build_model(lm_with_exits(num_layers=4, layers=[1, 2, 3]))
    _randomise_exit_heads(model)
    measure = "learned"
    toks = jnp.asarray([p + [0] * (7 - len(p)) for p in PROMPTS], jnp.int32)
    threshold = float(jnp.quantile(ee.pass_confidences(ee.exit_pass(model, toks), measure), 0.6))
    want = [_alone(model, p, n, measure=measure, threshold=threshold) for p, n in zip(PROMPTS, NEW, strict=True)]

    engine = ServingEngine(model, max_batch=4, max_len=16, early_exit={"measure": measure, "threshold": threshold})
    results = engine.generate([Request(p, max_new_tokens=n) for p, n in zip(PROMPTS, NEW, strict=True)])
    assert [r.tokens for r in results] == [w[0] for w in want]  # 5 requests through 4 rows: one joins mid-stream
    stats = engine.exit_stats()
    exits = np.concatenate([w[1] for w in want])
    assert stats["tokens_per_exit"] == np.bincount(exits, minlength=4).tolist()
    assert np.count_nonzero(stats["tokens_per_exit"]) >= 3  # rows leave at different exits
    assert stats["mean_layers"] == pytest.approx(np.asarray([1, 2, 3, 4])[exits].mean())
    assert stats["mean_layers"] / 4 <= stats["block_share"] < 1.0  # exited work removed (up to bucket padding)

    never = ServingEngine(model, max_batch=4, max_len=16, early_exit={"measure": measure, "threshold": 1.0})
    plain = ServingEngine(model, max_batch=4, max_len=16)
    requests = [Request(p, max_new_tokens=n) for p, n in zip(PROMPTS, NEW, strict=True)]
    assert [r.tokens for r in never.generate(requests)] == [r.tokens for r in plain.generate(requests)]
    assert never.exit_stats()["tokens_per_exit"][:3] == [0, 0, 0]


def test_engine_early_exit_option_errors_name_the_value():
    model = build_model(lm_with_exits(num_layers=2, layers=[1]))
    engine = ServingEngine(model, max_batch=1, max_len=8, early_exit=True)  # the config's measure / threshold
    assert (engine.exit_decoder.measure, float(engine.exit_decoder.threshold)) == ("max_prob", 1.0)
    with pytest.raises(ValueError, match=r"early_exit=\{'measur': 'learned'\} must be None, True"):
        ServingEngine(model, max_batch=1, max_len=8, early_exit={"measur": "learned"})
    with pytest.raises(ValueError, match=r"threshold=1\.5 must be a number in \[0, 1\]"):
        ServingEngine(model, max_batch=1, max_len=8, early_exit={"threshold": 1.5})
    with pytest.raises(ValueError, match=r"measure='vibes' is not one of"):
        ServingEngine(model, max_batch=1, max_len=8, early_exit={"measure": "vibes"})
    with pytest.raises(TypeError, match="CausalLM has no exit heads; build it with config.model.exits"):
        ServingEngine(build_model(tiny_model_config(num_layers=1)), max_batch=1, max_len=8, early_exit=True)
    with pytest.raises(ValueError, match="built without early_exit"):
        ServingEngine(build_model(tiny_model_config(num_layers=1)), max_batch=1, max_len=8).exit_stats()
