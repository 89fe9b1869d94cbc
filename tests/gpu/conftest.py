"""GPU tests: skipped (with the reason) where no CUDA device is present."""

import pytest
import torch

import flashjit.ops

def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device: GPU tests run on the GPU machine")
    for item in items:
        if "tests/gpu" in str(item.fspath).replace("\\", "/"):
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def poison_outputs():
    """Every flashjit output starts as NaN, so an unwritten element fails the comparison."""
    flashjit.ops.POISON_OUTPUTS = True
    yield
    flashjit.ops.POISON_OUTPUTS = False
