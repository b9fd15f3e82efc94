"""What flash_attn's tests import from flash_attn_interface besides the functions."""
import torch

from tokenforge.ops.attention import _fa2_block_n

USE_TRITON_ROCM = False


def _get_block_size_n(device, head_dim, is_dropout, is_causal):
    """The key-block width of the S_dmask that return_attn_probs gives: tokenforge's own rule."""
    return _fa2_block_n(head_dim, is_dropout, is_causal, torch.device(device))


def _not_ours(what: str):
    import pytest

    pytest.skip(f"not in tokenforge's API: flash_attn's internal {what}")


def _flash_attn_varlen_forward(*args, **kwargs):
    _not_ours("_flash_attn_varlen_forward")


class _ExtensionEntryPoints:
    """flash_attn_gpu, flash_attn's compiled extension: its raw entry points are not an API we mirror."""

    def __getattr__(self, name):
        _not_ours(f"flash_attn_gpu.{name}")


flash_attn_gpu = _ExtensionEntryPoints()
