"""Integrations of flashjit with other libraries.

sdpa: flashjit as the implementation behind torch's SDPA flash backend (the aten flash ops),
through torch.nn.attention's flash-attention registry. ``import flashjit`` only registers the
name "flashjit" there (register_sdpa_provider); nothing is imported, compiled or activated
until a user calls ``torch.nn.attention.activate_flash_attention_impl("flashjit")``.

transformers: flashjit as a Hugging Face transformers attention implementation, registered
by ``flashjit.integrations.transformers.register()`` under "fjit" (transformers reserves names
containing "flash"); the optional extra ``flashjit[transformers]``. Never imported by
``import flashjit``.
"""

from __future__ import annotations

PROVIDER_NAME = "flashjit"

# The three functions of torch's registry this integration relies on (torch.nn.attention;
# present in torch 2.11, 2.13 and 2.14, the versions tested; guarded for any other).
_REGISTRY_API = ("register_flash_attention_impl", "activate_flash_attention_impl",
                 "restore_flash_attention_impl")


def sdpa_registry_available() -> bool:
    """True where this torch has the flash-attention provider registry."""
    try:
        import torch.nn.attention as attention
    except Exception:  # noqa: BLE001 - a torch without it, or a broken one: no registry
        return False
    return all(callable(getattr(attention, name, None)) for name in _REGISTRY_API)


def _activate_sdpa():
    """The register_fn torch's registry calls on activate_flash_attention_impl("flashjit"):
    overrides the aten flash ops for CUDA and returns the handle whose remove() undoes it."""
    from .sdpa import register

    return register()


def register_sdpa_provider() -> bool:
    """Registers "flashjit" with torch.nn.attention's flash registry (where torch has one):
    returns whether it did. Cheap: it stores a function; the override itself (flashjit.
    integrations.sdpa) is imported only when the provider is activated."""
    if not sdpa_registry_available():
        return False
    import torch.nn.attention as attention

    attention.register_flash_attention_impl(PROVIDER_NAME, register_fn=_activate_sdpa)
    return True
