"""Compile gate of the optimizer kernels (kernels/adamw.py, lion.py, grad_norm.py): every mode the
launchers can pick compiles for sm_90 and sm_80 with no ptxas spills, and the fp32 AdamW moves its
streams with 16-byte vector accesses. Runs in a compiling process (see tests/compile_gate.py)."""

import pytest
from compile_gate import TARGETS, compile_kernel, ptxas_report, spill_bytes

from tokenforge.kernels import adamw as kadamw
from tokenforge.kernels import grad_norm as kgrad
from tokenforge.kernels import lion as klion

TABLE_TYPES = dict(PTRS="*i64", META="*i64", BLOCKMAP="*i32", HYPER="*fp64", GRAD_SCALE="*fp32", SCALE="*fp32",
                   PARTIALS="*fp32", n_tensors="i32", n_blocks="i32", seed="i32", p="fp32")
CASES = ([(kadamw, n, c) for n, c in kadamw.all_configs()] + [(klion, n, c) for n, c in klion.all_configs()]
         + [(kgrad, n, c) for n, c in kgrad.all_configs()])


def _id(case):
    module, name, cfg = case
    parts = [name] + [f"{k}={getattr(v, 'name', v)}" for k, v in cfg.items() if k not in ("BLOCK", "num_warps", "INTERPRETED")]
    return "-".join(str(p) for p in parts)


@pytest.mark.compile_gate
@pytest.mark.parametrize("arch", list(TARGETS))
@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_optimizer_kernels_compile_without_spills(arch, case):
    module, name, cfg = case
    cfg = dict(cfg)
    num_warps = cfg.pop("num_warps")
    compiled = compile_kernel(getattr(module, name), TABLE_TYPES, cfg, num_warps, TARGETS[arch],
                              unaligned_args=("n_tensors", "n_blocks", "seed"))
    assert len(compiled.asm["cubin"]) > 0
    report = ptxas_report(compiled.asm["ptx"], arch)
    assert spill_bytes(report) == 0, f"{name} {cfg} spills on {arch}:\n{report}"


@pytest.mark.compile_gate
def test_fp32_adamw_uses_vector_accesses():
    name, cfg = kadamw.all_configs()[0]
    cfg = dict(cfg)
    num_warps = cfg.pop("num_warps")
    compiled = compile_kernel(kadamw._adamw_kernel, TABLE_TYPES, cfg, num_warps, TARGETS["sm_90"],
                              unaligned_args=("n_tensors", "n_blocks", "seed"))
    ptx = compiled.asm["ptx"]
    assert "ld.global.v4" in ptx and "st.global.v4" in ptx, "AdamW streams are not 16-byte vectorised"


@pytest.mark.compile_gate
@pytest.mark.parametrize("arch", list(TARGETS))
def test_8bit_adamw_compiles_without_spills(arch):
    from tokenforge.kernels import adamw8bit

    for name, cfg in adamw8bit.all_configs():
        cfg = dict(cfg)
        num_warps = cfg.pop("num_warps")
        compiled = compile_kernel(getattr(adamw8bit, name), TABLE_TYPES, cfg, num_warps, TARGETS[arch],
                                  unaligned_args=("n_tensors", "n_blocks", "seed"))
        report = ptxas_report(compiled.asm["ptx"], arch)
        assert spill_bytes(report) == 0, f"{name} {cfg} spills on {arch}:\n{report}"
