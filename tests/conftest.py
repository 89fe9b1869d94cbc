"""Shared pytest setup: the ``gpu`` marker (GPU tests live in tests/gpu and skip without CUDA)."""


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU; skipped where none is visible")
