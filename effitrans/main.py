"""Entry point: `python -m effitrans.main --config=configs/lm_tiny.py --workdir=DIR [--config.a.b=v]`.

Modes: train (default; resumes from WORKDIR/checkpoints when present, ends with held-out metrics and,
for language models, a generated sample), eval (held-out metrics of the latest checkpoint), generate
(a sample from the latest checkpoint). Multi-host: pass --coordinator_address, --num_processes and
--process_id to every process; each reads its own slice of the global batch.

Exit codes:
  0  finished (or stopped by SIGTERM/SIGINT after saving a checkpoint: rerun the command to resume).
  2  a user error (the exception classes in `user_errors`), found before any model is built where it can
     be: one line `effitrans.main: error: <message>` on stderr naming the flag or config key, the value
     and what is allowed. A missing or broken --config file, a bad --config.x.y override or flag, a config
     value, a dataset its config cannot build, a workdir that is a file or cannot be written, an empty
     prompt, a checkpoint of another config, a checkpoint past train.steps, --mode=eval|generate without a
     checkpoint, a NaN/inf loss. --debug adds the traceback.
  1  a bug: the traceback, then a line asking to report it.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import sys
import tempfile
import traceback

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    None,
    "Path to a configs/*.py file, optionally file.py:key=value,... (schema.apply_arg).",
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.jsonl.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval", "generate"], "What to run.")
_PROMPT = flags.DEFINE_string("prompt", None, "Prompt for --mode=generate (default: config.train.sample_prompt).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for multi-process runs.")
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "Number of processes in a multi-process run.", lower_bound=1
)
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in a multi-process run.", lower_bound=0)
_CPU_DEVICES = flags.DEFINE_integer(
    "cpu_devices", None, "Fake this many CPU devices (testing meshes on a CPU).", lower_bound=1
)
_ON_CONFIG_CHANGE = flags.DEFINE_enum(
    "on_config_change",
    "refuse",
    ["refuse", "start_fresh", "load_weights"],
    "When WORKDIR's checkpoints were written by another config: refuse (list the differing keys, change nothing), "
    "start_fresh (set the old checkpoints aside, train from step 0) or load_weights (the same, starting from the "
    "old weights whose shapes match). Only with --mode=train.",
)
_DEBUG = flags.DEFINE_bool("debug", False, "Print the traceback of user errors too (exit code 2 all the same).")

PROG = "effitrans.main"


def user_errors() -> tuple[type[Exception], ...]:
    """The exceptions that are the user's to fix: reported in one line with exit code 2 (anything else is a
    bug). Imported on use: the trainer imports JAX, which must not start before --cpu_devices is applied."""
    from effitrans.schema import ConfigError
    from effitrans.train.checkpoints import CheckpointError
    from effitrans.train.trainer import NonFiniteLossError

    return (app.UsageError, ConfigError, CheckpointError, NonFiniteLossError)


def _exit_user_error(message: str, debug: bool):
    """Prints `effitrans.main: error: <message>` (on one line; with debug, the traceback first); exits 2."""
    if debug:
        traceback.print_exc()
    one_line = re.sub(r"\s*\n\s*", " ", message.strip())
    print(f"{PROG}: error: {one_line}", file=sys.stderr, flush=True)
    sys.exit(2)


def _exit_bug():
    """Prints the traceback of the exception being handled and a line asking to report it; exits 1."""
    traceback.print_exc()
    print(
        f"{PROG}: this is a bug in effitrans, not a problem with the command line; please report it with the "
        "command and the traceback above",
        file=sys.stderr,
        flush=True,
    )
    sys.exit(1)


def _check_workdir(path: str) -> None:
    """Refuses a workdir that is a file, or that cannot be created or written, before anything is built."""
    flag = f"--workdir={path}"
    allowed = "allowed: a directory this process can write, created if missing"
    if os.path.exists(path) and not os.path.isdir(path):
        raise app.UsageError(f"{flag} is a file, not a directory ({allowed})")
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise app.UsageError(f"{flag} cannot be created: {existing} is a file ({allowed})")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise app.UsageError(f"{flag} is not writable: {existing}: {e.strerror} ({allowed})") from None


def _sample_prompt(config) -> str | None:
    """The prompt the run samples from (None: this run prints no sample), refused up front if it is empty."""
    from effitrans.data import tokenizer

    samples = config.train.task == "lm" and _MODE.value != "eval" and config.train.sample_tokens > 0
    if not samples:
        if _PROMPT.value is not None:
            raise app.UsageError(
                f"--prompt={_PROMPT.value!r} would not be used: only --mode=train|generate with "
                f"config.train.task='lm' and config.train.sample_tokens > 0 print a sample"
            )
        return None
    given = _PROMPT.value is not None
    name, prompt = ("--prompt", _PROMPT.value) if given else ("config.train.sample_prompt", config.train.sample_prompt)
    try:
        empty = len(tokenizer.encode(prompt)) == 0
    except UnicodeEncodeError as e:
        raise app.UsageError(f"{name}={prompt!r} is not text UTF-8 can encode ({e.reason})") from None
    if empty:
        raise app.UsageError(f"{name}={prompt!r} is empty: a sample continues a prompt (allowed: a non-empty string)")
    return prompt


def _init_distributed() -> None:
    import jax

    if _COORDINATOR.value is None:
        if _NUM_PROCESSES.value not in (None, 1):
            raise app.UsageError("--num_processes > 1 needs --coordinator_address and --process_id")
        return
    if _NUM_PROCESSES.value is None or _PROCESS_ID.value is None:
        raise app.UsageError("--coordinator_address needs --num_processes and --process_id")
    if _PROCESS_ID.value >= _NUM_PROCESSES.value:
        raise app.UsageError(f"--process_id={_PROCESS_ID.value} must be in [0, --num_processes={_NUM_PROCESSES.value})")
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
    """Runs the mode; a user error exits 2 with one line, a bug exits 1 with its traceback (module docstring)."""
    try:
        _run_mode(argv)
    except Exception as e:  # noqa: BLE001 - sorted into user errors and bugs here, the one place
        if isinstance(e, user_errors()):
            _exit_user_error(str(e), _DEBUG.value)
        _exit_bug()


def _run_mode(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}: every argument is a flag, --name=value")
    if _CPU_DEVICES.value:
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={_CPU_DEVICES.value}"
        )
    if _CONFIG.value is None or not _WORKDIR.value:
        raise app.UsageError("--config and --workdir are required, e.g. --config=configs/lm_tiny.py --workdir=DIR")
    config = _CONFIG.value
    _check_workdir(_WORKDIR.value)
    if _MODE.value != "train":
        if _ON_CONFIG_CHANGE.value != "refuse":
            raise app.UsageError(
                f"--on_config_change={_ON_CONFIG_CHANGE.value} with --mode={_MODE.value}: only training may set "
                "checkpoints aside (allowed here: refuse)"
            )
        if not os.path.isdir(os.path.join(_WORKDIR.value, "checkpoints")):
            raise app.UsageError(
                f"--mode={_MODE.value} needs a trained run, but --workdir={_WORKDIR.value} has no checkpoints/ "
                "folder (allowed: the --workdir of a --mode=train run)"
            )
    prompt = _sample_prompt(config)
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO; keep the progress lines readable
    _init_distributed()
    import jax

    from effitrans.train import records
    from effitrans.train.trainer import Trainer

    if jax.process_index() == 0:  # non-default keys (*) first; the same config lands in WORKDIR/config.json
        print("config:\n  " + "\n  ".join(records.config_lines(config)), flush=True)

    trainer = Trainer(config, _WORKDIR.value, on_config_change=_ON_CONFIG_CHANGE.value)
    if _MODE.value == "train":
        result = trainer.train()
        if result["interrupted"]:
            trainer.checkpointer.close()
            return  # saved; rerun the same command to resume
        state, metrics = result["state"], result["eval"]
    else:
        state = trainer.restore_or_init(require_checkpoint=True)
        metrics = trainer.evaluate(state["params"], state["model_state"]) if _MODE.value == "eval" else {}
    if metrics:
        print("held-out: " + json.dumps({k: round(v, 5) for k, v in metrics.items()}), flush=True)
    if prompt is not None:
        text = sample_text(trainer, state["params"], prompt, config.train.sample_tokens, state["model_state"])
        print(f"sample: {prompt}{text}", flush=True)
    trainer.checkpointer.close()


def _config_argument(argv) -> str | None:
    """The value of the last --config flag in argv (file.py or file.py:arg), None without one."""
    spec = None
    for i, arg in enumerate(argv[1:], 1):
        if arg.startswith("--config="):
            spec = arg.split("=", 1)[1]
        elif arg == "--config" and i + 1 < len(argv):
            spec = argv[i + 1]
    return spec


def _load_config_file(spec: str, debug: bool):
    """get_config() of the --config file, or exit 2 naming the file and what went wrong in it."""
    from effitrans.schema import ConfigError, load_config

    path = spec.rsplit(":", 1)[0] if ":" in os.path.basename(spec) else spec
    flag = f"--config={spec}"
    if not os.path.isfile(path):
        _exit_user_error(f"{flag}: no such file (allowed: a configs/*.py file, optionally file.py:arg)", debug)
    try:
        return load_config(spec)
    except SyntaxError as e:
        _exit_user_error(f"{flag}: syntax error in {e.filename} line {e.lineno}: {e.msg}", debug)
    except ConfigError as e:  # e.g. a bad file.py:key=value argument
        _exit_user_error(f"{flag}: {e}", debug)
    except Exception as e:  # noqa: BLE001 - whatever a config file raises is the config file's problem
        lines = [
            f.lineno
            for f in traceback.extract_tb(e.__traceback__)
            if os.path.abspath(f.filename) == os.path.abspath(path)
        ]
        where = f" at line {lines[-1]}" if lines else ""
        _exit_user_error(f"{flag}: the config file raised {type(e).__name__}{where}: {e}", debug)


def _override_problem(argv, config, error: Exception) -> str:
    """What is wrong with the --config.x.y overrides in argv: the first key the config file does not have, else
    the value that cannot take the key's type (from `error`)."""
    overrides = [a for a in argv[1:] if a.startswith("--config.")]
    for arg in overrides:
        parts = arg[2:].split("=", 1)[0].split(".")
        node, where = config, parts[0]
        for part in parts[1:]:
            if not hasattr(node, "keys") or part not in node:
                known = sorted(node.keys()) if hasattr(node, "keys") else []
                close = difflib.get_close_matches(part, known, n=1)
                hint = f" (did you mean {where}.{close[0]}?)" if close else ""
                return (
                    f"bad config override {arg}: {where}.{part} does not exist in the config file{hint}; keys of "
                    f"{where}: {known}. Keys that are not in the config file cannot be set"
                )
            node, where = node[part], f"{where}.{part}"
    detail = str(error).strip().strip("'\"").replace("\\n", " ").replace("\\'", "'")
    return f"bad config override {' '.join(overrides) or '(none)'}: {detail}; values must keep the key's type"


def parse_flags(argv):
    """absl flag parsing in which a broken --config file, a bad --config.x.y override or a bad flag exits 2
    with one line (module docstring) instead of a traceback."""
    debug = any(a in ("--debug", "--debug=true", "--debug=True", "--debug=1") for a in argv[1:])
    spec = _config_argument(argv)
    config = _load_config_file(spec, debug) if spec is not None else None
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        _exit_user_error(f"{e} (pass --help to see the flags)", debug)
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        _exit_user_error(_override_problem(argv, config, e), debug)
    except Exception:  # noqa: BLE001 - anything else while parsing flags is a bug
        _exit_bug()


def run() -> None:
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    sys.exit(run())
