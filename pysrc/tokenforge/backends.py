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


@dataclass
class OpBackends:
    name: str
    # Order tried for CUDA tensors when nothing is forced: fastest measured first.
    cuda_preference: tuple[str, ...]
    supports: dict[str, SupportsFn] = field(default_factory=dict)


_OPS: dict[str, OpBackends] = {}


def register_op(name: str, cuda_preference: tuple[str, ...], supports: dict[str, SupportsFn]) -> None:
    """Declare an op's backends; ``supports[b](*tensors)`` says whether backend b can run them."""
    unknown = set(supports) - set(BACKENDS)
    if unknown:
        raise ValueError(f"unknown backend(s) {sorted(unknown)} for op {name}; known: {BACKENDS}")
    _OPS[name] = OpBackends(name, tuple(cuda_preference), dict(supports))


def registered_ops() -> list[str]:
    return sorted(_OPS)


# ---------------------------------------------------------------------------------------------
# Environment facts shared by every op's supports() checks
# ---------------------------------------------------------------------------------------------


def interpreter_requested() -> bool:
    """True when TRITON_INTERPRET asks for Triton's CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


_TRITON_IMPORT = {}  # a plain dict, not lru_cache: torch.compile traces through this code


def triton_import_error() -> Optional[str]:
    """None when triton imports, else why not."""
    if "error" not in _TRITON_IMPORT:
        try:
            import triton  # noqa: F401

            _TRITON_IMPORT["error"] = None
        except Exception as exc:  # ImportError, or a broken install raising something else
            _TRITON_IMPORT["error"] = f"triton is not importable ({type(exc).__name__}: {exc}); pip install triton"
    return _TRITON_IMPORT["error"]


def triton_unsupported_reason(device: torch.device) -> Optional[str]:
    """Why Triton kernels cannot run on ``device`` (None when they can)."""
    err = triton_import_error()
    if err:
        return err
    if device.type == "cuda":
        from tokenforge import kernels

        if kernels.INTERPRETED:
            # Interpreted kernels would copy CUDA tensors through the host: correct but very slow.
            # It is what the user asked for, so allow it.
            return None
        major, minor = torch.cuda.get_device_capability(device)
        if major < 8:
            return (
                f"GPU {torch.cuda.get_device_name(device)} is sm_{major}{minor}; the Triton kernels "
                "need sm_80 or newer (bf16); use backend='torch'"
            )
        return None
    if device.type == "cpu":
        if not interpreter_requested():
            return "CPU tensors run Triton kernels only under TRITON_INTERPRET=1 (Triton's interpreter)"
        from tokenforge import kernels

        if not kernels.INTERPRETED:
            return (
                "TRITON_INTERPRET=1 was set after tokenforge.kernels was imported; set it before "
                "the first import (e.g. in the environment of the process)"
            )
        return None
    return f"Triton kernels do not run on {device.type} tensors"


def cuda_ext_unsupported_reason(device: torch.device) -> Optional[str]:
    """Why the CUDA C++ extension cannot run on ``device`` (None when it can)."""
    from tokenforge import cuda as cuda_ext

    status = cuda_ext.extension_status()
    if not status["available"]:
        return f"the CUDA extension tokenforge._C is not available: {status['reason']}"
    if device.type != "cuda":
        return f"the CUDA extension runs on CUDA tensors only, not {device.type}"
    return None


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
