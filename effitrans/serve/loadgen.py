"""Closed-loop load generator: keeps `concurrency` requests in flight on a ServingEngine and reports QPS,
latency percentiles (p50 / p90 / p99), time to first token and generated tokens per second.

    python -m effitrans.bench loadgen --config=configs/lm_tiny.py [--concurrency 8] [--requests 32] [--json PATH]

(a randomly initialised model of that config: the numbers measure the serving loop, not the text).
Latency is submit -> last token; TTFT is submit -> first token (queueing + prefill); QPS counts finished
requests over the wall time of the run. Rejected (at submit) and failed (in a step) requests are counted
and excluded from the percentiles.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from effitrans.serve.engine import Request, ServingEngine


def percentiles(values, qs=(50, 90, 99)) -> dict:
    if not values:
        return {f"p{q}": None for q in qs}
    return {f"p{q}": float(np.percentile(values, q)) for q in qs}


def run_load(
    engine: ServingEngine, make_request: Callable[[int], Request], *, num_requests: int, concurrency: int
) -> dict:
    """Submits make_request(i) for i < num_requests, never more than `concurrency` unfinished at once."""
    if concurrency < 1 or num_requests < 1:
        raise ValueError(f"concurrency={concurrency} and num_requests={num_requests} must be >= 1")
    ids, in_flight = [], set()
    t0 = time.perf_counter()
    while len(ids) < num_requests or in_flight:
        while len(ids) < num_requests and len(in_flight) < concurrency:
            rid = engine.submit(make_request(len(ids)))
            ids.append(rid)
            if not engine.results[rid].terminal:
                in_flight.add(rid)
        engine.step()
        in_flight = {r for r in in_flight if not engine.results[r].terminal}
    wall = time.perf_counter() - t0
    done = [engine.results[r] for r in ids if engine.results[r].status == "finished"]
    lat = [r.latency for r in done]
    ttft = [r.ttft for r in done]
    tokens = sum(len(r.tokens) for r in done)
    return {
        "requests": num_requests,
        "finished": len(done),
        "rejected": sum(engine.results[r].status == "rejected" for r in ids),
        "failed": sum(engine.results[r].status == "failed" for r in ids),
        "concurrency": concurrency,
        "wall_s": wall,
        "qps": len(done) / wall,
        "tokens_per_s": tokens / wall,
        **{f"latency_{k}_s": v for k, v in percentiles(lat).items()},
        **{f"ttft_{k}_s": v for k, v in percentiles(ttft).items()},
    }


def random_requests(vocab_size: int, *, prompt_len=32, new_tokens=32, temperature=0.8, top_p=0.95):
    """make_request(i) for run_load: prompts of 1..prompt_len random tokens (a fixed seed), sampled replies."""
    rng = np.random.default_rng(0)

    def make(i):
        n = int(rng.integers(1, prompt_len + 1))
        prompt = rng.integers(0, vocab_size, n).tolist()
        return Request(prompt=prompt, max_new_tokens=new_tokens, temperature=temperature, top_p=top_p)

    return make


def load_test(model, make_request, *, requests: int = 32, concurrency: int = 8, max_len: int = 128) -> dict:
    """run_load's stats for `requests` requests on a ServingEngine of `model`, after one warm-up round of
    `concurrency` requests (compiles)."""
    engine = ServingEngine(model, max_batch=concurrency, max_len=max_len)
    run_load(engine, make_request, num_requests=min(concurrency, requests), concurrency=concurrency)
    return run_load(engine, make_request, num_requests=requests, concurrency=concurrency)
