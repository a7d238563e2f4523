"""Serving: KV-cache prefill and decode, sampling, generation, a batched engine and a load generator."""

from effitrans.serve.engine import Request, Result, ServingEngine, cache_mismatch
from effitrans.serve.generate import generate, sample_next_token
from effitrans.serve.loadgen import load_test, random_requests, run_load
from effitrans.serve.sampling import check_sampling, sample_tokens

__all__ = [
    "Request",
    "Result",
    "ServingEngine",
    "cache_mismatch",
    "check_sampling",
    "generate",
    "load_test",
    "random_requests",
    "run_load",
    "sample_next_token",
    "sample_tokens",
]
