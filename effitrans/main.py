"""Entry point: `python -m effitrans.main --config=configs/lm_tiny.py --workdir=DIR [--config.a.b=v]`.

Modes: train (default; resumes from WORKDIR/checkpoints when present, ends with held-out metrics and,
for language models, a generated sample), eval (held-out metrics of the latest checkpoint), generate
(a sample from the latest checkpoint). Multi-host: pass --coordinator_address, --num_processes and
--process_id to every process; each reads its own slice of the global batch.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to a configs/*.py file (optionally file.py:arg).", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.jsonl.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval", "generate"], "What to run.")
_PROMPT = flags.DEFINE_string("prompt", None, "Prompt for --mode=generate (default: config.train.sample_prompt).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for multi-process runs.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes in a multi-process run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in a multi-process run.")
_CPU_DEVICES = flags.DEFINE_integer("cpu_devices", None, "Fake this many CPU devices (testing meshes on a CPU).")


def _init_distributed() -> None:
    import jax

    if _COORDINATOR.value is None:
        if _NUM_PROCESSES.value not in (None, 1):
            raise app.UsageError("--num_processes > 1 needs --coordinator_address and --process_id")
        return
    if _NUM_PROCESSES.value is None or _PROCESS_ID.value is None:
        raise app.UsageError("--coordinator_address needs --num_processes and --process_id")
    # CPU processes need gloo for cross-process collectives; the setting does not affect GPU/TPU backends.
    # (Asking jax.default_backend() here would initialise the backend before distributed.initialize.)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value
    )


def sample_text(trainer, params, prompt: str, num_tokens: int, model_state=None) -> str:
    """Greedy continuation of `prompt` by the LM in `params` (and `model_state`), decoded from bytes."""
    import jax.numpy as jnp

    from effitrans.data import tokenizer
    from effitrans.serve import generate

    ids = jnp.asarray(tokenizer.encode(prompt))[None, :]
    out = generate(trainer.model_from(params, model_state), ids, max_new_tokens=num_tokens)
    return tokenizer.decode(out[0, ids.shape[1] :].tolist())


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _CPU_DEVICES.value:
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={_CPU_DEVICES.value}"
        )
    if _CONFIG.value is None or _WORKDIR.value is None:
        raise app.UsageError("--config and --workdir are required")
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO; keep the progress lines readable
    _init_distributed()
    from effitrans.train.trainer import Trainer

    config = _CONFIG.value
    trainer = Trainer(config, _WORKDIR.value)
    if _MODE.value == "train":
        result = trainer.train()
        if result["interrupted"]:
            trainer.checkpointer.close()
            return  # saved; rerun the same command to resume
        state, metrics = result["state"], result["eval"]
    else:
        state = trainer.restore_or_init()
        metrics = trainer.evaluate(state["params"], state["model_state"]) if _MODE.value == "eval" else {}
    if metrics:
        print("held-out: " + json.dumps({k: round(v, 5) for k, v in metrics.items()}), flush=True)
    if config.train.task == "lm" and (_MODE.value != "eval") and config.train.sample_tokens > 0:
        prompt = _PROMPT.value if _PROMPT.value is not None else config.train.sample_prompt
        text = sample_text(trainer, state["params"], prompt, config.train.sample_tokens, state["model_state"])
        print(f"sample: {prompt}{text}", flush=True)
    trainer.checkpointer.close()


def parse_flags(argv):
    """absl flag parsing that turns a bad --config.x.y override into one readable line instead of a traceback."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        sys.exit(f"effitrans.main: {e}\nPass --help to see the flags.")
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        bad = [a for a in argv[1:] if a.startswith("--config.")]
        detail = str(e).strip().strip("'\"").replace("\\n", " ").replace("\\'", "'").replace("\n", " ")
        sys.exit(
            f"effitrans.main: bad config override {' '.join(bad) or '(in --config file)'}: key {detail} "
            f"does not exist or cannot take that value. Keys that do not exist in the config file cannot be set; "
            "values must keep the key's type."
        )


def run() -> None:
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    sys.exit(run())
