"""Device parametrisation shared by the test files (a module of its own, not conftest, so that
`pytest tests bench` never confuses it with bench/conftest.py)."""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
# tests/conftest.py turns the interpreter on when there is no GPU (before this module is imported).
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")

# CPU tensors exercise the Triton kernels through the interpreter at small sizes; CUDA tensors
# run them for real, at real sizes. A GPU machine runs without the interpreter, so its CPU cases
# are skipped there (CI runs them).
DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not INTERPRETING, reason="CPU kernel cases need TRITON_INTERPRET=1")),
    pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU on this machine")),
]


def kernel_backends(device: str) -> list[str]:
    """The kernel backends to check on a device: Triton everywhere, the CUDA extension on CUDA."""
    return ["triton", "cuda"] if device == "cuda" else ["triton"]
