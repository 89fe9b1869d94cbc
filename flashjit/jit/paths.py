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


def csrc_override_problem() -> str | None:
    """What is wrong with ``FLASHJIT_CSRC_DIR`` (missing, or not a folder), in words naming it;
    None when it is unset or names a folder. Builds from a missing folder fail (no sources), so
    ``info`` warns and prebuild refuses to start."""
    override = os.environ.get("FLASHJIT_CSRC_DIR")
    if not override:
        return None
    path = csrc_dir()
    if path.is_dir():
        return None
    what = "is not a folder" if path.exists() else "does not exist"
    return (f"FLASHJIT_CSRC_DIR={override} {what}" + (f" ({path})" if str(path) != override else "")
            + ": point it at a copy of flashjit's csrc folder, or leave it unset")


_resolved_cache_dirs: dict[str, Path] = {}


def cache_dir() -> Path:
    """The binary cache: ``FLASHJIT_CACHE_DIR`` if set, else the user cache dir for "flashjit".

    The variable is made an absolute path where it is read: ``~`` is expanded and a relative
    value is resolved against the working directory of the first call in this process that reads
    that value, and kept (a later ``os.chdir`` does not move the cache). Other processes resolve
    it against their own working directory (prebuild hands its workers the absolute path).
    """
    override = os.environ.get("FLASHJIT_CACHE_DIR")
    if override:
        path = _resolved_cache_dirs.get(override)
        if path is None:
            path = _resolved_cache_dirs[override] = Path(override).expanduser().absolute()
        return path
    import platformdirs

    return Path(platformdirs.user_cache_dir("flashjit"))


def cache_dir_problem(root: Path | None = None) -> str | None:
    """Why ``root`` cannot be the cache dir, in words naming FLASHJIT_CACHE_DIR when that set it:
    not a folder, not readable, or not makeable (a parent that is a file); None for a readable
    folder or one that does not exist yet but can be made (builds make it and its parents).
    ``root`` defaults to cache_dir()."""
    root = cache_dir() if root is None else root
    value = os.environ.get("FLASHJIT_CACHE_DIR")
    where = f"the cache dir {root}"
    if value:
        where = f"FLASHJIT_CACHE_DIR={value}" + (f" ({root})" if str(root) != value else "")
    if root.is_dir():
        try:
            os.listdir(root)
        except OSError as err:
            return f"{where} cannot be read ({err.strerror or err})"
        return None
    if root.exists() or root.is_symlink():
        what = ("a file" if root.is_file() else "a broken symbolic link" if not root.exists()
                else "a device, pipe or socket")
        return f"{where} is {what}, not a folder"
    parent = root.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return f"{where} cannot be made ({parent} is not a folder)"
    return None
