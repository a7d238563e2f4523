"""What a run leaves in its workdir besides checkpoints and metrics.jsonl: config.json (the resolved config),
machine.json (where it ran), TensorBoard event files (every metrics row as scalars, and the config as
hparams once the run finishes, so TensorBoard's HParams tab compares sweep points) and result.json (the
final step and held-out metrics; its presence marks a finished run)."""

from __future__ import annotations

import json
import os

from absl import logging

RESULT_FILE = "result.json"


def flat_config(config) -> dict:
    """{"model.d_model": 64, "train.steps": 200, ...}: every leaf of a ConfigDict (or nested dict) by dotted path."""
    plain = json.loads(config.to_json_best_effort()) if hasattr(config, "to_json_best_effort") else config
    out = {}

    def walk(node, prefix):
        for k, v in node.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                out[f"{prefix}{k}"] = v

    walk(plain, "")
    return out


def write_json(path: str, value) -> None:
    """Writes `value` as indented JSON to `path` atomically (a reader never sees half a file)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=2, default=str)
        f.write("\n")
    os.replace(tmp, path)


def write_start_records(workdir: str, config) -> None:
    """WORKDIR/config.json (the resolved config) and WORKDIR/machine.json (effitrans.perf.machine_description)."""
    from effitrans import perf

    os.makedirs(workdir, exist_ok=True)
    write_json(os.path.join(workdir, "config.json"), json.loads(config.to_json_best_effort()))
    write_json(os.path.join(workdir, "machine.json"), perf.machine_description())


def read_result(workdir: str) -> dict | None:
    """WORKDIR/result.json ({"step", "eval", "train"}) of a finished run, None when the run has not finished."""
    path = os.path.join(workdir, RESULT_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def _hparam_value(v):
    """A value TensorBoard's HParams plugin can show: numbers, strings and bools as they are, the rest as text."""
    return v if isinstance(v, (bool, int, float, str)) else json.dumps(v)


class EventWriter:
    """TensorBoard event files in `logdir` (tensorboardX: no TensorFlow needed): `scalars(step, row)` for each
    metrics row, `hparams(config, metrics)` once at the end. Write errors are logged, never fatal."""

    def __init__(self, logdir: str):
        from tensorboardX import SummaryWriter

        self._writer = SummaryWriter(logdir=logdir, flush_secs=30)

    def scalars(self, step: int, row: dict) -> None:
        for k, v in row.items():
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                self._writer.add_scalar(k, v, step)

    def hparams(self, config, metrics: dict) -> None:
        """The config's leaves as hparams of this run, with `metrics`' names (already logged as scalars)."""
        from tensorboardX.summary import hparams

        values = {k: _hparam_value(v) for k, v in flat_config(config).items() if v is not None}
        for summary in hparams(values, dict.fromkeys(metrics)):
            self._writer.file_writer.add_summary(summary)

    def close(self) -> None:
        try:
            self._writer.close()
        except OSError as e:  # a full disk must not turn a finished run into a crash
            logging.warning("could not close the TensorBoard writer: %s", e)


def _default_flat(config) -> dict:
    """flat_config of the declared defaults of `config`'s groups (data: of its config.data.name)."""
    from effitrans import defaults

    groups = {"model": defaults.model(), "train": defaults.train(), "mesh": defaults.mesh()}
    if "data" in config and "name" in config.data:
        try:
            groups["data"] = defaults.data(config.data.name)
        except ValueError:  # an unknown dataset: validation reports it; here all its keys count as changed
            pass
    out = flat_config({k: json.loads(v.to_json_best_effort()) for k, v in groups.items()})
    for name in ("funnel", "moe", "autoformer", "dlinear"):
        if "model" in config and name in config.model and config.model[name] is not None:
            group = json.loads(getattr(defaults, name)().to_json_best_effort())
            out.update({f"model.{name}.{k}": v for k, v in flat_config(group).items()})
    return out


def config_lines(config) -> list[str]:
    """The resolved config as "key = value" lines: keys whose value differs from the declared default first
    (marked *), then the rest."""
    defaults_flat = _default_flat(config)
    flat = flat_config(config)
    changed = [k for k, v in flat.items() if k not in defaults_flat or defaults_flat[k] != v]
    same = [k for k in flat if k not in changed]
    return [f"* {k} = {json.dumps(flat[k])}" for k in changed] + [f"  {k} = {json.dumps(flat[k])}" for k in same]
