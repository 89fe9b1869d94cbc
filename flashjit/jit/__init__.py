"""flashjit's JIT: build specs, the binary cache, build locks and compile-on-first-use.

Importing this package is cheap: torch and torch.utils.cpp_extension are imported only when a
key is computed or a build runs.
"""

from .arch import current_arch, parse_arch_list
from .build import BuildError, JitDisabledError, compile_only, ensure_built, load_spec
from .cache import CacheDirError
from .lock import LockTimeoutError
from .paths import cache_dir, csrc_dir
from .spec import (HEAD_DIM_BUCKETS, KERNELS, SM90_BWD_HEAD_DIMS, SM90_FWD_HEAD_DIMS, JitSpec,
                   default_family, head_dim_bucket, nvcc_flags)

__all__ = [
    "BuildError", "CacheDirError", "HEAD_DIM_BUCKETS", "JitDisabledError", "JitSpec", "KERNELS",
    "LockTimeoutError", "SM90_BWD_HEAD_DIMS", "SM90_FWD_HEAD_DIMS", "cache_dir", "compile_only",
    "csrc_dir", "current_arch", "default_family", "ensure_built", "head_dim_bucket", "load_spec",
    "nvcc_flags", "parse_arch_list",
]
