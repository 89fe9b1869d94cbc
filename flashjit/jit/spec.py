"""Build specs: one frozen object per compiled specialisation, named after what it fixes.

A spec says which kernel (fwd, bwd, selftest), for which arch, dtype, head-dim bucket and
variant, and which kernel family implements it; from it follow the sources, the compiler flags
and the readable name that also names the op namespace and the cache folder, e.g.
``fwd_sm80_bf16_hd128_causal`` or ``fwd_sm90a_bf16_hd128_causal_wgmma``.

Kernel families, their sources, defines and where each serves come from the registry
(registry.py): ``sm90`` (Hopper wgmma) serves the forward and backward at head dims 64 and 128 on
sm90a and is the default there; ``sm80`` (mma.sync) serves every CUDA spec.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

from .arch import gencode_flags, normalize_arch
from . import registry
from .env import kernel_family_preference, verbose_enabled
from .paths import csrc_dir
from .registry import ATTENTION_KERNELS, KERNEL_FAMILIES, default_family  # noqa: F401 (re-export)

HEAD_DIM_BUCKETS = (32, 64, 96, 128, 160, 192, 224, 256)
SM90_FWD_HEAD_DIMS = registry.row("fwd", "sm90").head_dims  # where the wgmma forward serves
SM90_BWD_HEAD_DIMS = registry.row("bwd", "sm90").head_dims  # ... and the wgmma backward
DTYPES = ("fp16", "bf16")
_DTYPE_ALIASES = {
    "fp16": "fp16", "float16": "fp16", "half": "fp16", "torch.float16": "fp16",
    "bf16": "bf16", "bfloat16": "bf16", "torch.bfloat16": "bf16",
}


@dataclass(frozen=True)
class KernelDef:
    """A kernel: its sources (relative to csrc_dir()) and whether it is CPU-only. The attention
    kernels' sources depend on the family: registry.REGISTRY has them."""

    sources: tuple[str, ...] = ()
    cpu_only: bool = False


KERNELS: dict[str, KernelDef] = {
    **{kernel: KernelDef() for kernel in ATTENTION_KERNELS},
    "selftest": KernelDef(("selftest/selftest_op.cpp",), cpu_only=True),
}


def head_dim_bucket(d: int) -> int:
    """The smallest compiled head dim >= d (a d that is not a multiple of 8 is served zero-padded,
    interface._attention). ValueError unless 1 <= d <= 256."""
    if isinstance(d, bool) or not isinstance(d, int):
        raise ValueError(f"head_dim must be an int, got {d!r}")
    if d < 1 or d > HEAD_DIM_BUCKETS[-1]:
        raise ValueError(f"head_dim {d} is not supported: it must be between 1 and "
                         f"{HEAD_DIM_BUCKETS[-1]}")
    return next(b for b in HEAD_DIM_BUCKETS if b >= d)


def cxx_flags() -> list[str]:
    """Default host C++ flags (the binding files).

    No ``-std``: torch.utils.cpp_extension adds the C++ standard its headers need (C++20 from
    torch 2.13 on), and a later ``-std`` of ours would override it and break the build.
    """
    return ["-O3"]


def nvcc_flags(arch: str, verbose: bool = False) -> list[str]:
    """Default nvcc flags for ``arch`` (e.g. ``sm80-sm90a``): all of them, in one place.

    Our ``-gencode`` flags make torch.utils.cpp_extension add no arch flags of its own (its
    ``_get_cuda_arch_flags`` returns nothing once a flag mentions ``arch``), so
    TORCH_CUDA_ARCH_LIST never widens a build. No ``-std``: cpp_extension gives nvcc torch's
    C++ standard when our flags name none (compile_only() leaves nvcc at its default).
    ``verbose`` adds line info and ptxas's register/shared-memory report.
    """
    flags = ["-O3", "--expt-relaxed-constexpr", "--use_fast_math", "-DNDEBUG"]
    flags += gencode_flags(arch)
    if verbose:
        flags += ["-lineinfo", "-Xptxas=-v"]
    return flags


@dataclass(frozen=True)
class JitSpec:
    """One specialisation to compile. Hashable; equal specs share one binary.

    ``head_dim`` is stored as its bucket (``head_dim=120`` becomes 128), ``arch`` in normal
    form (``sm90`` becomes ``sm90a``), ``dtype`` as ``fp16``/``bf16`` (torch dtypes accepted).
    The selftest kernel takes ``arch="cpu"`` (the default for it) and no dtype or head dim.
    ``family`` (``sm80`` or ``sm90``; CUDA kernels only) defaults to default_family(), or to
    ``sm80`` when FLASHJIT_KERNEL_FAMILY=sm80 (the forward and the backward alike); an explicit
    ``sm90`` must be one default_family() gives. ``tile`` (optional): a tile shape the family's
    registry row takes (``tile_params``), e.g. ``(128, 64, 4, 2)`` or ``"128,64,4,2"`` for the
    sm80 forward, instead of the launch code's per-head-dim choice: part of the name
    (``_t128x64x4x2``), the defines (``-DFLASHJIT_TILE_BLOCK_M=128`` ...) and the cache key, for
    tuning sweeps.
    """

    kernel: str
    arch: str | None = None
    dtype: str | None = None
    head_dim: int | None = None
    causal: bool = False
    dropout: bool = False
    family: str | None = None
    tile: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        kernel = KERNELS.get(self.kernel)
        if kernel is None:
            raise ValueError(f"unknown kernel {self.kernel!r}; known: {', '.join(KERNELS)}")
        set_ = object.__setattr__  # frozen: normalise fields in place, once
        if kernel.cpu_only:
            if self.arch not in (None, "cpu"):
                raise ValueError(f"kernel {self.kernel!r} is CPU-only: arch must be 'cpu'")
            if (self.dtype is not None or self.head_dim is not None or self.causal or self.dropout
                    or self.family is not None or self.tile is not None):
                raise ValueError(f"kernel {self.kernel!r} takes no dtype, head_dim, causal, "
                                 "dropout, family or tile")
            set_(self, "arch", "cpu")
            return
        if not self.arch:
            raise ValueError(f"kernel {self.kernel!r} needs an arch, e.g. current_arch()")
        set_(self, "arch", normalize_arch(self.arch))
        dtype = _DTYPE_ALIASES.get(str(self.dtype))
        if dtype is None:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        set_(self, "dtype", dtype)
        if self.head_dim is None:
            raise ValueError(f"kernel {self.kernel!r} needs a head_dim")
        set_(self, "head_dim", head_dim_bucket(self.head_dim))
        set_(self, "causal", bool(self.causal))
        set_(self, "dropout", bool(self.dropout))
        set_(self, "family", self._resolve_family())
        set_(self, "tile", self._resolve_tile())

    def _resolve_tile(self) -> tuple[int, ...] | None:
        """``tile`` as a tuple of ints, checked against the family's tile parameters."""
        if self.tile is None:
            return None
        params = self._row.tile_params
        if params is None:
            raise ValueError(f"kernel {self.kernel!r} of family {self.family!r} takes no tile")
        tile = self.tile
        if isinstance(tile, str):
            tile = tuple(t.strip() for t in tile.split(","))
        try:
            tile = tuple(int(t) for t in tile)
        except (TypeError, ValueError):
            tile = ()
        if len(tile) != len(params) or any(t <= 0 for t in tile):
            raise ValueError(f"tile of kernel {self.kernel!r}, family {self.family!r} (also "
                             f"FLASHJIT_{self.kernel.upper()}_TILE): {len(params)} positive ints "
                             f"({', '.join(params)}), got {self.tile!r}")
        return tile

    def _resolve_family(self) -> str:
        """The family of a CUDA spec whose other fields are normalised (see the class doc)."""
        if self.family is None:
            # FLASHJIT_KERNEL_FAMILY is a preference: that family wherever it serves, else the
            # default (registry.preferred_family).
            preferred = kernel_family_preference()
            if preferred is None:
                return default_family(self.kernel, self.arch, self.head_dim)
            return registry.preferred_family(self.kernel, self.arch, self.head_dim, preferred)
        if self.family not in KERNEL_FAMILIES:
            raise ValueError(f"family must be one of {KERNEL_FAMILIES}, got {self.family!r}")
        if not registry.row(self.kernel, self.family).serves(self.arch, self.head_dim):
            where = registry.describe(registry.row(self.kernel, self.family))
            raise ValueError(
                f"family {self.family!r} ({where}) does not serve kernel {self.kernel!r} on arch "
                f"{self.arch!r} at head-dim bucket {self.head_dim}")
        return self.family

    @property
    def _row(self) -> registry.FamilyRow:
        return registry.row(self.kernel, self.family)

    @property
    def name(self) -> str:
        """Readable unique name, e.g. ``fwd_sm80_bf16_hd128_causal``, ``selftest_cpu``; the sm90
        family adds ``_wgmma``: ``fwd_sm90a_bf16_hd128_causal_wgmma``,
        ``bwd_sm90a_bf16_hd128_causal_wgmma``."""
        if KERNELS[self.kernel].cpu_only:
            return f"{self.kernel}_{self.arch}"
        name = f"{self.kernel}_{self.arch}_{self.dtype}_hd{self.head_dim}"
        name += ("_causal" if self.causal else "") + ("_dropout" if self.dropout else "")
        name += self._row.suffix
        return name + ("_t" + "x".join(map(str, self.tile)) if self.tile else "")

    @property
    def op_namespace(self) -> str:
        """The torch.ops namespace the binary registers: ``flashjit_`` + name (``-`` -> ``_``)."""
        return "flashjit_" + self.name.replace("-", "_")

    @property
    def with_cuda(self) -> bool:
        return not KERNELS[self.kernel].cpu_only

    def sources(self, root: Path | None = None) -> list[Path]:
        """Absolute source paths under ``root`` (default csrc_dir())."""
        root = csrc_dir() if root is None else root
        sources = KERNELS[self.kernel].sources if not self.with_cuda else self._row.sources
        return [root / s for s in sources]

    @property
    def defines(self) -> list[str]:
        """Preprocessor defines given to both the C++ and the nvcc compiles, with the family's own
        (registry row: ``-DFLASHJIT_FWD_FAMILY_SM90=1`` for the wgmma forward, say)."""
        defines = [f"-DFLASHJIT_OP_NAMESPACE={self.op_namespace}"]
        if self.with_cuda:
            defines += [
                f"-DFLASHJIT_DTYPE_{self.dtype.upper()}=1",
                f"-DFLASHJIT_HEAD_DIM={self.head_dim}",
                f"-DFLASHJIT_IS_CAUSAL={int(self.causal)}",
                f"-DFLASHJIT_HAS_DROPOUT={int(self.dropout)}",
            ]
            if self._row.define is not None:
                defines.append(self._row.define)
            if self.tile is not None:  # one define per parameter: nvcc splits -D values at commas
                defines.append("-DFLASHJIT_TILE=1")
                defines += [f"-DFLASHJIT_TILE_{name.upper()}={value}"
                            for name, value in zip(self._row.tile_params, self.tile)]
        return defines

    def cflags(self) -> list[str]:
        return cxx_flags() + self.defines

    def cuda_cflags(self, verbose: bool | None = None) -> list[str]:
        """nvcc flags (empty for CPU-only kernels); ``verbose`` defaults to FLASHJIT_VERBOSE."""
        if not self.with_cuda:
            return []
        verbose = verbose_enabled() if verbose is None else verbose
        return nvcc_flags(self.arch, verbose) + self.defines

    def prebuild_command(self) -> str:
        """The command that builds exactly this spec into the cache (``--family`` always given,
        so FLASHJIT_KERNEL_FAMILY where it runs changes nothing)."""
        args = ["python", "-m", "flashjit.prebuild", "--kernel", self.kernel]
        if self.with_cuda:
            args += [
                "--arch", self.arch.replace("-", ";"),
                "--dtype", self.dtype,
                "--head-dim", str(self.head_dim),
                "--causal", "yes" if self.causal else "no",
                "--dropout", "yes" if self.dropout else "no",
                "--family", self.family,
            ]
            if self.tile is not None:
                args += ["--tile", ",".join(map(str, self.tile))]
        return shlex.join(args)

    def fields(self) -> dict:
        """The fields that make the spec (JitSpec(**fields()) rebuilds it); tile only when set."""
        fields = {
            "kernel": self.kernel, "arch": self.arch, "dtype": self.dtype,
            "head_dim": self.head_dim, "causal": self.causal, "dropout": self.dropout,
            "family": self.family,
        }
        if self.tile is not None:
            fields["tile"] = list(self.tile)
        return fields
