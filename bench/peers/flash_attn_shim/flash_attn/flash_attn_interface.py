"""What flash_attn's tests import from flash_attn_interface besides the functions."""
import torch

from tokenforge.ops.attention import _fa2_block_n

USE_TRITON_ROCM = False


def _get_block_size_n(device, head_dim, is_dropout, is_causal):
    """The key-block width of the S_dmask that return_attn_probs gives: tokenforge's own rule."""
    return _fa2_block_n(head_dim, is_dropout, is_causal, torch.device(device))
