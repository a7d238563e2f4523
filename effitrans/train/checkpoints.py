"""Orbax checkpoints: keep the last K, resume from the newest readable one, refuse an incompatible config.

Layout: WORKDIR/checkpoints/<step>/{state, meta}. `meta` holds the model config and the data name, so a
checkpoint from another architecture is rejected by key before any restore or compilation.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

log = logging.getLogger("effitrans.checkpoints")

# Keys of config.model that change parameter shapes or meaning; a checkpoint must agree on all of them.
_COMPAT_KEYS = (
    "name",
    "vocab_size",
    "d_model",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "head_dim",
    "ffn_width",
    "tie_embeddings",
    "num_classes",
    "embed_dim",
)


def shape_signature(params) -> dict:
    """Signature of a model known only by its parameters (no config): {"param_shapes": {path: shape}}."""
    leaves = jax.tree_util.tree_leaves_with_path(params)
    return {"param_shapes": {jax.tree_util.keystr(p): list(x.shape) for p, x in leaves}}


class IncompatibleCheckpointError(ValueError):
    """The checkpoint on disk was written by a config whose model differs from this one."""


def model_signature(model_cfg) -> dict:
    d = model_cfg.to_dict() if hasattr(model_cfg, "to_dict") else dict(model_cfg)
    sig = {k: d.get(k) for k in _COMPAT_KEYS if k in d}
    if isinstance(sig.get("ffn_width"), tuple):
        sig["ffn_width"] = list(sig["ffn_width"])
    return sig


class Checkpointer:
    """Save every N steps (and on demand), keep the last K, restore the newest readable step."""

    def __init__(
        self,
        directory: str,
        *,
        keep: int,
        model_cfg=None,
        signature: dict | None = None,
        extra_meta: dict | None = None,
    ):
        """The compatibility signature is model_signature(model_cfg), or `signature` when given."""
        self.directory = os.path.abspath(directory)
        self.signature = signature if signature is not None else model_signature(model_cfg)
        self.extra_meta = dict(extra_meta or {})
        self.manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
        )

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def check_compatible(self) -> None:
        """Raises IncompatibleCheckpointError naming the first differing key, before anything is restored."""
        for step in reversed(self.steps()):
            path = os.path.join(self.directory, str(step), "meta", "metadata")
            try:
                with open(path) as f:
                    meta = json.load(f)
            except (OSError, json.JSONDecodeError):
                continue  # unreadable meta: restore() reports and skips this step
            saved = meta.get("model", {})
            for key in sorted(set(saved) | set(self.signature)):
                if saved.get(key) != self.signature.get(key):
                    raise IncompatibleCheckpointError(
                        f"checkpoint {os.path.join(self.directory, str(step))} was written with "
                        f"config.model.{key}={saved.get(key)!r}, but this config has "
                        f"config.model.{key}={self.signature.get(key)!r}; use a fresh --workdir or the same "
                        f"model config"
                    )
            return

    def save(self, step: int, state: Any, *, force: bool = False) -> None:
        meta = {"model": self.signature, "step": int(step), **self.extra_meta}
        self.manager.save(
            step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=force
        )

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def restore_latest(self, abstract_state: Any) -> tuple[int | None, Any]:
        """(step, state) of the newest checkpoint that reads back; (None, None) when there is none.

        A checkpoint that fails to read (truncated file, missing array) is reported by step and skipped.
        """
        self.check_compatible()
        for step in reversed(self.steps()):
            try:
                restored = self.manager.restore(
                    step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
                )
                return step, restored["state"]
            except Exception as e:  # noqa: BLE001 - any read failure means "try the next older one"
                log.warning(
                    "checkpoint at step %d in %s is unreadable (%s: %s); trying an older one",
                    step,
                    self.directory,
                    type(e).__name__,
                    str(e).splitlines()[0][:200],
                )
                print(
                    f"[effitrans] checkpoint at step {step} is unreadable ({type(e).__name__}); trying an older one",
                    flush=True,
                )
        return None, None

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(tree, shardings) -> Any:
    """ShapeDtypeStructs with shardings: the restore target for orbax."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
