"""Triton kernels and their launchers (installed as ``tokenforge.kernels``).

One file per op. Each file holds the ``@triton.jit`` kernels, the launch-config choice and the
launch functions; the autograd Functions that call them live in ``tokenforge.ops``.

Triton decides at decoration time whether a kernel is compiled or interpreted, so whether this
package runs under the interpreter is fixed when it is first imported (``TRITON_INTERPRET=1``).
"""

import os

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def launch_device(x):
    """The context a launcher runs its kernel in: ``torch.cuda.device`` of a CUDA tensor (or
    device), so a kernel on cuda:1 launches there whatever the current device; a no-op on CPU."""
    import contextlib

    import torch

    device = x.device if isinstance(x, torch.Tensor) else torch.device(x)
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
