"""What the command-line tests share: running ``hifuse`` as a user types it, a narrow model
(``SMALL``: a few epochs take seconds; the code paths are those of the published sizes), the
demo data and a run trained on it."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hifuse.cli import demo_data, main

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--depths", "1,1,1,1", "--dims", "16,32,64,128", "--heads", "1,2,4,8", "--img-size", "64", "--workers", "0"]
def cli(*args: str) -> tuple[int, str, str]:
    """main() in this process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in args])
    return rc, out.getvalue(), err.getvalue()


def env() -> dict:
    e = dict(os.environ)
    e["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{e.get('PATH', '')}"
    for name in ("HIFUSE_FUSED", "TRITON_INTERPRET"):  # set by the test session, not by a user
        e.pop(name, None)
    return e


def run_cli(*args: str, cwd=None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hifuse", *map(str, args)], cwd=cwd, env=env(),
                          capture_output=True, text=True, timeout=600, **kw)


def model_state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)["model"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli") / "demo"
    rc, out, err = cli("demo-data", root)
    assert rc == 0, err
    return root


@pytest.fixture(scope="module")
def trained(demo, tmp_path_factory) -> Path:
    """A run of four epochs on the demo data."""
    out = tmp_path_factory.mktemp("cli") / "run"
    rc, stdout, err = cli("train", "--data", demo, "--out", out, "--epochs", "4", "--lr", "1e-3", "--batch-size", "16", *SMALL)
    assert rc == 0, err
    return out


def tiny_data(root: Path, per_class: int, val: int = 1) -> Path:
    demo_data.write(root, 64, {"train": per_class, "val": val}, seed=1)
    return root


def one_line_error(result: tuple[int, str, str], *needles: str) -> None:
    rc, _out, err = result
    assert rc == 2, err
    lines = [line for line in err.strip().splitlines() if line]
    assert lines and lines[0].startswith("hifuse"), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err
