"""GPU architecture names: parsing arch lists and finding the arch to build for.

flashjit names an architecture ``sm<major><minor>`` with an optional ``a`` suffix for the
arch-specific feature set, e.g. ``sm80``, ``sm86``, ``sm90a``, ``sm100``. Hopper is always
``sm90a`` (its wgmma/TMA instructions exist only there). A binary for several archs joins them
with ``-`` in ascending order: ``sm80-sm90a``.
"""

from __future__ import annotations

import functools
import os
import re

MIN_CAPABILITY = (8, 0)
ARCH_ENV_VARS = ("FLASHJIT_CUDA_ARCH_LIST", "TORCH_CUDA_ARCH_LIST")

# torch.utils.cpp_extension's family names that are sm_80 or newer.
_NAMED_ARCHES = {
    "ampere": "8.0 8.6",
    "ampere+tegra": "8.7",
    "ada": "8.9",
    "hopper": "9.0",
    "blackwell": "10.0 10.3 12.0 12.1",
    "blackwell+tegra": "11.0",
}
_DOTTED = re.compile(r"^(\d+)\.(\d)([af]?)(?:\+ptx)?$")
_SM = re.compile(r"^sm_?(\d+?)(\d)([af]?)$")


def _arch_name(major: int, minor: int, suffix: str = "") -> str:
    if (major, minor) == (9, 0):
        suffix = "a"
    return f"sm{major}{minor}{suffix}"


def _capability(arch: str) -> tuple[int, int]:
    match = _SM.match(arch)
    if match is None:
        raise ValueError(f"not an arch name: {arch!r}")
    return int(match.group(1)), int(match.group(2))


def parse_arch_list(text: str, *, drop_old: bool = False) -> list[str]:
    """Parse an arch list into sorted, unique flashjit arch names.

    Entries are separated by ``;``, ``,`` or spaces and may be written ``8.0``, ``9.0a``,
    ``8.6+PTX`` (the PTX part is ignored: flashjit embeds SASS only), ``sm80``, ``sm_90a`` or a
    family name (``Ampere``, ``Hopper``...). Archs older than sm80 raise ValueError, or are
    skipped when ``drop_old`` (used for TORCH_CUDA_ARCH_LIST, which often lists old archs for
    other extensions).
    """
    entries = [e for e in re.split(r"[;,\s]+", text.strip()) if e]
    expanded: list[str] = []
    for entry in entries:
        expanded.extend(_NAMED_ARCHES.get(entry.lower(), entry).split())
    archs: set[str] = set()
    for entry in expanded:
        low = entry.lower()
        match = _DOTTED.match(low) or _SM.match(low)
        if match is None:
            raise ValueError(
                f"unknown CUDA arch {entry!r} in {text!r}; write e.g. '8.0', '9.0', 'sm80' or 'sm90a'"
            )
        major, minor, suffix = int(match.group(1)), int(match.group(2)), match.group(3)
        if (major, minor) < MIN_CAPABILITY:
            if drop_old:
                continue
            raise ValueError(
                f"CUDA arch {entry!r} is older than sm80: flashjit needs compute capability 8.0 or newer"
            )
        archs.add(_arch_name(major, minor, suffix))
    if not archs:
        raise ValueError(f"no CUDA arch of compute capability 8.0 or newer in {text!r}")
    return sorted(archs, key=lambda a: (_capability(a), a))


@functools.lru_cache(maxsize=None)
def normalize_arch(arch: str) -> str:
    """``"sm90"`` -> ``"sm90a"``, ``"sm90a-sm80"`` -> ``"sm80-sm90a"``; ValueError if invalid."""
    return "-".join(parse_arch_list(arch.replace("-", ";")))


def gencode_flags(arch: str) -> list[str]:
    """nvcc ``-gencode`` flags producing SASS for each arch of ``arch`` (e.g. ``sm80-sm90a``)."""
    flags = []
    for one in arch.split("-"):
        number = one[2:]  # "90a"
        flags.append(f"-gencode=arch=compute_{number},code=sm_{number}")
    return flags


class NoGpuError(RuntimeError):
    """current_arch() found neither an arch list nor a GPU; callers with their own way to name
    an arch (prebuild's --arch) catch it to say so."""


def runs_on(built: str, gpu: str) -> bool:
    """Whether SASS built for ``built`` (one arch, e.g. ``sm80``) runs on a GPU of arch ``gpu``
    (e.g. ``sm86``): the same major version and a minor no newer than the GPU's; an arch-specific
    build (``sm90a``) runs on its own arch only (CUDA C++ Programming Guide, "Binary
    Compatibility" and "Feature Set Compiler Targets")."""
    built_cc, gpu_cc = _capability(built), _capability(gpu)
    if built.endswith("a"):
        return built_cc == gpu_cc
    return built_cc[0] == gpu_cc[0] and built_cc[1] <= gpu_cc[1]


@functools.lru_cache(maxsize=None)
def _env_archs(var: str, value: str) -> tuple[str, ...]:
    """An arch-list variable's archs, parsed once per value; RuntimeError naming it if invalid."""
    try:
        return tuple(parse_arch_list(value, drop_old=(var == "TORCH_CUDA_ARCH_LIST")))
    except ValueError as err:
        raise RuntimeError(f"flashjit: cannot use {var}={value!r}: {err}") from None


@functools.lru_cache(maxsize=None)
def _gpu_arch(index: int | None) -> tuple[str, str] | None:
    """(arch, name) of CUDA device ``index`` (None: the current one), looked up once; None when
    torch sees no GPU (a CPU build, or fake CUDA tensors in tests)."""
    import torch

    if not torch.cuda.is_available():
        return None
    if index is None:
        index = torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    name = torch.cuda.get_device_name(index)
    if (major, minor) < MIN_CAPABILITY:
        raise RuntimeError(
            f"flashjit: {name} has compute capability {major}.{minor}; flashjit needs 8.0 "
            "(Ampere) or newer"
        )
    return _arch_name(major, minor), name


def current_arch(device=None) -> str:
    """The arch to build for: FLASHJIT_CUDA_ARCH_LIST, else TORCH_CUDA_ARCH_LIST, else the GPU's.

    FLASHJIT_CUDA_ARCH_LIST is taken whole: a list of several archs gives one name for a binary
    holding them all (``sm80-sm90a``; such a binary takes the family that every arch of it runs,
    mma.sync). TORCH_CUDA_ARCH_LIST is shared with other extensions (containers list every arch
    in it): with a GPU visible only the newest arch of it that runs there is built (``9.0`` of
    ``8.0 8.6 9.0`` on a Hopper GPU), so the GPU keeps its own kernel family; with none visible
    (prebuild on a login node) the whole list. With a GPU visible (``device``'s, else the current
    one) a list holding no arch that runs on it raises RuntimeError naming the variable.

    Also raises RuntimeError when the GPU is older than sm80 or a list is invalid, NoGpuError (a
    RuntimeError) when there is no list and no GPU.
    """
    index = getattr(device, "index", None)
    for var in ARCH_ENV_VARS:
        value = os.environ.get(var, "").strip()
        if not value or value.lower() == "native":
            continue
        archs = _env_archs(var, value)
        try:
            gpu = _gpu_arch(index)
        except RuntimeError:  # an old GPU: the list is for others (its calls fail elsewhere)
            gpu = None
        if gpu is None:
            return "-".join(archs)
        runnable = [arch for arch in archs if runs_on(arch, gpu[0])]
        if not runnable:
            raise RuntimeError(
                f"flashjit: {var}={value!r} holds no arch that runs on {gpu[1]} ({gpu[0]}): add "
                f"{gpu[0]} to it, or unset it to build for the visible GPU"
            )
        return runnable[-1] if var == "TORCH_CUDA_ARCH_LIST" else "-".join(archs)
    gpu = _gpu_arch(index)
    if gpu is None:
        raise NoGpuError(
            "flashjit: no CUDA GPU is visible, so the arch to compile for is unknown. Set "
            "FLASHJIT_CUDA_ARCH_LIST (e.g. '8.0;9.0' or 'sm90a') to build without a GPU"
        )
    return gpu[0]
