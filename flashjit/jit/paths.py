"""Where flashjit finds its CUDA/C++ sources and keeps its compiled binaries."""

from __future__ import annotations

import os
from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent.parent  # .../flashjit


def csrc_dir() -> Path:
    """The folder holding the kernel and binding sources.

    In order: ``FLASHJIT_CSRC_DIR`` (a developer override), the installed package's
    ``flashjit/csrc`` (the wheel ships csrc there), then the repository's top-level ``csrc/``
    (a checkout or an editable install).
    """
    override = os.environ.get("FLASHJIT_CSRC_DIR")
    if override:
        return Path(override).expanduser().resolve()
    for candidate in (_PACKAGE_DIR / "csrc", _PACKAGE_DIR.parent / "csrc"):
        if candidate.is_dir():
            return candidate
    raise RuntimeError(
        f"flashjit: no csrc folder found next to {_PACKAGE_DIR} (looked for flashjit/csrc and "
        "../csrc); the installation is incomplete, reinstall flashjit or set FLASHJIT_CSRC_DIR"
    )


def cache_dir() -> Path:
    """The binary cache: ``FLASHJIT_CACHE_DIR`` if set, else the user cache dir for "flashjit"."""
    override = os.environ.get("FLASHJIT_CACHE_DIR")
    if override:
        return Path(override).expanduser().absolute()
    import platformdirs

    return Path(platformdirs.user_cache_dir("flashjit"))
