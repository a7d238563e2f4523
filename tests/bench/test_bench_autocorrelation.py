"""The auto-correlation scaling bench: the exponent fit, and one tiny run writing its JSON (slow)."""

import json
import math

import pytest

from effitrans.bench import autocorrelation


def test_fit_exponent_recovers_a_power_law_and_rejects_bad_input():
    lengths = [512, 1024, 2048, 4096]
    assert autocorrelation.fit_exponent(lengths, [3e-9 * n**2 for n in lengths]) == pytest.approx(2.0)
    assert autocorrelation.fit_exponent(lengths, [n * math.log(n) for n in lengths]) == pytest.approx(1.13, abs=0.01)
    with pytest.raises(ValueError, match=r"need >= 2 positive"):
        autocorrelation.fit_exponent([512], [1.0])
    with pytest.raises(ValueError, match=r"need >= 2 positive"):
        autocorrelation.fit_exponent([512, 1024], [1.0, 0.0])


@pytest.mark.slow  # compiles three programs per length: 15-65 s on 2 loaded cores
def test_tiny_run_writes_rows_exponents_and_the_goal(tmp_path):
    path = tmp_path / "scaling.json"
    argv = ["--seq_lens", "64,128", "--heads", "2", "--head_dim", "8", "--max_seconds", "0.1", "--json", str(path)]
    assert autocorrelation.main(argv) == 0
    out = json.loads(path.read_text())
    assert [r["seq_len"] for r in out["rows"]] == [64, 128]
    assert set(out["exponents"]) == {"autocorrelation_gather", "autocorrelation_roll", "dense"}
    assert out["goal"]["autocorrelation_exponent_max"] == 1.2 and isinstance(out["goal"]["met"], bool)
    with pytest.raises(ValueError, match=r"at least two lengths"):
        autocorrelation.main(["--seq_lens", "64"])
