"""Shared by the sparse / routed / TGA family tests: a float64 numpy attention oracle and a jaxpr scan
that finds S x S intermediates."""

import jax
import jax.numpy as jnp
import numpy as np


def dense_attention_np(q, k, v, allowed, scale=None, self_logit=None):
    """q [B, T, N, H], k/v [B, S, N, H] (kv heads already repeated), allowed bool [B?, N?, T, S] broadcastable
    to [B, N, T, S] -> out [B, T, N, H] float64; rows with no allowed key give 0. self_logit replaces the
    diagonal logit (Reformer's shared-QK self mask)."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = np.einsum("btnh,bsnh->bnts", q, k) * scale
    if self_logit is not None:
        t = np.arange(q.shape[1])
        logits[:, :, t, t] = self_logit
    allowed = np.broadcast_to(allowed, logits.shape)
    logits = np.where(allowed, logits, -np.inf)
    m = np.max(logits, axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    e = np.where(allowed, np.exp(logits - m), 0.0)
    den = e.sum(-1, keepdims=True)
    p = e / np.where(den > 0, den, 1.0)
    return np.einsum("bnts,bsnh->btnh", p, v)


def _shapes(jaxpr):
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            yield tuple(getattr(var.aval, "shape", ()))
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                inner = getattr(sub, "jaxpr", None)
                if inner is not None:
                    yield from _shapes(inner if hasattr(inner, "eqns") else inner.jaxpr)
                elif hasattr(sub, "eqns"):
                    yield from _shapes(sub)


def largest_intermediate(fn, *args):
    """(elements, shape) of the largest array produced anywhere in fn's jaxpr (sub-jaxprs included)."""
    closed = jax.make_jaxpr(fn)(*args)
    best = (0, ())
    for shape in _shapes(closed.jaxpr):
        size = int(np.prod(shape)) if shape else 1
        best = max(best, (size, shape))
    return best


def assert_no_quadratic_intermediate(module, s: int, d_model: int) -> None:
    """Traces forward + backward of `module` at length s and checks its largest intermediate is below
    S^2 / 8 elements (dense attention for the tests' 2 heads would hold 2 S^2, 16x this bound)."""
    from flax import nnx

    graphdef, params = nnx.split(module)
    pos = jnp.arange(s, dtype=jnp.int32)[None]
    loss = lambda p, x: jnp.sum(nnx.merge(graphdef, p)(x, positions=pos)[0])
    size, shape = largest_intermediate(jax.grad(loss), params, jnp.zeros((1, s, d_model), jnp.float32))
    assert size < s * s // 8, shape
