"""Orbax checkpoints: keep the last K, resume from the newest readable one, refuse a changed config.

Layout: WORKDIR/checkpoints/<step>/{state, meta}. `meta` holds the config that gives the checkpoint its
meaning (the whole model config, the data config and the task: `meaning(config)`), so a resume under another
config is refused, naming every differing key, before anything is restored or compiled.

Nothing is deleted except by the keep-K cleanup, and that only ever sees checkpoints of this config: a step
that cannot be used is *set aside*, i.e. moved to WORKDIR/checkpoints.set_aside/<step>-<reason>-<time>/ with
a REASON.txt, so training can pass that step again and a person can still look at it. Reasons: unreadable
(truncated file, missing array, broken meta), non-finite parameters, or config-changed (only when asked
for with `on_config_change="start_fresh"` or `"load_weights"`).
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import sys
import traceback
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

log = logging.getLogger("effitrans.checkpoints")

# What to do when the checkpoints on disk were written by another config (see Checkpointer.restore_latest).
ON_CONFIG_CHANGE = ("refuse", "start_fresh", "load_weights")


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be used as asked; the message says why and what to do."""


class IncompatibleCheckpointError(CheckpointError):
    """The checkpoints on disk were written by a config that differs from this one."""


def _flatten(tree: dict, prefix: str) -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _plain(cfg) -> dict:
    """A ConfigDict (or dict) as JSON values: tuples become lists, so saved and current values compare equal."""
    if hasattr(cfg, "to_json_best_effort"):
        return json.loads(cfg.to_json_best_effort())
    return json.loads(json.dumps(dict(cfg), default=repr))


def meaning(config) -> dict:
    """{"model.d_model": 64, "data.name": "text_lm", "train.task": "lm", ...}: every key that changes what
    a checkpoint's numbers mean. Optimizer, schedule, logging, mesh and held-out-evaluation keys are left
    out: a run may resume with more steps, another learning rate, another mesh or a larger eval batch."""
    out = {}
    if "model" in config:
        out.update(_flatten(_plain(config.model), "model."))
    if "data" in config:
        # Data keys named *eval* (eval_batch_size, max_eval_batches, eval_seed, ...) only shape the held-out
        # pass, not what was trained on.
        out.update({k: v for k, v in _flatten(_plain(config.data), "data.").items() if "eval" not in k})
    if "train" in config and "task" in config.train:
        out["train.task"] = config.train.task
    return out


def shape_signature(params) -> dict:
    """Meaning of a model known only by its parameters (no config): {"param_shapes.<path>": shape}."""
    leaves = jax.tree_util.tree_leaves_with_path(params)
    return {f"param_shapes.{jax.tree_util.keystr(p)}": list(x.shape) for p, x in leaves}


def path_name(path) -> str:
    """ "params/blocks/0/attn/k" for a pytree key path: the same name whether a level is a dict with int keys, a
    list, or (as orbax restores it without a target) a dict with string keys."""
    return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def _shapes(tree) -> dict:
    return {path_name(p): tuple(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def config_diff(saved: dict, current: dict) -> list[str]:
    """Lines 'config.KEY=saved there, config.KEY=current here' for every key whose value differs."""
    return [
        f"config.{k}={saved.get(k, '<absent>')!r} there, config.{k}={current.get(k, '<absent>')!r} here"
        for k in sorted(set(saved) | set(current))
        if saved.get(k, "<absent>") != current.get(k, "<absent>")
    ]


@jax.jit
def finite_flag(tree) -> jax.Array:
    """bool[]: whether every float array in `tree` is finite (usable inside jit)."""
    leaves = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def all_finite(tree) -> bool:
    """Whether every float array in `tree` is finite (one jitted reduction, one host transfer)."""
    return bool(jax.device_get(finite_flag(tree)))


def _quiet_failed_read_leftovers() -> None:
    """After a failed read, orbax leaves coroutines (and callbacks on its closed event loop) that Python reports
    as "Exception ignored" tracebacks when they are collected, pages after the one-line report of the same
    failure. Installs (once) an unraisable-exception hook that logs those at debug level and passes every
    other one to the previous hook."""
    previous = sys.unraisablehook
    if getattr(previous, "effitrans_quiet", False):
        return

    def hook(unraisable):
        files = [f.filename for f in traceback.extract_tb(unraisable.exc_traceback)]
        exc = unraisable.exc_value
        if any("orbax" in f for f in files) or (isinstance(exc, RuntimeError) and "Event loop is closed" in str(exc)):
            log.debug("left over from a failed checkpoint read: %s: %s", type(exc).__name__, str(exc)[:200])
            return
        previous(unraisable)

    hook.effitrans_quiet = True
    sys.unraisablehook = hook


class Checkpointer:
    """Save every N steps (and on demand), keep the last K, restore the newest usable step.

    `config_meaning` is what the checkpoints of this run mean (`meaning(config)`); given only `model_cfg`, it is
    that model config's keys. Restoring compares it with the meaning saved beside each checkpoint.
    """

    def __init__(
        self,
        directory: str,
        *,
        keep: int,
        model_cfg=None,
        config_meaning: dict | None = None,
        extra_meta: dict | None = None,
    ):
        if config_meaning is None:
            if model_cfg is None:
                raise ValueError("Checkpointer needs config_meaning= or model_cfg=")
            config_meaning = _flatten(_plain(model_cfg), "model.")
        self.directory = os.path.abspath(directory)
        self.set_aside_directory = self.directory + ".set_aside"
        self.config_meaning = config_meaning
        self.extra_meta = dict(extra_meta or {})
        self.manager = ocp.CheckpointManager(
            self.directory,
            # cleanup_tmp_directories: a write killed half way leaves a <step>.orbax-checkpoint-tmp-* folder
            # that was never a checkpoint; orbax removes those when the manager opens.
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, cleanup_tmp_directories=True),
            # Named handlers let item_metadata read a step's array layout before anything is restored.
            item_handlers={"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()},
        )

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    # ---- meta and compatibility -------------------------------------------------------------------

    def read_meta(self, step: int) -> dict | None:
        """The meta saved with `step`, or None when it cannot be read."""
        path = os.path.join(self.directory, str(step), "meta", "metadata")
        try:
            with open(path) as f:
                meta = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return None
        return meta if isinstance(meta, dict) else None

    def differences(self, meta: dict) -> list[str]:
        """How the config that wrote `meta` differs from this one (empty: the same meaning)."""
        if "config" in meta:
            return config_diff(meta["config"], self.config_meaning)
        # Older meta: only the model's shape keys (or its parameter shapes) were saved, under "model".
        old = meta.get("model", {})
        if "param_shapes" in old:
            legacy = {f"param_shapes.{k}": v for k, v in old["param_shapes"].items()}
            return config_diff(legacy, {k: v for k, v in self.config_meaning.items() if k.startswith("param_shapes.")})
        legacy = {f"model.{k}": v for k, v in old.items()}
        return config_diff(legacy, {k: self.config_meaning.get(k, "<absent>") for k in legacy})

    def set_aside(self, step: int, reason: str, detail: str) -> str:
        """Moves checkpoint `step` to checkpoints.set_aside/<step>-<reason>-<UTC time>/ with a REASON.txt."""
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%S%fZ")
        target = os.path.join(self.set_aside_directory, f"{step}-{reason}-{stamp}")
        if jax.process_index() == 0:
            os.makedirs(self.set_aside_directory, exist_ok=True)
            os.rename(os.path.join(self.directory, str(step)), target)
            with open(os.path.join(target, "REASON.txt"), "w") as f:
                f.write(f"{reason}: {detail}\n")
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"effitrans-set-aside-{step}")
        self.manager.reload()
        msg = f"checkpoint at step {step} set aside ({reason}: {detail}) -> {target}"
        log.info(msg)
        print(f"[effitrans] {msg}", flush=True)
        return target

    def _state_diff(self, step: int, abstract_state: Any) -> list[str] | None:
        """How the arrays saved at `step` differ from `abstract_state` by path and shape (None: unreadable).
        A changed optimizer (e.g. train.grad_clip on or off) changes the state without changing the config's
        meaning; such a checkpoint is incompatible, not corrupt."""
        try:
            saved = _shapes(self.manager.item_metadata(step)["state"])
        except Exception:  # noqa: BLE001 - unreadable metadata: the caller sets the step aside
            return None
        if not saved:  # a torn write or truncated files: orbax finds no arrays at all
            return None
        want = _shapes(abstract_state)
        return [
            f"state/{k}: {saved.get(k, 'absent')} there, {want.get(k, 'absent')} here"
            for k in sorted(set(saved) | set(want))
            if saved.get(k) != want.get(k)
        ]

    def _changed_config(self, abstract_state: Any, on_config_change: str) -> tuple[int, list[str]] | None:
        """(newest step written by another config or state layout, its differences) or None. Steps whose meta or
        array metadata cannot be read are set aside on the way."""
        changed = None
        for step in reversed(self.steps()):
            meta = self.read_meta(step)
            diff = self.differences(meta) if meta is not None else None
            if diff == []:
                diff = self._state_diff(step, abstract_state)
            if diff is None:
                self.set_aside(step, "unreadable", "its meta or array metadata is missing or broken")
            elif diff and changed is None:
                changed = (step, diff)
        if changed is not None and on_config_change == "refuse":
            step, diff = changed
            shown = "; ".join(diff[:12]) + (f"; and {len(diff) - 12} more" if len(diff) > 12 else "")
            raise IncompatibleCheckpointError(
                f"checkpoint {os.path.join(self.directory, str(step))} was written by another config: {shown}. "
                f"Nothing was changed on disk. Use the same config, another --workdir, or "
                f"--on_config_change=start_fresh (sets the old checkpoints aside and trains from step 0) or "
                f"--on_config_change=load_weights (starts from step 0 with the old weights where the shapes "
                f"allow)"
            )
        return changed

    # ---- save / restore ---------------------------------------------------------------------------

    def save(self, step: int, state: Any, *, force: bool = False) -> None:
        meta = {"config": self.config_meaning, "step": int(step), **self.extra_meta}
        self.manager.save(
            step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=force
        )

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def _restore(self, step: int, abstract_state: Any) -> Any:
        return self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))[
            "state"
        ]

    def restore_latest(
        self, abstract_state: Any, *, on_config_change: str = "refuse"
    ) -> tuple[int | None, Any, dict | None]:
        """(step, state, None) of the newest usable checkpoint of this config; (None, None, None) if none.

        Checkpoints that fail to read, or whose float arrays are not all finite, are set aside and the next
        older one is tried. Checkpoints written by another config: "refuse" raises IncompatibleCheckpointError
        listing the differing keys (disk untouched); "start_fresh" sets them all aside and returns no state;
        "load_weights" returns (None, None, weights) with `load_matching_params` of the newest readable one
        (the parameters whose paths and shapes match `abstract_state["params"]`), then sets them all aside, so
        the new run starts from step 0 and its keep-K cleanup never reaches them.
        """
        if on_config_change not in ON_CONFIG_CHANGE:
            raise ValueError(f"on_config_change={on_config_change!r}; allowed {ON_CONFIG_CHANGE}")
        changed = self._changed_config(abstract_state, on_config_change)
        if changed is not None:
            _, diff = changed
            weights = (
                self.load_matching_params(abstract_state["params"]) if on_config_change == "load_weights" else None
            )
            for s in self.steps():
                self.set_aside(s, "config-changed", "; ".join(diff))
            return None, None, weights
        for step in reversed(self.steps()):
            try:
                state = self._restore(step, abstract_state)
            except Exception as e:  # noqa: BLE001 - any read failure means "set it aside, try the next older one"
                _quiet_failed_read_leftovers()
                self.set_aside(step, "unreadable", f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")
                continue
            if not all_finite(state):
                self.set_aside(step, "non-finite", "some parameters or optimizer state are NaN or inf")
                continue
            return step, state, None
        return None, None, None

    def load_matching_params(self, abstract_params: Any) -> dict:
        """From the newest step that reads back: {"step", "values": {path_name: array} of the saved parameters
        whose path and shape match `abstract_params`, "loaded": [paths], "fresh": [paths left to initialize,
        each with why]}. Raises IncompatibleCheckpointError when nothing matches."""
        want = {path_name(p): x for p, x in jax.tree_util.tree_leaves_with_path(abstract_params)}
        for step in reversed(self.steps()):
            try:
                saved = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
            except Exception as e:  # noqa: BLE001 - an unreadable step: try the next older one
                log.warning("step %d unreadable for load_weights: %s", step, e)
                continue
            have = {path_name(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(saved["params"])}
            loaded, fresh, values = [], [], {}
            for path, spec in want.items():
                if path not in have:
                    fresh.append(f"{path} (not in the checkpoint)")
                elif tuple(have[path].shape) != tuple(spec.shape):
                    fresh.append(f"{path} (shape {tuple(have[path].shape)} there, {tuple(spec.shape)} here)")
                else:
                    loaded.append(path)
                    values[path] = have[path].astype(spec.dtype)
            if not loaded:
                raise IncompatibleCheckpointError(
                    f"--on_config_change=load_weights: no parameter of checkpoint step {step} in {self.directory} "
                    f"matches this model by path and shape (e.g. {fresh[:3]}); use start_fresh or another --workdir"
                )
            return {"step": step, "values": values, "loaded": loaded, "fresh": fresh}
        raise CheckpointError(f"--on_config_change=load_weights: no checkpoint in {self.directory} reads back")

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(tree, shardings) -> Any:
    """ShapeDtypeStructs with shardings: the restore target for orbax."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
