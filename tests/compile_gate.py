"""Helpers for the compile gate: compile a Triton kernel for sm_90 / sm_80 on a machine with no
GPU and read ptxas's register and spill report.

Triton fixes at import time whether every @jit function (its own tl.* helpers included) is
interpreted, and compiling for a GPU target needs them compiled. So tests that compile are marked
``@pytest.mark.compile_gate``: in an interpreted test process (the CPU run) conftest skips them
there and ``test_compile_gate.py::test_gate_in_compiling_process`` runs them all in a child
process with TRITON_INTERPRET=0.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

ALL_TARGETS = {"sm_90": GPUTarget("cuda", 90, 32), "sm_80": GPUTarget("cuda", 80, 32)}
# TOKENFORGE_GATE_ARCHS=sm_90 narrows the gate: the second gate run under triton 3.6 (the GPU
# machine's version, `make gate-triton36`) checks the one architecture that machine has.
GATE_ARCHS = [a.strip() for a in os.environ.get("TOKENFORGE_GATE_ARCHS", "sm_90,sm_80").split(",") if a.strip()]
if not GATE_ARCHS or set(GATE_ARCHS) - set(ALL_TARGETS):
    raise ValueError(f"TOKENFORGE_GATE_ARCHS={os.environ.get('TOKENFORGE_GATE_ARCHS')!r}: use a comma list of "
                     f"{', '.join(ALL_TARGETS)}")
TARGETS = {a: ALL_TARGETS[a] for a in GATE_ARCHS}
TRITON_DTYPE = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


def jit_function(kernel) -> JITFunction:
    # Under TRITON_INTERPRET=1 the decorator returned an InterpretedFunction; compile its source.
    return kernel if isinstance(kernel, JITFunction) else JITFunction(kernel.fn)


def compile_kernel(kernel, arg_types: dict, constexprs: dict, num_warps: int, target: GPUTarget,
                   aligned: bool = True, unaligned_args=("eps",), num_stages=None):
    """triton.compile ``kernel`` for ``target``.

    arg_types: runtime argument name -> triton type ("*bf16", "*fp32", "i32", "fp32", ...);
    arguments not named there must be in ``constexprs``. With ``aligned`` the pointers and
    integers (except ``unaligned_args``) are marked divisible by 16, the launcher's common case,
    which lets Triton vectorise; ``aligned=False`` compiles the generic variant."""
    fn = jit_function(kernel)
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        if name not in arg_types:
            raise KeyError(f"compile_kernel: no type given for argument {name!r} of {fn.__name__}")
        signature[name] = arg_types[name]
        if aligned and name not in unaligned_args and not arg_types[name].startswith("fp"):
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=signature, constexprs=dict(constexprs), attrs=attrs)
    options = {"num_warps": num_warps}
    if num_stages is not None:
        options["num_stages"] = num_stages
    return triton.compile(src, target=target, options=options)


def emission_gate_types(config: dict, arch: str, kernel) -> dict:
    """Types of a producer kernel's fp8-emission arguments (tokenforge.kernels.fp8_quantize.
    emit_fp8_tile) and its emission constexprs, filled into ``config`` in place as the launcher
    passes them on ``arch``: e4m3 for a config with EMIT_FP8 (sm_80 has no fp8 convert: the
    software encoder writes uint8), the defaults otherwise. Kernels without emission: nothing."""
    from tokenforge.kernels import fp8_quantize

    if "EMIT_FP8" not in jit_function(kernel).arg_names:
        return {}
    soft = arch == "sm_80"
    config.setdefault("EMIT_FP8", False)
    config.setdefault("GROUP", 1)
    for name, value in fp8_quantize._format_constexprs(torch.float8_e4m3fn, False, soft and config["EMIT_FP8"]).items():
        config.setdefault(name, value)
    return dict(DATA="*u8" if soft else "*fp8e4nv", SCALE="*fp32", stride_scale="i32")


def _ptxas_candidates() -> list[str]:
    """ptxas binaries that may understand triton's PTX: triton ships a newer one (named
    ptxas-blackwell in recent releases) than the toolkit's, and its PTX version follows it."""
    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    paths = [os.path.join(bundled, "ptxas-blackwell"), os.path.join(bundled, "ptxas"),
             shutil.which("ptxas") or "", "/usr/local/cuda/bin/ptxas"]
    return [p for p in paths if p and os.path.exists(p)]


def ptxas_report(ptx: str, arch: str) -> str:
    """ptxas -v output for the PTX (registers, spills, shared memory)."""
    gpu = "sm_90a" if arch == "sm_90" else arch
    failures = []
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        for ptxas in _ptxas_candidates():
            out = subprocess.run([ptxas, "-v", f"--gpu-name={gpu}", path, "-o", os.path.join(d, "k.cubin")],
                                 capture_output=True, text=True)
            if out.returncode == 0:
                return out.stdout + out.stderr
            failures.append(f"{ptxas}: {out.stderr.strip()[:300]}")
    raise AssertionError("no ptxas could assemble the PTX:\n" + "\n".join(failures))


def spill_bytes(report: str) -> int:
    stores = [int(m) for m in re.findall(r"(\d+) bytes spill stores", report)]
    loads = [int(m) for m in re.findall(r"(\d+) bytes spill loads", report)]
    return sum(stores) + sum(loads)


def uses_wgmma(compiled) -> bool:
    """True when the sm_90 PTX issues Hopper warpgroup MMAs (for matmul-heavy kernels)."""
    return "wgmma" in compiled.asm["ptx"]
