"""Small Flax NNX building blocks shared by every model: params with logical axes, norms, RoPE, embeddings, GLU."""

from effitrans.layers.embed import Embed
from effitrans.layers.glu import GLUFeedForward, glu_feed_forward
from effitrans.layers.norms import RMSNorm, rms_norm
from effitrans.layers.params import LogicalParam, init_param, logical_axes_of
from effitrans.layers.rope import apply_rope, rope_frequencies

__all__ = [
    "Embed",
    "GLUFeedForward",
    "glu_feed_forward",
    "RMSNorm",
    "rms_norm",
    "LogicalParam",
    "init_param",
    "logical_axes_of",
    "apply_rope",
    "rope_frequencies",
]
