"""Assembled models and their registry."""

from effitrans.models.registry import MODELS, build_model
from effitrans.models.transformer import CausalLM, EmbeddingEncoder, Encoder, EncoderClassifier

__all__ = ["MODELS", "build_model", "CausalLM", "Encoder", "EncoderClassifier", "EmbeddingEncoder"]
