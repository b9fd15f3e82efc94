"""Triton kernels and their launchers (installed as ``tokenforge.kernels``).

One file per op. Each file holds the ``@triton.jit`` kernels, the launch-config choice and the
launch functions; the autograd Functions that call them live in ``tokenforge.ops``.

Triton decides at decoration time whether a kernel is compiled or interpreted, so whether this
package runs under the interpreter is fixed when it is first imported (``TRITON_INTERPRET=1``).
"""

import os

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")
