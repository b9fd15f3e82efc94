"""Compile gate: every Triton kernel, at every config its launcher can pick, compiles for Hopper
(sm_90) and Ampere (sm_80) on this machine, GPU or not, and ptxas reports no register spills.

The interpreter accepts programs the GPU compiler rejects, so passing the interpreter tests is not
enough. Compiling needs no GPU: ``triton.compile`` with an explicit ``GPUTarget`` yields PTX and a
cubin here.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile

import pytest

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from tokenforge import kernels  # noqa: E402
from tokenforge.kernels import rms_norm as rms_norm_kernels  # noqa: E402

# Triton fixes at import time whether every @jit function (its own tl.* helpers included) is
# interpreted; compiling for a GPU target needs them compiled. So when this process interprets
# (the CPU test run), the gate reruns this file in a child process with the interpreter off.
needs_compiler = pytest.mark.skipif(kernels.INTERPRETED, reason="interpreted process; see test_gate_in_compiling_process")


def test_gate_in_compiling_process():
    if not kernels.INTERPRETED:
        pytest.skip("this process compiles; the gate's tests run here directly")
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider", "-m", "slow or not slow"],
        env=env, capture_output=True, text=True, timeout=1800,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    summary = proc.stdout.strip().splitlines()[-1]
    # Only this test itself may be skipped in the child.
    assert re.search(r"\d+ passed, 1 skipped in", summary), proc.stdout[-2000:]

TARGETS = {"sm_90": GPUTarget("cuda", 90, 32), "sm_80": GPUTarget("cuda", 80, 32)}
TRITON_DTYPE = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}

# Argument name -> type, shared by all RMSNorm kernels: tensors of x's dtype, of w's dtype, fp32
# buffers, and 32-bit sizes (what the launcher passes for tensors under 2**31 elements).
X_POINTERS = {"X", "Y", "DY", "DX"}
W_POINTERS = {"W"}
FP32_POINTERS = {"RSTD", "C", "DW_PARTIAL"}


def _jit_function(kernel) -> JITFunction:
    # Under TRITON_INTERPRET=1 the decorator returned an InterpretedFunction; compile its source.
    return kernel if isinstance(kernel, JITFunction) else JITFunction(kernel.fn)


def compile_kernel(kernel, config: dict, x_dtype: str, w_dtype: str, target: GPUTarget, has_weight=True, aligned=True):
    fn = _jit_function(kernel)
    config = dict(config)
    num_warps = config.pop("num_warps")
    constexprs = dict(config, HAS_WEIGHT=has_weight)
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in X_POINTERS:
            signature[name] = "*" + TRITON_DTYPE[x_dtype]
        elif name in W_POINTERS:
            signature[name] = "*" + TRITON_DTYPE[w_dtype]
        elif name in FP32_POINTERS:
            signature[name] = "*fp32"
        elif name == "eps":
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
        # The launcher's common case: 16-byte aligned pointers, sizes and strides divisible by 16,
        # which lets Triton vectorise the loads. Unaligned calls get the generic variant.
        if aligned and signature[name] != "constexpr" and name not in ("eps", "rows"):
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=target, options={"num_warps": num_warps})


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


RMS_NORM_CONFIGS = rms_norm_kernels.all_configs()


@needs_compiler
@pytest.mark.slow
@pytest.mark.parametrize("arch", list(TARGETS))
@pytest.mark.parametrize("name,config", RMS_NORM_CONFIGS,
                         ids=[f"{n}-{c.get('BLOCK_M', 1)}x{c['BLOCK_N']}w{c['num_warps']}" for n, c in RMS_NORM_CONFIGS])
def test_rms_norm_configs_compile_without_spills(arch, name, config):
    kernel = getattr(rms_norm_kernels, name)
    compiled = compile_kernel(kernel, config, "bfloat16", "bfloat16", TARGETS[arch])
    assert "cubin" in compiled.asm and len(compiled.asm["cubin"]) > 0
    report = ptxas_report(compiled.asm["ptx"], arch)
    assert spill_bytes(report) == 0, f"{name} {config} spills on {arch}:\n{report}"


@needs_compiler
@pytest.mark.slow
@pytest.mark.parametrize("arch", list(TARGETS))
@pytest.mark.parametrize("x_dtype", list(TRITON_DTYPE))
@pytest.mark.parametrize("w_dtype", list(TRITON_DTYPE))
def test_rms_norm_dtypes_compile(arch, x_dtype, w_dtype):
    """Every dtype pairing, with and without weight, unaligned too, at the headline width 4096."""
    for name, config in (("_rms_norm_fwd_rows_kernel", rms_norm_kernels.fwd_rows_config(4096)),
                         ("_rms_norm_bwd_rows_kernel", rms_norm_kernels.bwd_rows_config(4096))):
        kernel = getattr(rms_norm_kernels, name)
        for has_weight, aligned in ((True, True), (False, False)):
            compiled = compile_kernel(kernel, config, x_dtype, w_dtype, TARGETS[arch], has_weight, aligned)
            assert len(compiled.asm["cubin"]) > 0


def test_every_width_maps_to_a_compiled_config():
    """The launch-config functions only return configs that all_configs() (the gate) covers."""
    gated = {(name, tuple(sorted(cfg.items()))) for name, cfg in RMS_NORM_CONFIGS}
    for n in [1, 2, 15, 16, 17, 100, 1000, 4096, 5000, 8192, 8193, 16384]:
        fwd = ("_rms_norm_fwd_rows_kernel", tuple(sorted(rms_norm_kernels.fwd_rows_config(n).items())))
        if n <= rms_norm_kernels.FWD_MAX_ROW_N:
            assert fwd in gated, n
        if n <= rms_norm_kernels.BWD_MAX_ROW_N:
            bwd = ("_rms_norm_bwd_rows_kernel", tuple(sorted(rms_norm_kernels.bwd_rows_config(n).items())))
            assert bwd in gated, n


@needs_compiler
def test_vectorised_loads_on_aligned_rows():
    """With aligned inputs the headline forward uses 16-byte loads (ld.global.v4), the point of
    specialising on alignment."""
    compiled = compile_kernel(rms_norm_kernels._rms_norm_fwd_rows_kernel, rms_norm_kernels.fwd_rows_config(4096),
                              "bfloat16", "bfloat16", TARGETS["sm_90"])
    assert re.search(r"ld\.global(\.\w+)*\.v4", compiled.asm["ptx"]), "expected 128-bit vector loads"
