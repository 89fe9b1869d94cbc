"""The kernel registry: one row per (attention kernel, kernel family), the only place that says
which family serves which arch and head dim, and from which sources (each family its own csrc
folder: ``sm80/fwd.cu``, ``sm90/bwd.cu``, ...).

JitSpec (default family, sources, defines, name), prebuild (--family) and ``python -m flashjit
info`` read these rows; none of them re-implements the rules. A new family is a new csrc folder and
a new row here, listed before the families it should win over.

No imports beyond the standard library: env.py validates FLASHJIT_KERNEL_FAMILY against it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class FamilyRow:
    """One attention kernel of one family.

    archs: the normal arch names (jit.arch) whose binaries it may serve, None for any CUDA arch. A
    multi-arch binary (``sm80-sm90a``) is served only by a row that serves every arch of it.
    head_dims: the head-dim buckets it serves, None for all. sources: relative to csrc_dir(), the
    family's own translation unit and the shared binding (the sources pick the family: no define).
    suffix: what it adds to spec names.
    tile_params: the parameters of a tile a spec may choose instead of the launch code's own
    (JitSpec.tile, -DFLASHJIT_TILE_<PARAM>=value each: tuning sweeps); None where the family
    takes no tile. dropout: whether its kernels implement dropout (decoding does not). paged:
    whether its kernels can read K/V through a block table (JitSpec.paged: the forward, for
    chunked prefill on a paged KV cache; the decode family pages through its own cache
    arguments, not this flag). head_dim_panel: the kernels' tiles are whole panels of this many
    columns, buckets that are not are padded to them (zero-filled; 0: every tile is the bucket's
    width); the backward's fp32 dQ scratch has the padded width (padded_head_dim)."""

    kernel: str
    family: str
    instructions: str  # the matrix instructions, for people: "mma.sync", "wgmma"
    sources: tuple[str, ...]
    archs: Optional[tuple[str, ...]] = None
    head_dims: Optional[tuple[int, ...]] = None
    suffix: str = ""
    tile_params: Optional[tuple[str, ...]] = None
    dropout: bool = True
    paged: bool = False
    head_dim_panel: int = 0

    def padded_head_dim(self, head_dim_bucket: int) -> int:
        """The head dim this row's kernels run ``head_dim_bucket`` at (head_dim_panel)."""
        panel = self.head_dim_panel or head_dim_bucket
        return -(-head_dim_bucket // panel) * panel

    def serves(self, arch: str, head_dim_bucket: int, paged: bool = False) -> bool:
        """Whether this row can build a binary for ``arch`` (normal form, possibly several archs
        joined by '-') at ``head_dim_bucket``, reading K/V through a block table if ``paged``."""
        archs_ok = self.archs is None or all(a in self.archs for a in arch.split("-"))
        return (archs_ok and (self.head_dims is None or head_dim_bucket in self.head_dims)
                and (self.paged or not paged))


# In order of preference: the first row that serves a (kernel, arch, head dim) is its default.
REGISTRY: tuple[FamilyRow, ...] = (
    # the warp-specialised Hopper forward (TMA producer, two ping-pong wgmma consumers,
    # setmaxnreg); paged K/V through TMA boxes of whole pages' rows. Buckets 96, 160 and 224 run
    # on tiles padded to whole 64-column panels (sm90ws/fwd_kernel.cuh); 32 stays mma.sync (a
    # padded 64 would double its work)
    FamilyRow("fwd", "sm90ws", "wgmma+tma", ("fwd_binding.cpp", "sm90ws/fwd.cu"),
              archs=("sm90a",), head_dims=(64, 96, 128, 160, 192, 224, 256), suffix="_ws",
              tile_params=("block_n", "stages", "consumers"), head_dim_panel=64,  # its launch's
              paged=True),
    FamilyRow("fwd", "sm90", "wgmma", ("fwd_binding.cpp", "sm90/fwd.cu"), archs=("sm90a",),
              head_dims=(64, 128), suffix="_wgmma",
              tile_params=("block_n", "warpgroups", "min_blocks"),  # the sm90 forward's launch
              paged=True),
    # the wgmma backward; bucket 96 runs its 128-column kernels, 160 its 192-column ones, 224 its
    # 256-column ones (sm90/bwd_launch.cuh)
    FamilyRow("bwd", "sm90", "wgmma", ("bwd_binding.cpp", "sm90/bwd.cu"), archs=("sm90a",),
              head_dims=(64, 96, 128, 160, 192, 224, 256), suffix="_wgmma",
              tile_params=("block_m",), head_dim_panel=64),  # the sm90 backward's launch
    FamilyRow("fwd", "sm80", "mma.sync", ("fwd_binding.cpp", "sm80/fwd.cu"),
              tile_params=("block_m", "block_n", "warps", "min_blocks"),  # the sm80 forward's
              paged=True),
    FamilyRow("bwd", "sm80", "mma.sync", ("bwd_binding.cpp", "sm80/bwd.cu")),
    # decoding against a KV cache (flash_attn_with_kvcache): split-KV, GQA-packed, paged or not
    FamilyRow("decode", "splitkv", "mma.sync", ("decode_binding.cpp", "splitkv/decode.cu"),
              tile_params=("block_n", "stages", "loader"), dropout=False),  # decoding (<= 16 rows)
)

KERNEL_FAMILIES: tuple[str, ...] = tuple(dict.fromkeys(r.family for r in REGISTRY))
ATTENTION_KERNELS: tuple[str, ...] = tuple(dict.fromkeys(r.kernel for r in REGISTRY))


def rows(kernel: str) -> tuple[FamilyRow, ...]:
    """The rows of ``kernel``, in order of preference."""
    return tuple(r for r in REGISTRY if r.kernel == kernel)


def row(kernel: str, family: str) -> FamilyRow:
    """The row of (kernel, family); KeyError if there is none."""
    for r in REGISTRY:
        if r.kernel == kernel and r.family == family:
            return r
    raise KeyError(f"no kernel {kernel!r} in family {family!r}")


def default_family(kernel: str, arch: str, head_dim_bucket: int, paged: bool = False) -> str:
    """The family of the first row of ``kernel`` that serves ``arch`` and ``head_dim_bucket``
    (and, for a ``paged`` spec, reads K/V through a block table)."""
    for r in rows(kernel):
        if r.serves(arch, head_dim_bucket, paged):
            return r.family
    raise ValueError(f"no kernel family serves kernel {kernel!r} on arch {arch!r} at head-dim "
                     f"bucket {head_dim_bucket}" + (" with paged K/V" if paged else ""))


def preferred_family(kernel: str, arch: str, head_dim_bucket: int, preference: str,
                     paged: bool = False) -> str:
    """``preference`` where its row serves (kernel, arch, head dim, paged), else the default
    family: how FLASHJIT_KERNEL_FAMILY and prebuild --family apply (sm80, which serves every
    forward and backward, forces mma.sync there; a kernel the family has no row for keeps its
    default)."""
    preferred = [r for r in rows(kernel) if r.family == preference]
    if preferred and preferred[0].serves(arch, head_dim_bucket, paged):
        return preference
    return default_family(kernel, arch, head_dim_bucket, paged)


def describe(r: FamilyRow) -> str:
    """Where a row serves, in words, e.g. 'wgmma, on sm90a at head dims 64, 128'."""
    where = []
    if r.archs is not None:
        where.append("on " + ", ".join(r.archs))
    if r.head_dims is not None:
        where.append("at head dims " + ", ".join(map(str, r.head_dims)))
    return r.instructions + (", " + " ".join(where) if where else ", everywhere")
