"""Assembled models (built from a config by effitrans.registry.build_model)."""

from effitrans.models.transformer import CausalLM, EmbeddingEncoder, Encoder, EncoderClassifier

__all__ = ["CausalLM", "Encoder", "EncoderClassifier", "EmbeddingEncoder"]
