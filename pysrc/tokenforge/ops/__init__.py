"""Functional ops, one file each: validation, backend choice, autograd Function, custom ops."""

from tokenforge.ops.add_rms_norm import add_rms_norm, add_rms_norm_reference
from tokenforge.ops.attention import (alibi_slopes, attention, attention_kvpacked, attention_qkvpacked,
                                     attention_reference, attention_varlen, attention_varlen_kvpacked,
                                     attention_varlen_qkvpacked, attention_varlen_reference)
from tokenforge.ops.attention_kvcache import attention_with_kvcache
from tokenforge.ops.cross_entropy import cross_entropy, cross_entropy_reference
from tokenforge.ops.linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_reference
from tokenforge.ops.moe_routing import load_balancing_loss, moe_permute, moe_route, moe_unpermute
from tokenforge.ops.newton_schulz import newton_schulz, newton_schulz_reference
from tokenforge.ops.grouped_mm import grouped_mm, grouped_mm_fp8, grouped_mm_fp8_reference, grouped_mm_reference
from tokenforge.ops.rms_norm import rms_norm, rms_norm_reference
from tokenforge.ops.rope import rope, rope_reference
from tokenforge.ops.swiglu import geglu, gpt_oss_glu, swiglu, swiglu_packed, swiglu_packed_reference, swiglu_reference
from tokenforge.ops.vocab_parallel_cross_entropy import vocab_parallel_linear_cross_entropy

__all__ = [
    "add_rms_norm",
    "add_rms_norm_reference",
    "alibi_slopes",
    "attention",
    "attention_kvpacked",
    "attention_qkvpacked",
    "attention_reference",
    "attention_varlen",
    "attention_varlen_kvpacked",
    "attention_varlen_qkvpacked",
    "attention_varlen_reference",
    "attention_with_kvcache",
    "cross_entropy",
    "cross_entropy_reference",
    "linear_cross_entropy",
    "linear_cross_entropy_reference",
    "grouped_mm",
    "grouped_mm_fp8",
    "grouped_mm_fp8_reference",
    "grouped_mm_reference",
    "load_balancing_loss",
    "moe_permute",
    "moe_route",
    "moe_unpermute",
    "newton_schulz",
    "newton_schulz_reference",
    "rms_norm",
    "rms_norm_reference",
    "rope",
    "rope_reference",
    "geglu",
    "swiglu",
    "swiglu_packed",
    "gpt_oss_glu",
    "swiglu_packed_reference",
    "swiglu_reference",
    "vocab_parallel_linear_cross_entropy",
]
