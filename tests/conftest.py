import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from hifuse import config  # noqa: E402


@pytest.fixture(autouse=True)
def eager_by_default(monkeypatch):
    """Every test starts eager, with no environment override, and leaves it that way."""
    monkeypatch.delenv(config.ENV_VAR, raising=False)
    config.set_parts(config.FusedParts())
    yield
    config.set_parts(config.FusedParts())


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
