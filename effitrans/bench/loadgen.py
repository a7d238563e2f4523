"""`python -m effitrans.bench loadgen --config=configs/lm_tiny.py`: the closed-loop load generator
(effitrans.serve.loadgen) on a randomly initialised model of a config; prints QPS, tokens/s, latency and
TTFT percentiles, and writes them with --json.

    python -m effitrans.bench loadgen --config=configs/lm_tiny.py [--concurrency 8] [--requests 32] [--json PATH]
        [--config.x=value ...]
"""

from __future__ import annotations

import argparse
import inspect

from effitrans.bench import common
from effitrans.registry import build_model
from effitrans.serve.loadgen import load_test, random_requests

COLUMNS = (
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


def _keyword_defaults(fn) -> dict:
    return {name: p.default for name, p in inspect.signature(fn).parameters.items() if p.default is not p.empty}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m effitrans.bench loadgen", description=__doc__)
    parser.add_argument("--json", default=None)
    # One flag per keyword of load_test and random_requests, with its default.
    engine_opts, request_opts = _keyword_defaults(load_test), _keyword_defaults(random_requests)
    for name, default in {**engine_opts, **request_opts}.items():
        parser.add_argument(f"--{name}", type=type(default), default=default)
    cfg, _, rest = common.config_from_args(argv, "configs/lm_tiny.py", "effitrans.bench loadgen")
    args = parser.parse_args(rest)
    make = random_requests(cfg.model.vocab_size, **{name: getattr(args, name) for name in request_opts})
    stats = load_test(build_model(cfg.model), make, **{name: getattr(args, name) for name in engine_opts})
    print(common.format_table([stats], [(k, k) for k in COLUMNS]))
    common.write_json(args.json, [stats])
    return 0
