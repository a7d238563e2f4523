"""Meshes and logical-axis sharding rules (t5x style: a short table from logical names to mesh axes).

Params carry logical axis names (`effitrans.layers.params`); `config.mesh.rules` maps each name to a mesh
axis, a tuple of mesh axes, or None (replicated). A mesh axis is used at most once per array, and a
dimension that the mesh axis size does not divide is replicated instead (reported by `describe_sharding`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")


def make_mesh(mesh_cfg, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A Mesh with axes (data, fsdp, tensor) of the sizes in mesh_cfg, over the first devices."""
    devices = list(jax.devices() if devices is None else devices)
    shape = (mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor)
    n = int(np.prod(shape))
    if n > len(devices):
        raise ValueError(
            f"config.mesh data={shape[0]} x fsdp={shape[1]} x tensor={shape[2]} needs {n} devices "
            f"but {len(devices)} are available"
        )
    return Mesh(np.asarray(devices[:n]).reshape(shape), MESH_AXES)


def _as_tuple(axes) -> tuple:
    if axes is None:
        return ()
    return (axes,) if isinstance(axes, str) else tuple(axes)


def logical_to_spec(logical_axes: Sequence[str | None], shape: Sequence[int], rules: Iterable, mesh: Mesh) -> P:
    """PartitionSpec for an array with these logical axis names and shape under `rules` on `mesh`."""
    table = {name: _as_tuple(axes) for name, axes in rules}
    used: set[str] = set()
    spec = []
    for name, dim in zip(logical_axes, shape):
        mesh_axes = tuple(a for a in table.get(name, ()) if a not in used and mesh.shape[a] > 1)
        size = int(np.prod([mesh.shape[a] for a in mesh_axes])) if mesh_axes else 1
        if not mesh_axes or dim % size:
            spec.append(None)  # replicate: no rule, or the dimension does not split evenly
            continue
        used.update(mesh_axes)
        spec.append(mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    return P(*spec)


def param_specs(params_state: nnx.State, rules, mesh: Mesh):
    """A pure-dict tree of PartitionSpecs matching nnx.to_pure_dict(params_state)."""

    def spec_of(var):
        shape = np.shape(var.get_value())
        axes = var.get_metadata().get("logical_axes") or (None,) * len(shape)
        return logical_to_spec(axes, shape, rules, mesh)

    specs = jax.tree.map(spec_of, params_state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.to_pure_dict(specs) if isinstance(specs, nnx.State) else specs


def batch_spec(ndim: int) -> P:
    """Batches are split along their leading dim over (data, fsdp)."""
    return P(("data", "fsdp"), *([None] * (ndim - 1)))


def mirror_specs(tree, param_spec_tree, param_shape_tree):
    """Specs for a tree whose subtrees mirror the params (optimizer moments): leaves whose key path ends
    with a param's path and whose shape matches take that param's spec; everything else is replicated."""
    by_path = {}
    for (path, spec), (_, shape) in zip(
        jax.tree_util.tree_leaves_with_path(param_spec_tree, is_leaf=lambda x: isinstance(x, P)),
        jax.tree_util.tree_leaves_with_path(param_shape_tree),
    ):
        by_path[tuple(str(k) for k in path)] = (spec, tuple(shape.shape))

    def spec_for(path, leaf):
        keys = tuple(str(k) for k in path)
        shape = tuple(np.shape(leaf))
        for start in range(len(keys)):
            hit = by_path.get(keys[start:])
            if hit is not None and hit[1] == shape:
                return hit[0]
        return P()

    return jax.tree_util.tree_map_with_path(spec_for, tree)


def describe_sharding(tree) -> dict:
    """{path: spec string} for every array in a tree of sharded jax.Arrays (for logs and tests)."""
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        out[jax.tree_util.keystr(path)] = str(getattr(leaf.sharding, "spec", leaf.sharding))
    return out
