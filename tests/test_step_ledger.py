"""scripts/step_ledger.py counts a training step's launches; the fused step's counts at the
narrow size are held to a committed ledger, so a change that adds launches or glue shows
(and one that removes them is written down). After an intended change, regenerate it:
``HIFUSE_UPDATE_LEDGER=1 python -m pytest tests/test_step_ledger.py``."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import DEVICE, triton_device_or_skip

ROOT = Path(__file__).parents[1]
SCRIPT = ROOT / "scripts" / "step_ledger.py"
BASELINE = Path(__file__).parent / "data" / "step_ledger_narrow.json"
# the counts held: launches by kind and by block, casts, op calls (bytes follow from these)
HELD = ("launches", "triton launches", "native launches", "gemm launches", "optimizer launches", "glue launches",
        "stems and downsamples launches", "global blocks launches", "local blocks launches", "fusion blocks launches",
        "head launches", "cast launches", "hifuse op calls")

pytestmark = [pytest.mark.skipif(DEVICE != "cpu", reason="a CPU count: the CPU runs cover it"),
              triton_device_or_skip()]


def _ledger(tmp_path, *args) -> dict:
    out = tmp_path / "ledger.json"
    result = subprocess.run([sys.executable, str(SCRIPT), "--narrow", "--image-size", "64", "--at", "2", "--threads", "1",
                             "--json", str(out), *args], capture_output=True, text=True, timeout=900,
                            env={**os.environ, "TRITON_INTERPRET": "1"})
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return json.loads(out.read_text())["result"]


def test_fused_step_launches_match_the_ledger(tmp_path):
    fused = _ledger(tmp_path, "--fused", "fused")["fused"]["at"]["2"]
    counts = {k: round(fused[k]) for k in HELD}
    assert counts["launches"] == sum(counts[f"{k} launches"] for k in ("triton", "native", "gemm", "optimizer", "glue"))
    assert counts["triton launches"] > 100 and counts["hifuse op calls"] > 100
    if os.environ.get("HIFUSE_UPDATE_LEDGER") == "1":
        BASELINE.write_text(json.dumps(counts, indent=1) + "\n")
    held = json.loads(BASELINE.read_text())
    changed = {k: f"{held[k]} -> {counts[k]}" for k in HELD if counts[k] != held[k]}
    assert not changed, (f"the fused step's launches changed (narrow model, 64x64, batch 2): {changed}; if intended, "
                         f"rerun with HIFUSE_UPDATE_LEDGER=1 and commit {BASELINE.relative_to(ROOT)}")


def test_fit_goes_through_its_counts(tmp_path):
    # --fit counts at --batch (2 and 3) and fits a + b x batch: at batch 2 it is that count,
    # the count the direct mode makes there
    direct = _ledger(tmp_path, "--fused", "fused")["fused"]["at"]["2"]
    fitted = _ledger(tmp_path, "--fused", "fused", "--fit", "--batch", "2,3")["fused"]["at"]["2"]
    for k in ("launches", "GB", "glue GB", "triton GB"):
        assert fitted[k] == pytest.approx(direct[k], rel=1e-9), k
