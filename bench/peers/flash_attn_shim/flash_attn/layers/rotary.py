"""flash_attn.layers.rotary.apply_rotary_emb on tokenforge's RoPE (flash_attn's KV-cache tests build
their reference queries and keys with it)."""
import torch

from tokenforge.ops.rope import rope_one, rope_tables_from_frequencies


def apply_rotary_emb(x, cos, sin, interleaved=False, inplace=False, seqlen_offsets=0, cu_seqlens=None,
                     max_seqlen=None):
    """x (batch, seqlen, heads, head_dim) rotated by (seqlen_ro, rotary_dim / 2) tables at positions
    seqlen_offsets + i (an int or one offset per batch entry)."""
    if cu_seqlens is not None:
        import pytest

        pytest.skip("not in the shim: apply_rotary_emb over packed sequences (cu_seqlens)")
    batch, seqlen = x.shape[:2]
    offsets = torch.as_tensor(seqlen_offsets, device=x.device).long().reshape(-1, 1)
    positions = (offsets + torch.arange(seqlen, device=x.device)).expand(batch, seqlen)
    table_cos, table_sin = rope_tables_from_frequencies(cos, sin, interleaved)
    out = rope_one(x, table_cos, table_sin, positions, interleaved)
    return x.copy_(out) if inplace else out
