"""The serving engine under bad requests and failing steps: every request ends finished, rejected or failed,
and one request never stops the others."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from effitrans.registry import build_model
from effitrans.serve import Request, Sampling, ServingEngine, check_sampling, run_load
from effitrans.serve import engine as engine_lib
from tests.helpers import tiny_model_config

# The shapes of tests/serve/test_engine.py::test_load_generator_statistics, so a joint run shares compilations.
MAX_BATCH, MAX_LEN = 3, 16


@pytest.fixture(scope="module")
def model():
    return build_model(tiny_model_config(num_layers=1), seed=2)


def _engine(model):
    return ServingEngine(model, max_batch=MAX_BATCH, max_len=MAX_LEN)


def _alone(model, request):
    """The tokens `request` gets on an engine serving nothing else."""
    (result,) = _engine(model).generate([request])
    assert result.status == "finished", result.error
    return result.tokens


def test_case4_bad_stop_tokens_rejected_at_submit_and_the_good_request_completes(model):
    good = Request([1, 2, 3, 4], max_new_tokens=5)
    engine = _engine(model)
    good_id = engine.submit(good)
    bad_id = engine.submit(Request([5, 6], max_new_tokens=3, stop_tokens=["a"]))
    engine.run()
    bad = engine.results[bad_id]
    assert bad.status == "rejected" and "stop_tokens[0]='a'" in bad.error
    assert engine.results[good_id].status == "finished"
    assert engine.results[good_id].tokens == _alone(model, good)
    assert not engine.has_work()


POISON = 60  # a prompt starting with this token makes the injected prefill raise


def _raising_prefill(monkeypatch, delete_cache=False):
    """Makes the engine's jitted prefill raise for any batch holding a prompt that starts with POISON
    (after deleting the donated cache's buffers, as a failure after donation would, if `delete_cache`)."""
    real = engine_lib._prefill_step

    def prefill(graphdef, state, cache, rows, tokens, *args):
        if (np.asarray(tokens)[:, 0] == POISON).any():
            if delete_cache:
                jax.tree.map(lambda x: x.delete(), cache)
            raise RuntimeError("injected prefill failure")
        return real(graphdef, state, cache, rows, tokens, *args)

    monkeypatch.setattr(engine_lib, "_prefill_step", prefill)


def test_prefill_exception_fails_only_its_request(model, monkeypatch):
    requests = [Request([1, 2, 3], 4), Request([POISON, 2], 4), Request([7, 8, 9, 10], 4)]
    want = [_alone(model, requests[0]), None, _alone(model, requests[2])]
    _raising_prefill(monkeypatch)
    engine = _engine(model)
    results = engine.generate(requests)  # all three in one batched prefill, which raises
    assert [r.status for r in results] == ["finished", "failed", "finished"]
    assert "prefill" in results[1].error and "injected prefill failure" in results[1].error
    assert [results[0].tokens, results[2].tokens] == [want[0], want[2]]
    assert not engine.has_work()


def test_prefill_failure_that_loses_the_cache_fails_the_running_rows_and_serves_on(model, monkeypatch):
    first, later = Request([1, 2, 3], 6), Request([4, 5], 4)
    want = _alone(model, later)
    _raising_prefill(monkeypatch, delete_cache=True)
    engine = _engine(model)
    running = engine.submit(first)
    engine.step()
    ids = [engine.submit(Request([POISON], 3)), engine.submit(later)]
    engine.run()
    lost, poisoned, served = engine.results[running], engine.results[ids[0]], engine.results[ids[1]]
    assert lost.status == "failed" and "cache" in lost.error
    assert poisoned.status == "failed" and "injected prefill failure" in poisoned.error
    assert served.status == "finished" and served.tokens == want
    assert not engine.has_work()


def _raising_second_decode(monkeypatch):
    """Makes the engine's second jitted decode step raise."""
    real, calls = engine_lib._decode_step, []

    def decode(*args):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("injected decode failure")
        return real(*args)

    monkeypatch.setattr(engine_lib, "_decode_step", decode)


def test_decode_failure_fails_the_running_rows_and_the_engine_serves_new_requests(model, monkeypatch):
    queued, later = Request([9, 9, 9], 5), Request([3, 1, 4, 1, 5], 5)
    want = [_alone(model, queued), _alone(model, later)]
    _raising_second_decode(monkeypatch)
    engine = _engine(model)
    ids = [engine.submit(Request([i + 1, 2], 6)) for i in range(MAX_BATCH)] + [engine.submit(queued)]
    engine.step()
    engine.step()  # the decode raises: the three running rows fail, the queued request waits
    assert [engine.results[i].status for i in ids] == ["failed"] * MAX_BATCH + ["queued"]
    assert all("decode" in engine.results[i].error for i in ids[:MAX_BATCH])
    assert engine.has_work()
    ids.append(engine.submit(later))
    engine.run()
    assert [engine.results[i].tokens for i in ids[MAX_BATCH:]] == want
    assert all(engine.results[i].status == "finished" for i in ids[MAX_BATCH:])
    assert not engine.has_work()


def test_load_generator_counts_failed_requests_and_finishes(model, monkeypatch):
    _raising_second_decode(monkeypatch)
    stats = run_load(_engine(model), lambda i: Request([i + 1, 2], 5), num_requests=5, concurrency=MAX_BATCH)
    assert (stats["finished"], stats["failed"], stats["rejected"]) == (2, 3, 0)


VOCAB = 61
# (the field a rejection must name, a request that breaks one rule of it)
INVALID = [
    ("request", "not a request"),
    ("request", {"prompt": [1], "max_new_tokens": 2}),
    ("prompt", Request([], 2)),
    ("prompt", Request([1, VOCAB], 2)),
    ("prompt", Request([-1], 2)),
    ("prompt", Request([True, 2], 2)),
    ("prompt", Request([1.0], 2)),
    ("prompt", Request("ab", 2)),
    ("prompt", Request(7, 2)),
    ("prompt", Request(np.array([[1, 2]]), 2)),
    ("prompt", Request(list(range(1, 13)), 5)),  # 12 + 5 tokens > max_len 16
    ("max_new_tokens", Request([1, 2], 15)),
    ("max_new_tokens", Request([1], 0)),
    ("max_new_tokens", Request([1], 2.0)),
    ("max_new_tokens", Request([1], True)),
    ("max_new_tokens", Request([1], "3")),
    ("max_new_tokens", Request([1], None)),
    ("temperature", Request([1], 2, temperature=float("inf"))),
    ("temperature", Request([1], 2, temperature=np.float32("nan"))),
    ("temperature", Request([1], 2, temperature=-0.5)),
    ("temperature", Request([1], 2, temperature="0")),
    ("temperature", Request([1], 2, temperature=True)),
    ("temperature", Request([1], 2, temperature=None)),
    ("top_k", Request([1], 2, top_k=-1)),
    ("top_k", Request([1], 2, top_k=VOCAB + 1)),
    ("top_k", Request([1], 2, top_k=2.5)),
    ("top_k", Request([1], 2, top_k=True)),
    ("top_p", Request([1], 2, top_p=0.0)),
    ("top_p", Request([1], 2, top_p=1.5)),
    ("top_p", Request([1], 2, top_p=np.float64("nan"))),
    ("stop_tokens", Request([1], 2, stop_tokens=["a"])),
    ("stop_tokens", Request([1], 2, stop_tokens="a")),
    ("stop_tokens", Request([1], 2, stop_tokens=[VOCAB])),
    ("stop_tokens", Request([1], 2, stop_tokens=[-1])),
    ("stop_tokens", Request([1], 2, stop_tokens=[1.5])),
    ("stop_tokens", Request([1], 2, stop_tokens=[True])),
    ("stop_tokens", Request([1], 2, stop_tokens=7)),
    ("stop_tokens", Request([1], 2, stop_tokens=None)),
    ("seed", Request([1], 2, seed=-1)),
    ("seed", Request([1], 2, seed=2**32)),
    ("seed", Request([1], 2, seed=1.5)),
    ("seed", Request([1], 2, seed=True)),
    ("prefix_cache", Request([1, 2], 2, prefix_cache="not a cache")),
    ("prefix_cache", Request([1, 2], 2, prefix_cache=[1, 2])),
]
# Valid spellings: numpy integers are ints, numpy arrays and tuples are sequences.
AS_IDS = [list, tuple, lambda ids: np.array(ids, np.int32), lambda ids: [np.int64(t) for t in ids], jnp.array]
AS_INT = [int, np.int32, np.int64]
AS_SEED = [int, np.uint32, np.int64]
GREEDY = [0, 0.0, np.float32(0), np.float64(0)]
SAMPLED = [0.8, np.float32(1.5), 2]

seeds = st.integers(0, 2**32 - 1)
token_ids = st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=8)  # one prefill length bucket


def test_a_seeded_sampled_request_gets_the_same_tokens_in_any_batch(model):
    sampled = Request([7, 3, 9], 8, temperature=1.5, top_k=40, top_p=0.95, seed=np.uint32(12345))
    want = _alone(model, sampled)
    engine = _engine(model)
    ids = [engine.submit(Request([1, 2, 3, 4, 5], 9, temperature=2.0)), engine.submit(Request([8], 3))]
    engine.step()
    ids += [engine.submit(sampled), engine.submit(Request([5, 5], 4, temperature=0.7, seed=1))]
    engine.run()
    assert engine.results[ids[2]].tokens == want
    assert want != _alone(model, dataclasses.replace(sampled, seed=54321))  # the seed does pick the draws
    assert want != _alone(model, dataclasses.replace(sampled, temperature=0))


@st.composite
def valid_requests(draw):
    prompt = draw(token_ids)
    return Request(
        draw(st.sampled_from(AS_IDS))(prompt),
        draw(st.sampled_from(AS_INT))(draw(st.integers(1, 6))),
        temperature=draw(st.sampled_from(GREEDY if draw(st.booleans()) else SAMPLED)),
        top_k=draw(st.sampled_from(AS_INT))(draw(st.integers(0, VOCAB))),
        top_p=draw(st.sampled_from([1.0, 0.5, np.float32(0.9), 1])),
        stop_tokens=draw(st.sampled_from(AS_IDS))(draw(st.lists(st.integers(0, VOCAB - 1), max_size=2))),
        seed=None if draw(st.integers(0, 3)) == 0 else draw(st.sampled_from(AS_SEED))(draw(seeds)),
    )


@settings(max_examples=20, deadline=None, derandomize=True, database=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 2), st.one_of(valid_requests(), st.sampled_from(INVALID))), min_size=1, max_size=8
    )
)
def test_random_mixes_of_valid_and_invalid_requests(model, mix):
    """Each item: (engine steps before it is submitted, a request or an (expected field, invalid request))."""
    engine = _engine(model)
    ids = []
    for wait, item in mix:
        for _ in range(wait):
            engine.step()
            assert engine.has_work() == any(not r.terminal for r in engine.results.values())
        ids.append(engine.submit(item[1] if isinstance(item, tuple) else item))
        if isinstance(item, tuple):
            result = engine.results[ids[-1]]
            assert result.status == "rejected" and item[0] in result.error, (item, result.error)
    engine.run()
    assert not engine.has_work()
    assert all(r.terminal for r in engine.results.values())
    for rid, (_, item) in zip(ids, mix):
        result = engine.results[rid]
        if isinstance(item, tuple):
            continue
        assert result.status == "finished", result.error
        assert 1 <= len(result.tokens) <= item.max_new_tokens
        if item.temperature == 0 or item.seed is not None:  # greedy, or sampled with a fixed key
            assert result.tokens == _alone(model, item)


def test_every_rejection_rule_names_its_field(model):
    engine = _engine(model)
    for field, request in INVALID:
        result = engine.results[engine.submit(request)]
        assert result.status == "rejected" and field in result.error, (field, request, result.error)
    assert not engine.has_work()


def test_check_sampling_takes_numpy_numbers_and_refuses_inf_and_nan():
    assert check_sampling(np.float32(0.5), np.int64(3), np.float32(0.9), 10) is None
    assert "temperature=inf must be a finite number" in check_sampling(float("inf"), 0, 1.0, 10)
    assert "top_p=nan" in check_sampling(1.0, 0, float("nan"), 10)
    assert "top_k=True" in check_sampling(1.0, True, 1.0, 10)
    with pytest.raises(ValueError, match="temperature=inf"):
        Sampling(temperature=float("inf"))
