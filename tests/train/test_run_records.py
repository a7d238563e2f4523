"""What a run leaves in its workdir: config.json, machine.json, TensorBoard events with hparams, result.json,
and a jax.profiler trace of config.train.profile_steps."""

import glob
import json
import os

import pytest
from tensorboardX.event_file_writer import event_pb2

from effitrans import defaults
from effitrans.schema import ConfigError, validate
from effitrans.train.schema import TRAIN_KEYS, parse_step_range
from effitrans.train.trainer import Trainer
from tests.helpers import tiny_lm_experiment


def _events(workdir) -> list:
    """Every tensorboard Event in WORKDIR's event files (read with the record framing TFRecord uses)."""
    out = []
    for path in glob.glob(os.path.join(workdir, "events.out.tfevents.*")):
        data = open(path, "rb").read()
        pos = 0
        while pos < len(data):
            length = int.from_bytes(data[pos : pos + 8], "little")
            event = event_pb2.Event()
            event.ParseFromString(data[pos + 12 : pos + 12 + length])
            out.append(event)
            pos += 12 + length + 4
    return out


def test_a_run_writes_config_machine_events_hparams_result_and_a_profile(tmp_path):
    cfg = tiny_lm_experiment(steps=4, profile_steps="1:3")
    Trainer(cfg, str(tmp_path), peak_gflops=1.0, verbose=False).train()
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model"]["num_layers"] == 1 and saved["train"]["profile_steps"] == "1:3"
    machine = json.loads((tmp_path / "machine.json").read_text())
    assert machine["backend"] == "cpu" and machine["cpu_count"] >= 1
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["step"] == 4 and "eval_loss" in result["eval"] and result["train"]["step"] == 4

    events = _events(tmp_path)
    scalars = {(v.tag, e.step): v.simple_value for e in events for v in e.summary.value if v.HasField("simple_value")}
    assert sorted(s for tag, s in scalars if tag == "loss") == [1, 2, 3, 4]
    assert scalars[("eval_loss", 4)] == pytest.approx(result["eval"]["eval_loss"], rel=1e-6)
    tags = {v.tag for e in events for v in e.summary.value}
    hparams = [v for e in events for v in e.summary.value if v.tag.startswith("_hparams_/")]
    assert "_hparams_/experiment" in tags and len(hparams) == 3  # the experiment, the run's start and end
    assert any(b"train.steps" in v.metadata.plugin_data.content for v in hparams)

    traces = glob.glob(str(tmp_path / "profile" / "**" / "*.xplane.pb"), recursive=True)
    assert len(traces) == 1 and os.path.getsize(traces[0]) > 0


def test_profile_steps_takes_a_step_range_only():
    assert parse_step_range("10:13") == (10, 13) and parse_step_range("") is None
    for bad in ("13:10", "3", "a:b", "1:2:3", 5):
        with pytest.raises(ConfigError, match=r"config.train.profile_steps=.* \"START:END\" with 0 <= START < END"):
            validate({"profile_steps": bad}, TRAIN_KEYS, "config.train")
    validate(defaults.train(profile_steps="0:1"), TRAIN_KEYS, "config.train")


def test_the_printed_config_lists_non_default_keys_first():
    from effitrans.train.records import config_lines

    lines = config_lines(tiny_lm_experiment(steps=4))
    changed = [line for line in lines if line.startswith("* ")]
    assert lines[: len(changed)] == changed and all(line.startswith("  ") for line in lines[len(changed) :])
    assert "* train.steps = 4" in changed and "* model.num_layers = 1" in changed
    assert "  train.b1 = 0.9" in lines and "  mesh.data = 1" in lines
