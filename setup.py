"""Build script for tokenforge.

Pure-Python parts install as usual. The CUDA C++ extension ``tokenforge._C`` is built from csrc/
by a small ninja build (nvcc for the kernels, the host compiler for the pybind11 bindings, the CUDA
runtime linked statically, no libtorch; see DESIGN.md, "CUDA C++ extension").

Environment:
  TOKENFORGE_BUILD_EXT     unset: try, and on failure warn and install without the extension
                           0: skip the extension;  1: a missing nvcc or a failed build is an error
  TOKENFORGE_CUDA_ARCHS    target architectures, default "80;90a". Accepts "80;90a", "8.0;9.0a",
                           "sm_80 sm_90a", "90a+PTX". PTX of the highest one is always embedded.
  TOKENFORGE_NVCC          explicit nvcc (else CUDA_HOME, CUDA_PATH, /usr/local/cuda, PATH)
  TOKENFORGE_CUTLASS_INCLUDE  CUTLASS/CuTe headers (a folder holding cute/ and cutlass/) for the sm_90a
                           kernels in csrc/*_sm90.cu; else the nvidia-cutlass wheel's
                           cutlass_library/source/include, else $CUTLASS_PATH/include. Without them
                           those kernels are left out (their launchers say why) and the rest builds.
  TOKENFORGE_PTXAS_VERBOSE 1: print ptxas register/spill reports during the build
  TOKENFORGE_BUILD_JOBS    parallel compile jobs (default: CPU count; MAX_JOBS is honoured too)
  CXX, CUDAHOSTCXX         host compiler for the bindings / for nvcc's host side

Every build writes tokenforge/_build_info.json (next to where _C goes) saying whether the extension
was built and, if not, why; ``tokenforge info`` and ``tokenforge.cuda.extension_status()`` read it.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
EXT_NAME = "tokenforge._C"
BUILD_INFO_NAME = "_build_info.json"
DEFAULT_ARCHS = "80;90a"


# ---------------------------------------------------------------------------------------------
# Helpers (importable without running setup(): tests/test_extension.py uses them)
# ---------------------------------------------------------------------------------------------


def read_version() -> str:
    text = (ROOT / "pysrc" / "tokenforge" / "__init__.py").read_text(encoding="utf-8")
    m = re.search(r"""^__version__\s*=\s*["']([^"']+)["']""", text, re.MULTILINE)
    if not m:
        raise RuntimeError("could not find __version__ in pysrc/tokenforge/__init__.py")
    return m.group(1)


class ArchSpecError(ValueError):
    pass


def parse_cuda_archs(spec: str | None = None) -> list[tuple[str, bool]]:
    """Parse TOKENFORGE_CUDA_ARCHS into [(arch, want_ptx)], e.g. "8.0;9.0a+PTX" ->
    [("80", False), ("90a", True)], sorted by compute capability, duplicates merged. The highest
    arch always gets PTX so that newer GPUs can JIT-compile it."""
    spec = DEFAULT_ARCHS if spec is None or not spec.strip() else spec
    found: dict[str, bool] = {}
    for token in re.split(r"[;,\s]+", spec.strip()):
        if not token:
            continue
        t = token.strip().lower()
        ptx = False
        if t.endswith("+ptx"):
            ptx, t = True, t[: -len("+ptx")]
        for prefix in ("sm_", "compute_"):
            if t.startswith(prefix):
                t = t[len(prefix):]
        m = re.fullmatch(r"(\d+)(?:\.(\d))?([af]?)", t)
        if not m:
            raise ArchSpecError(
                f"TOKENFORGE_CUDA_ARCHS: cannot parse {token!r}; use forms like 80, 8.0, 90a, 9.0a, sm_90a or 90a+PTX"
            )
        major, minor, suffix = m.groups()
        arch = f"{major}{minor}{suffix}" if minor is not None else f"{major}{suffix}"
        if int(re.sub(r"\D", "", arch)) < 70:
            raise ArchSpecError(f"TOKENFORGE_CUDA_ARCHS: {token!r} is older than sm_70; the kernels need sm_70+")
        found[arch] = found.get(arch, False) or ptx
    if not found:
        raise ArchSpecError(f"TOKENFORGE_CUDA_ARCHS={spec!r} names no architecture")
    ordered = sorted(found.items(), key=lambda kv: (int(re.sub(r"\D", "", kv[0])), kv[0]))
    arch, _ = ordered[-1]
    ordered[-1] = (arch, True)
    return ordered


def gencode_flags(archs: list[tuple[str, bool]]) -> tuple[list[str], list[str]]:
    """nvcc -gencode flags and the matching target names ("sm_80", "compute_90" for PTX).

    PTX is emitted for the family-portable virtual arch (compute_90, not compute_90a): PTX of an
    arch-specific target ("a"/"f") only loads on that exact GPU generation, which defeats the
    point of embedding PTX for GPUs newer than the build knows about."""
    flags: list[str] = []
    names: list[str] = []
    for arch, ptx in archs:
        flags += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
        names.append(f"sm_{arch}")
        if ptx:
            base = arch.rstrip("af")
            flags += ["-gencode", f"arch=compute_{base},code=compute_{base}"]
            names.append(f"compute_{base}")
    return flags, names


def find_nvcc() -> tuple[str | None, str]:
    """(path to nvcc or None, where we looked / why not)."""
    explicit = os.environ.get("TOKENFORGE_NVCC")
    if explicit:
        if os.path.isfile(explicit) and os.access(explicit, os.X_OK):
            return explicit, "TOKENFORGE_NVCC"
        return None, f"TOKENFORGE_NVCC={explicit} is not an executable file"
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home:
            cand = Path(home) / "bin" / "nvcc"
            if cand.is_file() and os.access(cand, os.X_OK):
                return str(cand), var
    cand = Path("/usr/local/cuda/bin/nvcc")
    if cand.is_file() and os.access(cand, os.X_OK):
        return str(cand), "/usr/local/cuda"
    on_path = shutil.which("nvcc")
    if on_path:
        return on_path, "PATH"
    return None, "looked in CUDA_HOME, CUDA_PATH, /usr/local/cuda, PATH"


def nvcc_version(nvcc: str) -> str | None:
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"V(\d+\.\d+\.\d+)", out) or re.search(r"release (\d+\.\d+)", out)
    return m.group(1) if m else None


def cuda_lib_dir(nvcc: str) -> str | None:
    """Directory holding libcudart_static.a for this nvcc. nvcc may be a wrapper script (e.g.
    /usr/local/bin/nvcc), so ask it (--dryrun prints its library paths) before guessing."""
    candidates: list[Path] = []
    try:
        out = subprocess.run(
            [nvcc, "--dryrun", "-c", "tokenforge_probe.cu", "-o", "tokenforge_probe.o"],
            capture_output=True, text=True, timeout=60,
        )
        for line in (out.stdout + out.stderr).splitlines():
            if "LIBRARIES=" in line:
                for arg in shlex.split(line.split("LIBRARIES=", 1)[1]):
                    if arg.startswith("-L") and not arg.rstrip("/").endswith("stubs"):
                        candidates.append(Path(arg[2:]))
            m = re.match(r"#\$ TOP=(.*)$", line.strip())
            if m:
                top = Path(m.group(1).strip())
                candidates += [top / "lib64", top / "lib", top / "targets" / "x86_64-linux" / "lib"]
    except (OSError, subprocess.SubprocessError):
        pass
    home = Path(nvcc).resolve().parent.parent
    candidates += [home / "lib64", home / "lib", home / "targets" / "x86_64-linux" / "lib",
                   home / "targets" / "sbsa-linux" / "lib"]
    for c in candidates:
        if (c / "libcudart_static.a").is_file():
            return str(c.resolve())
    return None


def find_cutlass_include() -> tuple[str | None, str]:
    """(folder holding cute/ and cutlass/, where it came from) or (None, where we looked). The
    nvidia-cutlass wheel is found without importing it (its package imports cuda-python)."""
    def ok(path) -> bool:
        return path is not None and (Path(path) / "cute" / "tensor.hpp").is_file() and \
            (Path(path) / "cutlass" / "cutlass.h").is_file()

    explicit = os.environ.get("TOKENFORGE_CUTLASS_INCLUDE")
    if explicit:
        if ok(explicit):
            return str(Path(explicit).resolve()), "TOKENFORGE_CUTLASS_INCLUDE"
        return None, f"TOKENFORGE_CUTLASS_INCLUDE={explicit} holds no cute/tensor.hpp and cutlass/cutlass.h"
    import importlib.util

    try:
        spec = importlib.util.find_spec("cutlass_library")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            cand = Path(location) / "source" / "include"
            if ok(cand):
                return str(cand.resolve()), "the nvidia-cutlass wheel"
    home = os.environ.get("CUTLASS_PATH")
    if home and ok(Path(home) / "include"):
        return str((Path(home) / "include").resolve()), "CUTLASS_PATH"
    return None, ("no CUTLASS headers (pip install nvidia-cutlass, or set TOKENFORGE_CUTLASS_INCLUDE / "
                  "CUTLASS_PATH)")


def sm90_only_flags(gencode: list[str], cutlass_include: str | None) -> list[str]:
    """nvcc flags that replace the common gencode for a csrc/*_sm90.cu file: sm_90a alone (its
    CUTLASS kernels use wgmma/TMA, which exist on sm_90a only; compiling them for the other
    targets would only triple the build) with the headers, or, when sm_90a is not a target or the
    headers are missing, the common flags and no kernels (the file's launchers then say why)."""
    has_90a = any(flag == "arch=compute_90a,code=sm_90a" for flag in gencode)
    if has_90a and cutlass_include:
        return ["-gencode", "arch=compute_90a,code=sm_90a", "-DTOKENFORGE_BUILD_SM90A", "-DTOKENFORGE_HAVE_CUTLASS",
                f"-I{cutlass_include}"]
    return [*gencode, *(["-DTOKENFORGE_HAVE_CUTLASS"] if cutlass_include else [])]


def find_ninja() -> str | None:
    try:
        import ninja  # the PyPI package ships the binary

        cand = Path(ninja.BIN_DIR) / "ninja"
        if cand.is_file():
            return str(cand)
    except Exception:
        pass
    return shutil.which("ninja")


def _ninja_escape(path: str) -> str:
    return path.replace("$", "$$").replace(" ", "$ ").replace(":", "$:")


def _shell_join(args: list[str]) -> str:
    return " ".join(shlex.quote(a) for a in args)


def nvcc_compile_flags(gencode: list[str], extra_includes: list[str] = ()) -> list[str]:
    """Flags for every .cu file. No --use_fast_math: rstd and the reductions must match a float64
    reference to fp32 rounding (DESIGN.md, "Precision and numerics")."""
    flags = ["-O3", "-std=c++17", "-lineinfo", "-Xcompiler", "-fPIC", "-Xcompiler", "-fvisibility=hidden",
             *gencode, f"-I{CSRC}"]
    flags += [f"-I{d}" for d in extra_includes]
    if os.environ.get("TOKENFORGE_PTXAS_VERBOSE") == "1":
        flags += ["-Xptxas", "-v"]
    host = os.environ.get("CUDAHOSTCXX")
    if host:
        flags += ["-ccbin", host]
    return flags


def host_cxx() -> str:
    cxx = os.environ.get("CXX")
    if cxx:
        return cxx
    for name in ("c++", "g++", "clang++"):
        found = shutil.which(name)
        if found:
            return found
    return "c++"


class ExtensionBuildError(RuntimeError):
    pass


def build_cuda_extension(output: Path, build_temp: Path, nvcc: str, gencode: list[str],
                         target_names: list[str], version: str, cutlass_include: str | None = None) -> float:
    """Compile csrc/ into ``output`` (a Python extension module) with ninja; returns seconds."""
    import pybind11

    ninja = find_ninja()
    lib_dir = cuda_lib_dir(nvcc)
    if lib_dir is None:
        raise ExtensionBuildError(
            f"libcudart_static.a not found for {nvcc}; the CUDA toolkit looks incomplete (set CUDA_HOME)"
        )
    sources_cu = sorted(CSRC.glob("*.cu"))
    sources_cpp = sorted(CSRC.glob("*.cpp"))
    if not sources_cu or not sources_cpp:
        raise ExtensionBuildError(f"no CUDA/C++ sources found in {CSRC}")

    build_temp.mkdir(parents=True, exist_ok=True)
    output.parent.mkdir(parents=True, exist_ok=True)
    config_h = build_temp / "tokenforge_build_config.h"
    config_text = (
        "// Generated by setup.py; read by csrc/device.cu for tokenforge._C.build_info().\n"
        f'#define TOKENFORGE_CUDA_ARCHS "{";".join(target_names)}"\n'
        f'#define TOKENFORGE_VERSION "{version}"\n'
    )
    if not config_h.exists() or config_h.read_text() != config_text:
        config_h.write_text(config_text)

    py_includes = {sysconfig.get_paths()["include"], sysconfig.get_paths()["platinclude"]}
    cxx = host_cxx()
    cxx_flags = ["-O3", "-std=c++17", "-fPIC", "-fvisibility=hidden", "-Wall", f"-I{CSRC}",
                 f"-I{pybind11.get_include()}", *(f"-I{d}" for d in sorted(py_includes))]
    nv_flags = nvcc_compile_flags(gencode, [str(build_temp)])
    sm90_flags = nvcc_compile_flags(sm90_only_flags(gencode, cutlass_include), [str(build_temp)])
    # The CUDA runtime is linked statically (no libcudart.so needed at import, no clash with
    # torch's copy); --exclude-libs keeps its symbols out of our dynamic symbol table.
    ld_flags = [f"-L{lib_dir}", "-lcudart_static", "-lrt", "-lpthread", "-ldl", "-Wl,--exclude-libs,ALL"]

    jobs = os.environ.get("TOKENFORGE_BUILD_JOBS") or os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)

    lines = [
        "# Generated by tokenforge setup.py",
        "ninja_required_version = 1.3",
        f"nvcc = {nvcc}",
        f"cxx = {cxx}",
        f"nvcc_flags = {_shell_join(nv_flags)}",
        f"cxx_flags = {_shell_join(cxx_flags)}",
        f"ldflags = {_shell_join(ld_flags)}",
        "",
        "rule nvcc",
        "  command = $nvcc $nvcc_flags -MD -MF $out.d -c $in -o $out",
        "  depfile = $out.d",
        "  deps = gcc",
        "  description = NVCC $in",
        "",
        "rule cxx",
        "  command = $cxx $cxx_flags -MMD -MF $out.d -c $in -o $out",
        "  depfile = $out.d",
        "  deps = gcc",
        "  description = CXX $in",
        "",
        "rule link",
        "  command = $cxx -shared $in -o $out $ldflags",
        "  description = LINK $out",
        "",
    ]
    objects = []
    for src in sources_cu + sources_cpp:
        obj = build_temp / "obj" / (src.name + ".o")
        objects.append(obj)
        rule = "nvcc" if src.suffix == ".cu" else "cxx"
        lines.append(f"build {_ninja_escape(str(obj))}: {rule} {_ninja_escape(str(src))}")
        if is_sm90_only(src):
            lines.append(f"  nvcc_flags = {_shell_join(sm90_flags)}")
    lines.append(f"build {_ninja_escape(str(output))}: link {' '.join(_ninja_escape(str(o)) for o in objects)}")
    lines.append(f"default {_ninja_escape(str(output))}")
    (build_temp / "obj").mkdir(exist_ok=True)
    ninja_file = build_temp / "build.ninja"
    ninja_file.write_text("\n".join(lines) + "\n")

    start = time.monotonic()
    if ninja:
        cmd = [ninja, "-f", str(ninja_file), "-j", jobs]
        if os.environ.get("TOKENFORGE_PTXAS_VERBOSE") == "1":
            cmd.append("-v")
        result = subprocess.run(cmd, cwd=build_temp, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        log, ok = result.stdout, result.returncode == 0
    else:
        # No ninja at all: compile serially with the same commands.
        log, ok = "", True
        steps = [[nvcc, *(sm90_flags if is_sm90_only(s) else nv_flags), "-c", str(s), "-o", str(o)]
                 for s, o in zip(sources_cu, objects)]
        steps += [[cxx, *cxx_flags, "-c", str(s), "-o", str(o)]
                  for s, o in zip(sources_cpp, objects[len(sources_cu):])]
        steps.append([cxx, "-shared", *map(str, objects), "-o", str(output), *ld_flags])
        for step in steps:
            r = subprocess.run(step, cwd=build_temp, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            log += _shell_join(step) + "\n" + r.stdout
            if r.returncode != 0:
                ok = False
                break
    elapsed = time.monotonic() - start
    if log.strip():
        print(log, file=sys.stderr if not ok else sys.stdout)
    if not ok:
        raise ExtensionBuildError(_summarize_build_log(log))
    if not output.is_file():
        raise ExtensionBuildError(f"the build finished but {output} is missing")
    return elapsed


def is_sm90_only(src: Path) -> bool:
    """csrc/<name>_sm90.cu: Hopper-only CUTLASS kernels, compiled for sm_90a alone."""
    return src.suffix == ".cu" and src.stem.endswith("_sm90")


def _summarize_build_log(log: str, max_lines: int = 12) -> str:
    """The first failing step's output (not ninja's progress lines or the echoed command)."""
    lines = [ln for ln in log.splitlines() if ln.strip() and not re.match(r"\[\d+/\d+\] ", ln)
             and not ln.startswith("ninja: build stopped")]
    for i, ln in enumerate(lines):
        if ln.startswith("FAILED:"):
            return "build failed: " + "\n".join([ln] + lines[i + 2:i + 2 + max_lines])
    errors = [ln for ln in lines if re.search(r"\berror\b|fatal|undefined reference", ln, re.IGNORECASE)]
    return "build failed: " + "\n".join(errors[:max_lines] if errors else lines[-max_lines:])


# ---------------------------------------------------------------------------------------------
# setuptools glue
# ---------------------------------------------------------------------------------------------

if __name__ == "__main__":
    from setuptools import Extension, find_packages, setup
    from setuptools.command.build_ext import build_ext as _build_ext

    class CUDAExtension(Extension):
        """Marker: built by BuildExt with ninja, not by setuptools' compiler."""

    class BuildExt(_build_ext):
        def run(self):
            for ext in [e for e in self.extensions if isinstance(e, CUDAExtension)]:
                self._build_cuda(ext)
            super().run()

        def build_extension(self, ext):
            if isinstance(ext, CUDAExtension):
                return  # already built in run()
            super().build_extension(ext)

        # -- the CUDA extension ---------------------------------------------------------------
        def _build_cuda(self, ext: CUDAExtension) -> None:
            mode = os.environ.get("TOKENFORGE_BUILD_EXT", "").strip().lower()
            if mode not in ("", "auto", "0", "1"):
                print(f"WARNING: TOKENFORGE_BUILD_EXT={mode!r} is not 0, 1 or unset; treating it as unset",
                      file=sys.stderr)
                mode = ""
            required = mode == "1"
            info = {"extension_built": False, "reason": "", "nvcc": None, "nvcc_version": None,
                    "cuda_archs": [], "build_ext_env": os.environ.get("TOKENFORGE_BUILD_EXT"),
                    "cuda_archs_env": os.environ.get("TOKENFORGE_CUDA_ARCHS"),
                    "build_seconds": None}
            # Paths in the build tree; setuptools copies _C into the source tree for editable and
            # --inplace builds afterwards, and we write the build-info JSON to both places.
            saved_inplace, self.inplace = self.inplace, False
            try:
                output = Path(self.get_ext_fullpath(ext.name)).resolve()
            finally:
                self.inplace = saved_inplace
            # Absolute: ninja runs inside build_temp, and pip's non-editable builds use relative paths.
            build_temp = (Path(self.build_temp) / "tokenforge_cuda").resolve()

            try:
                if mode == "0":
                    info["reason"] = "TOKENFORGE_BUILD_EXT=0"
                    raise _Skip()
                if not sys.platform.startswith("linux"):
                    info["reason"] = f"the CUDA extension is built on Linux only (this is {sys.platform})"
                    raise _Skip()
                nvcc, where = find_nvcc()
                if nvcc is None:
                    info["reason"] = (f"nvcc not found ({where}); set CUDA_HOME or install the CUDA toolkit "
                                      "and reinstall")
                    raise _Skip()
                info["nvcc"] = nvcc
                info["nvcc_version"] = nvcc_version(nvcc)
                try:
                    gencode, names = gencode_flags(parse_cuda_archs(os.environ.get("TOKENFORGE_CUDA_ARCHS")))
                except ArchSpecError as exc:
                    info["reason"] = str(exc)
                    raise _Skip()
                info["cuda_archs"] = names
                cutlass_include, cutlass_where = find_cutlass_include()
                info["cutlass_include"] = cutlass_include
                info["cutlass"] = cutlass_where
                if cutlass_include is None:
                    print(f"WARNING: tokenforge: {cutlass_where}; building without the CUTLASS sm_90a kernels "
                          "(backend='cuda' FP8 GEMM)", file=sys.stderr, flush=True)
                print(f"tokenforge: building {ext.name} with {nvcc} (CUDA {info['nvcc_version']}) for "
                      f"{', '.join(names)}", flush=True)
                try:
                    info["build_seconds"] = round(
                        build_cuda_extension(output, build_temp, nvcc, gencode, names, read_version(),
                                             cutlass_include), 1)
                except ImportError as exc:
                    info["reason"] = f"pybind11 is not importable ({exc}); pip install pybind11"
                    raise _Skip()
                except (ExtensionBuildError, OSError) as exc:
                    info["reason"] = str(exc)
                    raise _Skip()
                info["extension_built"] = True
                info["reason"] = f"built in {info['build_seconds']} s"
            except _Skip:
                self.extensions.remove(ext)
                self._remove_stale(ext)
                message = f"tokenforge: CUDA extension {ext.name} not built: {info['reason']}"
                if required:
                    self._write_build_info(ext, info)
                    raise SystemExit(f"error: {message} (TOKENFORGE_BUILD_EXT=1 requires it)")
                if mode != "0":
                    print(f"WARNING: {message.rstrip('.')}. Installing without it; the Triton and torch "
                          "backends still work.", file=sys.stderr, flush=True)
            self._write_build_info(ext, info)

        def _package_dirs(self, ext) -> list[Path]:
            saved_inplace, self.inplace = self.inplace, False
            try:
                dirs = [Path(self.get_ext_fullpath(ext.name)).parent]
            finally:
                self.inplace = saved_inplace
            if self.inplace or getattr(self, "editable_mode", False):
                build_py = self.get_finalized_command("build_py")
                package = ".".join(self.get_ext_fullname(ext.name).split(".")[:-1])
                dirs.append(Path(build_py.get_package_dir(package)).resolve())
            return dirs

        def _write_build_info(self, ext, info: dict) -> None:
            text = json.dumps(info, indent=2, sort_keys=True) + "\n"
            for d in self._package_dirs(ext):
                d.mkdir(parents=True, exist_ok=True)
                (d / BUILD_INFO_NAME).write_text(text)

        def _remove_stale(self, ext) -> None:
            """A _C left by an earlier build would contradict the build info we write: in the build
            directory (a non-editable install of a tree that was built before packages whatever
            build/lib holds) and, for in-place builds, next to the sources."""
            saved_inplace, self.inplace = self.inplace, False
            try:
                stale = [Path(self.get_ext_fullpath(ext.name))]
            finally:
                self.inplace = saved_inplace
            if self.inplace or getattr(self, "editable_mode", False):
                build_py = self.get_finalized_command("build_py")
                fullname = self.get_ext_fullname(ext.name)
                package = ".".join(fullname.split(".")[:-1])
                stale.append(Path(build_py.get_package_dir(package)) / os.path.basename(self.get_ext_filename(fullname)))
            for path in stale:
                if path.is_file():
                    path.unlink()

    class _Skip(Exception):
        pass

    setup(
        name="tokenforge",
        version=read_version(),
        description="Fused Triton and CUDA C++ kernels for cheaper transformer training",
        long_description=(ROOT / "README.md").read_text(encoding="utf-8") if (ROOT / "README.md").is_file() else "",
        long_description_content_type="text/markdown",
        python_requires=">=3.10",
        install_requires=["torch>=2.4", "triton>=3.2; platform_system == 'Linux'", "numpy"],
        extras_require={
            # transformers: the Hugging Face patching tests (tokenforge.patch.TRANSFORMERS_TESTED);
            # accelerate: transformers.Trainer needs it (the Trainer client tests). The cap is the newest
            # release tested; 5.25+ imports Hugging Face's `kernels` package, which the checkout's own
            # kernels/ folder would shadow, so the tests keep the checkout root off sys.path
            # (tokenforge.testing.keep_checkout_off_sys_path). peft: patching a LoRA model (tests/test_patch_hf.py),
            # the newest release tested as the cap. deepspeed: the Trainer client under ZeRO-3 on 2 CPU
            # ranks (tests/test_run.py; pure Python on a machine without CUDA: no ops are built).
            # pytest-xdist: `make test` runs the suite on two workers (the Makefile's TEST_WORKERS).
            "test": ["pytest>=7", "pytest-benchmark>=4", "pytest-xdist>=3.2", "hypothesis>=6",
                     "transformers>=4.50,<5.26", "accelerate>=1.0", "peft>=0.13,<0.22", "deepspeed>=0.16,<0.20"],
            "hf": ["transformers>=4.50,<5.26"],
            "bench": ["pytest-benchmark>=4", "matplotlib"],
        },
        package_dir={"": "pysrc", "tokenforge.kernels": "kernels"},
        packages=sorted(set(find_packages("pysrc")) | {"tokenforge.kernels"}),
        ext_modules=[
            CUDAExtension(
                EXT_NAME,
                sources=[str(p.relative_to(ROOT)) for p in sorted(CSRC.glob("*.cu")) + sorted(CSRC.glob("*.cpp"))],
                depends=[str(p.relative_to(ROOT)) for p in sorted(CSRC.glob("*.h")) + sorted(CSRC.glob("*.cuh"))],
            )
        ],
        cmdclass={"build_ext": BuildExt},
        entry_points={"console_scripts": ["tokenforge = tokenforge.cli:main"]},
        zip_safe=False,
    )
