"""Serving: KV-cache prefill and decode, sampling, generation."""

from effitrans.serve.generate import generate, sample_next_token

__all__ = ["generate", "sample_next_token"]
