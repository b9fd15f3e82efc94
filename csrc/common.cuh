// Shared helpers for the CUDA kernels of tokenforge._C: dtype plumbing, vector memory access,
// reductions, and the host-side checks every launcher runs before touching the GPU.
// Only CUDA toolkit headers: no libtorch (see DESIGN.md, "CUDA C++ extension").
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

namespace tokenforge {

// ---- dtype codes (must match pysrc/tokenforge/cuda/__init__.py::dtype_code) ---------------------
enum DTypeCode : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

inline bool valid_dtype(int code) { return code == kFloat32 || code == kFloat16 || code == kBFloat16; }

inline const char* dtype_name(int code) {
  switch (code) {
    case kFloat32: return "float32";
    case kFloat16: return "float16";
    case kBFloat16: return "bfloat16";
    default: return "invalid";
  }
}

// Calls f(T{}) with T the C++ type of a dtype code. The code is validated by the caller.
template <typename F>
inline void dispatch_dtype(int code, F&& f) {
  switch (code) {
    case kFloat32: f(float{}); break;
    case kFloat16: f(__half{}); break;
    default: f(__nv_bfloat16{}); break;
  }
}

// ---- host-side checks -----------------------------------------------------------------------
inline std::string cuda_error_string(cudaError_t e) {
  return std::string(cudaGetErrorName(e)) + ": " + cudaGetErrorString(e);
}

// Why cudaGetDeviceCount failed, in words a user can act on. Empty when a device is usable.
inline std::string describe_device_problem() {
  int count = 0;
  const cudaError_t e = cudaGetDeviceCount(&count);
  if (e == cudaSuccess && count > 0) return "";
  (void)cudaGetLastError();  // the failed query must not look like a launch error later
  if (e == cudaSuccess) return "cudaGetDeviceCount: 0 devices";
  std::string why = "cudaGetDeviceCount: " + cuda_error_string(e);
  if (e == cudaErrorInsufficientDriver) {
    int driver = 0;
    if (cudaDriverGetVersion(&driver) != cudaSuccess || driver == 0) {
      (void)cudaGetLastError();
      why += "; no NVIDIA driver was found (libcuda.so.1 is not loadable)";
    } else {
      why += "; the driver supports CUDA " + std::to_string(driver / 1000) + "." +
             std::to_string((driver % 1000) / 10) + " but the extension was built with CUDA " +
             std::to_string(CUDART_VERSION / 1000) + "." + std::to_string((CUDART_VERSION % 1000) / 10) +
             ": update the driver or rebuild with an older toolkit";
    }
  }
  return why;
}

// Every entry point calls this before its first launch so that a machine without a GPU (or
// without a driver) gets a Python RuntimeError that says what to do, never a crash.
inline void require_cuda_device(const char* fn) {
  const std::string why = describe_device_problem();
  if (!why.empty()) {
    throw std::runtime_error(std::string("tokenforge._C.") + fn +
                             ": no CUDA device is available (" + why +
                             "); use backend='triton' or 'torch'");
  }
}

inline void check_cuda(cudaError_t e, const char* fn, const char* what) {
  if (e != cudaSuccess) {
    (void)cudaGetLastError();
    throw std::runtime_error(std::string("tokenforge._C.") + fn + ": " + what + " failed (" +
                             cuda_error_string(e) + ")");
  }
}

// Launch errors (bad configuration, no kernel image for this GPU, ...) surface here; faults
// inside the kernel are asynchronous and surface at the caller's next synchronization.
inline void check_launch(const char* fn) {
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) {
    std::string msg = std::string("tokenforge._C.") + fn + ": kernel launch failed (" +
                      cuda_error_string(e) + ")";
    if (e == cudaErrorNoKernelImageForDevice || e == cudaErrorInvalidDeviceFunction ||
        e == cudaErrorUnsupportedPtxVersion) {
      msg += "; the extension was not built for this GPU: reinstall with "
             "TOKENFORGE_CUDA_ARCHS set to include its compute capability, or use "
             "backend='triton'";
    }
    throw std::runtime_error(msg);
  }
}

inline void require_arg(bool ok, const char* fn, const std::string& what) {
  if (!ok) throw std::invalid_argument(std::string("tokenforge._C.") + fn + ": " + what);
}

inline bool is_aligned(std::uintptr_t p, std::size_t bytes) { return p % bytes == 0; }

inline int current_device(const char* fn) {
  int dev = 0;
  check_cuda(cudaGetDevice(&dev), fn, "cudaGetDevice");
  return dev;
}

inline int device_attribute(cudaDeviceAttr attr, int dev, const char* fn) {
  int value = 0;
  check_cuda(cudaDeviceGetAttribute(&value, attr, dev), fn, "cudaDeviceGetAttribute");
  return value;
}

inline std::int64_t ceil_div(std::int64_t a, std::int64_t b) { return (a + b - 1) / b; }

inline int sm_count_of_current_device(const char* fn) {
  return device_attribute(cudaDevAttrMultiProcessorCount, current_device(fn), fn);
}

// The *_sm90.cu kernels are sm_90a machine code: they run on compute capability 9.0 only (H100,
// H200, GH200). `what` names the kernel in the error.
inline void require_sm90(const char* fn, const char* what) {
  const int dev = current_device(fn);
  const int major = device_attribute(cudaDevAttrComputeCapabilityMajor, dev, fn);
  const int minor = device_attribute(cudaDevAttrComputeCapabilityMinor, dev, fn);
  if (major != 9 || minor != 0)
    throw std::runtime_error(std::string(fn) + ": " + what + " is built for sm_90a (H100/H200); this GPU is sm_" +
                             std::to_string(major) + std::to_string(minor) + "; use backend='triton'");
}

// ---- device-side helpers --------------------------------------------------------------------
template <typename T> __device__ __forceinline__ float to_float(T v);
template <> __device__ __forceinline__ float to_float<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

// Round-to-nearest-even on every narrowing: the torch reference rounds the same way.
template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// N consecutive elements moved as one unit. The alignment is the access width the pointer must
// honour (at most 16 bytes: one LDG.128/STG.128 per 16 bytes); the launchers check it on the
// host and fall back to N == 1 when a pointer, a row stride or n does not allow it.
template <int BYTES> struct ChunkOf;
template <> struct ChunkOf<2> { using type = unsigned short; };
template <> struct ChunkOf<4> { using type = unsigned int; };
template <> struct ChunkOf<8> { using type = uint2; };
template <> struct ChunkOf<16> { using type = uint4; };

template <typename T, int N>
struct PackAlign {
  static constexpr int bytes = int(sizeof(T)) * N;
  static constexpr int value = bytes < 16 ? bytes : 16;
};

template <typename T, int N>
struct alignas(PackAlign<T, N>::value) Pack {
  T v[N];
};

template <typename T, int N>
__device__ __forceinline__ void load_pack(const T* p, Pack<T, N>& out) {
  if constexpr (N == 1) {
    out.v[0] = p[0];
    return;
  }
  using Chunk = typename ChunkOf<PackAlign<T, N>::value>::type;
  constexpr int kChunks = PackAlign<T, N>::bytes / PackAlign<T, N>::value;
  const Chunk* src = reinterpret_cast<const Chunk*>(p);
  Chunk* dst = reinterpret_cast<Chunk*>(&out);
#pragma unroll
  for (int k = 0; k < kChunks; ++k) dst[k] = src[k];
}

template <typename T, int N>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, N>& in) {
  if constexpr (N == 1) {
    p[0] = in.v[0];
    return;
  }
  using Chunk = typename ChunkOf<PackAlign<T, N>::value>::type;
  constexpr int kChunks = PackAlign<T, N>::bytes / PackAlign<T, N>::value;
  const Chunk* src = reinterpret_cast<const Chunk*>(&in);
  Chunk* dst = reinterpret_cast<Chunk*>(p);
#pragma unroll
  for (int k = 0; k < kChunks; ++k) dst[k] = src[k];
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sum of v over the threads of one row group: the blockDim.x threads sharing threadIdx.y,
// which are whole warps because blockDim.x is a multiple of 32. Every thread of the block must
// call it (it may hit a barrier) and every thread gets the total. `scratch` holds >= 32 floats;
// a caller that reduces again before another barrier must pass a different buffer.
__device__ __forceinline__ float row_group_sum(float v, float* scratch) {
  v = warp_sum(v);
  const int warps_per_row = blockDim.x >> 5;
  if (warps_per_row == 1) return v;
  const int base = threadIdx.y * warps_per_row;
  if ((threadIdx.x & 31) == 0) scratch[base + (threadIdx.x >> 5)] = v;
  __syncthreads();
  // Every thread adds the same values in the same order: a deterministic total, and no second
  // barrier to broadcast it.
  float total = 0.f;
  for (int k = 0; k < warps_per_row; ++k) total += scratch[base + k];
  return total;
}

}  // namespace tokenforge
