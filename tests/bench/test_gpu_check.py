"""scripts/gpu_check.sh and effitrans/bench/gpu_check.py in dry mode on the CPU: JSON written, GPU-only rows
skipped with the reason, the rows that run are correct."""

import json
import os
import subprocess
import sys

import pytest

from effitrans.bench import gpu_check
from tests.helpers import ROOT, subprocess_env


def test_dry_correctness_section_in_process(tmp_path):
    args = ["--out", str(tmp_path), "--dry", "--sections", "correctness", "--masks", "window", "--dtypes", "bfloat16"]
    assert gpu_check.main(args) == 0
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["dry"] is True
    rows = report["sections"]["correctness"]["rows"]
    assert [r["impl"] for r in rows] == ["xla", "pallas", "cudnn"] and {r["dtype"] for r in rows} == {"bfloat16"}
    for r in rows:
        if r["impl"] == "xla":
            assert r["ok"], r  # forward and gradients against the reference
        else:
            assert r["skipped"], r
    assert rows[2]["skipped"] == "needs a CUDA GPU"  # cuDNN expresses a causal window


def test_unknown_section_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        gpu_check.main(["--out", str(tmp_path), "--sections", "speed"])
    assert "unknown section 'speed'" in capsys.readouterr().err


@pytest.mark.slow  # the whole dry script (every section, the lm_gpu step shrunk): minutes on 2 shared cores
def test_dry_script_writes_every_section(tmp_path):
    env = subprocess_env() | {"OUT": str(tmp_path), "PYTHON": sys.executable, "WHEELS": str(tmp_path / "none")}
    env["GPU_CHECK_TIMEOUT"] = "1800"
    subprocess.run(
        [os.path.join(ROOT, "scripts", "gpu_check.sh"), "--dry", "--masks", "causal,window,strided"],
        env=env,
        check=True,
        timeout=1900,
    )
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert set(report["sections"]) == set(gpu_check.SECTIONS)
    timing = {(r["impl"], r["block_q"]): r for r in report["sections"]["timing"]["rows"]}
    for impl in ("cudnn", "jax_triton_mha", "jax_mosaic_gpu"):
        assert timing[(impl, None)]["skipped"] == "needs a CUDA GPU"
    assert timing[("auto", None)]["auto_picks"] == "xla" and timing[("xla", None)]["fwd_ms"] > 0
    sparse = report["sections"]["sparse"]["rows"]
    assert {r.get("mask_name") for r in sparse} == {None, "window", "strided"}
    (lm,) = report["sections"]["lm"]["rows"]
    assert lm["mfu"] > 0 and lm["first_step_s"] > 0 and lm["peak_source"] in ("measured", "cached")
    moe = {r["path"]: r for r in report["sections"]["moe"]["rows"]}
    assert set(moe) == {"dense_glu_same_active_width", "dropless_ragged_dot", "dropless_tiles"}
    assert all(r["fwdbwd_ms"] > 0 for r in moe.values()) and moe["dropless_tiles"]["fwd_ms_x_dense"] > 0
