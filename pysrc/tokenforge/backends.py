"""Backend choice: which implementation of an op runs on given tensors, and why.

Every op has up to three backends:

- ``triton``: Triton kernels in ``tokenforge.kernels``. Default on CUDA tensors. On CPU tensors it
  runs only under Triton's interpreter (``TRITON_INTERPRET=1`` set before the first import of
  ``tokenforge.kernels``), which is how the kernels are tested on machines without a GPU.
- ``cuda``: the CUDA C++ extension ``tokenforge._C`` (built at install time when nvcc is found).
- ``torch``: the plain PyTorch reference. Always available; the fallback on CPU.

``TOKENFORGE_BACKEND=triton|cuda|torch`` (or ``backend=`` on a call) forces one. Forcing a backend
that cannot run the given tensors raises :class:`BackendUnavailableError` saying why; it never falls
back silently.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

BACKENDS = ("triton", "cuda", "torch")
ENV_VAR = "TOKENFORGE_BACKEND"

# A "supports" check takes the op's tensors and returns None when the backend can run them, or a
# sentence saying why not (shown verbatim to users, so it should say what to do).
SupportsFn = Callable[..., Optional[str]]


class BackendUnavailableError(RuntimeError):
    """A backend was requested (argument or TOKENFORGE_BACKEND) that cannot run these inputs."""


class Launchers:
    """An op's table backend name -> launcher module (``tokenforge.kernels.<op>`` for Triton,
    ``tokenforge.cuda.<op>`` for CUDA C++), built where the op registers and read by its custom
    ops: ``LAUNCHERS[backend].<op>_forward(...)``. Modules are imported on first use, so a
    machine without the extension or Triton imports tokenforge all the same."""

    def __init__(self, op: str, **modules: str):
        self.op = op
        self._modules = dict(modules)
        self._loaded: dict = {}

    def __getitem__(self, backend: str):
        module = self._loaded.get(backend)
        if module is None:
            if backend not in self._modules:
                raise ValueError(f"{self.op}: no kernel launcher for backend {backend!r} "
                                 f"(kernel backends: {', '.join(self._modules)}); use backend='torch' for the reference")
            import importlib

            module = self._loaded[backend] = importlib.import_module(self._modules[backend])
        return module

    def __contains__(self, backend: str) -> bool:
        return backend in self._modules


@dataclass
class OpBackends:
    name: str
    # Order tried for CUDA tensors when nothing is forced: fastest measured first.
    cuda_preference: tuple[str, ...]
    supports: dict[str, SupportsFn] = field(default_factory=dict)
    # (device, dtype) -> a tuple of small typical inputs, in the order supports() takes them; used
    # by `tokenforge info` to say which backend a typical call would get.
    example_inputs: Optional[Callable[[torch.device, torch.dtype], tuple]] = None


_OPS: dict[str, OpBackends] = {}


def register_op(name: str, cuda_preference: tuple[str, ...], supports: dict[str, SupportsFn],
                example_inputs: Optional[Callable[[torch.device, torch.dtype], tuple]] = None) -> None:
    """Declare an op's backends; ``supports[b](*tensors)`` says whether backend b can run them, and
    ``example_inputs(device, dtype)`` builds typical inputs for `tokenforge info`."""
    unknown = set(supports) - set(BACKENDS)
    if unknown:
        raise ValueError(f"unknown backend(s) {sorted(unknown)} for op {name}; known: {BACKENDS}")
    _OPS[name] = OpBackends(name, tuple(cuda_preference), dict(supports), example_inputs)


def example_inputs(op: str, device, dtype) -> Optional[tuple]:
    """Typical inputs of ``op`` on device/dtype (None when the op registered none)."""
    make = _OPS[op].example_inputs
    return None if make is None else make(torch.device(device), dtype)


def registered_ops() -> list[str]:
    return sorted(_OPS)


def op_backends(op: str) -> list[str]:
    """The backends ``op`` has, in BACKENDS order."""
    return [b for b in BACKENDS if b in _OPS[op].supports]


# ---------------------------------------------------------------------------------------------
# Environment facts shared by every op's supports() checks
# ---------------------------------------------------------------------------------------------


def interpreter_requested() -> bool:
    """True when TRITON_INTERPRET asks for Triton's CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


# The checks below run inside torch.compile's tracing too (an op picks its backend while the model
# is traced). Their answers are fixed for the life of the process, so they are marked
# assume_constant_result: dynamo calls them once and bakes the answer in, instead of tracing
# through imports, locks and C calls (which would break the graph).


@torch.compiler.assume_constant_result
def triton_import_error() -> str:
    """"" when triton imports, else why not."""
    try:
        import triton  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install raising something else
        return f"triton is not importable ({type(exc).__name__}: {exc}); pip install triton"
    return ""


@torch.compiler.assume_constant_result
def _triton_cuda_reason(device_index: int) -> str:
    from tokenforge import kernels

    if kernels.INTERPRETED:
        # Interpreted kernels copy CUDA tensors through the host: correct but very slow. It is
        # what the user asked for (TRITON_INTERPRET=1), so allow it.
        return ""
    major, minor = torch.cuda.get_device_capability(device_index)
    if major < 8:
        return (
            f"GPU {torch.cuda.get_device_name(device_index)} is sm_{major}{minor}; the Triton kernels "
            "need sm_80 or newer (bf16); use backend='torch'"
        )
    return ""


@torch.compiler.assume_constant_result
def _triton_cpu_reason() -> str:
    if not interpreter_requested():
        return "CPU tensors run Triton kernels only under TRITON_INTERPRET=1 (Triton's interpreter)"
    from tokenforge import kernels

    if not kernels.INTERPRETED:
        return (
            "TRITON_INTERPRET=1 was set after tokenforge.kernels was imported; set it before "
            "the first import (e.g. in the environment of the process)"
        )
    return ""


def triton_unsupported_reason(device: torch.device) -> Optional[str]:
    """Why Triton kernels cannot run on ``device`` (None when they can)."""
    err = triton_import_error()
    if err:
        return err
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return _triton_cuda_reason(index) or None
    if device.type == "cpu":
        return _triton_cpu_reason() or None
    return f"Triton kernels do not run on {device.type} tensors"


def cuda_ext_unsupported_reason(device: torch.device) -> Optional[str]:
    """Why the CUDA C++ extension cannot run on ``device`` (None when it can)."""
    from tokenforge import cuda as cuda_ext

    reason = cuda_ext.runtime_unavailable_reason()
    if device.type != "cuda":
        return f"the CUDA extension runs on CUDA tensors only, not {device.type}" + (f" ({reason})" if reason else "")
    return reason or None


# ---------------------------------------------------------------------------------------------
# Choosing
# ---------------------------------------------------------------------------------------------


def forced_backend(backend: Optional[str] = None) -> tuple[Optional[str], str]:
    """The backend forced by the argument or the environment, and who forced it."""
    if backend is not None:
        source = "backend= argument"
    else:
        backend = os.environ.get(ENV_VAR) or None
        source = f"{ENV_VAR}={backend}"
    if backend is None:
        return None, ""
    backend = backend.strip().lower()
    if backend in ("", "auto"):
        return None, ""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r} (from {source}); choose one of {', '.join(BACKENDS)} or auto")
    return backend, source


def why_not(op: str, backend: str, *tensors) -> Optional[str]:
    """None when ``backend`` can run ``op`` on these tensors, else the reason."""
    spec = _OPS[op]
    check = spec.supports.get(backend)
    if check is None:
        return f"{op} has no {backend} backend"
    return check(*tensors)


def choose(op: str, *tensors, backend: Optional[str] = None) -> str:
    """The backend that runs ``op`` on ``tensors`` (the first tensor's device decides)."""
    name, _why = explain(op, *tensors, backend=backend)
    return name


def explain(op: str, *tensors, backend: Optional[str] = None) -> tuple[str, str]:
    """(backend, reason) for running ``op`` on ``tensors``; raises if a forced backend can't run."""
    spec = _OPS[op]
    forced, source = forced_backend(backend)
    if forced is not None:
        reason = why_not(op, forced, *tensors)
        if reason is not None:
            raise BackendUnavailableError(
                f"{op}: backend '{forced}' was requested ({source}) but cannot run these inputs: {reason}. "
                f"Unset {ENV_VAR} / pass backend=None to let tokenforge choose, or pick another backend."
            )
        return forced, f"forced by {source}"
    device = tensors[0].device
    if device.type == "cuda":
        skipped = []
        for name in spec.cuda_preference:
            reason = why_not(op, name, *tensors)
            if reason is None:
                note = f"; skipped {'; '.join(skipped)}" if skipped else ""
                return name, f"fastest available on CUDA{note}"
            skipped.append(f"{name}: {reason}")
        return "torch", "no kernel backend can run these inputs: " + "; ".join(skipped)
    if why_not(op, "triton", *tensors) is None:
        return "triton", "Triton interpreter on CPU (TRITON_INTERPRET=1)"
    return "torch", f"plain PyTorch reference on {device.type} tensors"
