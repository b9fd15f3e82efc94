"""Compile gate: every Triton kernel, at every config its launcher can pick, compiles for Hopper
(sm_90) and Ampere (sm_80) on this machine, GPU or not, and ptxas reports no register spills.

The interpreter accepts programs the GPU compiler rejects, so passing the interpreter tests is not
enough. Compiling needs no GPU: ``triton.compile`` with an explicit ``GPUTarget`` yields PTX and a
cubin here. Each op's gate tests carry ``@pytest.mark.compile_gate`` (see tests/compile_gate.py).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("triton")
from compile_gate import TARGETS, TRITON_DTYPE, compile_kernel, emission_gate_types, ptxas_report, spill_bytes  # noqa: E402

from tokenforge import kernels  # noqa: E402
from tokenforge.kernels import rms_norm as rms_norm_kernels  # noqa: E402

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


def test_gate_in_compiling_process():
    """In an interpreted process, run every compile_gate test of the suite in a compiling child."""
    if not kernels.INTERPRETED:
        pytest.skip("this process compiles: the compile_gate tests run in it directly")
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", TESTS_DIR, "-q", "-p", "no:cacheprovider", "-m", "compile_gate"],
        # A guard against a hung compiler, not a budget: the gate takes minutes on an idle 2-core CI
        # machine, but 30 once other work shared the cores (stop 36), which the old 1800 s cut off.
        env=env, capture_output=True, text=True, timeout=3600, cwd=os.path.dirname(TESTS_DIR),
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    summary = proc.stdout.strip().splitlines()[-1]
    assert re.search(r"\d+ passed", summary) and "skipped" not in summary, proc.stdout[-2000:]


def rms_norm_arg_types(x_dtype: str, w_dtype: str) -> dict:
    """Argument types of the RMSNorm kernels: tensors in x's dtype, the weight in its own, fp32
    buffers, and 32-bit sizes (what the launcher passes for tensors under 2**31 elements)."""
    x, w = "*" + TRITON_DTYPE[x_dtype], "*" + TRITON_DTYPE[w_dtype]
    types = {name: x for name in ("X", "Y", "DY", "DX")}
    types.update(W=w, RSTD="*fp32", C="*fp32", DW_PARTIAL="*fp32", eps="fp32")
    types.update({name: "i32" for name in ("rows", "n", "stride_x", "stride_y", "stride_dy", "stride_dx")})
    return types


def compile_rms_norm(name, config, x_dtype, w_dtype, arch, has_weight=True, aligned=True):
    config = dict(config)
    types = dict(rms_norm_arg_types(x_dtype, w_dtype), **emission_gate_types(config, arch, getattr(rms_norm_kernels, name)))
    num_warps = config.pop("num_warps")
    return compile_kernel(getattr(rms_norm_kernels, name), types,
                          dict(config, HAS_WEIGHT=has_weight), num_warps, TARGETS[arch],
                          aligned=aligned, unaligned_args=("eps", "rows"))


RMS_NORM_CONFIGS = rms_norm_kernels.all_configs()


@pytest.mark.compile_gate
@pytest.mark.parametrize("arch", list(TARGETS))
@pytest.mark.parametrize("name,config", RMS_NORM_CONFIGS,
                         ids=[f"{n}-{c.get('BLOCK_M', 1)}x{c['BLOCK_N']}w{c['num_warps']}{'-fp8g%d' % c['GROUP'] if c.get('EMIT_FP8') else ''}" for n, c in RMS_NORM_CONFIGS])
def test_rms_norm_configs_compile_without_spills(arch, name, config):
    compiled = compile_rms_norm(name, config, "bfloat16", "bfloat16", arch)
    assert "cubin" in compiled.asm and len(compiled.asm["cubin"]) > 0
    report = ptxas_report(compiled.asm["ptx"], arch)
    assert spill_bytes(report) == 0, f"{name} {config} spills on {arch}:\n{report}"


@pytest.mark.compile_gate
@pytest.mark.parametrize("arch", list(TARGETS))
@pytest.mark.parametrize("x_dtype", list(TRITON_DTYPE))
@pytest.mark.parametrize("w_dtype", list(TRITON_DTYPE))
def test_rms_norm_dtypes_compile(arch, x_dtype, w_dtype):
    """Every dtype pairing, with and without weight, unaligned too, at the headline width 4096."""
    for name, config in (("_rms_norm_fwd_rows_kernel", rms_norm_kernels.fwd_rows_config(4096)),
                         ("_rms_norm_bwd_rows_kernel", rms_norm_kernels.bwd_rows_config(4096))):
        for has_weight, aligned in ((True, True), (False, False)):
            compiled = compile_rms_norm(name, config, x_dtype, w_dtype, arch, has_weight, aligned)
            assert len(compiled.asm["cubin"]) > 0


def test_every_width_maps_to_a_gated_config():
    """The launch-config functions only return configs that all_configs() (the gate) covers."""
    gated = {(name, tuple(sorted(cfg.items()))) for name, cfg in RMS_NORM_CONFIGS}
    for n in [1, 2, 15, 16, 17, 100, 1000, 4096, 5000, 8192, 8193, 16384]:
        if n <= rms_norm_kernels.FWD_MAX_ROW_N:
            fwd = ("_rms_norm_fwd_rows_kernel", tuple(sorted(rms_norm_kernels.fwd_rows_config(n).items())))
            assert fwd in gated, n
        if n <= rms_norm_kernels.BWD_MAX_ROW_N:
            bwd = ("_rms_norm_bwd_rows_kernel", tuple(sorted(rms_norm_kernels.bwd_rows_config(n).items())))
            assert bwd in gated, n


@pytest.mark.compile_gate
def test_vectorised_loads_on_aligned_rows():
    """With aligned inputs the headline forward uses 16-byte loads (ld.global.v4), the point of
    specialising on alignment."""
    compiled = compile_rms_norm("_rms_norm_fwd_rows_kernel", rms_norm_kernels.fwd_rows_config(4096),
                                "bfloat16", "bfloat16", "sm_90")
    assert re.search(r"ld\.global(\.\w+)*\.v4", compiled.asm["ptx"]), "expected 128-bit vector loads"
