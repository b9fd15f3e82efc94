"""pytest plugin for Liger-Kernel's tests on a machine without a GPU (loaded by run_peer_tests.sh
with and without liger_shim, so Liger's own kernels and ours see the same cases).

Liger runs its bf16 cases only on a GPU; under the Triton interpreter both kernels run them on the
CPU too. TOKENFORGE_PEER_RNE_BF16=1 is an experiment switch: the interpreter truncates fp32 -> bf16
where a GPU rounds to nearest even; with it set the interpreter rounds like the GPU, which tells a
truncation failure from a real one.
"""
import os

import torch

if not torch.cuda.is_available():
    # Liger asks supports_bfloat16() before every bf16 case; the interpreter runs them.
    import test.utils as liger_test_utils

    liger_test_utils.supports_bfloat16 = lambda: True

if os.environ.get("TOKENFORGE_PEER_RNE_BF16"):
    import interpreter_rne  # noqa: F401
