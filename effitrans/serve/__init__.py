"""Serving: KV-cache prefill and decode, sampling, generation, a batched engine and a load generator."""

from effitrans.serve.engine import Request, Result, ServingEngine, cache_mismatch
from effitrans.serve.generate import generate, sample_next_token
from effitrans.serve.sampling import check_sampling, sample_tokens


def __getattr__(name):
    # Imported lazily so `python -m effitrans.serve.loadgen` does not find the module already imported.
    if name == "run_load":
        from effitrans.serve.loadgen import run_load

        return run_load
    raise AttributeError(f"module 'effitrans.serve' has no attribute {name!r}")


__all__ = [
    "Request",
    "Result",
    "ServingEngine",
    "cache_mismatch",
    "check_sampling",
    "generate",
    "run_load",
    "sample_next_token",
    "sample_tokens",
]
