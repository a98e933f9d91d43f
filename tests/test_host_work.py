"""scripts/host_work.py, the CPU measure of a training step's host work, keeps running."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import DEVICE, triton_device_or_skip

SCRIPT = Path(__file__).parents[1] / "scripts" / "host_work.py"

# The script runs the fused ops on CPU tensors under the interpreter: where the tests do too.
pytestmark = [pytest.mark.skipif(DEVICE != "cpu", reason="a CPU measure: the CPU runs cover it"),
              triton_device_or_skip()]


def test_host_work_counts_the_fused_steps_launches():
    result = subprocess.run([sys.executable, str(SCRIPT), "--steps", "1"], capture_output=True, text=True,
                            env={**os.environ, "TRITON_INTERPRET": "1"}, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    rows = {line.split()[0]: [float(v) for v in line.split()[1:]]
            for line in result.stdout.splitlines() if line.startswith(("eager ", "fused "))}
    assert set(rows) == {"eager", "fused"}
    assert rows["eager"][1:3] == [0.0, 0.0]  # no launch, no hifuse op
    assert rows["fused"][1] > 100 and rows["fused"][2] > 100
