"""Parameters that carry logical axis names.

Every weight in effitrans is an `nnx.Param` whose metadata holds `logical_axes`, a tuple with one name per
dimension (e.g. ("embed", "mlp")). The names say what a dimension *is*; `effitrans.train.partitioning` maps
them to mesh axes through the rules table in `config.mesh.rules`, so modules never know about meshes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

Initializer = Callable[..., jax.Array]


def init_param(
    rngs: nnx.Rngs, shape: Sequence[int], logical_axes: Sequence[str | None], init: Initializer, dtype=jnp.float32
) -> nnx.Param:
    """Returns an nnx.Param of `shape` drawn from `init`, tagged with `logical_axes`."""
    shape = tuple(int(s) for s in shape)
    logical_axes = tuple(logical_axes)
    if len(shape) != len(logical_axes):
        raise ValueError(f"logical_axes {logical_axes} must name each of the {len(shape)} dims of shape {shape}")
    return nnx.Param(init(rngs.params(), shape, dtype), logical_axes=logical_axes)


# Alias used in type hints: a Param whose metadata has `logical_axes`.
LogicalParam = nnx.Param


def logical_axes_of(variable: nnx.Variable) -> tuple[str | None, ...]:
    """The logical axis names of a variable (all None when it was created without them)."""
    axes = variable.get_metadata().get("logical_axes")
    if axes is None:
        return (None,) * jnp.ndim(variable.get_value())
    return tuple(axes)


def fan_in_normal(fan_in_axes: Sequence[int] = (0,)) -> Initializer:
    """Truncated-normal-free variance scaling with fan-in over `fan_in_axes` (like lecun_normal for einsum weights)."""
    return nnx.initializers.variance_scaling(1.0, "fan_in", "normal", in_axis=tuple(fan_in_axes), out_axis=-1)


class StateParam(nnx.Param):
    """A parameter that gradients do not train: the module keeps it fixed (random LSH rotations) or updates
    it in its own forward pass (k-means centroids by EMA). It is saved and sharded like any Param; the
    trainer leaves it out of the optimizer's update and carries the value the forward pass left in it."""
