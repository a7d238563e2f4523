"""The training and evaluation loop: jitted sharded steps, metrics, checkpoints, resume, signals.

Reads top to bottom: build (validate config -> mesh -> dataset -> abstract model -> shardings -> sharded
init or restore), then `train()` runs steps, logging, evaluation and checkpointing. The state is a plain
pytree {"params", "model_state", "opt_state", "step"}: params are what the optimizer trains, model_state the
non-trainable `StateVariable`s (routing centroids, LSH rotations), carried and updated only by the train
step's `commit_updates`. The model is rebuilt from its graphdef inside each jitted step, so the same model
classes serve training, eval and serving.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from effitrans.config_validation import validate_config
from effitrans.data.registry import build_dataset
from effitrans.layers.params import StateVariable, commit_updates
from effitrans.registry import build_model
from effitrans.train import partitioning
from effitrans.train.checkpoints import Checkpointer, abstract_like
from effitrans.train.optimizer import learning_rate_schedule, make_optimizer
from effitrans.train.tasks import BITS_PER_NAT, TASK_LOSSES, tokens_in_batch, train_flops_per_step


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN or inf loss; the message names the step."""


def _format_eta(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Trainer:
    """Owns one experiment: config, mesh, dataset, jitted steps and the checkpoint directory."""

    def __init__(self, config, workdir: str, *, peak_gflops: float | None = None, verbose: bool = True):
        validate_config(config, num_devices=jax.device_count(), num_processes=jax.process_count())
        self.config, self.workdir, self.verbose = config, workdir, verbose
        self.task = config.train.task
        self.mesh = partitioning.make_mesh(config.mesh)
        self.rules = tuple(tuple(r) for r in config.mesh.rules)
        self.dataset = build_dataset(config.data, global_batch_size=config.train.batch_size, seed=config.train.seed)
        self.tx = make_optimizer(config.train)
        self.schedule = learning_rate_schedule(config.train)

        # Abstract model: shapes and logical axes without allocating anything.
        abstract_model = nnx.eval_shape(lambda: build_model(config.model, seed=config.train.seed))
        self.graphdef, abstract_params, abstract_model_state = nnx.split(abstract_model, nnx.Param, StateVariable)
        self.param_specs = partitioning.param_specs(abstract_params, self.rules, self.mesh)
        abstract_pure = nnx.to_pure_dict(abstract_params)
        abstract_opt = jax.eval_shape(self.tx.init, abstract_pure)
        opt_specs = partitioning.mirror_specs(abstract_opt, self.param_specs, abstract_pure)
        model_state_specs = partitioning.param_specs(abstract_model_state, self.rules, self.mesh)
        specs = {"params": self.param_specs, "model_state": model_state_specs, "opt_state": opt_specs, "step": P()}
        self.state_shardings = jax.tree.map(
            lambda s: NamedSharding(self.mesh, s), specs, is_leaf=lambda x: isinstance(x, P)
        )
        self.abstract_state = {
            "params": abstract_pure,
            "model_state": nnx.to_pure_dict(abstract_model_state),
            "opt_state": abstract_opt,
            "step": jax.ShapeDtypeStruct((), jnp.int32),
        }
        self.num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract_pure))

        self._build_steps()
        self.checkpointer = Checkpointer(
            os.path.join(workdir, "checkpoints"),
            keep=config.train.keep_checkpoints,
            model_cfg=config.model,
            extra_meta={"data": self.dataset.metadata},
        )
        self.peak_gflops = peak_gflops
        self._stop_signal: int | None = None

    # ---- state ------------------------------------------------------------------------------------

    def init_state(self) -> dict:
        """Fresh parameters, created directly in their shards (no full copy on one device)."""
        cfg = self.config

        def init():
            model = build_model(cfg.model, seed=cfg.train.seed)
            params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
            model_state = nnx.to_pure_dict(nnx.state(model, StateVariable))
            return {
                "params": params,
                "model_state": model_state,
                "opt_state": self.tx.init(params),
                "step": jnp.zeros((), jnp.int32),
            }

        return jax.jit(init, out_shardings=self.state_shardings)()

    def restore_or_init(self) -> dict:
        step, state = self.checkpointer.restore_latest(abstract_like(self.abstract_state, self.state_shardings))
        if state is None:
            return self.init_state()
        self._log(f"resumed from checkpoint at step {step} in {self.checkpointer.directory}")
        return state

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
        cfg, graphdef, tx = self.config, self.graphdef, self.tx
        loss_fn = TASK_LOSSES[self.task]
        accum = cfg.train.grad_accum_steps
        loss_kwargs = {"temperature": cfg.train.contrastive_temperature}
        schedule = self.schedule

        def sums_and_grads(params, model_state, batch):
            def f(p):
                model = nnx.merge(graphdef, p, model_state)
                s, w, m = loss_fn(model, batch, **loss_kwargs)
                commit_updates(model)  # only here: e.g. the routing centroids' EMA step
                return s, (w, m, nnx.to_pure_dict(nnx.state(model, StateVariable)))

            (s, (w, m, new_model_state)), g = jax.value_and_grad(f, has_aux=True)(params)
            return s, w, m, g, new_model_state

        def train_step(state, batch):
            params, model_state = state["params"], state["model_state"]
            if accum == 1:
                s, w, m, g, new_model_state = sums_and_grads(params, model_state, batch)
            else:
                # Micro-batch j takes rows j, j + accum, ...: each device keeps its own rows (no reshuffle).
                micro = jax.tree.map(
                    lambda x: jnp.swapaxes(x.reshape(x.shape[0] // accum, accum, *x.shape[1:]), 0, 1), batch
                )

                def body(carry, mb):
                    s, w, m, g, ms = sums_and_grads(params, model_state, mb)
                    return jax.tree.map(jnp.add, carry, (s, w, m, g)), ms

                first = jax.tree.map(lambda x: x[0], micro)
                zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(sums_and_grads, params, model_state, first)[:4])
                (s, w, m, g), ms_all = jax.lax.scan(body, zeros, micro)
                new_model_state = jax.tree.map(lambda x: x[-1], ms_all)  # the last micro-batch's update
            w = jnp.maximum(w, 1.0)
            grads = jax.tree.map(lambda x: x / w, g)
            updates, opt_state = tx.update(grads, state["opt_state"], params)
            new_state = {
                "params": optax.apply_updates(params, updates),
                "model_state": new_model_state,
                "opt_state": opt_state,
                "step": state["step"] + 1,
            }
            metrics = {
                "loss": s / w,
                "grad_norm": optax.tree.norm(grads),
                "lr": schedule(state["step"]),
                **{k: v / w for k, v in m.items()},
            }
            return new_state, metrics

        def eval_step(params, batch, model_state=None):  # never commits: eval leaves model_state as it is
            s, w, m = loss_fn(nnx.merge(graphdef, params, model_state or {}), batch, **loss_kwargs)
            return {"loss_sum": s, "weight": w, **{f"{k}_sum": v for k, v in m.items()}}

        def embed_step(params, tokens, mask, model_state=None):
            return nnx.merge(graphdef, params, model_state or {})(tokens, mask)

        self._train_step = jax.jit(train_step, donate_argnums=0, out_shardings=(self.state_shardings, None))
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

    def train_step(self, state, step: int):
        """One optimizer update on the batch of `step`; returns (state, metrics as device arrays)."""
        return self._train_step(state, self.train_batch(step))

    # ---- evaluation -------------------------------------------------------------------------------

    def evaluate(self, params, model_state=None) -> dict:
        """Held-out metrics: loss (and bits per byte for LM, recall@1/MRR for retrieval)."""
        model_state = self._model_state(model_state)
        if self.task == "retrieval":
            return self._evaluate_retrieval(params, model_state)
        totals: dict[str, float] = {}
        for local in self.dataset.eval_batches(process_index=jax.process_index(), process_count=jax.process_count()):
            sums = jax.device_get(self._eval_step(params, self.global_batch(local), model_state))
            for k, v in sums.items():
                totals[k] = totals.get(k, 0.0) + float(v)
        w = max(totals.get("weight", 0.0), 1.0)
        out = {
            "eval_loss": totals.get("loss_sum", 0.0) / w,
            "eval_accuracy": totals.get("accuracy_sum", 0.0) / w,
            "eval_examples": totals.get("weight", 0.0),
        }
        if self.task == "lm":
            out["eval_bits_per_byte"] = out["eval_loss"] * BITS_PER_NAT
        return out

    def _evaluate_retrieval(self, params, model_state) -> dict:
        from effitrans.data.retrieval import retrieval_metrics

        q, d = self.eval_embeddings(params, model_state)
        metrics = retrieval_metrics(q, d)
        return {f"eval_{k}": float(v) for k, v in metrics.items()} | {"eval_examples": float(q.shape[0])}

    def eval_embeddings(self, params, model_state=None) -> tuple:
        """Retrieval: (query, doc) embeddings of the held-out pairs, padding dropped: float [n, embed_dim] x 2."""
        model_state = self._model_state(model_state)
        qs, ds = [], []
        for local in self.dataset.eval_batches(process_index=jax.process_index(), process_count=jax.process_count()):
            b = self.global_batch(local)
            keep = np.asarray(jax.device_get(b["example_weights"])) > 0
            embed = lambda t, m: np.asarray(jax.device_get(self._embed_step(params, t, m, model_state)))
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

    def _on_signal(self, signum, frame):  # noqa: ARG002 - signal handler signature
        self._stop_signal = signum

    def _flops_per_step(self) -> float:
        shapes = {k: v.shape for k, v in self.dataset.get_batch(0).items()}
        return train_flops_per_step(self.config.model, self.task, shapes)

    def train(self) -> dict:
        """Runs (or resumes) training to config.train.steps; returns the final eval metrics and state."""
        cfg = self.config.train
        state = self.restore_or_init()
        start = int(jax.device_get(state["step"]))
        if self.peak_gflops is None:
            from effitrans.bench.common import measure_matmul_gflops

            self.peak_gflops = measure_matmul_gflops()
        flops_per_step = self._flops_per_step()
        tokens_per_step = tokens_in_batch(self.task, self.dataset.get_batch(0)) * jax.process_count()
        self._write_metrics(
            {
                "event": "start",
                "step": start,
                "num_params": self.num_params,
                "peak_matmul_gflops": self.peak_gflops,
                "data": self.dataset.metadata,
                "config": json.loads(self.config.to_json_best_effort()),
            }
        )
        self._log(
            f"{self.num_params:,} params | mesh {dict(self.mesh.shape)} | steps {start}->{cfg.steps} | "
            f"peak float32 matmul {self.peak_gflops:.1f} GFLOP/s (measured)"
        )
        old_handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        last_saved = start
        try:
            window_start, window_steps, run_start = time.perf_counter(), 0, time.perf_counter()
            eval_metrics: dict = {}
            for step in range(start, cfg.steps):
                state, metrics = self.train_step(state, step)
                loss = float(jax.device_get(metrics["loss"]))  # also the sync point for timing
                if not math.isfinite(loss):
                    raise NonFiniteLossError(
                        f"loss is {loss} at step {step + 1}; stopping. The last good checkpoint (step "
                        f"{last_saved}) is intact in {self.checkpointer.directory}"
                    )
                window_steps += 1
                done = step + 1
                if done % cfg.log_every == 0 or done == cfg.steps:
                    now = time.perf_counter()
                    dt = (now - window_start) / window_steps
                    m = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    row = {
                        "step": done,
                        **m,
                        "step_time_s": dt,
                        "tokens_per_s": tokens_per_step / dt,
                        "mfu": flops_per_step / dt / (self.peak_gflops * 1e9),
                    }
                    self._write_metrics(row)
                    eta = (cfg.steps - done) * dt
                    self._log(
                        f"step {done}/{cfg.steps} | loss {m['loss']:.4f} | lr {m['lr']:.2e} | "
                        f"grad_norm {m['grad_norm']:.3f} | {row['tokens_per_s']:,.0f} tok/s | "
                        f"MFU {100 * row['mfu']:.1f}% | ETA {_format_eta(eta)}"
                    )
                    window_start, window_steps = time.perf_counter(), 0
                if done % cfg.checkpoint_every == 0 or done == cfg.steps or self._stop_signal is not None:
                    self.checkpointer.save(done, state, force=True)
                    last_saved = done
                if done % cfg.eval_every == 0 or done == cfg.steps:
                    self.checkpointer.wait()
                    eval_metrics = self.evaluate(state["params"], state["model_state"])
                    self._write_metrics({"step": done, **eval_metrics})
                    self._log(f"eval @ {done}: " + ", ".join(f"{k} {v:.4f}" for k, v in eval_metrics.items()))
                    window_start = time.perf_counter()  # eval time is not training throughput
                if self._stop_signal is not None:
                    self._log(f"signal {self._stop_signal} received: saved step {done}, stopping")
                    break
            interrupted = self._stop_signal is not None
            if not eval_metrics and not interrupted:  # e.g. rerun of a finished run: still report
                eval_metrics = self.evaluate(state["params"], state["model_state"])
            self._log(
                f"{'stopped' if interrupted else 'finished'} at step {int(jax.device_get(state['step']))} "
                f"in {_format_eta(time.perf_counter() - run_start)}"
            )
            return {"state": state, "eval": eval_metrics, "interrupted": interrupted}
        finally:
            self.checkpointer.wait()
            for s, h in old_handlers.items():
                signal.signal(s, h)
