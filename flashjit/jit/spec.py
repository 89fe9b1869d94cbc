"""Build specs: one frozen object per compiled specialisation, named after what it fixes.

A spec says which kernel (fwd, bwd, the test-only dropout_mask, the CPU selftest), for which
arch, dtype, head-dim bucket and variant (causal, window, softcap, alibi, sink, dropout), whether
the forward reads K/V through a page table (paged), and which kernel family implements it; from
it follow the sources, the compiler flags and the readable name that also names the op namespace
and the cache folder, e.g. ``fwd_sm80_bf16_hd128_causal`` or
``fwd_sm90a_bf16_hd128_causal_window_softcap_wgmma``.

Kernel families, their sources and where each serves come from the registry (registry.py): on
sm90a at head-dim buckets 64-256 the forward is ``sm90ws`` (TMA, warp specialisation, ping-pong;
paged forwards: ``sm90`` at 64/128) and at 64-128 the backward ``sm90`` (wgmma); ``sm80``
(mma.sync) serves every CUDA spec. Every family serves every variant.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, replace
from pathlib import Path

from .arch import gencode_flags, normalize_arch
from . import registry
from .env import kernel_family_preference, parse_tile, tile_override, verbose_enabled
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


# The variant flags of attention specs, in name order (dropout, the last, is not among them: it
# predates them and keeps its own FLASHJIT_HAS_DROPOUT=0/1 define).
VARIANTS = ("window", "softcap", "alibi", "sink")
# The name order of every flag: causal, the variants, dropout, then paged (K/V through a page
# table: a kernel flag of the forward, not a variant of the scores; registry.FamilyRow.paged).
FLAGS = ("causal", *VARIANTS, "dropout", "paged")


@dataclass(frozen=True)
class KernelDef:
    """A kernel: its sources (relative to csrc_dir()), whether it is CPU-only and whether it is
    specialised by arch alone (no dtype, head dim, variant, family or tile). The attention
    kernels' sources depend on the family: registry.REGISTRY has them."""

    sources: tuple[str, ...] = ()
    cpu_only: bool = False
    arch_only: bool = False

    @property
    def attention(self) -> bool:
        return not (self.cpu_only or self.arch_only)


KERNELS: dict[str, KernelDef] = {
    **{kernel: KernelDef() for kernel in ATTENTION_KERNELS},
    # test-only: the dropout keep mask the kernels draw (flashjit.testing.dropout_mask)
    "dropout_mask": KernelDef(("dropout_mask_binding.cpp", "common/dropout_mask.cu"),
                              arch_only=True),
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
    The selftest kernel takes ``arch="cpu"`` (the default for it) and no dtype or head dim; the
    dropout_mask kernel an arch alone. The variant flags ``causal``, ``window``, ``softcap``,
    ``alibi``, ``sink`` and ``dropout`` each add a name part (``_window``) and, except causal and
    dropout (``-DFLASHJIT_IS_CAUSAL=0/1``, ``-DFLASHJIT_HAS_DROPOUT=0/1``), a define only when set
    (``-DFLASHJIT_HAS_WINDOW=1``): the specs without them keep their names and defines.
    ``paged`` (the forward only, registry.FamilyRow.paged; ValueError for any other kernel): K/V
    read through a block table (chunked prefill on a paged KV cache), name part ``_paged`` after
    the variants, ``-DFLASHJIT_HAS_PAGED=1``, in the fields and prebuild command only when set.
    ``family`` (a registry family: ``sm80``, ``sm90``, ``sm90ws``, ...; attention kernels only)
    defaults to default_family() (for a paged spec, the first row that reads a block table), or to
    FLASHJIT_KERNEL_FAMILY's family where that serves the spec (``sm80`` serves every forward and
    backward); an explicit family must serve the spec's arch and head dim. ``tile`` (optional): a
    tile shape the family's registry row takes (``tile_params``), e.g. ``(128, 64, 4, 2)`` or
    ``"128,64,4,2"`` for the sm80 forward, instead of the launch code's per-head-dim choice: part
    of the name (``_t128x64x4x2``), the defines (``-DFLASHJIT_TILE_BLOCK_M=128`` ...) and the
    cache key, for tuning sweeps.
    """

    kernel: str
    arch: str | None = None
    dtype: str | None = None
    head_dim: int | None = None
    causal: bool = False
    window: bool = False
    softcap: bool = False
    alibi: bool = False
    sink: bool = False
    dropout: bool = False
    family: str | None = None
    tile: tuple[int, ...] | None = None
    paged: bool = False

    def __post_init__(self) -> None:
        kernel = KERNELS.get(self.kernel)
        if kernel is None:
            raise ValueError(f"unknown kernel {self.kernel!r}; known: {', '.join(KERNELS)}")
        if self.paged and not any(r.paged for r in registry.rows(self.kernel)):
            raise ValueError(f"kernel {self.kernel!r} takes no paged K/V (paged=True): only the "
                             "forward reads K/V through a block table")
        set_ = object.__setattr__  # frozen: normalise fields in place, once
        if not kernel.attention:
            if (self.dtype is not None or self.head_dim is not None or self._variants()
                    or self.family is not None or self.tile is not None):
                only = "arch 'cpu'" if kernel.cpu_only else "an arch"
                raise ValueError(f"kernel {self.kernel!r} takes only {only}: no dtype, head_dim, "
                                 f"causal, {', '.join(VARIANTS)}, dropout, family or tile")
        if kernel.cpu_only:
            if self.arch not in (None, "cpu"):
                raise ValueError(f"kernel {self.kernel!r} is CPU-only: arch must be 'cpu'")
            set_(self, "arch", "cpu")
            return
        if not self.arch:
            raise ValueError(f"kernel {self.kernel!r} needs an arch, e.g. current_arch()")
        set_(self, "arch", normalize_arch(self.arch))
        if kernel.arch_only:
            return
        dtype = _DTYPE_ALIASES.get(str(self.dtype))
        if dtype is None:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        set_(self, "dtype", dtype)
        if self.head_dim is None:
            raise ValueError(f"kernel {self.kernel!r} needs a head_dim")
        set_(self, "head_dim", head_dim_bucket(self.head_dim))
        for flag in FLAGS:
            set_(self, flag, bool(getattr(self, flag)))
        set_(self, "family", self._resolve_family())
        if self.dropout and not self._row.dropout:
            raise ValueError(f"kernel {self.kernel!r} has no dropout")
        if self.paged and not self._row.paged:
            raise ValueError(f"kernel {self.kernel!r} of family {self.family!r} takes no paged "
                             "K/V")
        set_(self, "tile", self._resolve_tile())

    def _variants(self) -> list[str]:
        """The flags that are set, in name order (causal first, then dropout, then paged)."""
        return [f for f in FLAGS if getattr(self, f)]

    def _resolve_tile(self) -> tuple[int, ...] | None:
        """``tile`` as a tuple of ints, checked against the family's tile parameters."""
        if self.tile is None:
            return None
        params = self._row.tile_params
        if params is None:
            raise ValueError(f"kernel {self.kernel!r} of family {self.family!r} takes no tile")
        tile = parse_tile(self.tile)
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
                return default_family(self.kernel, self.arch, self.head_dim, self.paged)
            return registry.preferred_family(self.kernel, self.arch, self.head_dim, preferred,
                                             self.paged)
        if self.family not in KERNEL_FAMILIES:
            raise ValueError(f"family must be one of {KERNEL_FAMILIES}, got {self.family!r}")
        if not any(r.family == self.family for r in registry.rows(self.kernel)):
            raise ValueError(f"family {self.family!r} has no kernel {self.kernel!r}")
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
    def padded_head_dim(self) -> int:
        """The head dim the family's kernels run this spec's bucket at (the bucket, or whole
        64-column panels where the registry row says head_dim_panel): the backward's fp32
        dq_accum scratch is this wide (csrc/flash_api.h, bwd_dq_accum_width)."""
        return self._row.padded_head_dim(self.head_dim)

    @property
    def name(self) -> str:
        """Readable unique name, e.g. ``fwd_sm80_bf16_hd128_causal``, ``selftest_cpu``,
        ``dropout_mask_sm90a``: the variants in the order causal, window, softcap, alibi, sink,
        dropout, then paged, the family's suffix (sm90: ``_wgmma``) and the tile:
        ``fwd_sm90a_bf16_hd128_causal_window_softcap_wgmma``,
        ``fwd_sm90a_bf16_hd128_causal_paged_wgmma``."""
        if not KERNELS[self.kernel].attention:
            return f"{self.kernel}_{self.arch}"
        name = f"{self.kernel}_{self.arch}_{self.dtype}_hd{self.head_dim}"
        name += "".join("_" + flag for flag in self._variants())
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
        kernel = KERNELS[self.kernel]
        sources = self._row.sources if kernel.attention else kernel.sources
        return [root / s for s in sources]

    @property
    def defines(self) -> list[str]:
        """Preprocessor defines given to both the C++ and the nvcc compiles: the op namespace, and
        for attention kernels dtype, head dim, causal and dropout (0/1), then
        ``-DFLASHJIT_HAS_WINDOW=1`` (``_SOFTCAP``, ``_ALIBI``, ``_SINK``) for each variant set,
        ``-DFLASHJIT_HAS_PAGED=1`` when paged, then the tile's. The family is the sources' own
        (registry row), not a define."""
        defines = [f"-DFLASHJIT_OP_NAMESPACE={self.op_namespace}"]
        if KERNELS[self.kernel].attention:
            defines += [
                f"-DFLASHJIT_DTYPE_{self.dtype.upper()}=1",
                f"-DFLASHJIT_HEAD_DIM={self.head_dim}",
                f"-DFLASHJIT_IS_CAUSAL={int(self.causal)}",
                f"-DFLASHJIT_HAS_DROPOUT={int(self.dropout)}",
            ]
            defines += [f"-DFLASHJIT_HAS_{v.upper()}=1" for v in VARIANTS if getattr(self, v)]
            if self.paged:
                defines.append("-DFLASHJIT_HAS_PAGED=1")
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
            args += ["--arch", self.arch.replace("-", ";")]
        if KERNELS[self.kernel].attention:
            args += [
                "--dtype", self.dtype,
                "--head-dim", str(self.head_dim),
                "--causal", "yes" if self.causal else "no",
            ]
            for flag in VARIANTS:  # only when set: the commands of older specs stay as they were
                if getattr(self, flag):
                    args += [f"--{flag}", "yes"]
            args += ["--dropout", "yes" if self.dropout else "no"]
            if self.paged:  # only when set, as the variants
                args += ["--paged", "yes"]
            args += ["--family", self.family]
            if self.tile is not None:
                args += ["--tile", ",".join(map(str, self.tile))]
        return shlex.join(args)

    def fields(self) -> dict:
        """The fields that make the spec (JitSpec(**fields()) rebuilds it); the variants window,
        softcap, alibi and sink, paged and the tile only when set, so the fields (and cache keys)
        of the specs without them are what they were before these existed."""
        if not KERNELS[self.kernel].attention:
            return {"kernel": self.kernel, "arch": self.arch}
        fields = {
            "kernel": self.kernel, "arch": self.arch, "dtype": self.dtype,
            "head_dim": self.head_dim, "causal": self.causal, "dropout": self.dropout,
            "family": self.family,
        }
        fields.update({flag: True for flag in VARIANTS if getattr(self, flag)})
        if self.paged:
            fields["paged"] = True
        if self.tile is not None:
            fields["tile"] = list(self.tile)
        return fields


def with_tile_override(spec: JitSpec, tile: str | tuple[int, ...] | None = None,
                       family: str | None = None) -> JitSpec:
    """``spec`` with the tile of FLASHJIT_FWD_TILE / FLASHJIT_BWD_TILE / FLASHJIT_DECODE_TILE
    (env.tile_override) for its kernel, or ``tile`` when given instead (prebuild --tile), where it
    has no tile of its own: how calls and prebuild take a tuning sweep's tile, so both name the
    same spec. A paged spec takes it only where its family is the non-paged spec's (on sm90a the
    paged forward is another family, whose tile parameters mean other things), the non-paged
    spec's family being the one ``family`` (a preference: prebuild --family) or else
    FLASHJIT_KERNEL_FAMILY and the defaults give it. ValueError, naming the variable, when the
    tile does not fit the family."""
    tile = tile_override(spec.kernel) if tile is None else tile
    if tile is None or spec.tile is not None or not KERNELS[spec.kernel].attention:
        return spec
    if spec.paged:
        if family is None:
            plain_family = replace(spec, paged=False, family=None).family
        else:
            plain_family = registry.preferred_family(spec.kernel, spec.arch, spec.head_dim, family)
        if plain_family != spec.family:
            return spec
    return replace(spec, tile=tile)
