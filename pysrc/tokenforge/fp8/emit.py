"""fp8 inputs made where Float8Linear's activations are made: RMSNorm and SwiGLU can emit their
output quantized (rowwise, or (1, 128) blocks along the row) in the same pass that writes it, so the
next Float8Linear does not read the activation again to quantize it.

How it travels: the producer (``tokenforge.ops.rms_norm`` / ``add_rms_norm`` / ``swiglu`` with
``fp8=EmitCast(...)``, the Triton row kernels) returns its usual output tensor ``y`` with the fp8
copy attached (:func:`attach`); a Float8Linear whose forward input cast is the same cast asks for
it (:func:`lookup`) and uses it instead of quantizing ``y``. The copy is bit-identical to what the
Float8Linear would have made (same rules, same rounding), so results do not change; a copy is
only used while ``y`` is the very tensor it was made from and unmodified (its version counter),
so an in-place change, a reshape to another row length or a dtype cast simply falls back to
quantizing.

``tokenforge.patch(model, fp8=recipe)`` turns this on for the reference Transformer's norms and
SwiGLU when the recipe's input cast can be emitted this way (``rowwise``, ``blockwise``; a
tensorwise scale needs the whole tensor's amax before any element is cast, so it cannot be made
in one pass).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

_ATTR = "_tokenforge_fp8_emitted"


@dataclass(frozen=True)
class EmitCast:
    """The fp8 copy a producer makes of its output: scales per row (``blockwise=False``) or per
    (1, 128) block along the row, e4m3 or e5m2, optionally power-of-two scales."""

    fp8_dtype: torch.dtype = torch.float8_e4m3fn
    blockwise: bool = False
    power_of_two: bool = False


def emit_cast_for(casts: tuple, power_of_two: bool) -> Optional[EmitCast]:
    """The EmitCast equal to a Float8LinearConfig's forward input cast (``config.casts()[0]``), or
    None when that cast cannot be emitted row by row (tensorwise, disabled)."""
    granularity, dtype = casts[0]
    if granularity == "axiswise":
        return EmitCast(dtype, False, bool(power_of_two))
    if granularity == "blockwise":
        return EmitCast(dtype, True, bool(power_of_two))
    return None


def consumer_keeps_dtype(y: torch.Tensor) -> bool:
    """Whether a Float8Linear would quantize y itself rather than y cast to autocast's dtype (an
    fp32 residual stream under bf16 autocast): only then is an emitted copy of y what it uses."""
    device_type = y.device.type
    return not torch.is_autocast_enabled(device_type) or torch.get_autocast_dtype(device_type) == y.dtype


def attach(y: torch.Tensor, data: torch.Tensor, scale: torch.Tensor, cast: EmitCast) -> torch.Tensor:
    """Record (data, scale) as y's fp8 copy under ``cast``; data/scale are (rows, n) views of y's
    2-D rows form. Returns y."""
    setattr(y, _ATTR, (data, scale, cast, y._version, y.shape[-1]))
    return y


def lookup(x: torch.Tensor, cast: Optional[EmitCast]) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """(data (rows, n), scale) attached to x under exactly ``cast``, if x is unchanged since; else None."""
    if cast is None or torch.compiler.is_compiling():
        return None
    found = getattr(x, _ATTR, None)
    if found is None:
        return None
    data, scale, made_with, version, n = found
    if made_with != cast or x._version != version or x.shape[-1] != n or data.shape[0] * n != x.numel():
        return None
    return data, scale
