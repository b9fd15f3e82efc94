"""Importing this makes the Triton interpreter round fp32 -> bf16 to nearest even, as a GPU does (the
interpreter truncates). An experiment switch for the peers' suites on CPU (TOKENFORGE_PEER_RNE_BF16=1,
read by liger_on_cpu.py and conftest_flash_attn.py): a bf16 case that fails with truncation and
passes with this is the CPU machine's rounding, not the kernel."""
import numpy as np
import triton.language as tl
from triton.runtime import interpreter

_cast = interpreter.InterpreterBuilder.cast_impl


def _cast_rne(self, src, dst_type):
    if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
        bits = src.data.astype(np.float32).view(np.uint32).astype(np.uint64)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        return interpreter.TensorHandle(bits.astype(np.uint16), dst_type.scalar)
    return _cast(self, src, dst_type)


interpreter.InterpreterBuilder.cast_impl = _cast_rne
