"""flashjit: exact FlashAttention for PyTorch, compiled on first use.

    import flashjit
    out = flashjit.flash_attn_func(q, k, v, causal=True)   # q (batch, seq, heads, d)
"""

from . import testing  # noqa: F401  (flashjit.testing.next_dropout_mask, as the README says)
from ._version import __version__
from .interface import (
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
    scaled_dot_product_attention,
)

__all__ = [
    "__version__",
    "flash_attn_func",
    "flash_attn_kvpacked_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
    "scaled_dot_product_attention",
]
