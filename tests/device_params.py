"""Device parametrisation shared by the test files (a module of its own, not conftest, so that
`pytest tests bench` never confuses it with bench/conftest.py)."""

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()

# CPU tensors exercise the Triton kernels through the interpreter at small sizes; CUDA tensors
# run them for real, at real sizes.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU on this machine"))]


def kernel_backends(device: str) -> list[str]:
    """The kernel backends to check on a device: Triton everywhere, the CUDA extension on CUDA."""
    return ["triton", "cuda"] if device == "cuda" else ["triton"]
