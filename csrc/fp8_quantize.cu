// FP8 quantization (rowwise and tensorwise) for tokenforge._C. Same rules, bit for bit, as
// kernels/fp8_quantize.py and tokenforge.fp8.quantize_reference:
//   scale = amax / FP8_MAX (IEEE div), FLT_MIN if it underflows, rounded up to a power of two on
//   request, 1 when amax == 0; nan in a group -> nan scale; data = satfinite_rne(x * (1 / scale)).
// Rowwise: one block per row, two sweeps (the second mostly from L2). Tensorwise: a grid-stride
// amax kernel writes one partial per block; the cast kernel reduces the partials itself (no host
// sync, no atomics, deterministic).
#include <cuda_fp8.h>

#include <cfloat>

#include "common.cuh"
#include "tokenforge.h"

namespace tokenforge {
namespace {

constexpr int kThreads = 256;

struct Fp8Format {
  float max_value;
  __nv_fp8_interpretation_t interp;
};

__device__ __forceinline__ float nan_max(float a, float b) {
  return (a != a || b != b) ? __int_as_float(0x7fc00000) : fmaxf(a, b);
}

__device__ __forceinline__ float block_nan_max(float v, float* scratch) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = nan_max(v, __shfl_xor_sync(0xffffffffu, v, off));
  if ((threadIdx.x & 31) == 0) scratch[threadIdx.x >> 5] = v;
  __syncthreads();
  float total = 0.f;
  for (int w = 0; w < (int)(blockDim.x >> 5); ++w) total = nan_max(total, scratch[w]);
  __syncthreads();
  return total;
}

__device__ __forceinline__ float scale_from_amax(float amax, float fp8_max, bool pow2) {
  float s = __fdiv_rn(amax, fp8_max);
  if (s < FLT_MIN) s = FLT_MIN;  // nan compares false and stays
  if (pow2) {
    int bits = __float_as_int(s);
    const int exp_bits = bits & 0x7F800000;
    if ((bits & 0x7FFFFF) != 0 && exp_bits != 0x7F800000) bits = exp_bits + 0x800000;
    s = __int_as_float(bits);
  }
  return amax == 0.f ? 1.f : s;
}

__device__ __forceinline__ __nv_fp8_storage_t encode(float x, float inv, Fp8Format f) {
  float y = x * inv;
  if (y > f.max_value) y = f.max_value;
  if (y < -f.max_value) y = -f.max_value;
  return __nv_cvt_float_to_fp8(y, __NV_SATFINITE, f.interp);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) quantize_rows_kernel(const T* __restrict__ x, __nv_fp8_storage_t* __restrict__ data,
                                                  float* __restrict__ scale, std::int64_t cols, std::int64_t stride,
                                                  Fp8Format f, bool pow2) {
  __shared__ float scratch[32];
  const std::int64_t row = blockIdx.x;
  const T* xr = x + row * stride;
  float amax = 0.f;
  for (std::int64_t c = threadIdx.x; c < cols; c += blockDim.x) amax = nan_max(amax, fabsf(to_float(xr[c])));
  amax = block_nan_max(amax, scratch);
  const float s = scale_from_amax(amax, f.max_value, pow2);
  const float inv = __frcp_rn(s);
  __nv_fp8_storage_t* dr = data + row * cols;
  for (std::int64_t c = threadIdx.x; c < cols; c += blockDim.x) dr[c] = encode(to_float(xr[c]), inv, f);
  if (threadIdx.x == 0) scale[row] = s;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) amax_partial_kernel(const T* __restrict__ x, float* __restrict__ partial,
                                                 std::int64_t rows, std::int64_t cols, std::int64_t stride) {
  __shared__ float scratch[32];
  float amax = 0.f;
  const std::int64_t n = rows * cols;
  for (std::int64_t i = blockIdx.x * (std::int64_t)blockDim.x + threadIdx.x; i < n;
       i += (std::int64_t)gridDim.x * blockDim.x) {
    amax = nan_max(amax, fabsf(to_float(x[(i / cols) * stride + i % cols])));
  }
  amax = block_nan_max(amax, scratch);
  if (threadIdx.x == 0) partial[blockIdx.x] = amax;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) quantize_tensor_kernel(const T* __restrict__ x, __nv_fp8_storage_t* __restrict__ data,
                                                    float* __restrict__ scale, const float* __restrict__ partial,
                                                    int num_partials, std::int64_t rows, std::int64_t cols,
                                                    std::int64_t stride, Fp8Format f, bool pow2) {
  __shared__ float scratch[32];
  float amax = 0.f;
  for (int p = threadIdx.x; p < num_partials; p += blockDim.x) amax = nan_max(amax, partial[p]);
  amax = block_nan_max(amax, scratch);
  const float s = scale_from_amax(amax, f.max_value, pow2);
  const float inv = __frcp_rn(s);
  const std::int64_t n = rows * cols;
  for (std::int64_t i = blockIdx.x * (std::int64_t)blockDim.x + threadIdx.x; i < n;
       i += (std::int64_t)gridDim.x * blockDim.x) {
    data[i] = encode(to_float(x[(i / cols) * stride + i % cols]), inv, f);
  }
  if (blockIdx.x == 0 && threadIdx.x == 0) *scale = s;
}

Fp8Format format_of(int code, const char* fn) {
  require_arg(code == 0 || code == 1, fn, "fp8 format must be 0 (e4m3fn) or 1 (e5m2)");
  return code == 0 ? Fp8Format{448.f, __NV_E4M3} : Fp8Format{57344.f, __NV_E5M2};
}

}  // namespace

void fp8_quantize_rows(std::uintptr_t x, std::uintptr_t data, std::uintptr_t scale, std::int64_t rows,
                       std::int64_t cols, std::int64_t x_row_stride, int x_dtype, int fp8_format,
                       bool power_of_two, std::uintptr_t stream) {
  const char* fn = "fp8_quantize_rows";
  require_arg(valid_dtype(x_dtype), fn, "x dtype must be float32, float16 or bfloat16");
  require_arg(rows >= 0 && cols >= 0 && x_row_stride >= cols, fn, "bad sizes or row stride");
  const Fp8Format f = format_of(fp8_format, fn);
  require_cuda_device(fn);
  if (rows == 0 || cols == 0) return;
  require_arg(rows < (1ll << 31), fn, "rows must be < 2^31");
  dispatch_dtype(x_dtype, [&](auto tag) {
    using T = decltype(tag);
    quantize_rows_kernel<T><<<(unsigned)rows, kThreads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
        reinterpret_cast<const T*>(x), reinterpret_cast<__nv_fp8_storage_t*>(data), reinterpret_cast<float*>(scale),
        cols, x_row_stride, f, power_of_two);
  });
  check_launch(fn);
}

int fp8_amax_num_partials(int device) {
  const char* fn = "fp8_amax_num_partials";
  require_cuda_device(fn);
  if (device < 0) device = current_device(fn);
  const int sms = device_attribute(cudaDevAttrMultiProcessorCount, device, fn);
  return sms * 4 < 1024 ? sms * 4 : 1024;
}

void fp8_quantize_tensor(std::uintptr_t x, std::uintptr_t data, std::uintptr_t scale, std::uintptr_t partial,
                         std::int64_t rows, std::int64_t cols, std::int64_t x_row_stride, int num_partials,
                         int x_dtype, int fp8_format, bool power_of_two, std::uintptr_t stream) {
  const char* fn = "fp8_quantize_tensor";
  require_arg(valid_dtype(x_dtype), fn, "x dtype must be float32, float16 or bfloat16");
  require_arg(rows >= 0 && cols >= 0 && x_row_stride >= cols, fn, "bad sizes or row stride");
  require_arg(num_partials >= 1 && num_partials <= 65535, fn, "num_partials must be in [1, 65535]");
  const Fp8Format f = format_of(fp8_format, fn);
  require_cuda_device(fn);
  if (rows == 0 || cols == 0) return;
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  const std::int64_t blocks = ceil_div(rows * cols, kThreads * 8);
  const unsigned cast_blocks = (unsigned)(blocks < 65535 * 16 ? blocks : 65535 * 16);
  dispatch_dtype(x_dtype, [&](auto tag) {
    using T = decltype(tag);
    amax_partial_kernel<T><<<num_partials, kThreads, 0, s>>>(reinterpret_cast<const T*>(x),
                                                            reinterpret_cast<float*>(partial), rows, cols, x_row_stride);
    quantize_tensor_kernel<T><<<cast_blocks, kThreads, 0, s>>>(
        reinterpret_cast<const T*>(x), reinterpret_cast<__nv_fp8_storage_t*>(data), reinterpret_cast<float*>(scale),
        reinterpret_cast<const float*>(partial), num_partials, rows, cols, x_row_stride, f, power_of_two);
  });
  check_launch(fn);
}

}  // namespace tokenforge
