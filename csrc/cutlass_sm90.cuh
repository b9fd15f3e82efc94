// Shared by the CUTLASS kernel files csrc/*_sm90.cu: whether this build has them, and running a
// CUTLASS device-level GEMM with tokenforge's error conventions (see tokenforge.h).
//
// setup.py compiles a *_sm90.cu file for sm_90a alone, with -DTOKENFORGE_BUILD_SM90A and, when it
// found the CUTLASS headers, -DTOKENFORGE_HAVE_CUTLASS; without both the file builds its launchers
// only, and they refuse with cutlass_sm90_missing()'s sentence.
#pragma once

#include <string>

#include "common.cuh"

#if defined(TOKENFORGE_HAVE_CUTLASS) && defined(TOKENFORGE_BUILD_SM90A)
#define TOKENFORGE_CUTLASS_SM90 1
#include <cutlass/cutlass.h>
#endif

namespace tokenforge {

// "" when the CUTLASS kernels are in this build, else why not, naming `what`.
inline std::string cutlass_sm90_missing(const char* what) {
#if defined(TOKENFORGE_CUTLASS_SM90)
  (void)what;
  return "";
#elif !defined(TOKENFORGE_HAVE_CUTLASS)
  return std::string("this build of tokenforge._C has no ") + what +
         ": the CUTLASS headers (the nvidia-cutlass wheel) were not found at build time; pip install "
         "nvidia-cutlass and reinstall";
#else
  return std::string("this build of tokenforge._C has no ") + what +
         ": sm_90a was not among TOKENFORGE_CUDA_ARCHS at build time";
#endif
}

#if defined(TOKENFORGE_CUTLASS_SM90)
// can_implement, workspace check, initialize (builds the TMA descriptors on the host), launch.
template <class Gemm>
void run_cutlass(const typename Gemm::Arguments& args, std::uintptr_t workspace, std::int64_t workspace_bytes,
                 std::uintptr_t stream, const char* fn, const char* cannot) {
  Gemm gemm;
  require_arg(gemm.can_implement(args) == cutlass::Status::kSuccess, fn, cannot);
  const std::size_t need = Gemm::get_workspace_size(args);
  require_arg(std::int64_t(need) <= workspace_bytes, fn,
              "workspace too small: need " + std::to_string(need) + " bytes (ask the *_workspace_size entry point)");
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  cutlass::Status st = gemm.initialize(args, reinterpret_cast<void*>(workspace), s);
  if (st != cutlass::Status::kSuccess)
    throw std::runtime_error(std::string(fn) + ": CUTLASS initialize failed: " + cutlassGetStatusString(st));
  st = gemm.run(s);
  if (st != cutlass::Status::kSuccess)
    throw std::runtime_error(std::string(fn) + ": CUTLASS launch failed: " + cutlassGetStatusString(st));
  check_launch(fn);
}
#endif

}  // namespace tokenforge
