"""AdamW as one multi-tensor launch per (param group, device, dtype): a drop-in for torch.optim.AdamW.

Path of a step: :meth:`AdamW.step` checks grads, creates state, increments every step counter with
one ``torch._foreach_add_``, then per partition (params of one group sharing device, dtypes and
mode) either launches ``tokenforge.kernels.adamw`` (Triton) / ``tokenforge.cuda.adamw`` (CUDA C++)
over cached pointer tables (``tokenforge.optim.multi_tensor``) or runs :func:`adamw_reference`
param by param (the ``torch`` backend: CPU fallback and the tests' oracle).

State per param is torch's: ``step`` (float32 0-d, kept on the param's device), ``exp_avg``,
``exp_avg_sq`` and, with amsgrad, ``max_exp_avg_sq``; so state_dicts load both ways. Modes:

- fp32 params: exactly torch's update (see kernels/adamw.py for the formulas);
- fp16/bf16 params: the optimizer keeps an fp32 ``master_param`` in the state and fp32 moments; the
  param receives the rounded master after each step. Loading such a state_dict into torch.optim.AdamW
  casts the moments to the param dtype and ignores ``master_param``; loading torch's state_dict here
  upcasts the moments and starts the master from the param;
- ``bf16_stochastic_rounding=True``: bf16 params updated in place with stochastic rounding, no master
  copy, moments in ``sr_state_dtype`` (bf16 by default: 14 bytes of traffic per param per step). The
  random bits are Philox draws keyed by ``seed`` and counted by (the element's index in the *full*
  parameter, step, param index): an FSDP2 shard rounds exactly as the unsharded tensor would, on
  any number of ranks (tests/test_adamw.py checks 2 gloo ranks against one process);
- ``state_bits=8``: ``exp_avg`` int8 codes of m / sqrt(v), ``exp_avg_sq`` uint8 codes of sqrt(v)
  (a power-law map with a log tail, rounded stochastically with the Philox bits above), and fp32
  block maxima (``block_max`` [2, n_blocks of 256]): 2.03 bytes of state per param; small moments
  stay alive beside large ones in a block (kernels/adamw8bit.py says how and what it measured).
  Such a state_dict reloads here, not into torch.optim.AdamW.

CUDA graphs: a step can be captured and replayed once one step has run outside capture (states and
pointer tables exist) and ``lr`` is a CUDA tensor updated in place between replays; the step
counters live on the device. A capture with a float lr (it would be frozen into the graph), before
the first step, or after a param / grad moved raises ``multi_tensor.CaptureError`` saying what to do.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from tokenforge import backends
from tokenforge.kernels import adamw8bit as q8
from tokenforge.optim.multi_tensor import (LOW_PRECISION, MultiTensorOptimizer, TableCache, _capturing,
                                           check_capturable, global_offset, local)

OP = "adamw"


def _triton_supports(param) -> Optional[str]:
    reason = backends.triton_unsupported_reason(param.device)
    if reason is not None:
        return reason
    from tokenforge.kernels import adamw as kadamw

    return kadamw.supports(param)


def _cuda_supports(param) -> Optional[str]:
    reason = backends.cuda_ext_unsupported_reason(param.device)
    if reason is not None:
        return reason
    from tokenforge.cuda import adamw as cadamw

    return cadamw.supports(param)


backends.register_op(
    OP,
    cuda_preference=("triton", "cuda"),
    supports={"triton": _triton_supports, "cuda": _cuda_supports, "torch": lambda param: None},
    example_inputs=lambda device, dtype: (torch.empty(16, device=device, dtype=dtype),),
)


# ---------------------------------------------------------------------------------------------
# Stochastic rounding in torch: the kernels' Philox draw, bit for bit.
# ---------------------------------------------------------------------------------------------

_M32 = 0xFFFFFFFF
_PHILOX_KEY_A, _PHILOX_KEY_B = 0x9E3779B9, 0xBB67AE85
_PHILOX_ROUND_A, _PHILOX_ROUND_B = 0xD2511F53, 0xCD9E8D57


def _mul_hi_lo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32 bits of a * b for a 32-bit constant a and int64 tensors b holding uint32
    values, without overflowing int64: a is split in 16-bit halves."""
    a_hi, a_lo = a >> 16, a & 0xFFFF
    x, y = a_hi * b, a_lo * b  # each < 2**48
    hi = (x + (y >> 16)) >> 16
    lo = (((x & 0xFFFF) << 16) + y) & _M32
    return hi, lo


def philox_reference(seed: int, c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, c3: torch.Tensor,
                     n_rounds: int = 10) -> torch.Tensor:
    """First output word of Philox-4x32 (triton.language.philox's rounds and constants) for int64
    tensors holding uint32 counters and a 64-bit seed (the key)."""
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    for _ in range(n_rounds):
        hi_b, lo_b = _mul_hi_lo(_PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mul_hi_lo(_PHILOX_ROUND_A, c0)
        c0, c2, c1, c3 = hi_b ^ c1 ^ k0, hi_a ^ c3 ^ k1, lo_b, lo_a
        k0, k1 = (k0 + _PHILOX_KEY_A) & _M32, (k1 + _PHILOX_KEY_B) & _M32
    return c0


def philox_word_reference(seed: int, step: int, key: int, gidx: torch.Tensor) -> torch.Tensor:
    """kernels/multi_tensor.philox_word for int64 global element indices ``gidx``: the 32 random
    bits (as int64) the kernels draw for (seed, step, key, element)."""
    c0, c1 = gidx & _M32, (gidx >> 32) & _M32
    return philox_reference(int(seed) & 0x7FFFFFFF, c0, c1, torch.full_like(c0, int(step) & _M32),
                            torch.full_like(c0, int(key) & _M32))


def stochastic_round_bf16_reference(x: torch.Tensor, seed: int, step: int, key: int, offset: int = 0) -> torch.Tensor:
    """fp32 x -> bf16, rounded up or down at random with the kernels' Philox bits for (seed, step,
    key, offset + flat index): ``offset`` is the flat index of x's first element in the full
    parameter (an FSDP2 shard's), so a shard rounds exactly as the whole tensor would."""
    gidx = torch.arange(x.numel(), device=x.device, dtype=torch.int64) + int(offset)
    r = philox_word_reference(seed, step, key, gidx) & 0xFFFF
    bits = x.detach().reshape(-1).contiguous().view(torch.int32).to(torch.int64) & _M32
    finite = (bits & 0x7F800000) != 0x7F800000
    rounded = torch.where(finite, (bits + r) & 0xFFFF0000, bits)
    rounded = torch.where(rounded >= 2**31, rounded - 2**32, rounded).to(torch.int32)
    return rounded.view(torch.float32).to(torch.bfloat16).view(x.shape)


# ---------------------------------------------------------------------------------------------
# Reference: one param, torch ops, torch.optim.AdamW's single-tensor formulas
# ---------------------------------------------------------------------------------------------


def adamw_reference(param: torch.Tensor, grad: torch.Tensor, state: dict, *, lr, beta1: float, beta2: float,
                    eps: float, weight_decay: float, amsgrad: bool, maximize: bool,
                    grad_scale: Optional[torch.Tensor] = None, stochastic: bool = False, seed: int = 0,
                    key: int = 0, offset: int = 0) -> None:
    """Update param (and state) in place by one AdamW step; state['step'] is already incremented.
    fp16/bf16 params update state['master_param'] when present, or round stochastically (``offset``:
    flat index of param's first element in the full parameter, for a shard)."""
    step = float(state["step"])
    lr = float(lr)
    master = state.get("master_param")
    p = master if master is not None else (param.float() if param.dtype != torch.float32 else param)
    exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
    compute = torch.float32 if p.dtype != torch.float64 else torch.float64
    g = grad.to(compute)
    if grad_scale is not None:
        g = g * grad_scale.to(compute)
    if maximize:
        g = -g
    m = exp_avg.to(compute)
    v = exp_avg_sq.to(compute)

    p.mul_(1 - lr * weight_decay)
    m.lerp_(g, 1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    bc1 = 1 - beta1 ** step
    bc2_sqrt = math.sqrt(1 - beta2 ** step)
    if amsgrad:
        vmax = torch.maximum(state["max_exp_avg_sq"].to(compute), v)
        state["max_exp_avg_sq"].copy_(vmax)
        denom = (vmax.sqrt() / bc2_sqrt).add_(eps)
    else:
        denom = (v.sqrt() / bc2_sqrt).add_(eps)
    p.addcdiv_(m, denom, value=-lr / bc1)

    exp_avg.copy_(m)
    exp_avg_sq.copy_(v)
    if p is not param:
        if stochastic:
            param.copy_(stochastic_round_bf16_reference(p, seed, int(step), key, offset))
        else:
            param.copy_(p)


# ---------------------------------------------------------------------------------------------
# 8-bit states in torch: the codes of kernels/adamw8bit.py (see its docstring for the maps and why)
# ---------------------------------------------------------------------------------------------


def _r_decode(q: torch.Tensor) -> torch.Tensor:
    top = q / q8.R_CODES
    tail = torch.exp2((q - q8.R_KNEE) * q8.R_LOG2_STEP + q8.R_LOG2_X0)
    return torch.where(q >= q8.R_KNEE, top ** 2 * top ** 2 * top, torch.where(q > 0, tail, torch.zeros_like(q)))


def _r_encode(x: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    lx = torch.log2(x.clamp(min=1e-30))
    c = torch.where(x >= q8.R_X0, q8.R_CODES * torch.exp2(lx * 0.2), q8.R_KNEE + (lx - q8.R_LOG2_X0) / q8.R_LOG2_STEP)
    lo = torch.floor(c).clamp(0.0, q8.R_CODES - 1.0)
    r_lo, r_hi = _r_decode(lo), _r_decode(lo + 1.0)
    f = (x * x - r_lo * r_lo) / (r_hi * r_hi - r_lo * r_lo)
    return torch.where(uniform < f, lo + 1.0, lo)


def _blocks(x: torch.Tensor, nqb: int) -> torch.Tensor:
    flat = x.reshape(-1).float()
    return torch.nn.functional.pad(flat, (0, nqb * q8.QBLOCK - flat.numel())).view(nqb, q8.QBLOCK)


def dequantize_moments(state: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(m, v) fp32 from 8-bit states: int8 exp_avg (u codes), uint8 exp_avg_sq (sqrt(v) codes),
    block_max fp32 [2, n_qblocks] (max |u|, max sqrt(v))."""
    shape, n = state["exp_avg"].shape, state["exp_avg"].numel()
    nqb = state["block_max"].shape[1]
    r = _r_decode(_blocks(state["exp_avg_sq"], nqb)) * state["block_max"][1][:, None]
    m = _blocks(state["exp_avg"], nqb) * (1.0 / 127.0) * state["block_max"][0][:, None] * r
    return m.reshape(-1)[:n].view(shape), (r * r).reshape(-1)[:n].view(shape)


def quantize_moments_(state: dict, m: torch.Tensor, v: torch.Tensor, uniform: Optional[torch.Tensor] = None) -> None:
    """Store fp32 (m, v) into the 8-bit states. ``uniform``: per-element draws in [0, 1) for the
    stochastic rounding of the sqrt(v) codes (the kernel's Philox draws, see adamw8_reference);
    None rounds to nearest in v (a one-off conversion, e.g. from a 32-bit state_dict)."""
    n, nqb = m.numel(), state["block_max"].shape[1]
    mb, vb = _blocks(m, nqb), _blocks(v, nqb)
    rb = vb.sqrt()
    r_max = rb.amax(1)
    draws = torch.full_like(rb, 0.5) if uniform is None else _blocks(uniform, nqb)
    r_code = _r_encode(rb / torch.where(r_max > 0, r_max, 1.0)[:, None], draws)
    r_q = _r_decode(r_code) * r_max[:, None]
    u = torch.where(r_q > 0, mb / torch.where(r_q > 0, r_q, 1.0), torch.zeros_like(mb))
    u_max = u.abs().amax(1)
    u_code = torch.floor(u.abs() / torch.where(u_max > 0, u_max, 1.0)[:, None] * 127.0 + 0.5) * torch.sign(u)
    state["exp_avg"].copy_(u_code.reshape(-1)[:n].view(m.shape).to(torch.int8))
    state["exp_avg_sq"].copy_(r_code.reshape(-1)[:n].view(v.shape).to(torch.uint8))
    state["block_max"][0].copy_(u_max)
    state["block_max"][1].copy_(r_max)


def adamw8_reference(param, grad, state, *, lr, beta1, beta2, eps, weight_decay, maximize,
                     grad_scale=None, seed: int = 0, key: int = 0, offset: int = 0) -> None:
    """adamw_reference with 8-bit moments: dequantize, fp32 update, requantize with the kernel's
    Philox draws for (seed, step, key, offset + flat index)."""
    m, v = dequantize_moments(state)
    tmp = {"step": state["step"], "exp_avg": m, "exp_avg_sq": v}
    if "master_param" in state:
        tmp["master_param"] = state["master_param"]
    adamw_reference(param, grad, tmp, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
                    amsgrad=False, maximize=maximize, grad_scale=grad_scale)
    gidx = torch.arange(m.numel(), device=m.device, dtype=torch.int64) + int(offset)
    bits = philox_word_reference(seed, int(state["step"]), key, gidx)
    quantize_moments_(state, m, v, uniform=(bits >> 8).float() * (1.0 / 16777216.0))


# ---------------------------------------------------------------------------------------------
# The optimizer
# ---------------------------------------------------------------------------------------------


class AdamW(MultiTensorOptimizer):
    """Drop-in for ``torch.optim.AdamW`` updating all params of a group with one multi-tensor launch.

    Extra keyword arguments: ``max_grad_norm`` (clip by the global L2 grad norm inside the step, no
    host sync; ``last_grad_norm`` holds the norm), ``bf16_stochastic_rounding`` and
    ``sr_state_dtype`` (see the module docstring), ``seed`` (of the rounding), ``backend``
    (triton, cuda or torch; None chooses). ``lr`` may be a float or a tensor (e.g. on the GPU)."""

    NAME = "AdamW"
    # FSDP2's sharded DTensor params (and their grads and states) are stepped on their local shards
    # (multi_tensor.local); tokenforge.train relies on this promise under --dist fsdp.
    SUPPORTS_DTENSOR = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False,
                 maximize=False, *, foreach=None, capturable=False, differentiable=False, fused=None,
                 max_grad_norm: Optional[float] = None, bf16_stochastic_rounding: bool = False,
                 sr_state_dtype: torch.dtype = torch.bfloat16, seed: int = 0, state_bits: int = 32,
                 backend: Optional[str] = None):
        from tokenforge.optim.multi_tensor import check_hyper

        if state_bits not in (32, 8):
            raise ValueError(f"{self.NAME}: state_bits must be 32 or 8, got {state_bits!r}")
        if state_bits == 8 and (amsgrad or bf16_stochastic_rounding):
            raise ValueError(f"{self.NAME}: state_bits=8 does not combine with amsgrad or bf16_stochastic_rounding")
        if state_bits == 8 and backend == "cuda":
            raise ValueError(f"{self.NAME}: state_bits=8 has no CUDA C++ kernel; use backend='triton' or 'torch'")
        self.state_bits = state_bits

        check_hyper(self.NAME, lr, betas, eps, weight_decay)
        if differentiable:
            raise ValueError("AdamW: differentiable=True is not supported by the fused kernels; use torch.optim.AdamW")
        if sr_state_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"AdamW: sr_state_dtype must be torch.float32 or torch.bfloat16, got {sr_state_dtype}")
        self.bf16_stochastic_rounding = bool(bf16_stochastic_rounding)
        self.sr_state_dtype = sr_state_dtype
        self.seed = int(seed)
        defaults = dict(lr=lr, betas=(float(betas[0]), float(betas[1])), eps=eps, weight_decay=weight_decay,
                        amsgrad=amsgrad, maximize=maximize, foreach=foreach, capturable=capturable,
                        differentiable=False, fused=fused, decoupled_weight_decay=True)
        super().__init__(params, defaults, max_grad_norm=max_grad_norm, backend=backend)

    # -- state ----------------------------------------------------------------------------------
    def _mode(self, p: torch.Tensor) -> str:
        if self.state_bits == 8:
            return "q8master" if p.dtype in LOW_PRECISION else "q8"
        if p.dtype == torch.bfloat16 and self.bf16_stochastic_rounding:
            return "stochastic"
        return "master" if p.dtype in LOW_PRECISION else "plain"

    def _state_dtype(self, p: torch.Tensor, mode: str) -> torch.dtype:
        if mode.startswith("q8"):
            return torch.int8
        if mode == "stochastic":
            return self.sr_state_dtype
        return torch.float32 if mode == "master" else p.dtype

    def _init_state(self, p: torch.Tensor, group: dict, mode: str) -> dict:
        """Create the state on first use, and conform loaded state (dtype, device, master)."""
        state = self.state[p]
        sdt = self._state_dtype(p, mode)
        keys = self._moment_keys(group)
        if len(state) == 0:
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
        if mode.startswith("q8"):
            nqb = -(-p.numel() // q8.QBLOCK)
            if "qscale" in state:
                raise ValueError(f"{self.NAME}: this 8-bit state was written by an older tokenforge (codes of m "
                                 "and v, 'qscale'); its codes mean something else now. Resume it with the "
                                 "tokenforge that wrote it, or start the optimizer state afresh")
            want = {"exp_avg": torch.int8, "exp_avg_sq": torch.uint8}
            if any(state.get(k) is None or state[k].dtype != d for k, d in want.items()) \
                    or state.get("block_max") is None or state["block_max"].shape != (2, nqb):
                # Fresh, or loaded from a 32-bit optimizer: quantize what is there.
                m = state.get("exp_avg", torch.zeros_like(p, dtype=torch.float32)).float()
                v = state.get("exp_avg_sq", torch.zeros_like(p, dtype=torch.float32)).float()
                state["exp_avg"] = torch.empty_like(p, dtype=torch.int8, memory_format=torch.contiguous_format)
                state["exp_avg_sq"] = torch.empty_like(p, dtype=torch.uint8, memory_format=torch.contiguous_format)
                state["block_max"] = torch.zeros((2, nqb), dtype=torch.float32, device=p.device)
                quantize_moments_(state, m, v)
            keys = []
        for k in keys:
            if k not in state:
                state[k] = torch.zeros_like(p, dtype=sdt, memory_format=torch.preserve_format)
            elif state[k].dtype != sdt or state[k].device != p.device:
                state[k] = state[k].to(device=p.device, dtype=sdt)
        step = state["step"]
        if not isinstance(step, torch.Tensor) or step.device != p.device or step.dtype != torch.float32:
            state["step"] = torch.as_tensor(step, dtype=torch.float32).to(p.device)
        if mode in ("master", "q8master"):
            if "master_param" not in state or state["master_param"].shape != p.shape:
                state["master_param"] = p.detach().float().clone(memory_format=torch.preserve_format)
        else:
            state.pop("master_param", None)
        return state

    # -- step -----------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        """One AdamW step over every param with a grad; returns closure() when given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        capturing = _capturing()
        work = []
        for group in self.param_groups:
            items = []
            for p in group["params"]:
                if p.grad is None:
                    continue
                self._check_grad(p)
                mode = self._mode(p)
                if capturing:
                    check_capturable(self.NAME, group, self.state[p])
                self._init_state(p, group, mode)
                items.append((p, mode))
            work.append(items)
        scales = self._grad_scales([p for items in work for p, _ in items])
        keys = self._param_keys()
        for gi, (group, items) in enumerate(zip(self.param_groups, work)):
            if items:
                self._step_group(gi, group, items, scales, keys)
        return loss

    def _partitions(self, group: dict, items: list) -> dict:
        parts: dict = {}
        for p, mode in items:
            name = backends.choose(OP, p, backend=self.backend)
            st = self.state[p]
            if name != "torch":
                tensors = [p] + [st[k] for k in self._moment_keys(group)]
                if "master_param" in st:
                    tensors.append(st["master_param"])
                if not all(local(t).is_contiguous() for t in tensors) or p.grad.dtype not in (
                        torch.float32, torch.float16, torch.bfloat16) or global_offset(p) is None:
                    name = "torch"  # the kernels index flat memory (and a shard's rows contiguously)
            key = (p.device, p.dtype, p.grad.dtype, st["exp_avg"].dtype, mode, name)
            parts.setdefault(key, []).append(p)
        return parts

    # -- what Lion overrides -------------------------------------------------------------------
    def _moment_keys(self, group: dict) -> list:
        if self.state_bits == 8:
            return ["exp_avg", "exp_avg_sq", "block_max"]  # block_max rides in the max_exp_avg_sq row
        return ["exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if group["amsgrad"] else [])

    def _hyper_values(self, group: dict) -> list:
        beta1, beta2 = (float(b) for b in group["betas"])
        return [group["lr"], beta1, beta2, group["eps"], group["weight_decay"]]

    def _reference(self, p, st, group, scale, mode, key) -> None:
        beta1, beta2 = (float(b) for b in group["betas"])
        # A DTensor shard steps as its local tensors (in place, same storage); its stochastic
        # rounding indexes elements by their place in the full parameter.
        offset = global_offset(p) or 0
        grad, p = local(p.grad), local(p)
        st = {k: local(v) if isinstance(v, torch.Tensor) else v for k, v in st.items()}
        if mode.startswith("q8"):
            adamw8_reference(p, grad, st, lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                             weight_decay=group["weight_decay"], maximize=group["maximize"], grad_scale=scale,
                             seed=self.seed, key=key, offset=offset)
            return
        adamw_reference(p, grad, st, lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                        weight_decay=group["weight_decay"], amsgrad=group["amsgrad"], maximize=group["maximize"],
                        grad_scale=scale, stochastic=mode == "stochastic", seed=self.seed, key=key, offset=offset)

    def _launch(self, name, tables, hyper, scale, group, **kw) -> None:
        if self.state_bits == 8:
            from tokenforge.kernels import adamw8bit

            adamw8bit.adamw8_step(tables, hyper, scale, p_dtype=kw["p_dtype"], g_dtype=kw["g_dtype"],
                                  maximize=bool(group["maximize"]), has_master=kw["has_master"], seed=self.seed)
            return
        if name == "cuda":
            from tokenforge.cuda import adamw as launcher
        else:
            from tokenforge.kernels import adamw as launcher
        launcher.adamw_step(tables, hyper, scale, amsgrad=bool(group["amsgrad"]), maximize=bool(group["maximize"]), **kw)

    def _step_group(self, gi: int, group: dict, items: list, scales: Optional[dict], keys: dict) -> None:
        for pkey, params in self._partitions(group, items).items():
            device, p_dtype, g_dtype, s_dtype, mode, name = pkey
            states = [self.state[p] for p in params]
            torch._foreach_add_([s["step"] for s in states], 1.0)
            scale = scales[device] if scales is not None else None
            if name == "torch":
                for p, st in zip(params, states):
                    self._reference(p, st, group, scale, mode, keys[p])
                continue
            from tokenforge.kernels import adamw as kadamw

            grads = [local(p.grad) for p in params]
            grads = [g if g.is_contiguous() else g.contiguous() for g in grads]
            moments = self._moment_keys(group) + [None] * 3
            roles = [
                [local(p) for p in params], grads, [local(s.get(moments[0])) for s in states],
                [local(s.get(moments[1])) for s in states], [local(s.get(moments[2])) for s in states],
                [s["step"] for s in states], [local(s.get("master_param")) for s in states],
            ]
            cache = self._caches.setdefault((gi, pkey), TableCache())
            tables = cache.get(roles, [keys[p] for p in params], kadamw.block_size(), device,
                               offsets=[global_offset(p) for p in params])
            hyper = self._hyper_table(gi, device, self._hyper_values(group))
            self._launch(name, tables, hyper, scale, group, p_dtype=p_dtype, g_dtype=g_dtype, s_dtype=s_dtype,
                         has_master=mode in ("master", "q8master"), stochastic=mode == "stochastic", seed=self.seed)
