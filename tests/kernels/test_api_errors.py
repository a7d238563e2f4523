"""Every invalid input to kernels.attention / decode_attention raises a message that names it."""

import jax.numpy as jnp
import numpy as np
import pytest

from effitrans import kernels
from effitrans.kernels import masks as M

Q = jnp.zeros((2, 8, 4, 16))
K = jnp.zeros((2, 8, 2, 16))
V = jnp.zeros((2, 8, 2, 16))


def _attn(**overrides):
    args = dict(q=Q, k=K, v=V)
    args.update({k: overrides.pop(k) for k in ("q", "k", "v") if k in overrides})
    overrides.setdefault("impl", "reference")
    return kernels.attention(args["q"], args["k"], args["v"], **overrides)


@pytest.mark.parametrize(
    "overrides, error, match",
    [
        (dict(q=jnp.zeros((8, 4, 16))), ValueError, r"q must have rank 4.*\(8, 4, 16\)"),
        (dict(k=jnp.zeros((2, 8, 2))), ValueError, r"k must have rank 4"),
        (dict(v=jnp.zeros((2, 8, 2, 16, 1))), ValueError, r"v must have rank 4"),
        (dict(q=np.zeros((2, 8, 4, 16), np.int32)), TypeError, r"q must be a floating.*int32"),
        (dict(q=[[1.0]]), TypeError, r"q must be an array.*list"),
        (dict(k=jnp.zeros((3, 8, 2, 16))), ValueError, r"batch sizes differ.*k 3"),
        (dict(v=jnp.zeros((2, 9, 2, 16))), ValueError, r"kv_len differs.*v 9"),
        (dict(v=jnp.zeros((2, 8, 1, 16))), ValueError, r"num_kv_heads differs.*v 1"),
        (dict(k=jnp.zeros((2, 8, 2, 8))), ValueError, r"head_dim differs.*k 8"),
        (
            dict(k=jnp.zeros((2, 8, 3, 16)), v=jnp.zeros((2, 8, 3, 16))),
            ValueError,
            r"num_heads \(4\).*num_kv_heads \(3\)",
        ),
        (dict(mask="causal"), TypeError, r"mask must be .*Mask.*str: 'causal'"),
        (dict(mask=np.ones((8, 8), bool)), TypeError, r"mask must be"),
        (dict(impl="fast"), ValueError, r"impl must be one of .*'xla'.*'fast'"),
        (dict(block_q=12), ValueError, r"block_q must be a positive multiple of 8.*12"),
        (dict(block_k=0), ValueError, r"block_k must be a positive multiple of 8.*0"),
        (dict(block_k=16.0), ValueError, r"block_k must be .*16.0"),
        (dict(scale="x"), TypeError, r"scale must be"),
        (dict(scale=float("nan")), ValueError, r"scale must be finite.*nan"),
        (dict(return_lse=1), TypeError, r"return_lse must be a bool"),
        (
            dict(segment_ids=jnp.zeros((2, 7), jnp.int32)),
            ValueError,
            r"q_segment_ids must have shape \(2, 8\).*\(2, 7\)",
        ),
        (dict(segment_ids=jnp.zeros((2, 8))), TypeError, r"q_segment_ids must have an integer dtype"),
        (dict(segment_ids=(jnp.zeros((2, 8), jnp.int32),)), ValueError, r"segment_ids as a tuple"),
        (
            dict(segment_ids=(jnp.zeros((2, 8), jnp.int32), jnp.zeros((2, 5), jnp.int32))),
            ValueError,
            r"kv_segment_ids must have shape \(2, 8\)",
        ),
        (
            dict(k=jnp.zeros((2, 9, 2, 16)), v=jnp.zeros((2, 9, 2, 16)), segment_ids=jnp.zeros((2, 8), jnp.int32)),
            ValueError,
            r"q_len == kv_len.*kv_len 9",
        ),
    ],
)
def test_attention_invalid_inputs(overrides, error, match):
    with pytest.raises(error, match=match):
        _attn(**overrides)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(lengths=[8, 8]), TypeError, r"lengths must be an int array.*list"),
        (dict(lengths=jnp.zeros((2,))), TypeError, r"lengths must have an integer dtype"),
        (dict(lengths=jnp.zeros((3,), jnp.int32)), ValueError, r"lengths must have shape \(2,\).*3"),
        (
            dict(lengths=jnp.zeros((2,), jnp.int32), impl="pallas"),
            ValueError,
            r"impl must be one of \('reference', 'xla', 'auto'\).*'pallas'",
        ),
        (dict(lengths=jnp.zeros((2,), jnp.int32), block_k=7), ValueError, r"block_k .*7"),
    ],
)
def test_decode_invalid_inputs(kwargs, error, match):
    with pytest.raises(error, match=match):
        kernels.decode_attention(Q, K, V, **kwargs)


def test_valid_call_passes_validation():
    out = _attn(mask=M.Causal(), block_q=8, block_k=16)
    assert out.shape == (2, 8, 4, 16)


def test_auto_dispatches_to_xla_on_cpu():
    import jax  # pylint: disable=import-outside-toplevel

    from effitrans.kernels import api  # pylint: disable=import-outside-toplevel

    want = "pallas" if jax.default_backend() in ("gpu", "tpu") else "xla"
    assert api._resolve_impl("auto", api.IMPLS) == want  # pylint: disable=protected-access
    assert api._resolve_impl("auto", api.DECODE_IMPLS) == "xla"  # pylint: disable=protected-access
