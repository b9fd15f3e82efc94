// Runtime and build information for tokenforge._C. Nothing here throws on a machine without a
// GPU or without a driver: these functions are how Python finds out why the GPU is unusable.
#include "common.cuh"
#include "tokenforge.h"

// setup.py writes tokenforge_build_config.h (gencode targets, package version) into its build
// directory; a hand-run nvcc (the compile gate in tests/) builds without it.
#if defined(__has_include)
#if __has_include("tokenforge_build_config.h")
#include "tokenforge_build_config.h"
#endif
#endif
#ifndef TOKENFORGE_CUDA_ARCHS
#define TOKENFORGE_CUDA_ARCHS ""
#endif
#ifndef TOKENFORGE_VERSION
#define TOKENFORGE_VERSION "unknown"
#endif

#define TF_STR2(x) #x
#define TF_STR(x) TF_STR2(x)

namespace tokenforge {

BuildInfo build_info() {
  BuildInfo info;
  info.cuda_version = std::to_string(CUDART_VERSION / 1000) + "." + std::to_string((CUDART_VERSION % 1000) / 10);
  info.nvcc_version = TF_STR(__CUDACC_VER_MAJOR__) "." TF_STR(__CUDACC_VER_MINOR__) "." TF_STR(__CUDACC_VER_BUILD__);
  const std::string archs = TOKENFORGE_CUDA_ARCHS;
  std::size_t start = 0;
  while (start < archs.size()) {
    std::size_t end = archs.find(';', start);
    if (end == std::string::npos) end = archs.size();
    if (end > start) info.archs.push_back(archs.substr(start, end - start));
    start = end + 1;
  }
  info.cudart = "static";
  info.version = TOKENFORGE_VERSION;
  return info;
}

int device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return count;
}

std::string device_error() { return describe_device_problem(); }

int driver_version() {
  int v = 0;
  if (cudaDriverGetVersion(&v) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return v;
}

}  // namespace tokenforge
