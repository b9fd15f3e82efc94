"""The CUDA C++ extension ``tokenforge._C``: safe loading, status and shared helpers.

``_C`` is built at install time when nvcc is found (see setup.py) and depends on the CUDA toolkit
only, not on libtorch: its functions take raw device pointers, sizes, dtype codes and a stream
handle. The launchers in this package (e.g. :mod:`tokenforge.cuda.rms_norm`) check tensors and
pass those. Importing this package never fails: no torch.cuda, no ``_C`` and no GPU are all fine,
and :func:`extension_status` says which of them is missing.
"""

from __future__ import annotations

import copy
import functools
import json
import threading
from pathlib import Path
from typing import Any, Optional

BUILD_INFO_FILE = Path(__file__).resolve().parent.parent / "_build_info.json"

# dtype codes shared with csrc/common.cuh (DTypeCode)
FLOAT32, FLOAT16, BFLOAT16 = 0, 1, 2

_REINSTALL_HINT = (
    "reinstall with the CUDA toolkit present (nvcc on PATH or CUDA_HOME set), e.g. "
    "`TOKENFORGE_BUILD_EXT=1 pip install -e .` to make a failed build an error; the triton and "
    "torch backends work without it"
)

_lock = threading.Lock()
_loaded = False
_module = None
_import_error: Optional[str] = None


def _load():
    """Import tokenforge._C once; remember the error instead of raising."""
    global _loaded, _module, _import_error
    if _loaded:
        return _module
    with _lock:
        if not _loaded:
            try:
                from tokenforge import _C  # noqa: WPS433 (lazy on purpose)

                _module = _C
            except ImportError as exc:
                _import_error = f"{type(exc).__name__}: {exc}"
            except Exception as exc:  # a broken .so can raise other errors at import
                _import_error = f"{type(exc).__name__}: {exc}"
            _loaded = True
    return _module


def read_build_info() -> Optional[dict]:
    """The ``_build_info.json`` written by setup.py at install time, or None if absent/unreadable."""
    info = _read_build_info_cached()
    return copy.deepcopy(info) if info is not None else None


@functools.lru_cache(maxsize=1)
def _read_build_info_cached() -> Optional[dict]:
    try:
        return json.loads(BUILD_INFO_FILE.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _unavailable_reason() -> str:
    info = read_build_info()
    if info is not None and not info.get("extension_built", False):
        return f"not built: {info.get('reason') or 'no reason recorded'}"
    if info is not None:
        # The build said it succeeded but the module does not import: a broken or moved install.
        return f"built at install time but failed to import ({_import_error})"
    return f"not built: no build record ({BUILD_INFO_FILE.name} missing) and import failed ({_import_error})"


def _gpu_status() -> tuple[bool, str]:
    try:
        import torch
    except Exception as exc:
        return False, f"torch is not importable ({exc})"
    try:
        if not torch.cuda.is_available():
            if torch.version.cuda is None:
                return False, f"torch {torch.__version__} is a CPU-only build"
            return False, "no CUDA device is visible to torch"
        return True, f"{torch.cuda.device_count()} CUDA device(s) visible to torch"
    except Exception as exc:
        return False, f"torch.cuda failed ({exc})"


def extension_status() -> dict[str, Any]:
    """What is known about the extension, never raising:

    - ``available``: ``tokenforge._C`` imported;
    - ``reason``: why not (from the install-time build record, else the import error), or "";
    - ``build_info``: the install-time record merged with ``_C.build_info()`` when importable;
    - ``gpu_usable`` / ``gpu_reason``: whether torch sees a CUDA device to run it on (and, when
      the extension is loaded, whether its own CUDA runtime finds one too).
    """
    # Cached: the op layer asks on every call, and none of this changes within a process.
    return copy.deepcopy(_extension_status_cached())


def reset_status_cache() -> None:
    """Forget cached status (for tests that change the environment)."""
    _read_build_info_cached.cache_clear()
    _extension_status_cached.cache_clear()


@functools.lru_cache(maxsize=1)
def _extension_status_cached() -> dict[str, Any]:
    module = _load()
    build_info: dict[str, Any] = dict(read_build_info() or {})
    if module is not None:
        try:
            build_info.update(module.build_info())
        except Exception as exc:  # pragma: no cover - defensive
            build_info["build_info_error"] = str(exc)
    gpu_usable, gpu_reason = _gpu_status()
    if module is not None and gpu_usable:
        err = module.device_error()
        if err:
            gpu_usable, gpu_reason = False, f"torch sees a GPU but tokenforge._C does not: {err}"
    return {
        "available": module is not None,
        "reason": "" if module is not None else _unavailable_reason(),
        "build_info": build_info,
        "gpu_usable": gpu_usable,
        "gpu_reason": gpu_reason,
    }


def _runtime_unavailable_reason() -> str:
    status = _extension_status_cached()
    if not status["available"]:
        return f"the CUDA extension tokenforge._C is not available: {status['reason']}"
    if not status["gpu_usable"]:
        return f"the CUDA extension cannot use the GPU: {status['gpu_reason']}"
    return ""


def runtime_unavailable_reason() -> str:
    """"" when the extension is loaded and finds a GPU, else why not. Cheap after the first call,
    and a constant to torch.compile (it runs while a model using the ops is traced)."""
    return _runtime_unavailable_reason_constant()


def get_extension():
    """The loaded ``tokenforge._C`` module; RuntimeError saying why and what to do otherwise."""
    module = _load()
    if module is None:
        reason = _unavailable_reason()
        hint = _REINSTALL_HINT
        if "TOKENFORGE_BUILD_EXT=0" in reason:
            hint = "it was turned off at install time: reinstall without TOKENFORGE_BUILD_EXT=0; " + hint
        raise RuntimeError(f"tokenforge._C is not available ({reason}); {hint}")
    return module


def is_available() -> bool:
    return _load() is not None


def dtype_code(dtype) -> int:
    """The extension's code for a torch dtype (0 float32, 1 float16, 2 bfloat16)."""
    import torch

    codes = {torch.float32: FLOAT32, torch.float16: FLOAT16, torch.bfloat16: BFLOAT16}
    try:
        return codes[dtype]
    except KeyError:
        raise ValueError(
            f"the CUDA extension handles float32, float16 and bfloat16, not {dtype}"
        ) from None


def current_stream_handle(tensor) -> int:
    """The raw cudaStream_t (as an int) of the current stream on ``tensor``'s device."""
    import torch

    if tensor.device.type != "cuda":
        raise ValueError(f"expected a CUDA tensor, got one on {tensor.device}")
    return int(torch.cuda.current_stream(tensor.device).cuda_stream)


def tma_rows(t):
    """t (rows, n) as the CUTLASS kernels' TMA reads it: unit stride along n, a 16-byte aligned base
    and 16-byte aligned, non-overlapping rows; a contiguous copy when it is not so."""
    size = t.element_size()
    ok = (t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and (t.stride(0) * size) % 16 == 0
          and t.stride(0) >= t.shape[-1])
    return t if ok else t.contiguous()


def sm90_kernel_unavailable(tensor, entry: str, what: str) -> Optional[str]:
    """None when the CUTLASS sm_90a kernel behind ``entry`` (a csrc/*_sm90.cu launcher, with its
    ``<entry>_unavailable`` twin) can run on ``tensor``'s device, else why not: a CPU tensor, no
    extension or GPU, a build without it (no CUTLASS headers / no sm_90a target), not an sm_90 GPU."""
    import torch

    if tensor.device.type != "cuda":
        return f"the CUDA extension runs on CUDA tensors only; the input is on {tensor.device}"
    reason = runtime_unavailable_reason()
    if reason:
        return reason
    ext = get_extension()
    if not hasattr(ext, entry):
        return f"this build of tokenforge._C has no {what}; reinstall to rebuild it"
    missing = getattr(ext, f"{entry}_unavailable")()
    if missing:
        return missing
    index = tensor.device.index if tensor.device.index is not None else torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    if (major, minor) != (9, 0):
        return f"the {what} is built for sm_90a (H100/H200); this GPU is sm_{major}{minor}"
    return None


__all__ = [
    "BFLOAT16",
    "FLOAT16",
    "FLOAT32",
    "current_stream_handle",
    "dtype_code",
    "extension_status",
    "get_extension",
    "sm90_kernel_unavailable",
    "tma_rows",
    "is_available",
    "read_build_info",
    "reset_status_cache",
    "runtime_unavailable_reason",
]


def _make_constant(fn):
    # Imported lazily so this module stays importable without torch.
    import torch

    return torch.compiler.assume_constant_result(fn)


_runtime_unavailable_reason_constant = _make_constant(_runtime_unavailable_reason)
