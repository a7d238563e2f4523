"""Serving: KV-cache prefill and decode, sampling, generation, a batched engine and a load generator."""

from effitrans.serve.engine import Request, Result, ServingEngine, cache_mismatch
from effitrans.serve.generate import decode_tokens, generate, split_model, vocab_size
from effitrans.serve.loadgen import load_test, random_requests, run_load
from effitrans.serve.sampling import Sampling, apply_stop_tokens, check_sampling, sample_tokens

__all__ = [
    "Request",
    "Result",
    "Sampling",
    "ServingEngine",
    "apply_stop_tokens",
    "cache_mismatch",
    "check_sampling",
    "decode_tokens",
    "generate",
    "load_test",
    "random_requests",
    "run_load",
    "sample_tokens",
    "split_model",
    "vocab_size",
]
