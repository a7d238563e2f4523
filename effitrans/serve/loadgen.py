"""Closed-loop load generator: keeps `concurrency` requests in flight on a ServingEngine and reports QPS,
latency percentiles (p50 / p90 / p99), time to first token and generated tokens per second.

    python -m effitrans.serve.loadgen --config=configs/lm_tiny.py [--concurrency 8] [--requests 32] [--json PATH]

(a randomly initialised model of that config: the numbers measure the serving loop, not the text).
Latency is submit -> last token; TTFT is submit -> first token (queueing + prefill); QPS counts finished
requests over the wall time of the run. Rejected requests are counted and excluded from the percentiles.
"""

from __future__ import annotations

import argparse
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
            if engine.results[rid].status != "rejected":
                in_flight.add(rid)
        engine.step()
        in_flight = {r for r in in_flight if engine.results[r].status not in ("finished", "rejected")}
    wall = time.perf_counter() - t0
    done = [engine.results[r] for r in ids if engine.results[r].status == "finished"]
    lat = [r.latency for r in done]
    ttft = [r.ttft for r in done]
    tokens = sum(len(r.tokens) for r in done)
    return {
        "requests": num_requests,
        "finished": len(done),
        "rejected": num_requests - len(done),
        "concurrency": concurrency,
        "wall_s": wall,
        "qps": len(done) / wall,
        "tokens_per_s": tokens / wall,
        **{f"latency_{k}_s": v for k, v in percentiles(lat).items()},
        **{f"ttft_{k}_s": v for k, v in percentiles(ttft).items()},
    }


def main(argv=None) -> int:
    import importlib.util
    import os
    import sys

    from effitrans.bench import common
    from effitrans.models import build_model

    parser = argparse.ArgumentParser(
        prog="python -m effitrans.serve.loadgen",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", default="configs/lm_tiny.py")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--prompt_len", type=int, default=32, help="prompts are 1..prompt_len random tokens")
    parser.add_argument("--new_tokens", type=int, default=32)
    parser.add_argument("--max_len", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top_p", type=float, default=0.95)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    sys.path.insert(0, os.path.join(os.getcwd(), "configs"))
    spec = importlib.util.spec_from_file_location("serve_config", args.config)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cfg = mod.get_config()
    model = build_model(cfg.model)
    engine = ServingEngine(model, max_batch=args.concurrency, max_len=args.max_len)
    rng = np.random.default_rng(0)

    def make(i):
        n = int(rng.integers(1, args.prompt_len + 1))
        return Request(
            prompt=rng.integers(0, cfg.model.vocab_size, n).tolist(),
            max_new_tokens=args.new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
        )

    run_load(engine, make, num_requests=min(args.concurrency, args.requests), concurrency=args.concurrency)  # compile
    stats = run_load(engine, make, num_requests=args.requests, concurrency=args.concurrency)
    cols = [
        (k, k)
        for k in (
            "concurrency",
            "finished",
            "qps",
            "tokens_per_s",
            "latency_p50_s",
            "latency_p90_s",
            "latency_p99_s",
            "ttft_p50_s",
            "ttft_p90_s",
            "ttft_p99_s",
        )
    ]
    print(common.format_table([stats], cols))
    common.write_json(args.json, [stats])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
