"""SwiGLU: ``silu(gate) * up``, elementwise, the gated activation of a LLaMA MLP; and GeGLU,
``gelu(gate) * up`` (Gemma's, tanh-approximated GELU by default), on the same kernels.

Path of a call: :func:`swiglu` / :func:`swiglu_packed` / :func:`geglu` validate and pick a backend ->
:class:`SwiGLUFunction` / :class:`SwiGLUPackedFunction` (autograd; save only the inputs, the
backward recomputes the activation from gate) -> the custom ops ``tokenforge::swiglu_fwd`` / ``_bwd``
and ``tokenforge::swiglu_packed_fwd`` / ``_bwd`` (their ``activation`` argument picks silu,
gelu_tanh or gelu) -> ``tokenforge.kernels.swiglu`` (Triton). The ``torch`` backend is
:func:`gated_reference`, differentiated by autograd.

The packed form takes the output of one fused gate/up projection, ``gate_up`` (..., 2*hidden):
the first half of the last dim is gate, the second half up (``torch.cat([gate, up], -1)``, i.e.
``Linear`` weights stacked as ``torch.cat([w_gate, w_up], 0)``). Its gradient is one packed
(..., 2*hidden) tensor, written by the kernel directly into its two halves.

Outputs and gradients have the inputs' dtype; the math is fp32 (float64 on the torch backend),
rounded where eager PyTorch's ``act(gate) * up`` rounds (act(gate), then the product), so a patched
model's MLP activations are those of the unpatched one.

Clamped forms of the packed op, the gates of MoE experts trained with them (same kernels, same
custom ops: their ``limit`` / ``alpha`` / ``interleaved`` arguments): ``swiglu_packed(limit=L)`` is
``silu(gate.clamp(max=L)) * up.clamp(-L, L)`` (DeepSeek-V4, GLM-5-Next, HY-V4), and
:func:`gpt_oss_glu` is GPT-OSS's ``(up.clamp(-L, L) + 1) * g * sigmoid(alpha * g)``, g =
``gate.clamp(max=L)`` (MiniMax-M3's too). ``interleaved=True`` reads gate and up from the even and
odd columns of gate_up (GPT-OSS's ``gate_up[..., ::2]``, ``gate_up[..., 1::2]``) instead of its halves.
"""

from __future__ import annotations

import math

from typing import Optional

import torch

from tokenforge.ops.layout import rows_view

from tokenforge import backends
from tokenforge.dtensor import any_dtensor, run_on_shards

OP = "swiglu"
OP_PACKED = "swiglu_packed"


# The kernels' ACTIVATION names and what each computes in PyTorch.
ACTIVATIONS = {
    "silu": torch.nn.functional.silu,
    "gelu_tanh": lambda g: torch.nn.functional.gelu(g, approximate="tanh"),
    "gelu": torch.nn.functional.gelu,
}


def gated_reference(gate: torch.Tensor, up: torch.Tensor, activation: str = "silu") -> torch.Tensor:
    """Plain PyTorch ``act(gate) * up`` (act from ACTIVATIONS), rounded as eager PyTorch rounds it:
    act(gate) in fp32 rounded to the dtype, then the product in fp32 rounded (float64 stays float64):
    the oracle of the tests, the CPU fallback and the eager baseline of the benchmarks."""
    compute = torch.float64 if gate.dtype == torch.float64 else torch.float32
    act = ACTIVATIONS[activation](gate.to(compute)).to(gate.dtype)
    return (act.to(compute) * up.to(compute)).to(gate.dtype)


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Plain PyTorch ``silu(gate) * up`` (:func:`gated_reference` with silu)."""
    return gated_reference(gate, up, "silu")


def split_gate_up(gate_up: torch.Tensor, interleaved: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(gate, up) views of a packed (..., 2*hidden) tensor: its halves, or with ``interleaved`` its
    even and odd columns."""
    if interleaved:
        return gate_up[..., 0::2], gate_up[..., 1::2]
    hidden = gate_up.shape[-1] // 2
    return gate_up[..., :hidden], gate_up[..., hidden:]


def swiglu_packed_reference(gate_up: torch.Tensor, activation: str = "silu", limit: Optional[float] = None,
                            interleaved: bool = False) -> torch.Tensor:
    """:func:`gated_reference` of gate and up of gate_up (..., 2*hidden) (:func:`split_gate_up`),
    with ``limit`` of gate clamped from above and up to [-limit, limit] first."""
    gate, up = split_gate_up(gate_up, interleaved)
    if limit is not None:
        gate, up = gate.clamp(max=limit), up.clamp(min=-limit, max=limit)
    return gated_reference(gate, up, activation)


def gpt_oss_glu_reference(gate_up: torch.Tensor, alpha: float = 1.702, limit: float = 7.0,
                          interleaved: bool = True) -> torch.Tensor:
    """GPT-OSS's gate as its eager code computes it, in gate_up's dtype (each operation rounded)."""
    gate, up = split_gate_up(gate_up, interleaved)
    gate, up = gate.clamp(max=limit), up.clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


# ---------------------------------------------------------------------------------------------
# Input checks: every refusal says what to do.
# ---------------------------------------------------------------------------------------------


def _check_float(name: str, what: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: {what} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(
            f"{name}: {what} must be a floating-point tensor (float32, float16, bfloat16 or float64), "
            f"got {t.dtype}; convert it first, e.g. {what}.float()"
        )


def _check_inputs(gate, up, name: str = "swiglu") -> None:
    _check_float(name, "gate", gate)
    _check_float(name, "up", up)
    if gate.shape != up.shape:
        raise ValueError(
            f"{name}: gate has shape {tuple(gate.shape)} but up has shape {tuple(up.shape)}; they must match "
            "(for one packed (..., 2*hidden) projection output use tokenforge.ops.swiglu_packed)"
        )
    if gate.dtype != up.dtype:
        raise TypeError(f"{name}: gate is {gate.dtype} but up is {up.dtype}; cast one, e.g. up.to(gate.dtype)")
    if gate.device != up.device:
        raise ValueError(f"{name}: gate is on {gate.device} but up is on {up.device}; move both to the same device")


def _check_packed(gate_up, name: str = "swiglu_packed") -> None:
    _check_float(name, "gate_up", gate_up)
    if gate_up.dim() == 0:
        raise ValueError(f"{name}: gate_up must have at least one dimension (..., 2*hidden)")
    if gate_up.shape[-1] % 2:
        raise ValueError(
            f"{name}: the last dim of gate_up {tuple(gate_up.shape)} must be even (gate then up, "
            "hidden each); pass gate and up separately to tokenforge.ops.swiglu otherwise"
        )


def _check_scalar(name: str, what: str, value, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or (positive and value <= 0):
        kind = "a finite positive number" if positive else "a finite number"
        raise ValueError(f"{name}: {what} must be {kind}, got {value!r}")
    return float(value)


def _triton_supports(gate, up=None) -> Optional[str]:
    reason = backends.triton_unsupported_reason(gate.device)
    if reason is not None:
        return reason
    from tokenforge.kernels import swiglu as triton_swiglu

    if up is None:  # packed: the kernels see the halves
        return triton_swiglu.supports(gate[..., : gate.shape[-1] // 2], None)
    return triton_swiglu.supports(gate, up)


backends.register_op(OP, cuda_preference=("triton",),
                     supports={"triton": _triton_supports, "torch": lambda gate, up: None},
                     example_inputs=lambda device, dtype: (torch.empty(2, 64, device=device, dtype=dtype),
                                                           torch.empty(2, 64, device=device, dtype=dtype)))
backends.register_op(OP_PACKED, cuda_preference=("triton",),
                     supports={"triton": _triton_supports, "torch": lambda gate_up: None},
                     example_inputs=lambda device, dtype: (torch.empty(2, 128, device=device, dtype=dtype),))


# The custom ops below call their backend's launcher through this table (no dispatch in between).
LAUNCHERS = backends.Launchers(OP, triton="tokenforge.kernels.swiglu")


# ---------------------------------------------------------------------------------------------
# Custom ops: what torch.compile sees. Tensors are 2-D with unit column stride.
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("tokenforge::swiglu_fwd", mutates_args=())
def swiglu_fwd(gate: torch.Tensor, up: torch.Tensor, backend: str, activation: str = "silu") -> torch.Tensor:
    return LAUNCHERS[backend].swiglu_forward(gate, up, activation=activation)


@swiglu_fwd.register_fake
def _(gate, up, backend, activation="silu"):
    return gate.new_empty(gate.shape)


@torch.library.custom_op("tokenforge::swiglu_bwd", mutates_args=())
def swiglu_bwd(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, backend: str,
               activation: str = "silu") -> tuple[torch.Tensor, torch.Tensor]:
    dgate, dup = torch.empty_like(gate, memory_format=torch.contiguous_format), torch.empty_like(up, memory_format=torch.contiguous_format)
    LAUNCHERS[backend].swiglu_backward(dy, gate, up, dgate, dup, activation=activation)
    return dgate, dup


@swiglu_bwd.register_fake
def _(dy, gate, up, backend, activation="silu"):
    return gate.new_empty(gate.shape), up.new_empty(up.shape)


# Packed ops: the activation's form is (activation, limit, alpha, interleaved); limit None: no clamp.
@torch.library.custom_op("tokenforge::swiglu_packed_fwd", mutates_args=())
def swiglu_packed_fwd(gate_up: torch.Tensor, backend: str, activation: str = "silu", limit: Optional[float] = None,
                      alpha: float = 1.0, interleaved: bool = False) -> torch.Tensor:
    gate, up = split_gate_up(gate_up, interleaved)
    return LAUNCHERS[backend].swiglu_forward(gate, up, activation=activation, limit=limit, alpha=alpha)


@swiglu_packed_fwd.register_fake
def _(gate_up, backend, activation="silu", limit=None, alpha=1.0, interleaved=False):
    return gate_up.new_empty((gate_up.shape[0], gate_up.shape[1] // 2))


@torch.library.custom_op("tokenforge::swiglu_packed_bwd", mutates_args=())
def swiglu_packed_bwd(dy: torch.Tensor, gate_up: torch.Tensor, backend: str, activation: str = "silu",
                      limit: Optional[float] = None, alpha: float = 1.0, interleaved: bool = False) -> torch.Tensor:
    dgate_up = torch.empty(gate_up.shape, dtype=gate_up.dtype, device=gate_up.device)
    LAUNCHERS[backend].swiglu_backward(dy, *split_gate_up(gate_up, interleaved), *split_gate_up(dgate_up, interleaved),
                                        activation=activation, limit=limit, alpha=alpha)
    return dgate_up


@swiglu_packed_bwd.register_fake
def _(dy, gate_up, backend, activation="silu", limit=None, alpha=1.0, interleaved=False):
    return gate_up.new_empty(gate_up.shape)




class SwiGLUFunction(torch.autograd.Function):
    """Autograd for the kernel backends: saves gate and up only; the activation is recomputed."""

    @staticmethod
    def forward(ctx, gate, up, backend, activation="silu"):
        g2, u2 = rows_view(gate), rows_view(up)
        y = torch.ops.tokenforge.swiglu_fwd(g2, u2, backend, activation)
        ctx.save_for_backward(g2, u2)
        ctx.backend, ctx.activation = backend, activation
        ctx.shape = gate.shape
        return y.view(gate.shape)

    @staticmethod
    def backward(ctx, dy):
        g2, u2 = ctx.saved_tensors
        dg, du = torch.ops.tokenforge.swiglu_bwd(rows_view(dy.to(g2.dtype)), g2, u2, ctx.backend, ctx.activation)
        return dg.view(ctx.shape), du.view(ctx.shape), None, None


@torch.library.custom_op("tokenforge::swiglu_fwd_fp8", mutates_args=())
def swiglu_fwd_fp8(gate: torch.Tensor, up: torch.Tensor, fp8_dtype: torch.dtype, blockwise: bool,
                   power_of_two: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from tokenforge.kernels import swiglu as kernel

    return kernel.swiglu_forward_fp8(gate, up, "silu", fp8_dtype, blockwise, power_of_two)


@swiglu_fwd_fp8.register_fake
def _(gate, up, fp8_dtype, blockwise, power_of_two):
    groups = -(-gate.shape[1] // 128) if blockwise else 1
    return (gate.new_empty(gate.shape), gate.new_empty(gate.shape, dtype=fp8_dtype),
            gate.new_empty((gate.shape[0], groups), dtype=torch.float32))


class SwiGLUFP8Function(torch.autograd.Function):
    """SwiGLUFunction whose forward also emits y in fp8 for the down projection's Float8Linear
    (the Triton kernel; see tokenforge.fp8.emit): outputs (y, data, scale), the last two without
    gradients."""

    @staticmethod
    def forward(ctx, gate, up, cast):
        g2, u2 = rows_view(gate), rows_view(up)
        y, data, scale = torch.ops.tokenforge.swiglu_fwd_fp8(g2, u2, cast.fp8_dtype, cast.blockwise, cast.power_of_two)
        ctx.save_for_backward(g2, u2)
        ctx.backend, ctx.activation = "triton", "silu"
        ctx.shape = gate.shape
        ctx.mark_non_differentiable(data, scale)
        return y.view(gate.shape), data, scale

    @staticmethod
    def backward(ctx, dy, _ddata, _dscale):
        dg, du, _, _ = SwiGLUFunction.backward(ctx, dy)
        return dg, du, None


def _emits_fp8(fp8, backend: str, gate: torch.Tensor) -> bool:
    """Whether this call can emit its output in fp8 (see tokenforge.fp8.emit): asked for, on the
    Triton kernel, eager mode, not under an autocast that hands the next layer another dtype, and
    for rowwise scales a row the kernel holds whole."""
    if fp8 is None or backend != "triton" or torch.compiler.is_compiling() or gate.dim() == 0:
        return False
    from tokenforge.fp8.emit import consumer_keeps_dtype
    from tokenforge.kernels.swiglu import EMIT_ROW_MAX_N

    return consumer_keeps_dtype(gate) and (fp8.blockwise or gate.shape[-1] <= EMIT_ROW_MAX_N)


class SwiGLUPackedFunction(torch.autograd.Function):
    """Autograd of the packed form: saves gate_up only; its gradient is one packed tensor."""

    @staticmethod
    def forward(ctx, gate_up, backend, activation="silu", limit=None, alpha=1.0, interleaved=False):
        gu2 = rows_view(gate_up)
        form = (activation, limit, alpha, interleaved)
        y = torch.ops.tokenforge.swiglu_packed_fwd(gu2, backend, *form)
        ctx.save_for_backward(gu2)
        ctx.backend, ctx.form = backend, form
        ctx.shape = gate_up.shape
        return y.view(*gate_up.shape[:-1], gate_up.shape[-1] // 2)

    @staticmethod
    def backward(ctx, dy):
        (gu2,) = ctx.saved_tensors
        dgu = torch.ops.tokenforge.swiglu_packed_bwd(rows_view(dy.to(gu2.dtype)), gu2, ctx.backend, *ctx.form)
        return dgu.view(ctx.shape), None, None, None, None, None


def _check_multipliers(gate_multiplier, down_multiplier, fp8) -> None:
    for what, m in (("gate_multiplier", gate_multiplier), ("down_multiplier", down_multiplier)):
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not math.isfinite(m):
            raise ValueError(f"swiglu: {what} must be a finite number (Falcon-H1's mlp_multipliers), got {m!r}")
    if fp8 is not None and down_multiplier != 1.0:
        raise ValueError("swiglu: fp8 emission with a down_multiplier is not supported (the fp8 copy would "
                         "miss it); apply the multiplier after the down projection instead")


def swiglu(gate: torch.Tensor, up: torch.Tensor, *, gate_multiplier: float = 1.0, down_multiplier: float = 1.0,
           backend: Optional[str] = None, fp8=None) -> torch.Tensor:
    """``silu(gate) * up`` for gate and up of one shape and dtype (fp32/fp16/bf16; float64 on the
    torch backend); returns that shape and dtype. ``backend`` forces triton or torch. ``fp8``: a
    tokenforge.fp8.EmitCast to also emit the result in fp8 for the next Float8Linear where the
    Triton kernel runs (tokenforge.fp8.emit).

    ``gate_multiplier`` / ``down_multiplier`` (Falcon-H1's ``mlp_multipliers``, Liger-Kernel's
    arguments): ``silu(gate * gate_multiplier) * up * down_multiplier``. They run as PyTorch
    elementwise ops around the kernel, rounded where eager rounds (one extra pass each when not 1).
    DTensor gate / up (tensor parallelism): each rank runs its shard, up aligned to gate's placements
    (:mod:`tokenforge.dtensor`)."""
    if any_dtensor(gate, up):
        return run_on_shards("swiglu", lambda g, u: swiglu(g, u, gate_multiplier=gate_multiplier,
                                                           down_multiplier=down_multiplier, backend=backend),
                             [gate, up], whole_dims=())
    _check_inputs(gate, up)
    _check_multipliers(gate_multiplier, down_multiplier, fp8)
    if gate_multiplier != 1.0 or down_multiplier != 1.0:
        y = swiglu(gate * gate_multiplier if gate_multiplier != 1.0 else gate, up, backend=backend, fp8=fp8)
        return y * down_multiplier if down_multiplier != 1.0 else y
    if gate.numel() == 0:
        return swiglu_reference(gate, up)
    name = backends.choose(OP, gate, up, backend=backend)
    if name == "torch":
        return swiglu_reference(gate, up)
    if _emits_fp8(fp8, name, gate):
        from tokenforge.fp8.emit import attach

        y, data, scale = SwiGLUFP8Function.apply(gate, up, fp8)
        return attach(y, data, scale, fp8)
    return SwiGLUFunction.apply(gate, up, name)


def swiglu_packed(gate_up: torch.Tensor, *, limit: Optional[float] = None, interleaved: bool = False,
                  backend: Optional[str] = None) -> torch.Tensor:
    """``silu(gate) * up`` for gate_up (..., 2*hidden) = cat([gate, up], -1), the output of a fused
    gate/up projection; returns (..., hidden) in gate_up's dtype, and a packed (..., 2*hidden)
    gradient. ``backend`` forces triton or torch. DTensor gate_up: per shard, its last dim whole.

    ``limit``: ``silu(gate.clamp(max=limit)) * up.clamp(-limit, limit)`` (DeepSeek-V4's experts;
    no gradient where clamped). ``interleaved``: gate and up are gate_up's even and odd columns."""
    if any_dtensor(gate_up):
        return run_on_shards("swiglu_packed", lambda t: swiglu_packed(t, limit=limit, interleaved=interleaved,
                                                                      backend=backend), [gate_up])
    _check_packed(gate_up)
    if limit is not None:
        limit = _check_scalar("swiglu_packed", "limit", limit, positive=True)
    interleaved = bool(interleaved)
    if gate_up.numel() == 0:
        return swiglu_packed_reference(gate_up, limit=limit, interleaved=interleaved)
    name = backends.choose(OP_PACKED, gate_up, backend=backend)
    if name == "torch":
        return swiglu_packed_reference(gate_up, limit=limit, interleaved=interleaved)
    return SwiGLUPackedFunction.apply(gate_up, name, "silu", limit, 1.0, interleaved)


def gpt_oss_glu(gate_up: torch.Tensor, *, alpha: float = 1.702, limit: float = 7.0, interleaved: bool = True,
                backend: Optional[str] = None) -> torch.Tensor:
    """GPT-OSS's expert gate on gate_up (..., 2*hidden): ``(up.clamp(-limit, limit) + 1) * g *
    sigmoid(alpha * g)`` with ``g = gate.clamp(max=limit)``; gate and up are gate_up's even and odd
    columns (GPT-OSS's layout), or with ``interleaved=False`` its halves (MiniMax-M3's). Returns
    (..., hidden) in gate_up's dtype, rounded where GPT-OSS's eager code rounds, and a packed gradient
    (none where clamped). Defaults are GPT-OSS's ``alpha`` and ``swiglu_limit``. DTensor gate_up: per
    shard, its last dim whole."""
    if any_dtensor(gate_up):
        return run_on_shards("gpt_oss_glu", lambda t: gpt_oss_glu(t, alpha=alpha, limit=limit, interleaved=interleaved,
                                                                  backend=backend), [gate_up])
    _check_packed(gate_up, "gpt_oss_glu")
    alpha = _check_scalar("gpt_oss_glu", "alpha", alpha)
    limit = _check_scalar("gpt_oss_glu", "limit", limit, positive=True)
    interleaved = bool(interleaved)
    if gate_up.numel() == 0:
        return gpt_oss_glu_reference(gate_up, alpha, limit, interleaved)
    name = backends.choose(OP_PACKED, gate_up, backend=backend)
    if name == "torch":
        return gpt_oss_glu_reference(gate_up, alpha, limit, interleaved)
    return SwiGLUPackedFunction.apply(gate_up, name, "gpt_oss", limit, alpha, interleaved)


GELU_APPROXIMATIONS = {"tanh": "gelu_tanh", "none": "gelu"}


def geglu(gate: torch.Tensor, up: torch.Tensor, approximate: str = "tanh", *,
          backend: Optional[str] = None) -> torch.Tensor:
    """``gelu(gate, approximate) * up`` (GeGLU; Gemma's MLP uses approximate='tanh', Hugging Face's
    ``gelu_pytorch_tanh``), same shapes, dtypes and backends (and DTensor inputs) as :func:`swiglu`."""
    if any_dtensor(gate, up):
        return run_on_shards("geglu", lambda g, u: geglu(g, u, approximate, backend=backend), [gate, up],
                             whole_dims=())
    if approximate not in GELU_APPROXIMATIONS:
        raise ValueError(f"geglu: approximate must be 'tanh' or 'none' (as torch.nn.functional.gelu), got {approximate!r}")
    activation = GELU_APPROXIMATIONS[approximate]
    _check_inputs(gate, up, "geglu")
    if gate.numel() == 0:
        return gated_reference(gate, up, activation)
    name = backends.choose(OP, gate, up, backend=backend)
    if name == "torch":
        return gated_reference(gate, up, activation)
    return SwiGLUFunction.apply(gate, up, name, activation)
