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
    flash_attn_with_kvcache,
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
    "flash_attn_with_kvcache",
    "scaled_dot_product_attention",
]


def _register_sdpa_provider() -> None:
    """Registers "flashjit" with torch.nn.attention's flash-attention registry, where this torch
    has one (torch 2.11 and newer): activate_flash_attention_impl("flashjit") then routes SDPA's
    flash backend to flashjit (flashjit/integrations/sdpa.py). Only a name and a function are stored;
    nothing is compiled or activated, and no failure here may break ``import flashjit``."""
    try:
        from .integrations import register_sdpa_provider

        register_sdpa_provider()
    except Exception:  # noqa: BLE001
        import logging

        logging.getLogger(__name__).debug("flashjit: SDPA provider not registered",
                                          exc_info=True)


_register_sdpa_provider()
