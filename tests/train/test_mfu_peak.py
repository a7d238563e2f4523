"""MFU against the peak of the compute dtype: published peaks of known accelerators, else a measured matmul."""

import json

import pytest

from effitrans import perf
from effitrans.train.trainer import Trainer
from tests.helpers import tiny_lm_experiment


def test_published_peaks_per_device_kind_and_dtype():
    assert perf.published_peak_gflops("NVIDIA H200", "bfloat16") == 989400.0
    assert perf.published_peak_gflops("NVIDIA H100 80GB HBM3", "float32") == 494700.0
    assert perf.published_peak_gflops("NVIDIA H100 PCIe", "bfloat16") == 756000.0
    assert perf.published_peak_gflops("NVIDIA A100-SXM4-80GB", "bfloat16") == 312000.0
    assert perf.published_peak_gflops("TPU v4", "bfloat16") == 275000.0
    assert perf.published_peak_gflops("TPU v5 lite", "bfloat16") == 197000.0
    assert perf.published_peak_gflops("TPU v5p", "bfloat16") == 459000.0
    assert perf.published_peak_gflops("TPU v6 lite", "bfloat16") == 918000.0
    assert perf.published_peak_gflops("TPU v4", "float32") is None  # TPUs publish bf16 only: measured
    assert perf.published_peak_gflops("cpu", "float32") is None


def test_peak_source_published_given_or_measured(tmp_path, monkeypatch):
    monkeypatch.setenv(perf.CACHE_DIR_ENV, str(tmp_path))
    monkeypatch.delenv(perf.PEAK_ENV, raising=False)
    monkeypatch.setattr(perf, "measure_matmul_gflops", lambda **kw: {"bfloat16": 20.0, "float32": 10.0}[kw["dtype"]])
    assert perf.peak_gflops("bfloat16", "NVIDIA H200") == (989400.0, "published NVIDIA H200 bfloat16 dense")
    assert perf.peak_gflops("bfloat16", "cpu") == (20.0, "measured")  # a matmul in the compute dtype
    assert perf.peak_gflops("float32", "TPU v4") == (10.0, "measured")
    monkeypatch.setenv(perf.PEAK_ENV, "7")
    assert perf.peak_gflops("bfloat16", "NVIDIA H200") == (7.0, "given")


@pytest.mark.slow  # a short training run; CI runs it
def test_trainer_uses_the_compute_dtype_peak_and_times_the_first_step_apart(tmp_path, monkeypatch):
    monkeypatch.delenv(perf.PEAK_ENV, raising=False)
    seen = []

    def fake_peak(dtype, device_kind=None):
        seen.append(dtype)
        return 5.0, f"published fake {dtype} dense"

    monkeypatch.setattr(perf, "peak_gflops", fake_peak)
    cfg = tiny_lm_experiment(steps=3, checkpoint_every=100, eval_every=100)
    cfg.model.dtype = "bfloat16"
    history = Trainer(cfg, str(tmp_path), verbose=False).train()["history"]
    start = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert seen == ["bfloat16"]
    assert (start["peak_dtype"], start["peak_source"], start["peak_matmul_gflops"]) == (
        "bfloat16",
        "published fake bfloat16 dense",
        5.0,
    )
    assert history[0]["mfu"] is None  # the first window holds only the compiling step
    assert all(r["mfu"] is not None and r["mfu"] > 0 for r in history[1:])
