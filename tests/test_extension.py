"""The CUDA C++ extension tokenforge._C: build, status, argument checks, kernels.

The install step builds the extension (``pip install -e .`` runs setup.py), so these tests check
what that left behind:

- where nvcc exists, ``tokenforge._C`` imports and its build record says so (a failure here, not a
  skip: a silently missing extension is the bug this guards against), unless the build was
  explicitly turned off with TOKENFORGE_BUILD_EXT=0;
- without a GPU every entry point raises a helpful RuntimeError / ValueError instead of crashing;
- setup.py's own logic (arch parsing, skip/require modes, the build record) on this machine;
- a compile gate: every kernel compiles for sm_90a and sm_80 with no register spills;
- on a CUDA GPU (skipped cleanly elsewhere): the kernels against a float64 reference.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

import tokenforge.cuda as tf_cuda
from tokenforge.cuda import rms_norm as cuda_rms_norm

ROOT = Path(__file__).resolve().parents[1]
HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (torch.cuda.is_available() is False)")


def _load_setup_module():
    """setup.py's helpers, without running setup() (it is guarded by __name__ == '__main__')."""
    spec = importlib.util.spec_from_file_location("tokenforge_setup_py", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


setup_py = _load_setup_module()
NVCC, _NVCC_WHERE = setup_py.find_nvcc()


def _build_disabled() -> bool:
    record = tf_cuda.read_build_info() or {}
    return os.environ.get("TOKENFORGE_BUILD_EXT") == "0" or record.get("build_ext_env") == "0"


def _ext():
    return tf_cuda.get_extension()


# ---------------------------------------------------------------------------------------------
# Was it built, and does the status tell the truth?
# ---------------------------------------------------------------------------------------------


def test_extension_built_where_nvcc_exists():
    if NVCC is None:
        pytest.skip(f"no nvcc on this machine ({_NVCC_WHERE}); nothing to build")
    if _build_disabled():
        pytest.skip("the build was turned off with TOKENFORGE_BUILD_EXT=0")
    status = tf_cuda.extension_status()
    assert status["available"], (
        f"nvcc exists ({NVCC}) but tokenforge._C is missing: {status['reason']}. "
        "Reinstall with `pip install -e . --no-build-isolation -v` to see the build log."
    )
    record = tf_cuda.read_build_info()
    assert record is not None, "tokenforge/_build_info.json is missing next to tokenforge._C"
    assert record["extension_built"] is True, record
    assert record["nvcc"] and record["nvcc_version"], record


def test_build_info_reports_archs():
    if not tf_cuda.is_available():
        pytest.skip(f"tokenforge._C not available: {tf_cuda.extension_status()['reason']}")
    info = _ext().build_info()
    assert info["cudart"] == "static"
    assert re.fullmatch(r"\d+\.\d+", info["cuda_version"]), info
    assert info["archs"], info
    assert all(re.fullmatch(r"(sm|compute)_\d+[af]?", a) for a in info["archs"]), info
    # The install-time record and the module agree on what was compiled.
    record = tf_cuda.read_build_info()
    if record is not None:
        assert record["cuda_archs"] == info["archs"]
    # What TOKENFORGE_CUDA_ARCHS asked for at install time (default: Ampere and Hopper machine
    # code), plus PTX for the newest.
    if record is not None:
        _, expected = setup_py.gencode_flags(setup_py.parse_cuda_archs(record.get("cuda_archs_env")))
        assert info["archs"] == expected
    assert any(a.startswith("compute_") for a in info["archs"])
    assert info["rms_norm_max_n"] >= 16384


def test_extension_status_tells_the_truth():
    status = tf_cuda.extension_status()
    assert set(status) >= {"available", "reason", "build_info", "gpu_usable", "gpu_reason"}
    try:
        import tokenforge._C  # noqa: F401

        importable = True
    except ImportError:
        importable = False
    assert status["available"] == importable
    assert (status["reason"] == "") == importable
    assert isinstance(status["gpu_reason"], str) and status["gpu_reason"]
    if importable:
        assert status["gpu_usable"] == (HAS_CUDA and _ext().device_count() > 0)
        assert status["build_info"]["archs"]
    else:
        assert not status["gpu_usable"] or HAS_CUDA


def test_status_and_errors_when_the_extension_is_missing(monkeypatch, tmp_path):
    """Simulate an install without _C: status says why, get_extension says what to do."""
    record = tmp_path / "_build_info.json"
    record.write_text(json.dumps({"extension_built": False, "reason": "TOKENFORGE_BUILD_EXT=0", "nvcc": None,
                                  "nvcc_version": None, "cuda_archs": []}))
    monkeypatch.setattr(tf_cuda, "BUILD_INFO_FILE", record)
    monkeypatch.setattr(tf_cuda, "_loaded", True)
    monkeypatch.setattr(tf_cuda, "_module", None)
    monkeypatch.setattr(tf_cuda, "_import_error", "ImportError: cannot import name '_C'")
    tf_cuda.reset_status_cache()
    try:
        status = tf_cuda.extension_status()
        assert status["available"] is False
        assert "TOKENFORGE_BUILD_EXT=0" in status["reason"]
        with pytest.raises(RuntimeError, match="not available.*TOKENFORGE_BUILD_EXT=0.*reinstall"):
            tf_cuda.get_extension()
        # A non-CPU, non-CUDA device: supports() still answers in words.
        assert "CUDA" in cuda_rms_norm.supports(torch.empty(2, 8, device="meta"), None)
        record.unlink()
        tf_cuda.reset_status_cache()
        assert "import failed" in tf_cuda.extension_status()["reason"]
    finally:
        monkeypatch.undo()
        tf_cuda.reset_status_cache()


def test_supports_gives_reasons():
    assert "CUDA tensors" in cuda_rms_norm.supports(torch.randn(4, 8), None)
    assert "CUDA tensors" in cuda_rms_norm.supports(torch.randn(4, 8), torch.ones(8))
    if HAS_CUDA and tf_cuda.is_available():
        x = torch.randn(4, 8, device="cuda")
        assert cuda_rms_norm.supports(x, None) is None
        assert "float64" in cuda_rms_norm.supports(x.double(), None)
        big = torch.empty(1, cuda_rms_norm.max_n(torch.cuda.current_device()) + 1, device="cuda")
        assert "limit" in cuda_rms_norm.supports(big, None)


def test_launchers_reject_cpu_tensors():
    if not tf_cuda.is_available():
        pytest.skip("tokenforge._C not available")
    with pytest.raises(ValueError, match="CUDA tensor"):
        cuda_rms_norm.rms_norm_forward(torch.randn(3, 8), None, 1e-6)
    with pytest.raises(ValueError, match="CUDA tensor"):
        cuda_rms_norm.rms_norm_backward(torch.randn(3, 8), torch.randn(3, 8), None, torch.ones(3))


def test_dtype_code_and_stream_helpers():
    assert tf_cuda.dtype_code(torch.float32) == 0
    assert tf_cuda.dtype_code(torch.float16) == 1
    assert tf_cuda.dtype_code(torch.bfloat16) == 2
    with pytest.raises(ValueError, match="float64"):
        tf_cuda.dtype_code(torch.float64)
    with pytest.raises(ValueError, match="CUDA tensor"):
        tf_cuda.current_stream_handle(torch.empty(1))


# ---------------------------------------------------------------------------------------------
# Raw entry points: bad arguments and a missing GPU raise, never crash
# ---------------------------------------------------------------------------------------------

# Non-null, 16-byte aligned fake addresses: never dereferenced, because every call either fails
# validation or finds no GPU first (the GPU tests below use real tensors).
FAKE = 1 << 20


def _fwd_args(**over):
    args = dict(x_ptr=FAKE, w_ptr=FAKE, y_ptr=FAKE, rstd_ptr=FAKE, rows=4, n=64, x_row_stride=64,
                y_row_stride=64, eps=1e-6, x_dtype=2, w_dtype=2, stream=0)
    args.update(over)
    return args


def _bwd_args(**over):
    args = dict(dy_ptr=FAKE, x_ptr=FAKE, w_ptr=FAKE, rstd_ptr=FAKE, dx_ptr=FAKE, dw_partial_ptr=FAKE, rows=4,
                n=64, dy_row_stride=64, x_row_stride=64, dx_row_stride=64, num_partials=2, x_dtype=2,
                w_dtype=0, stream=0)
    args.update(over)
    return args


@pytest.mark.parametrize(
    "fn,over,match",
    [
        ("fwd", dict(x_dtype=7), "x_dtype must be 0"),
        ("fwd", dict(w_dtype=-1), "w_dtype must be 0"),
        ("fwd", dict(n=0), "n must be >= 1"),
        ("fwd", dict(rows=0), "rows must be >= 1"),
        ("fwd", dict(x_ptr=0), "x_ptr is null"),
        ("fwd", dict(y_ptr=0), "y_ptr is null"),
        ("fwd", dict(rstd_ptr=0), "rstd_ptr is null"),
        ("fwd", dict(y_row_stride=10), "rows do not overlap"),
        ("fwd", dict(x_row_stride=-64), "x_row_stride must be >= 0"),
        ("fwd", dict(eps=float("nan")), "eps must be finite"),
        ("bwd", dict(x_dtype=3), "x_dtype must be 0"),
        ("bwd", dict(n=0), "n must be >= 1"),
        ("bwd", dict(dy_ptr=0), "dy_ptr is null"),
        ("bwd", dict(dx_ptr=0), "dx_ptr is null"),
        ("bwd", dict(dw_partial_ptr=0), "dw_partial_ptr"),
        ("bwd", dict(w_ptr=0), "dw_partial_ptr must be 0 when w_ptr is 0"),
        ("bwd", dict(num_partials=0), "num_partials"),
        ("bwd", dict(n=1 << 20), "exceeds rms_norm_max_n"),
        ("bwd", dict(dx_row_stride=1), "rows do not overlap"),
    ],
)
def test_bad_arguments_raise_value_error(fn, over, match):
    if not tf_cuda.is_available():
        pytest.skip("tokenforge._C not available")
    C = _ext()
    with pytest.raises(ValueError, match=match):
        if fn == "fwd":
            C.rms_norm_fwd(**_fwd_args(**over))
        else:
            C.rms_norm_bwd(**_bwd_args(**over))


def test_negative_pointer_is_a_type_error():
    if not tf_cuda.is_available():
        pytest.skip("tokenforge._C not available")
    with pytest.raises(TypeError):
        _ext().rms_norm_fwd(**_fwd_args(x_ptr=-16))


def test_calls_without_a_gpu_raise_runtime_error():
    if not tf_cuda.is_available():
        pytest.skip("tokenforge._C not available")
    C = _ext()
    if C.device_count() > 0:
        pytest.skip("a CUDA device is present; the no-GPU path cannot be exercised here")
    assert C.device_error()  # says why
    calls = [
        lambda: C.rms_norm_fwd(**_fwd_args()),
        lambda: C.rms_norm_bwd(**_bwd_args()),
        lambda: C.rms_norm_bwd_num_partials(4096, 4096, 2, 0, True, 0),
        lambda: C.rms_norm_max_n(0),
    ]
    for call in calls:
        with pytest.raises(RuntimeError, match=r"no CUDA device is available \(cudaGetDeviceCount.*backend='triton' or 'torch'"):
            call()
    # Nothing was left in a bad state: the build-wide facts still answer.
    assert C.rms_norm_max_n() >= 16384
    assert C.device_count() == 0


def test_no_gpu_call_does_not_crash_a_fresh_process():
    """A fresh interpreter (no torch import first) gets the exception too, and exits normally."""
    if not tf_cuda.is_available():
        pytest.skip("tokenforge._C not available")
    if _ext().device_count() > 0:
        pytest.skip("a CUDA device is present")
    code = (
        "import tokenforge._C as C\n"
        "try:\n"
        f"    C.rms_norm_fwd({FAKE}, 0, {FAKE}, {FAKE}, 4, 64, 64, 64, 1e-6, 2, 2, 0)\n"
        "except RuntimeError as e:\n"
        "    print('RuntimeError:', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "RuntimeError: tokenforge._C.rms_norm_fwd: no CUDA device" in out.stdout


# ---------------------------------------------------------------------------------------------
# setup.py logic
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec,archs",
    [
        (None, [("80", False), ("90a", True)]),
        ("80;90a", [("80", False), ("90a", True)]),
        ("8.0;9.0a", [("80", False), ("90a", True)]),
        ("sm_90a sm_80", [("80", False), ("90a", True)]),
        ("90a+PTX", [("90a", True)]),
        ("80+PTX,86;90", [("80", True), ("86", False), ("90", True)]),
        ("10.0a;9.0", [("90", False), ("100a", True)]),
    ],
)
def test_arch_parsing(spec, archs):
    assert setup_py.parse_cuda_archs(spec) == archs


def test_gencode_flags_embed_portable_ptx():
    flags, names = setup_py.gencode_flags(setup_py.parse_cuda_archs("80;90a"))
    assert flags == ["-gencode", "arch=compute_80,code=sm_80",
                     "-gencode", "arch=compute_90a,code=sm_90a",
                     "-gencode", "arch=compute_90,code=compute_90"]
    assert names == ["sm_80", "sm_90a", "compute_90"]


@pytest.mark.parametrize("spec", ["ampere", "9.x", "sm_61", ""])
def test_bad_arch_specs(spec):
    if spec == "":
        assert setup_py.parse_cuda_archs(spec) == setup_py.parse_cuda_archs(None)
        return
    with pytest.raises(setup_py.ArchSpecError):
        setup_py.parse_cuda_archs(spec)


def test_version_is_parsed_without_import():
    import tokenforge

    assert setup_py.read_version() == tokenforge.__version__


def test_cutlass_headers_and_sm90_only_flags(monkeypatch, tmp_path):
    """csrc/*_sm90.cu builds for sm_90a alone with the CUTLASS headers; without sm_90a among the
    targets or without headers it builds the common way with no kernels (its launcher says why)."""
    monkeypatch.setenv("TOKENFORGE_CUTLASS_INCLUDE", str(tmp_path))
    where, why = setup_py.find_cutlass_include()
    assert where is None and "holds no cute/tensor.hpp" in why
    (tmp_path / "cute").mkdir()
    (tmp_path / "cute" / "tensor.hpp").write_text("")
    (tmp_path / "cutlass").mkdir()
    (tmp_path / "cutlass" / "cutlass.h").write_text("")
    assert setup_py.find_cutlass_include() == (str(tmp_path.resolve()), "TOKENFORGE_CUTLASS_INCLUDE")
    gencode, _ = setup_py.gencode_flags(setup_py.parse_cuda_archs("80;90a"))
    flags = setup_py.sm90_only_flags(gencode, "/cutlass")
    assert flags == ["-gencode", "arch=compute_90a,code=sm_90a", "-DTOKENFORGE_BUILD_SM90A",
                     "-DTOKENFORGE_HAVE_CUTLASS", "-I/cutlass"]
    assert setup_py.sm90_only_flags(gencode, None) == gencode
    sm80, _ = setup_py.gencode_flags(setup_py.parse_cuda_archs("80"))
    assert setup_py.sm90_only_flags(sm80, "/cutlass") == [*sm80, "-DTOKENFORGE_HAVE_CUTLASS"]
    assert setup_py.is_sm90_only(ROOT / "csrc" / "fp8_gemm_sm90.cu")
    assert not setup_py.is_sm90_only(ROOT / "csrc" / "rms_norm.cu")


def _run_build_ext(tmp_path, env_over):
    env = dict(os.environ)
    env.update(env_over)
    build_lib, build_temp = tmp_path / "lib", tmp_path / "temp"
    proc = subprocess.run(
        [sys.executable, "setup.py", "-q", "build_ext", "--build-lib", str(build_lib), "--build-temp", str(build_temp)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    record_path = build_lib / "tokenforge" / "_build_info.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else None
    so_files = list((build_lib / "tokenforge").glob("_C*.so")) if (build_lib / "tokenforge").is_dir() else []
    return proc, record, so_files


def test_build_skipped_with_env_0(tmp_path):
    proc, record, so_files = _run_build_ext(tmp_path, {"TOKENFORGE_BUILD_EXT": "0"})
    assert proc.returncode == 0, proc.stderr
    assert record == {**record, "extension_built": False, "reason": "TOKENFORGE_BUILD_EXT=0"}
    assert not so_files


def test_build_without_nvcc_warns_and_records_why(tmp_path):
    proc, record, so_files = _run_build_ext(
        tmp_path, {"TOKENFORGE_NVCC": "/nonexistent/nvcc", "TOKENFORGE_BUILD_EXT": ""})
    assert proc.returncode == 0, proc.stderr
    assert record["extension_built"] is False and record["nvcc"] is None
    assert "TOKENFORGE_NVCC=/nonexistent/nvcc is not an executable" in record["reason"]
    assert "not built" in proc.stderr and "WARNING" in proc.stderr
    assert not so_files


def test_build_required_without_nvcc_fails(tmp_path):
    proc, record, so_files = _run_build_ext(tmp_path, {"TOKENFORGE_NVCC": "/nonexistent/nvcc", "TOKENFORGE_BUILD_EXT": "1"})
    assert proc.returncode != 0
    assert "TOKENFORGE_BUILD_EXT=1 requires it" in proc.stderr + proc.stdout
    assert record is not None and record["extension_built"] is False


def test_bad_arch_spec_fails_soft_or_hard(tmp_path):
    if NVCC is None:
        pytest.skip("no nvcc")
    proc, record, _ = _run_build_ext(tmp_path, {"TOKENFORGE_CUDA_ARCHS": "ampere", "TOKENFORGE_BUILD_EXT": ""})
    assert proc.returncode == 0, proc.stderr
    assert record["extension_built"] is False and "cannot parse 'ampere'" in record["reason"]


# ---------------------------------------------------------------------------------------------
# Compile gate: sm_90a and sm_80, every kernel, no spills
# ---------------------------------------------------------------------------------------------

KERNEL_FILES = ["rms_norm.cu"]
GATE_ARCHS = ["90a", "80"]


def _ptxas_report(arch: str, source: str, tmp_path: Path) -> str:
    flags = [NVCC, "-cubin", "-gencode", f"arch=compute_{arch},code=sm_{arch}", "-O3", "-std=c++17",
             "-lineinfo", "-Xptxas", "-v", f"-I{ROOT / 'csrc'}", str(ROOT / "csrc" / source),
             "-o", str(tmp_path / f"{source}.{arch}.cubin")]
    proc = subprocess.run(flags, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"nvcc failed for sm_{arch}:\n{proc.stderr[-4000:]}"
    return proc.stdout + proc.stderr


def parse_ptxas(report: str) -> dict[str, dict[str, int]]:
    """{mangled kernel: {registers, stack, spill_stores, spill_loads}} from `ptxas -v` output."""
    kernels: dict[str, dict[str, int]] = {}
    current = None
    for line in report.splitlines():
        m = re.search(r"Compiling entry function '(\w+)'", line) or re.search(r"Function properties for (\w+)", line)
        if m:
            current = m.group(1)
            kernels.setdefault(current, {})
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and current:
            kernels[current].update(stack=int(m[1]), spill_stores=int(m[2]), spill_loads=int(m[3]))
        m = re.search(r"Used (\d+) registers", line)
        if m and current:
            kernels[current]["registers"] = int(m[1])
    return kernels


@pytest.mark.skipif(NVCC is None, reason="no nvcc on this machine")
@pytest.mark.parametrize("source", KERNEL_FILES)
def test_kernels_compile_without_spills(source, tmp_path):
    with ThreadPoolExecutor(max_workers=len(GATE_ARCHS)) as pool:
        reports = dict(zip(GATE_ARCHS, pool.map(lambda a: _ptxas_report(a, source, tmp_path), GATE_ARCHS)))
    for arch, report in reports.items():
        kernels = parse_ptxas(report)
        # 9 dtype pairs x {16-byte vector, scalar} for each of forward and backward.
        fwd = [k for k in kernels if "rms_norm_fwd_kernel" in k]
        bwd = [k for k in kernels if "rms_norm_bwd_kernel" in k]
        assert len(fwd) == 18 and len(bwd) == 18, (arch, sorted(kernels))
        bad = {k: v for k, v in kernels.items() if v.get("spill_stores", 0) or v.get("spill_loads", 0) or v.get("stack", 0)}
        assert not bad, f"sm_{arch}: register spills / stack use in {bad}"
        # __launch_bounds__ caps: forward 1024 threads (64 regs), backward 512 threads (128 regs).
        assert all(kernels[k]["registers"] <= 64 for k in fwd), {k: kernels[k] for k in fwd}
        assert all(kernels[k]["registers"] <= 128 for k in bwd), {k: kernels[k] for k in bwd}


# ---------------------------------------------------------------------------------------------
# The CUTLASS sm_90a FP8 GEMM (csrc/fp8_gemm_sm90.cu): in the build, and what its binary does
# ---------------------------------------------------------------------------------------------


def _cuobjdump() -> str | None:
    """cuobjdump: the one in the newest Triton wheel (it disassembles QGMMA), else PATH."""
    import triton

    cand = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(cand) if cand.is_file() else shutil.which("cuobjdump")


def _built_with_sm90a() -> bool:
    record = tf_cuda.read_build_info() or {}
    return tf_cuda.is_available() and "sm_90a" in record.get("cuda_archs", [])


# What each CUTLASS file must hold: (entry point reporting availability, kernel-name filter, count,
# SASS each kernel must contain). QGMMA is the FP8 (E4M3) form of HGMMA; UTMALDG / UTMASTG are TMA
# loads / stores; UTMACCTL re-points a TMA descriptor (the grouped kernel's per-expert operands);
# SYNCS.PHASECHK waits on an mbarrier (the producer / consumer pipeline).
CUTLASS_KERNELS = {
    "fp8_gemm_sm90": ("fp8_gemm_sm90_unavailable", r"GemmUniversal\w*E4M3", 4,
                      [r"QGMMA\.64x128x32\.F32\.E4M3\.E4M3", r"UTMALDG\.3D\.MULTICAST", "UTMASTG", "SYNCS.PHASECHK"]),
    "grouped_mm_sm90": ("grouped_mm_sm90_unavailable", r"GemmUniversal\w*GroupProblemShape", 3,
                        [r"HGMMA\.64x256x16\.F32\.BF16", "UTMALDG", "UTMASTG", "UTMACCTL", "SYNCS.PHASECHK"]),
    # CuTe, not a CUTLASS device GEMM: forward and backward at d64 and d128; the P V / dV / dK GEMMs
    # take one operand from registers (HGMMA ... R), which only wgmma's RS form does.
    "attention_sm90": ("attention_sm90_unavailable", r"attention_(?:fwd|bwd)_kernelILi", 4,
                       [r"HGMMA\.64x\d+x16\.F32\.BF16", r"HGMMA\.64x\d+x16\.F32\.BF16 R\d+, R\d+, gdesc", "UTMALDG",
                        "SYNCS.PHASECHK"]),
}


@pytest.mark.parametrize("source", sorted(CUTLASS_KERNELS))
def test_cutlass_kernels_are_in_the_build(source):
    """Where the extension was built for sm_90a, the CUTLASS headers were found (the Makefile and
    pyproject install nvidia-cutlass) and the kernels are in it: a silently missing kernel fails."""
    if not _built_with_sm90a():
        pytest.skip("tokenforge._C was not built for sm_90a here")
    record = tf_cuda.read_build_info()
    assert record.get("cutlass_include"), f"built without CUTLASS headers: {record.get('cutlass')}"
    assert getattr(_ext(), CUTLASS_KERNELS[source][0])() == ""


def _sass_functions(sass: str) -> dict[str, str]:
    """{mangled function: its SASS} from `cuobjdump -sass`."""
    parts = re.split(r"\n\s*Function : (\S+)\n", sass)
    return dict(zip(parts[1::2], parts[2::2]))


@pytest.fixture(scope="module")
def installed_binary():
    """(cuobjdump -lelf, -res-usage, -sass) of the installed tokenforge._C."""
    if not _built_with_sm90a():
        pytest.skip("tokenforge._C was not built for sm_90a here")
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump (the Triton wheel ships one)")
    so = str(Path(_ext().__file__))
    return tuple(subprocess.run([tool, flag, so], capture_output=True, text=True, timeout=300).stdout
                 for flag in ("-lelf", "-res-usage", "-sass"))


@pytest.mark.parametrize("source", sorted(CUTLASS_KERNELS))
def test_cutlass_binary_is_hopper_tma_and_wgmma(source, installed_binary):
    """The installed binary, read back: each CUTLASS file is compiled for sm_90a alone and holds its
    kernels (fp8: rowwise/blockwise x bf16/fp32 out; grouped: forward, dgrad, wgrad layouts), each
    with wgmma, TMA loads and stores, mbarrier pipelines, and no local memory or stack (no spills)."""
    available, pattern, count, features = CUTLASS_KERNELS[source]
    if getattr(_ext(), available)():
        pytest.skip(f"tokenforge._C has no {source} here (test_cutlass_kernels_are_in_the_build says why)")
    elves, usage, sass = installed_binary
    assert re.findall(rf"{source}\.(\w+)\.cubin", elves) == ["sm_90a"], elves
    resources = {name: line for name, line in re.findall(r"Function (\w+):\s*\n\s*(REG:.*)", usage)
                 if re.search(pattern, name)}
    assert len(resources) == count, sorted(resources)
    if source == "fp8_gemm_sm90":
        assert sum("BlockwiseFP8" in k for k in resources) == 2, sorted(resources)
    for name, line in resources.items():
        fields = dict(re.findall(r"(\w+(?:\[\d\])?):(\d+)", line))
        assert fields["LOCAL"] == "0" and fields["STACK"] == "0", (name, line)
        assert int(fields["REG"]) <= 168, (name, line)  # 3 warpgroups in 64K registers, setmaxnreg splits them
    functions = {k: v for k, v in _sass_functions(sass).items() if k in resources}
    assert len(functions) == count, sorted(functions)
    for name, body in functions.items():
        for feature in features:
            assert re.search(feature, body), (source, feature, name[:120])


# ---------------------------------------------------------------------------------------------
# On a GPU: the kernels against a float64 reference
# ---------------------------------------------------------------------------------------------


def reference(x, weight, dy, eps):
    """float64 RMSNorm forward and gradients, written out here so this file stands alone (the
    shared reference lives in tokenforge.ops.rms_norm)."""
    x64 = x.double()
    w64 = weight.double() if weight is not None else None
    rstd = torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps)
    xhat = x64 * rstd
    y = xhat * w64 if w64 is not None else xhat
    dy64 = dy.double()
    g = dy64 * w64 if w64 is not None else dy64
    dx = rstd * (g - xhat * (g * xhat).mean(-1, keepdim=True))
    dw = (dy64 * xhat).sum(0) if w64 is not None else None
    return y, rstd.squeeze(-1), dx, dw, rstd * g


def rel_err(out, ref, scale=None):
    out64, ref64 = out.double(), ref.double()
    if not torch.isfinite(out64).all():
        return float("inf")
    denom = (scale if scale is not None else ref64).norm().item()
    num = (out64 - ref64).norm().item()
    return num / denom if denom else (0.0 if num == 0 else float("inf"))


TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def _rows_view(rows, n, dtype, layout, gen):
    """(rows, n) tensor with unit column stride: contiguous, padded rows (strided, still 16-byte
    aligned), or shifted by one element (misaligned: the scalar path)."""
    if layout == "contiguous":
        return torch.randn(rows, n, device="cuda", dtype=dtype, generator=gen)
    if layout == "padded":
        return torch.randn(rows, n + 8, device="cuda", dtype=dtype, generator=gen)[:, :n]
    return torch.randn(rows, n + 3, device="cuda", dtype=dtype, generator=gen)[:, 1:n + 1]


def _check(x, w, dy, eps, y, rstd, dx, dw):
    y_ref, rstd_ref, dx_ref, dw_ref, cancel_scale = reference(x, w, dy, eps)
    tol = TOL[x.dtype]
    assert rel_err(y, y_ref) < tol, ("y", rel_err(y, y_ref))
    assert rel_err(rstd, rstd_ref) < 1e-5, ("rstd", rel_err(rstd, rstd_ref))
    # With n == 1, dx = rstd * g * eps / (x^2 + eps): the two terms of dx cancel almost exactly,
    # which no fp32 kernel can resolve relative to the tiny result. Measure the error against the
    # size of the terms that cancel instead.
    scale = cancel_scale if x.shape[1] == 1 else None
    assert rel_err(dx, dx_ref, scale) < tol, ("dx", rel_err(dx, dx_ref, scale))
    if w is not None:
        assert dw.dtype == w.dtype and dw.shape == w.shape
        # dw is stored in the weight's dtype: a 16-bit weight rounds it even when x is fp32.
        assert rel_err(dw, dw_ref) < max(tol, TOL[w.dtype]), ("dw", rel_err(dw, dw_ref))
    else:
        assert dw is None


DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@requires_cuda
@pytest.mark.parametrize("rows", [1, 3, 127, 129, 4096])
@pytest.mark.parametrize("n", [1, 17, 1000, 4096, 16384])
@pytest.mark.parametrize("x_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("w_kind", ["same", "fp32", "none"])
def test_launchers_match_float64_reference(rows, n, x_dtype, w_kind):
    if not tf_cuda.is_available():
        pytest.fail(f"CUDA GPU present but tokenforge._C is not available: {tf_cuda.extension_status()['reason']}")
    gen = torch.Generator(device="cuda").manual_seed(rows * 100003 + n)
    x = _rows_view(rows, n, x_dtype, "contiguous", gen)
    dy = _rows_view(rows, n, x_dtype, "contiguous", gen)
    w = None
    if w_kind != "none":
        w = (1 + 0.1 * torch.randn(n, device="cuda", generator=gen)).to(x_dtype if w_kind == "same" else torch.float32)
    eps = 1e-6
    y, rstd = cuda_rms_norm.rms_norm_forward(x, w, eps)
    dx, dw = cuda_rms_norm.rms_norm_backward(dy, x, w, rstd)
    assert y.dtype == x_dtype and y.is_contiguous() and rstd.dtype == torch.float32 and rstd.shape == (rows,)
    assert dx.dtype == x_dtype and dx.is_contiguous()
    _check(x, w, dy, eps, y, rstd, dx, dw)


@requires_cuda
@pytest.mark.parametrize("layout", ["padded", "shifted"])
@pytest.mark.parametrize("n", [17, 1000, 4096, 16384])
@pytest.mark.parametrize("x_dtype", DTYPES, ids=str)
def test_strided_and_misaligned_rows(layout, n, x_dtype):
    gen = torch.Generator(device="cuda").manual_seed(n)
    rows = 129
    x = _rows_view(rows, n, x_dtype, layout, gen)
    dy = _rows_view(rows, n, x_dtype, layout, gen)
    w = (1 + 0.1 * torch.randn(n, device="cuda", generator=gen)).to(x_dtype)
    y, rstd = cuda_rms_norm.rms_norm_forward(x, w, 1e-5)
    dx, dw = cuda_rms_norm.rms_norm_backward(dy, x, w, rstd)
    _check(x, w, dy, 1e-5, y, rstd, dx, dw)


@requires_cuda
@pytest.mark.parametrize("rows,n,x_dtype,w_dtype", [
    (3, 17, torch.bfloat16, torch.float32),      # scalar path, more partials than rows
    (129, 4096, torch.bfloat16, torch.bfloat16),  # vector path, cached rows, several rows per block
    (5, 40960, torch.float16, torch.float32),     # the largest n: uncached spans, 160 KB of smem
    (64, 24576, torch.float32, torch.float32),    # fp32 uncached backward
])
def test_raw_calls_write_every_output(rows, n, x_dtype, w_dtype):
    """Direct _C calls into NaN-filled outputs: every element of y, rstd, dx and every row of
    dw_partial (including rows of blocks that got no work) must be written."""
    C = _ext()
    gen = torch.Generator(device="cuda").manual_seed(7)
    x = torch.randn(rows, n, device="cuda", dtype=x_dtype, generator=gen)
    dy = torch.randn(rows, n, device="cuda", dtype=x_dtype, generator=gen)
    w = torch.randn(n, device="cuda", generator=gen).to(w_dtype)
    xc, wc = tf_cuda.dtype_code(x_dtype), tf_cuda.dtype_code(w_dtype)
    stream = tf_cuda.current_stream_handle(x)
    y = torch.full_like(x, float("nan"))
    rstd = torch.full((rows,), float("nan"), device="cuda")
    C.rms_norm_fwd(x.data_ptr(), w.data_ptr(), y.data_ptr(), rstd.data_ptr(), rows, n, n, n, 1e-6, xc, wc, stream)
    num_partials = C.rms_norm_bwd_num_partials(rows, n, xc, wc, True, torch.cuda.current_device()) + 5
    partial = torch.full((num_partials, n), float("nan"), device="cuda")
    dx = torch.full_like(x, float("nan"))
    C.rms_norm_bwd(dy.data_ptr(), x.data_ptr(), w.data_ptr(), rstd.data_ptr(), dx.data_ptr(), partial.data_ptr(),
                   rows, n, n, n, n, num_partials, xc, wc, stream)
    torch.cuda.synchronize()
    assert torch.isfinite(partial).all(), "some dw_partial rows were not written"
    _check(x, w, dy, 1e-6, y, rstd, dx, partial.sum(0).to(w_dtype))


@requires_cuda
def test_runs_on_the_callers_stream():
    x = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(4096, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn_like(x)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        y, rstd = cuda_rms_norm.rms_norm_forward(x, w, 1e-6)
        dx, dw = cuda_rms_norm.rms_norm_backward(dy, x, w, rstd)
    torch.cuda.current_stream().wait_stream(side)
    _check(x, w, dy, 1e-6, y, rstd, dx, dw)


@requires_cuda
def test_backward_is_deterministic():
    x = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(4096, device="cuda", dtype=torch.float32)
    dy = torch.randn_like(x)
    _, rstd = cuda_rms_norm.rms_norm_forward(x, w, 1e-6)
    first = cuda_rms_norm.rms_norm_backward(dy, x, w, rstd)
    for _ in range(3):
        again = cuda_rms_norm.rms_norm_backward(dy, x, w, rstd)
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


@requires_cuda
def test_max_n_on_this_gpu():
    C = _ext()
    dev = torch.cuda.current_device()
    limit = C.rms_norm_max_n(dev)
    assert 16384 <= limit <= C.rms_norm_max_n()
    assert cuda_rms_norm.supports(torch.empty(1, limit, device="cuda"), torch.ones(limit, device="cuda")) is None
