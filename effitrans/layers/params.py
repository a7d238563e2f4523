"""Parameters and non-trainable state that carry logical axis names.

Every weight in effitrans is an `nnx.Param` whose metadata holds `logical_axes`, a tuple with one name per
dimension (e.g. ("embed", "mlp")). The names say what a dimension *is*; `effitrans.train.partitioning` maps
them to mesh axes through the rules table in `config.mesh.rules`, so modules never know about meshes.

Non-trainable state (LSH rotations, routing centroids) is a `StateVariable`: not an `nnx.Param`, so an
optimizer built over `nnx.Param` never sees it, but tagged with `logical_axes` like a parameter, so it is
sharded and checkpointed the same way. A forward pass never changes it: a module that learns state
outside of gradients (a k-means EMA) records the new value with `propose_update`, and only a training
step applies it with `commit_updates`; evaluation and serving drop the proposal. Likewise a forward pass may
`report` scalars (auxiliary losses, router metrics) that the training step collects with `pop_reports`.
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


def fan_in_normal(fan_in_axes: Sequence[int] = (0,), batch_axes: Sequence[int] = ()) -> Initializer:
    """Truncated-normal-free variance scaling with fan-in over `fan_in_axes` (like lecun_normal for einsum weights);
    `batch_axes` index independent matrices (e.g. the experts of a stacked [E, D, F] weight)."""
    return nnx.initializers.variance_scaling(
        1.0, "fan_in", "normal", in_axis=tuple(fan_in_axes), out_axis=-1, batch_axis=tuple(batch_axes)
    )


class StateVariable(nnx.Variable):
    """Non-trainable model state with `logical_axes` metadata: kept fixed (LSH rotations) or moved only by
    `commit_updates` in a training step (k-means centroids). Optimizers over `nnx.Param` skip it."""


class StateUpdate(nnx.Variable):
    """A forward pass's proposed new value of the StateVariable named by its `target` metadata (an attribute
    of the same module). It exists only after a forward pass and lives until `commit_updates` applies it."""


def _update_name(name: str) -> str:
    return f"{name}_update"


def propose_update(module: nnx.Module, name: str, value: jax.Array) -> None:
    """Records `value` as the next value of `module.<name>` (a StateVariable); the variable is unchanged."""
    target = getattr(module, name)
    if not isinstance(target, StateVariable):
        raise TypeError(f"{type(module).__name__}.{name} is a {type(target).__name__}; expected a StateVariable")
    if jnp.shape(value) != jnp.shape(target.get_value()):
        raise ValueError(
            f"proposed update of {type(module).__name__}.{name} has shape {jnp.shape(value)}; "
            f"expected the variable's shape {jnp.shape(target.get_value())}"
        )
    setattr(module, _update_name(name), StateUpdate(jax.lax.stop_gradient(value), target=name))


def commit_updates(model: nnx.Module) -> int:
    """Writes every pending StateUpdate in `model` into its StateVariable and removes it; returns how many.

    Training steps call this after the forward pass; evaluation and serving never do.
    """
    count = 0
    for _, module in nnx.iter_modules(model):
        for attr, update in list(vars(module).items()):
            if isinstance(update, StateUpdate):
                target = getattr(module, update.get_metadata()["target"])
                target.set_value(update.get_value().astype(target.get_value().dtype))
                delattr(module, attr)
                count += 1
    return count


class StepReport(nnx.Variable):
    """A scalar a forward pass reports to the training step: an auxiliary loss (`loss=True`: added to the
    objective) or a metric; `reduce` (sum | mean | max) says how the same name from several modules combines.
    It exists only after a forward pass and lives until `pop_reports` collects it."""


REDUCTIONS = {"sum": sum, "mean": lambda v: sum(v) / len(v), "max": lambda v: jnp.max(jnp.stack(v))}


def report(module: nnx.Module, name: str, value: jax.Array, *, loss: bool = False, reduce: str = "mean") -> None:
    """Records the scalar `value` under `name` for the training step (an auxiliary loss when `loss`, else a
    metric). A second call with the same name on the same module replaces the first."""
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce={reduce!r} is not one of {sorted(REDUCTIONS)}")
    if jnp.ndim(value):
        raise ValueError(f"report {name!r} must be a scalar, got shape {jnp.shape(value)}")
    setattr(module, f"{name}_report", StepReport(value, name=name, loss=loss, reduce="sum" if loss else reduce))


def pop_reports(model: nnx.Module) -> tuple[jax.Array, dict]:
    """Removes every StepReport in `model`; returns (the sum of the reported losses, {name: reduced value}), where
    a loss name reduces by sum (the total it adds to the objective). (0.0, {}) when nothing reported."""
    losses, values = [], {}
    for _, module in nnx.iter_modules(model):
        for attr, rep in list(vars(module).items()):
            if isinstance(rep, StepReport):
                meta = rep.get_metadata()
                value = jnp.asarray(rep.get_value(), jnp.float32)
                if meta["loss"]:
                    losses.append(value)
                values.setdefault(meta["name"], (meta["reduce"], []))[1].append(value)
                delattr(module, attr)
    metrics = {name: REDUCTIONS[reduce](vals) for name, (reduce, vals) in values.items()}
    return (sum(losses) if losses else jnp.zeros((), jnp.float32)), metrics
