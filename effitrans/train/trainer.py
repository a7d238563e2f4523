"""The training and evaluation loop: jitted sharded steps, metrics, checkpoints, resume, signals.

Reads top to bottom: build (validate config -> mesh -> dataset -> abstract or given model -> shardings ->
sharded init or restore), then `train()` runs steps, logging, evaluation and checkpointing. The state is a
plain pytree {"params", "model_state", "opt_state", "step"}: params are what the optimizer trains,
model_state the non-trainable `StateVariable`s (routing centroids, LSH rotations), carried and updated only
by the train step's `commit_updates`. The model is rebuilt from its graphdef inside each jitted step, so the
same model classes serve training, eval and serving. What is trained is a `Task` (LM,
classification, retrieval, or one built by pruning / funnel recovery / MatFormer), optionally with a
`Distillation` term. The host syncs only at log, checkpoint and eval steps: the losses since the last sync
are checked for NaN/inf there, before any checkpoint is written.
"""

from __future__ import annotations

import collections
import functools
import json
import math
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from effitrans import perf
from effitrans.cascades.early_exit import exit_task, exit_trainable
from effitrans.config_validation import validate_config
from effitrans.data.registry import build_dataset
from effitrans.layers.params import StateVariable, commit_updates, pop_reports
from effitrans.registry import build_model
from effitrans.train import partitioning, records
from effitrans.train.checkpoints import (
    Checkpointer,
    CheckpointError,
    abstract_like,
    finite_flag,
    meaning,
    path_name,
    shape_signature,
)
from effitrans.train.optimizer import learning_rate_schedule, make_optimizer
from effitrans.train.schema import parse_step_range
from effitrans.train.tasks import BITS_PER_NAT, Task, task_from_config


def _split(model: nnx.Module):
    """(graphdef, trainable params, non-trainable state), both as nnx.State: the one place a model is split
    into what the optimizer trains and what only the train step's `commit_updates` changes."""
    return nnx.split(model, nnx.Param, StateVariable)


_IN_FLIGHT = 2  # train steps dispatched ahead of the host at most


def _single_device_mesh() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({"data": 1, "fsdp": 1, "tensor": 1, "rules": ()})


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN or inf loss; the message names the step and the last good checkpoint."""


def _format_eta(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Trainer:
    """Owns one experiment: config, mesh, dataset, task, jitted steps and the checkpoint directory.

    By default everything comes from `config` (groups model, data, train, mesh). Given `model` (e.g. a
    sliced or surgically changed one), training starts from its graph and weights instead of
    build_model(config.model); given `dataset` (get_batch(step, process_index=, process_count=),
    eval_batches(...), metadata), batches come from it. Either may stand in for a missing config group;
    without config.model the checkpoint compatibility check compares parameter shapes. `task` defaults to
    config.train.task; `distillation` adds a teacher term; `trainable(params) -> tree of bools` freezes
    the leaves marked False. `prefetch` builds step+1's batch in a thread while step runs.
    `on_config_change` says what a resume does when the workdir's checkpoints were written by another config:
    "refuse" (raise, listing the differing keys), "start_fresh" or "load_weights" (see Checkpointer).
    """

    def __init__(
        self,
        config,
        workdir: str,
        *,
        task: Task | None = None,
        model: nnx.Module | None = None,
        dataset=None,
        distillation=None,
        trainable=None,
        peak_gflops: float | None = None,
        verbose: bool = True,
        prefetch: bool = True,
        on_config_change: str = "refuse",
    ):
        groups = ("model", "data", "train", "mesh")
        if all(g in config for g in groups):
            validate_config(config, num_devices=jax.device_count(), num_processes=jax.process_count())
        elif (
            "train" not in config
            or ("model" not in config and model is None)
            or ("data" not in config and dataset is None)
        ):
            raise ValueError(
                f"config has groups {sorted(config.keys())}: a Trainer needs config.train, config.model (or "
                f"model=) and config.data (or dataset=)"
            )
        self.config, self.workdir, self.verbose, self.prefetch = config, workdir, verbose, prefetch
        self.on_config_change = on_config_change
        train_cfg = config.train
        self.task = task if task is not None else task_from_config(train_cfg)
        if task is None and "model" in config and "exits" in config.model:  # per-exit losses (docs/cascades.md)
            self.task = exit_task(self.task, config.model)
            if trainable is None and config.model.exits.get("frozen_backbone"):
                trainable = exit_trainable
        self.distillation = distillation
        mesh_cfg = config.mesh if "mesh" in config else _single_device_mesh()
        self.mesh = partitioning.make_mesh(mesh_cfg)
        self.rules = tuple(tuple(r) for r in mesh_cfg.rules)
        if dataset is None:
            dataset = build_dataset(config.data, global_batch_size=train_cfg.batch_size, seed=train_cfg.seed)
        self.dataset = dataset
        self.tx = make_optimizer(train_cfg, trainable=trainable)
        self.schedule = learning_rate_schedule(train_cfg)

        given = model is not None
        if not given:  # abstract model: shapes and logical axes without allocating anything
            model = nnx.eval_shape(lambda: build_model(config.model, seed=train_cfg.seed))
        self.graphdef, params_state, model_state = _split(model)
        self._initial = (nnx.to_pure_dict(params_state), nnx.to_pure_dict(model_state)) if given else None
        shapes = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nnx.to_pure_dict(tree))
        abstract_pure = shapes(params_state)
        self.param_specs = partitioning.param_specs(params_state, self.rules, self.mesh)
        abstract_opt = jax.eval_shape(self.tx.init, abstract_pure)
        opt_specs = partitioning.mirror_specs(abstract_opt, self.param_specs, abstract_pure)
        model_state_specs = partitioning.param_specs(model_state, self.rules, self.mesh)
        specs = {"params": self.param_specs, "model_state": model_state_specs, "opt_state": opt_specs, "step": P()}
        self.state_shardings = jax.tree.map(
            lambda s: NamedSharding(self.mesh, s), specs, is_leaf=lambda x: isinstance(x, P)
        )
        self.abstract_state = {
            "params": abstract_pure,
            "model_state": shapes(model_state),
            "opt_state": abstract_opt,
            "step": jax.ShapeDtypeStruct((), jnp.int32),
        }
        self.num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract_pure))

        self._build_steps()
        self.checkpointer = Checkpointer(
            os.path.join(workdir, "checkpoints"),
            keep=train_cfg.keep_checkpoints,
            # Without config.model the model is known by its parameter shapes.
            config_meaning=meaning(config) | ({} if "model" in config else shape_signature(abstract_pure)),
            extra_meta={"data": self.dataset.metadata},
        )
        self.peak_gflops = peak_gflops
        self._stop_signal: int | None = None
        self._resumed_from: int | None = None
        self._events: records.EventWriter | None = None  # TensorBoard, open during train() on process 0

    # ---- state ------------------------------------------------------------------------------------

    def init_state(self) -> dict:
        """Step-0 state, created directly in its shards (no full copy on one device): fresh parameters from
        build_model, or the given model's weights (copied; the model is left as it is)."""
        cfg = self.config

        def init(initial):
            if initial is None:
                _, params, model_state = _split(build_model(cfg.model, seed=cfg.train.seed))
                params, model_state = nnx.to_pure_dict(params), nnx.to_pure_dict(model_state)
            else:
                params, model_state = initial
            return {
                "params": params,
                "model_state": model_state,
                "opt_state": self.tx.init(params),
                "step": jnp.zeros((), jnp.int32),
            }

        return jax.jit(init, out_shardings=self.state_shardings)(self._initial)

    def restore_or_init(self, *, require_checkpoint: bool = False) -> dict:
        """The newest usable checkpoint's state (see Checkpointer.restore_latest), else the step-0 state;
        `require_checkpoint` makes "no usable checkpoint" a CheckpointError (evaluating random weights)."""
        step, state, weights = self.checkpointer.restore_latest(
            abstract_like(self.abstract_state, self.state_shardings), on_config_change=self.on_config_change
        )
        self._resumed_from = step
        if state is not None:
            self._log(f"resumed from checkpoint at step {step} in {self.checkpointer.directory}")
            return state
        if require_checkpoint:
            raise CheckpointError(
                f"no usable checkpoint in {self.checkpointer.directory}: train first (--mode=train) or pass "
                f"the --workdir of a trained run"
            )
        state = self.init_state()
        if weights is not None:
            state = self._with_weights(state, weights)
        return state

    def _with_weights(self, state: dict, weights: dict) -> dict:
        """`state` with the parameters in `weights` (from Checkpointer.load_matching_params) put in place."""
        values = weights["values"]
        params = jax.tree_util.tree_map_with_path(
            lambda p, x: jax.device_put(values[path_name(p)], x.sharding) if path_name(p) in values else x,
            state["params"],
        )
        fresh = weights["fresh"]
        self._log(
            f"loaded {len(weights['loaded'])} parameter arrays from checkpoint step {weights['step']}; "
            f"{len(fresh)} initialized fresh" + (f": {', '.join(fresh)}" if fresh else "")
        )
        return {
            **state,
            "params": params,
            "opt_state": jax.jit(self.tx.init, out_shardings=self.state_shardings["opt_state"])(params),
        }

    def _model_state(self, model_state) -> dict:
        """`model_state` (the state's "model_state"); None is allowed for models without non-trainable state."""
        if model_state is None:
            if self.abstract_state["model_state"]:
                raise ValueError(
                    "model_state=None, but this model has non-trainable state (e.g. routing centroids); "
                    'pass model_state=state["model_state"]'
                )
            return {}
        return model_state

    def model_from(self, params, model_state=None) -> nnx.Module:
        """An NNX model holding `params` (a pure dict) and `model_state`, e.g. for generation after training."""
        return nnx.merge(self.graphdef, params, self._model_state(model_state))

    # ---- jitted steps -----------------------------------------------------------------------------

    def _batch_sharding(self, ndim: int) -> NamedSharding:
        return NamedSharding(self.mesh, partitioning.batch_spec(ndim))

    def _build_steps(self) -> None:
        graphdef, tx, task, distill, schedule = self.graphdef, self.tx, self.task, self.distillation, self.schedule
        accum = self.config.train.get("grad_accum_steps", 1)
        report_names = self._report_names = set()  # the metrics modules reported (filled while tracing)

        def sums_and_grads(params, model_state, batch, teacher_out, variant):
            def f(p):
                model = nnx.merge(graphdef, p if variant is None else task.view(p, variant), model_state)
                s, w, m, out = task.scored(model, batch, training=True)
                if distill is not None:
                    d, dm = distill.term(out, teacher_out, batch)
                    m = {**m, "task_loss": s, **dm}
                    s = distill.task_weight * s + distill.weight * d
                aux, reported = pop_reports(model)  # e.g. an MoE router's balance loss and metrics (means)
                if reported:
                    report_names.update(reported)
                    s = s + aux * w  # a mean per weight unit, like s / w: summed over micro-batches exactly
                    m = {**m, **{k: v * w for k, v in reported.items()}}
                commit_updates(model)  # only here: e.g. the routing centroids' EMA step
                return s, (w, m, nnx.to_pure_dict(nnx.state(model, StateVariable)))

            (s, (w, m, updated)), g = jax.value_and_grad(f, has_aux=True)(params)
            return s, w, m, g, updated

        def train_step(state, batch, teacher_out=None, variant=None):
            params, model_state = state["params"], state["model_state"]
            if accum == 1:
                s, w, m, g, updated = sums_and_grads(params, model_state, batch, teacher_out, variant)
            else:
                # Micro-batch j takes rows j, j + accum, ...: each device keeps its own rows (no reshuffle).
                micro = jax.tree.map(
                    lambda x: jnp.swapaxes(x.reshape(x.shape[0] // accum, accum, *x.shape[1:]), 0, 1),
                    (batch, teacher_out),
                )

                micro_step = functools.partial(sums_and_grads, variant=variant)  # variant stays static

                def body(carry, mb):
                    s, w, m, g, sp = micro_step(params, model_state, *mb)
                    return jax.tree.map(jnp.add, carry, (s, w, m, g)), sp

                first = jax.tree.map(lambda x: x[0], micro)
                zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(micro_step, params, model_state, *first)[:4])
                (s, w, m, g), sp_all = jax.lax.scan(body, zeros, micro)
                updated = jax.tree.map(lambda x: x[-1], sp_all)  # the last micro-batch's update
            w = jnp.maximum(w, 1.0)
            grads = jax.tree.map(lambda x: x / w, g)
            updates, opt_state = tx.update(grads, state["opt_state"], params)
            new_params = optax.apply_updates(params, updates)
            new_state = {
                "params": new_params,
                "model_state": updated,
                "opt_state": opt_state,
                "step": state["step"] + 1,
            }
            metrics = {
                "loss": s / w,
                "grad_norm": optax.tree.norm(grads),
                # Checked on the host before this state may be checkpointed: a finite loss and gradient can
                # still overflow the parameters (too high a learning rate).
                "params_finite": finite_flag(new_params),
                "lr": schedule(state["step"]),
                **{k: v / w for k, v in m.items()},
            }
            return new_state, metrics

        def eval_step(params, batch, model_state=None):  # never commits: eval leaves model_state as it is
            s, w, m, _ = task.scored(nnx.merge(graphdef, params, model_state or {}), batch)
            return {"loss_sum": s, "weight": w, **{f"{k}_sum": v for k, v in m.items()}}

        def embed_step(params, tokens, mask, model_state=None):
            return nnx.merge(graphdef, params, model_state or {})(tokens, mask)

        self._train_step = jax.jit(
            train_step, donate_argnums=0, static_argnames="variant", out_shardings=(self.state_shardings, None)
        )
        self._eval_step = jax.jit(eval_step)
        self._embed_step = jax.jit(embed_step)

    def global_batch(self, local: dict) -> dict:
        """This process's rows -> global jax.Arrays sharded over (data, fsdp)."""
        out = {}
        for k, x in local.items():
            x = np.asarray(x)
            global_shape = (x.shape[0] * jax.process_count(), *x.shape[1:])
            out[k] = jax.make_array_from_process_local_data(self._batch_sharding(x.ndim), x, global_shape)
        return out

    def train_batch(self, step: int) -> dict:
        return self.global_batch(
            self.dataset.get_batch(step, process_index=jax.process_index(), process_count=jax.process_count())
        )

    def step_inputs(self, step: int) -> tuple:
        """(batch, teacher outputs or None, variant or None) of `step`: a pure function of (seed, step)."""
        batch = self.train_batch(step)
        teacher_out = self.distillation.teacher(batch) if self.distillation is not None else None
        variant = self.task.variant(step) if self.task.variant is not None else None
        return batch, teacher_out, variant

    def train_step(self, state, step: int):
        """One optimizer update on the batch of `step`; returns (state, metrics as device arrays)."""
        batch, teacher_out, variant = self.step_inputs(step)
        return self._train_step(state, batch, teacher_out, variant=variant)

    # ---- evaluation -------------------------------------------------------------------------------

    def evaluate(self, params, model_state=None) -> dict:
        """Held-out metrics: loss (and bits per byte for LM, recall@1/MRR for retrieval)."""
        model_state = self._model_state(model_state)
        if self.task.name == "retrieval":
            return self._evaluate_retrieval(params, model_state)
        totals: dict[str, float] = {}
        for local in self.dataset.eval_batches(process_index=jax.process_index(), process_count=jax.process_count()):
            sums = jax.device_get(self._eval_step(params, self.global_batch(local), model_state))
            for k, v in sums.items():
                totals[k] = totals.get(k, 0.0) + float(v)
        if not totals:  # a dataset without held-out batches
            return {}
        w = max(totals.get("weight", 0.0), 1.0)
        metrics = {f"eval_{k[: -len('_sum')]}": v / w for k, v in totals.items() if k.endswith("_sum")}
        out = {**metrics, "eval_examples": totals.get("weight", 0.0)}  # eval_loss and each task metric
        if self.task.name == "lm":
            out["eval_bits_per_byte"] = out["eval_loss"] * BITS_PER_NAT
        if self.task.name == "forecast":
            out["eval_mse"] = out["eval_loss"]
        return out

    def _evaluate_retrieval(self, params, model_state) -> dict:
        from effitrans.data.retrieval import retrieval_metrics

        q, d = self.eval_embeddings(params, model_state)
        metrics = retrieval_metrics(q, d)
        return {f"eval_{k}": float(v) for k, v in metrics.items()} | {"eval_examples": float(q.shape[0])}

    def eval_embeddings(self, params, model_state=None) -> tuple:
        """Retrieval: (query, doc) embeddings of the held-out pairs, padding dropped: float [n, embed_dim] x 2."""
        model_state = self._model_state(model_state)
        embed = lambda t, m: np.asarray(jax.device_get(self._embed_step(params, t, m, model_state)))
        qs, ds = [], []
        for local in self.dataset.eval_batches(process_index=jax.process_index(), process_count=jax.process_count()):
            b = self.global_batch(local)
            keep = np.asarray(jax.device_get(b["example_weights"])) > 0
            qs.append(embed(b["query"], b["query_mask"])[keep])
            ds.append(embed(b["doc"], b["doc_mask"])[keep])
        return np.concatenate(qs), np.concatenate(ds)

    # ---- the loop ---------------------------------------------------------------------------------

    def _log(self, msg: str) -> None:
        if self.verbose and jax.process_index() == 0:
            print(f"[effitrans] {msg}", flush=True)

    def _write_metrics(self, row: dict) -> None:
        if jax.process_index() != 0:
            return
        os.makedirs(self.workdir, exist_ok=True)
        with open(os.path.join(self.workdir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")
        if self._events is not None and "event" not in row:
            self._events.scalars(row["step"], row)

    def _on_signal(self, signum, frame):  # noqa: ARG002 - signal handler signature
        self._stop_signal = signum

    def _flops_per_step(self) -> float | None:
        """Model FLOPs of one step from config.model (None without one: MFU is then not reported)."""
        if "model" not in self.config or self.task.name == "forecast":  # the FLOP model covers Transformer stacks
            return None
        shapes = {k: v.shape for k, v in self.dataset.get_batch(0).items()}
        return perf.train_flops_per_step(self.config.model, self.task.name, shapes)

    def _check_finite(self, unchecked: list, done: int, last_good: int | None) -> None:
        """The host sync: raises NonFiniteLossError naming the first step since the last check whose loss,
        gradient norm or updated parameters are not finite, the range checked, and the newest checkpoint known
        to be finite (every checkpoint this loop writes passed this check; a restored one was checked too)."""
        first = done - len(unchecked) + 1
        rows = jax.device_get([(m["loss"], m["grad_norm"], m["params_finite"]) for m in unchecked])
        for i, (loss, grad_norm, params_finite) in enumerate(rows):
            loss, grad_norm = float(loss), float(grad_norm)
            if not math.isfinite(loss):
                what = f"loss is {loss}"
            elif not math.isfinite(grad_norm):
                what = f"grad_norm is {grad_norm} (loss {loss})"
            elif not bool(params_finite):
                what = (
                    f"the parameters became non-finite (loss {loss}, grad_norm {grad_norm}: the update overflowed; "
                    f"lower train.learning_rate or set train.grad_clip)"
                )
            else:
                continue
            kept = (
                f"The last good checkpoint (step {last_good}) is intact in {self.checkpointer.directory}"
                if last_good is not None
                else f"No checkpoint was written before it and none exists in {self.checkpointer.directory}"
            )
            raise NonFiniteLossError(
                f"{what} at step {first + i}; stopping (first non-finite value among steps {first}-{done}, "
                f"the steps since the last check). {kept}"
            )

    def _profile_range(self, start: int, end: int) -> tuple[int, int] | None:
        """config.train.profile_steps as (first, end) step indices when this run reaches them, else None."""
        steps = parse_step_range(self.config.train.get("profile_steps", ""))
        if steps is None:
            return None
        first, stop = steps
        if first < start or stop > end:
            logging.warning(
                "config.train.profile_steps=%r lies outside the steps this run takes (%d-%d): no profile",
                self.config.train.profile_steps,
                start,
                end - 1,
            )
            return None
        return steps

    def _write_result(self, eval_metrics: dict, history: list) -> None:
        """WORKDIR/result.json (marks the run finished) and the config as TensorBoard hparams; process 0 only."""
        if jax.process_index() != 0:
            return
        result = {"step": self.config.train.steps, "eval": eval_metrics, "train": history[-1] if history else None}
        records.write_json(os.path.join(self.workdir, records.RESULT_FILE), result)
        if self._events is not None:
            self._events.hparams(self.config, {**eval_metrics, **({"loss": 0.0} if history else {})})

    def train(self, *, until: int | None = None) -> dict:
        """Runs (or resumes) training to config.train.steps, or only to step `until` of that schedule (a
        checkpoint is written there). Returns the final state, eval metrics (at config.train.steps), whether
        a signal interrupted it, and the logged rows."""
        cfg = self.config.train
        end = cfg.steps if until is None else until
        if isinstance(end, bool) or not isinstance(end, int) or not 0 <= end <= cfg.steps:
            raise ValueError(f"until={until!r} must be an int in [0, config.train.steps={cfg.steps}]")
        state = self.restore_or_init()
        start = int(jax.device_get(state["step"]))
        if start > end:
            raise CheckpointError(
                f"the checkpoint in {self.checkpointer.directory} is at step {start}, past the "
                + (f"requested until={end}" if until is not None else f"config.train.steps={cfg.steps}")
                + f": nothing to train. Pass --config.train.steps >= {start} to continue it, --mode=eval to "
                "evaluate it, or another --workdir for a shorter run"
            )
        peak_source = "given"
        # MFU is against the peak of the dtype the model computes in (params stay float32).
        peak_dtype = self.config.model.get("dtype", "float32") if "model" in self.config else "float32"
        if self.peak_gflops is None:
            self.peak_gflops, peak_source = perf.peak_gflops(peak_dtype)
        flops_per_step = self._flops_per_step()
        tokens_per_step = self.task.tokens(self.dataset.get_batch(0)) * jax.process_count()
        if jax.process_index() == 0:
            records.write_start_records(self.workdir, self.config)
            self._events = records.EventWriter(self.workdir)
        self._write_metrics(
            {
                "event": "start",
                "step": start,
                "num_params": self.num_params,
                "peak_matmul_gflops": self.peak_gflops,
                "peak_dtype": peak_dtype,
                "peak_source": peak_source,
                "data": self.dataset.metadata,
                "config": json.loads(self.config.to_json_best_effort()),
            }
        )
        self._log(
            f"{self.num_params:,} params | mesh {dict(self.mesh.shape)} | steps {start}->{end} | "
            f"peak {peak_dtype} {self.peak_gflops:.1f} GFLOP/s ({peak_source})"
        )
        profile, tracing = self._profile_range(start, end), False
        old_handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        pool = ThreadPoolExecutor(1, thread_name_prefix="effitrans-prefetch") if self.prefetch else None
        last_good = self._resumed_from  # the newest checkpoint known to hold finite params
        history: list[dict] = []
        try:
            window_start, window_steps, run_start = time.perf_counter(), 0, time.perf_counter()
            eval_metrics: dict = {}
            unchecked: list[dict] = []  # device metrics of the steps since the last host sync
            in_flight: collections.deque = collections.deque()
            upcoming = pool.submit(self.step_inputs, start) if pool is not None and start < end else None
            for step in range(start, end):
                if profile is not None and step == profile[0]:
                    jax.profiler.start_trace(os.path.join(self.workdir, "profile"))
                    tracing = True
                batch, teacher_out, variant = upcoming.result() if pool is not None else self.step_inputs(step)
                with jax.profiler.StepTraceAnnotation("train", step_num=step):
                    state, metrics = self._train_step(state, batch, teacher_out, variant=variant)  # dispatched
                if profile is not None and step + 1 == profile[1]:
                    jax.block_until_ready(metrics)
                    jax.profiler.stop_trace()
                    tracing = False
                    self._log(f"profiler trace of steps {profile[0]}-{step} in {self.workdir}/profile")
                done = step + 1
                if pool is not None and done < end:
                    upcoming = pool.submit(self.step_inputs, done)  # built while this step runs
                unchecked.append(metrics)
                # Bound the dispatch queue without a host transfer: wait for step done-2 (the device still
                # has step done-1 and this one queued), so at most _IN_FLIGHT steps' batches are alive.
                in_flight.append(metrics["loss"])
                if len(in_flight) > _IN_FLIGHT:
                    in_flight.popleft().block_until_ready()
                window_steps += 1
                if step == start:  # the first step compiles: time it apart and start the window after it
                    metrics["loss"].block_until_ready()
                    window_start, window_steps = time.perf_counter(), 0
                    self._log(f"first step (compile and run) {window_start - run_start:.1f} s")
                log_now = done % cfg.log_every == 0 or done == end
                save_now = done % cfg.checkpoint_every == 0 or done == end or self._stop_signal is not None
                eval_now = done % cfg.eval_every == 0 or done == cfg.steps
                if log_now or save_now or eval_now:
                    self._check_finite(unchecked, done, last_good)  # before anything is written
                    unchecked = []
                if log_now:
                    now = time.perf_counter()
                    # A window holding only the first step: its time includes compilation, so no MFU.
                    compiling = window_steps == 0
                    dt = (now - run_start) if compiling else (now - window_start) / window_steps
                    m = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    mfu = None
                    if flops_per_step is not None and not compiling:
                        achieved = flops_per_step / dt / 1e9  # GFLOP/s
                        if achieved > self.peak_gflops and peak_source in ("measured", "cached", "raised"):
                            # a measured peak cached under load
                            self.peak_gflops, peak_source = perf.raise_peak(peak_dtype, achieved), "raised"
                            self._log(f"peak {peak_dtype} matmul raised to {self.peak_gflops:.1f} GFLOP/s (seen here)")
                        mfu = achieved / self.peak_gflops
                    row = {"step": done, **m, "step_time_s": dt, "tokens_per_s": tokens_per_step / dt, "mfu": mfu}
                    if variant is not None:
                        row[self.task.variant_name] = variant
                    history.append(row)
                    self._write_metrics(row)
                    eta = (end - done) * dt
                    self._log(
                        f"step {done}/{end} | loss {m['loss']:.4f} | lr {m['lr']:.2e} | "
                        f"grad_norm {m['grad_norm']:.3f} | {row['tokens_per_s']:,.0f} tok/s | "
                        f"MFU {'-' if mfu is None else f'{100 * mfu:.1f}%'} | ETA {_format_eta(eta)}"
                        + "".join(f" | {k} {m[k]:.3g}" for k in sorted(self._report_names))
                    )
                    window_start, window_steps = time.perf_counter(), 0
                if save_now:
                    self.checkpointer.save(done, state, force=True)
                    last_good = done
                if eval_now:
                    self.checkpointer.wait()
                    eval_metrics = self.evaluate(state["params"], state["model_state"])
                    if eval_metrics:
                        self._write_metrics({"step": done, **eval_metrics})
                        self._log(f"eval @ {done}: " + ", ".join(f"{k} {v:.4f}" for k, v in eval_metrics.items()))
                    window_start = time.perf_counter()  # eval time is not training throughput
                if self._stop_signal is not None:
                    self._log(f"signal {self._stop_signal} received: saved step {done}, stopping")
                    break
            interrupted = self._stop_signal is not None
            if not eval_metrics and not interrupted and end == cfg.steps:  # e.g. rerun of a finished run
                eval_metrics = self.evaluate(state["params"], state["model_state"])
            if not interrupted and end == cfg.steps:
                self._write_result(eval_metrics, history)
            self._log(
                f"{'stopped' if interrupted else 'finished'} at step {int(jax.device_get(state['step']))} "
                f"in {_format_eta(time.perf_counter() - run_start)}"
            )
            return {"state": state, "eval": eval_metrics, "interrupted": interrupted, "history": history}
        finally:
            if tracing:  # stopped inside the traced range
                jax.profiler.stop_trace()
            if self._events is not None:
                self._events.close()
                self._events = None
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
            self.checkpointer.wait()
            for s, h in old_handlers.items():
                signal.signal(s, h)
