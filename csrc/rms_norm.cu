// RMSNorm forward and backward, no libtorch.
//
//   forward:  rstd = 1 / sqrt(mean(x^2) + eps)      (fp32, one per row)
//             y    = x * rstd * w                    (y in x's dtype)
//   backward: xhat = x * rstd, g = dy * w
//             dx   = rstd * (g - xhat * mean(g * xhat))
//             dw   = sum over rows of dy * xhat      (per-block partials; Python sums them)
//
// All arithmetic is fp32 whatever the storage dtype, and narrowing happens once, on the store.
//
// Layout and work split. A row is handled by a "row group" of blockDim.x threads (a multiple of
// 32, so groups are whole warps) and a block holds blockDim.y row groups. Thread t of a group
// owns vectors t, t + blockDim.x, ... of the row, so a warp touches consecutive 16-byte vectors:
// fully coalesced. Up to kVecPerThread vectors per thread stay in registers between the
// reduction and the normalization, so a row is read from DRAM once ("cached" rows: n <= 32768
// for 16-bit x and n <= 16384 for fp32 x in the forward; half that in the backward, whose row
// groups stop at 512 threads). Longer rows are processed in spans and re-read for the second
// pass (that re-read mostly hits L2).
#include "common.cuh"
#include "tokenforge.h"

#include <algorithm>
#include <climits>
#include <cmath>
#include <string>

namespace tokenforge {
namespace {

// 4 x 16 B per thread puts 64 B of loads in flight per thread (the lever for DRAM bandwidth on
// a memory-bound op) while the register cache stays at 16 registers.
constexpr int kVecPerThread = 4;
// The forward caches only x (~16 registers), so a 1024-thread row group fits the 64-register
// budget of __launch_bounds__(1024, 1).
constexpr int kFwdMaxThreads = 1024;
// The backward caches dy and x and accumulates dweight in registers (~70 registers before
// addressing), so its blocks stop at 512 threads (128 registers each).
constexpr int kBwdMaxThreads = 512;
// Both kernels say "at least 1 block per SM" explicitly: with a bare __launch_bounds__(N),
// ptxas 13 for sm_90 aimed at 2 resident blocks of N threads and spilled the fp32 scalar
// variants at 32 registers. tests/test_extension.py checks the ptxas report for spills.
// Short rows: pack several row groups per block so a block is never a lone warp.
constexpr int kFwdMinBlockThreads = 128;
constexpr int kBwdTargetBlockThreads = 256;
// The backward reduces dweight across the row groups of a block through n floats of shared
// memory. 40960 floats = 160 KiB fits the opt-in limit of sm_80 (163 KiB) and sm_90 (227 KiB).
constexpr int kMaxBwdN = 40960;
// Room for the static scratch arrays and the per-block reservation when checking the opt-in limit.
constexpr int kSmemReserve = 1024;
// Keeps every per-row index (span starts plus one span) inside int.
constexpr std::int64_t kMaxRowLength = std::int64_t(1) << 30;

struct LaunchConfig {
  int threads_per_row;  // blockDim.x
  int rows_per_block;   // blockDim.y
};

// Enough threads that each holds at most kVecPerThread vectors, rounded to whole warps.
int threads_per_row(std::int64_t nv, int max_threads) {
  const std::int64_t want = ceil_div(ceil_div(nv, kVecPerThread), 32) * 32;
  return static_cast<int>(std::min<std::int64_t>(std::max<std::int64_t>(want, 32), max_threads));
}

bool row_is_cached(std::int64_t nv, int tpr) { return nv <= std::int64_t(tpr) * kVecPerThread; }

LaunchConfig fwd_config(std::int64_t nv) {
  const int tpr = threads_per_row(nv, kFwdMaxThreads);
  return {tpr, tpr < kFwdMinBlockThreads ? kFwdMinBlockThreads / tpr : 1};
}

LaunchConfig bwd_config(std::int64_t nv) {
  const int tpr = threads_per_row(nv, kBwdMaxThreads);
  // Uncached rows accumulate dweight straight into shared memory, which only works when one
  // row group owns each column of it: one group per block.
  const int rpb = row_is_cached(nv, tpr) ? std::max(1, kBwdTargetBlockThreads / tpr) : 1;
  return {tpr, rpb};
}

// ---------------------------------------------------------------------------------------------
template <typename Tx, typename Tw, int VEC>
__global__ void __launch_bounds__(kFwdMaxThreads, 1)
rms_norm_fwd_kernel(const Tx* __restrict__ x, const Tw* __restrict__ w, Tx* __restrict__ y,
                    float* __restrict__ rstd_out, std::int64_t rows, int n,
                    std::int64_t x_stride, std::int64_t y_stride, float eps) {
  __shared__ float scratch[32];
  const int tpr = blockDim.x;
  const int nv = n / VEC;
  const int span = tpr * kVecPerThread;
  const bool cached = nv <= span;
  const std::int64_t row = std::int64_t(blockIdx.x) * blockDim.y + threadIdx.y;
  const bool valid = row < rows;
  const Tx* xr = x + (valid ? row : 0) * x_stride;

  Pack<Tx, VEC> xv[kVecPerThread];
  float sumsq = 0.f;
  if (valid) {
    for (int base = threadIdx.x; base < nv; base += span) {
      // All loads of the span are issued before the first use so they overlap in flight.
#pragma unroll
      for (int i = 0; i < kVecPerThread; ++i) {
        const int j = base + i * tpr;
        if (j < nv) load_pack(xr + std::int64_t(j) * VEC, xv[i]);
      }
#pragma unroll
      for (int i = 0; i < kVecPerThread; ++i) {
        if (base + i * tpr < nv) {
#pragma unroll
          for (int e = 0; e < VEC; ++e) {
            const float f = to_float(xv[i].v[e]);
            sumsq = fmaf(f, f, sumsq);
          }
        }
      }
    }
  }
  // Rows past the end still take part: the reduction may contain a barrier.
  const float total = row_group_sum(sumsq, scratch);
  // IEEE sqrt and division (no fast-math): rstd is saved for the backward and must match the
  // float64 reference to fp32 rounding.
  const float rstd = 1.0f / sqrtf(total / static_cast<float>(n) + eps);
  if (!valid) return;
  if (threadIdx.x == 0) rstd_out[row] = rstd;

  Tx* yr = y + row * y_stride;
  for (int base = threadIdx.x; base < nv; base += span) {
    if (!cached) {
#pragma unroll
      for (int i = 0; i < kVecPerThread; ++i) {
        const int j = base + i * tpr;
        if (j < nv) load_pack(xr + std::int64_t(j) * VEC, xv[i]);
      }
    }
#pragma unroll
    for (int i = 0; i < kVecPerThread; ++i) {
      const int j = base + i * tpr;
      if (j >= nv) continue;
      Pack<Tx, VEC> out;
      if (w != nullptr) {
        Pack<Tw, VEC> wv;
        load_pack(w + std::int64_t(j) * VEC, wv);
#pragma unroll
        for (int e = 0; e < VEC; ++e)
          out.v[e] = from_float<Tx>(to_float(xv[i].v[e]) * rstd * to_float(wv.v[e]));
      } else {
#pragma unroll
        for (int e = 0; e < VEC; ++e) out.v[e] = from_float<Tx>(to_float(xv[i].v[e]) * rstd);
      }
      store_pack(yr + std::int64_t(j) * VEC, out);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Persistent: gridDim.x == num_partials blocks walk the row groups, and block b writes row b of
// dw_partial. Cached rows keep each thread's dweight columns in registers across all its rows
// (a thread always owns the same columns), so the only shared-memory traffic for dweight is
// one reduction over the block's row groups at the end.
template <typename Tx, typename Tw, int VEC>
__global__ void __launch_bounds__(kBwdMaxThreads, 1)
rms_norm_bwd_kernel(const Tx* __restrict__ dy, const Tx* __restrict__ x,
                    const Tw* __restrict__ w, const float* __restrict__ rstd,
                    Tx* __restrict__ dx, float* __restrict__ dw_partial, std::int64_t rows,
                    int n, std::int64_t dy_stride, std::int64_t x_stride,
                    std::int64_t dx_stride) {
  extern __shared__ float4 dyn_smem[];  // float4: 16-byte aligned for vector access
  float* dw_smem = reinterpret_cast<float*>(dyn_smem);  // n floats when dw_partial != nullptr
  __shared__ float scratch[2][32];
  const int tpr = blockDim.x;
  const int rpb = blockDim.y;
  const int nv = n / VEC;
  const int span = tpr * kVecPerThread;
  const bool cached = nv <= span;  // the host guarantees rpb == 1 when not cached
  const bool want_dw = dw_partial != nullptr;

  float dw_acc[kVecPerThread][VEC];
#pragma unroll
  for (int i = 0; i < kVecPerThread; ++i)
#pragma unroll
    for (int e = 0; e < VEC; ++e) dw_acc[i][e] = 0.f;
  if (want_dw && !cached) {
    // Zeroed with the same thread-to-column map as the accumulation: no barrier needed.
    Pack<float, VEC> zero;
#pragma unroll
    for (int e = 0; e < VEC; ++e) zero.v[e] = 0.f;
    for (int j = threadIdx.x; j < nv; j += tpr) store_pack(dw_smem + std::int64_t(j) * VEC, zero);
  }

  Pack<Tx, VEC> dyv[kVecPerThread];
  Pack<Tx, VEC> xv[kVecPerThread];
  int parity = 0;
  // The trip count depends on blockIdx only, so every thread reaches every barrier.
  for (std::int64_t group = blockIdx.x; group * rpb < rows; group += gridDim.x) {
    const std::int64_t row = group * rpb + threadIdx.y;
    const bool valid = row < rows;
    const Tx* dyr = dy + (valid ? row : 0) * dy_stride;
    const Tx* xr = x + (valid ? row : 0) * x_stride;
    const float r = valid ? rstd[row] : 0.f;

    // Pass 1: sum(g * x), g = dy * w.
    float gx = 0.f;
    if (valid) {
      for (int base = threadIdx.x; base < nv; base += span) {
#pragma unroll
        for (int i = 0; i < kVecPerThread; ++i) {
          const int j = base + i * tpr;
          if (j < nv) {
            load_pack(dyr + std::int64_t(j) * VEC, dyv[i]);
            load_pack(xr + std::int64_t(j) * VEC, xv[i]);
          }
        }
#pragma unroll
        for (int i = 0; i < kVecPerThread; ++i) {
          const int j = base + i * tpr;
          if (j >= nv) continue;
          if (w != nullptr) {
            Pack<Tw, VEC> wv;
            load_pack(w + std::int64_t(j) * VEC, wv);
#pragma unroll
            for (int e = 0; e < VEC; ++e)
              gx = fmaf(to_float(dyv[i].v[e]) * to_float(wv.v[e]), to_float(xv[i].v[e]), gx);
          } else {
#pragma unroll
            for (int e = 0; e < VEC; ++e)
              gx = fmaf(to_float(dyv[i].v[e]), to_float(xv[i].v[e]), gx);
          }
        }
      }
    }
    // One barrier per iteration at most, so alternating two scratch buffers is race-free.
    const float sum_gx = row_group_sum(gx, scratch[parity]);
    parity ^= 1;
    if (!valid) continue;

    // mean(g * xhat) = rstd * sum(g * x) / n
    const float m = r * sum_gx / static_cast<float>(n);
    Tx* dxr = dx + row * dx_stride;
    // Pass 2: dx, and dweight += dy * xhat.
    for (int base = threadIdx.x; base < nv; base += span) {
      if (!cached) {
#pragma unroll
        for (int i = 0; i < kVecPerThread; ++i) {
          const int j = base + i * tpr;
          if (j < nv) {
            load_pack(dyr + std::int64_t(j) * VEC, dyv[i]);
            load_pack(xr + std::int64_t(j) * VEC, xv[i]);
          }
        }
      }
#pragma unroll
      for (int i = 0; i < kVecPerThread; ++i) {
        const int j = base + i * tpr;
        if (j >= nv) continue;
        Pack<Tw, VEC> wv;
        if (w != nullptr) load_pack(w + std::int64_t(j) * VEC, wv);
        Pack<float, VEC> acc;
        if (want_dw && !cached) load_pack(dw_smem + std::int64_t(j) * VEC, acc);
        Pack<Tx, VEC> out;
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          const float d = to_float(dyv[i].v[e]);
          const float xh = to_float(xv[i].v[e]) * r;
          const float g = w != nullptr ? d * to_float(wv.v[e]) : d;
          out.v[e] = from_float<Tx>(r * (g - xh * m));
          if (cached) {
            dw_acc[i][e] = fmaf(d, xh, dw_acc[i][e]);
          } else {
            acc.v[e] = fmaf(d, xh, acc.v[e]);
          }
        }
        store_pack(dxr + std::int64_t(j) * VEC, out);
        if (want_dw && !cached) store_pack(dw_smem + std::int64_t(j) * VEC, acc);
      }
    }
  }

  if (!want_dw) return;
  if (cached) {
    // Row groups add their register partials in turn; group 0 initializes, so columns of a
    // block that got no rows come out as zeros.
    for (int s = 0; s < rpb; ++s) {
      if (threadIdx.y == s) {
#pragma unroll
        for (int i = 0; i < kVecPerThread; ++i) {
          const int j = threadIdx.x + i * tpr;
          if (j >= nv) continue;
          Pack<float, VEC> acc;
          if (s == 0) {
#pragma unroll
            for (int e = 0; e < VEC; ++e) acc.v[e] = 0.f;
          } else {
            load_pack(dw_smem + std::int64_t(j) * VEC, acc);
          }
#pragma unroll
          for (int e = 0; e < VEC; ++e) acc.v[e] += dw_acc[i][e];
          store_pack(dw_smem + std::int64_t(j) * VEC, acc);
        }
      }
      __syncthreads();
    }
  } else {
    __syncthreads();
  }
  float* out = dw_partial + std::int64_t(blockIdx.x) * n;
  const int nthreads = tpr * rpb;
  for (int k = threadIdx.y * tpr + threadIdx.x; k < n; k += nthreads) out[k] = dw_smem[k];
}

// ---------------------------------------------------------------------------------------------
struct FwdArgs {
  std::uintptr_t x, w, y, rstd;
  std::int64_t rows, n, x_stride, y_stride;
  float eps;
  cudaStream_t stream;
};

struct BwdArgs {
  std::uintptr_t dy, x, w, rstd, dx, dw_partial;
  std::int64_t rows, n, dy_stride, x_stride, dx_stride, num_partials;
  cudaStream_t stream;
};

// 16-byte vectors of x (8 halves or 4 floats); the weight vector has the same element count.
template <typename Tx>
constexpr int vec_width() { return 16 / int(sizeof(Tx)); }

template <typename Tx, typename Tw, int VEC>
void launch_fwd(const FwdArgs& a) {
  const LaunchConfig c = fwd_config(a.n / VEC);
  const std::int64_t blocks = ceil_div(a.rows, c.rows_per_block);
  if (blocks > INT_MAX)
    throw std::invalid_argument("tokenforge._C.rms_norm_fwd: too many rows (" +
                                std::to_string(a.rows) + ") for one launch");
  const dim3 block(c.threads_per_row, c.rows_per_block);
  rms_norm_fwd_kernel<Tx, Tw, VEC><<<static_cast<unsigned>(blocks), block, 0, a.stream>>>(
      reinterpret_cast<const Tx*>(a.x), reinterpret_cast<const Tw*>(a.w),
      reinterpret_cast<Tx*>(a.y), reinterpret_cast<float*>(a.rstd), a.rows,
      static_cast<int>(a.n), a.x_stride, a.y_stride, a.eps);
  check_launch("rms_norm_fwd");
}

template <typename Tx, typename Tw>
void dispatch_fwd(const FwdArgs& a) {
  constexpr int V = vec_width<Tx>();
  const bool vec = a.n % V == 0 && is_aligned(a.x, 16) && is_aligned(a.y, 16) &&
                   (a.w == 0 || is_aligned(a.w, PackAlign<Tw, V>::value)) &&
                   (a.rows == 1 || (a.x_stride % V == 0 && a.y_stride % V == 0));
  if (vec) {
    launch_fwd<Tx, Tw, V>(a);
  } else {
    launch_fwd<Tx, Tw, 1>(a);
  }
}

// Raises the dynamic shared-memory limit of `kernel` when dweight needs more than the 48 KB
// default, or explains why this GPU cannot run this n.
template <typename Kernel>
void prepare_bwd_smem(Kernel kernel, std::size_t smem, std::int64_t n, const char* fn) {
  if (smem + kSmemReserve <= 48 * 1024) return;
  const int dev = current_device(fn);
  const int optin = device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, dev, fn);
  if (smem + kSmemReserve > static_cast<std::size_t>(optin)) {
    throw std::runtime_error(
        std::string("tokenforge._C.") + fn + ": n=" + std::to_string(n) + " needs " +
        std::to_string(smem) + " bytes of shared memory for dweight but device " +
        std::to_string(dev) + " allows " + std::to_string(optin) +
        " per block (rms_norm_max_n(" + std::to_string(dev) + ") = " +
        std::to_string((optin - kSmemReserve) / 4) + "); use backend='triton'");
  }
  check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                  static_cast<int>(smem)),
             fn, "cudaFuncSetAttribute(MaxDynamicSharedMemorySize)");
}

template <typename Tx, typename Tw, int VEC>
void launch_bwd(const BwdArgs& a) {
  const LaunchConfig c = bwd_config(a.n / VEC);
  const std::size_t smem = a.dw_partial ? std::size_t(a.n) * sizeof(float) : 0;
  auto kernel = rms_norm_bwd_kernel<Tx, Tw, VEC>;
  prepare_bwd_smem(kernel, smem, a.n, "rms_norm_bwd");
  const dim3 block(c.threads_per_row, c.rows_per_block);
  kernel<<<static_cast<unsigned>(a.num_partials), block, smem, a.stream>>>(
      reinterpret_cast<const Tx*>(a.dy), reinterpret_cast<const Tx*>(a.x),
      reinterpret_cast<const Tw*>(a.w), reinterpret_cast<const float*>(a.rstd),
      reinterpret_cast<Tx*>(a.dx), reinterpret_cast<float*>(a.dw_partial), a.rows,
      static_cast<int>(a.n), a.dy_stride, a.x_stride, a.dx_stride);
  check_launch("rms_norm_bwd");
}

template <typename Tx, typename Tw>
void dispatch_bwd(const BwdArgs& a) {
  constexpr int V = vec_width<Tx>();
  const bool vec = a.n % V == 0 && is_aligned(a.dy, 16) && is_aligned(a.x, 16) &&
                   is_aligned(a.dx, 16) &&
                   (a.w == 0 || is_aligned(a.w, PackAlign<Tw, V>::value)) &&
                   (a.rows == 1 ||
                    (a.dy_stride % V == 0 && a.x_stride % V == 0 && a.dx_stride % V == 0));
  if (vec) {
    launch_bwd<Tx, Tw, V>(a);
  } else {
    launch_bwd<Tx, Tw, 1>(a);
  }
}

template <typename Tx, typename Tw, int VEC>
std::int64_t bwd_num_partials(std::int64_t rows, std::int64_t n, bool has_weight, int dev) {
  const char* fn = "rms_norm_bwd_num_partials";
  const LaunchConfig c = bwd_config(n / VEC);
  const std::size_t smem = has_weight ? std::size_t(n) * sizeof(float) : 0;
  auto kernel = rms_norm_bwd_kernel<Tx, Tw, VEC>;
  prepare_bwd_smem(kernel, smem, n, fn);
  int blocks_per_sm = 0;
  check_cuda(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
                 &blocks_per_sm, kernel, c.threads_per_row * c.rows_per_block, smem),
             fn, "cudaOccupancyMaxActiveBlocksPerMultiprocessor");
  const int sms = device_attribute(cudaDevAttrMultiProcessorCount, dev, fn);
  const std::int64_t groups = ceil_div(rows, c.rows_per_block);
  return std::max<std::int64_t>(
      1, std::min<std::int64_t>(groups, std::int64_t(std::max(blocks_per_sm, 1)) * sms));
}

void check_dtypes(const char* fn, int x_dtype, int w_dtype) {
  require_arg(valid_dtype(x_dtype), fn,
              "x_dtype must be 0 (float32), 1 (float16) or 2 (bfloat16), got " +
                  std::to_string(x_dtype));
  require_arg(valid_dtype(w_dtype), fn,
              "w_dtype must be 0 (float32), 1 (float16) or 2 (bfloat16), got " +
                  std::to_string(w_dtype));
}

void check_shape(const char* fn, std::int64_t rows, std::int64_t n) {
  require_arg(rows >= 1, fn, "rows must be >= 1, got " + std::to_string(rows));
  require_arg(n >= 1, fn, "n must be >= 1, got " + std::to_string(n));
  require_arg(n <= kMaxRowLength, fn,
              "n=" + std::to_string(n) + " exceeds the supported row length " +
                  std::to_string(kMaxRowLength));
}

// An output whose rows overlap would be written by several blocks at once.
void check_out_stride(const char* fn, const char* name, std::int64_t stride, std::int64_t rows,
                      std::int64_t n) {
  require_arg(rows == 1 || stride >= n, fn,
              std::string(name) + " must be >= n (" + std::to_string(n) + ") so rows do not overlap, got " +
                  std::to_string(stride));
}

void check_in_stride(const char* fn, const char* name, std::int64_t stride) {
  require_arg(stride >= 0, fn, std::string(name) + " must be >= 0, got " + std::to_string(stride));
}

void check_ptr(const char* fn, const char* name, std::uintptr_t p) {
  require_arg(p != 0, fn, std::string(name) + " is null");
}

}  // namespace

int rms_norm_max_n(int device) {
  if (device < 0) return kMaxBwdN;
  const char* fn = "rms_norm_max_n";
  require_cuda_device(fn);
  const int optin = device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, device, fn);
  return std::min(kMaxBwdN, (optin - kSmemReserve) / int(sizeof(float)));
}

void rms_norm_fwd(std::uintptr_t x, std::uintptr_t w, std::uintptr_t y, std::uintptr_t rstd,
                  std::int64_t rows, std::int64_t n, std::int64_t x_row_stride,
                  std::int64_t y_row_stride, double eps, int x_dtype, int w_dtype,
                  std::uintptr_t stream) {
  const char* fn = "rms_norm_fwd";
  check_dtypes(fn, x_dtype, w_dtype);
  check_shape(fn, rows, n);
  check_ptr(fn, "x_ptr", x);
  check_ptr(fn, "y_ptr", y);
  check_ptr(fn, "rstd_ptr", rstd);
  check_in_stride(fn, "x_row_stride", x_row_stride);
  check_out_stride(fn, "y_row_stride", y_row_stride, rows, n);
  require_arg(std::isfinite(eps) && eps >= 0.0, fn,
              "eps must be finite and >= 0, got " + std::to_string(eps));
  require_cuda_device(fn);

  const FwdArgs a{x, w, y, rstd, rows, n, x_row_stride, y_row_stride, static_cast<float>(eps),
                  reinterpret_cast<cudaStream_t>(stream)};
  // Without a weight the weight type is irrelevant: reuse the x-typed instantiation.
  dispatch_dtype(x_dtype, [&](auto xt) {
    using Tx = decltype(xt);
    dispatch_dtype(w != 0 ? w_dtype : x_dtype, [&](auto wt) {
      using Tw = decltype(wt);
      dispatch_fwd<Tx, Tw>(a);
    });
  });
}

void rms_norm_bwd(std::uintptr_t dy, std::uintptr_t x, std::uintptr_t w, std::uintptr_t rstd,
                  std::uintptr_t dx, std::uintptr_t dw_partial, std::int64_t rows, std::int64_t n,
                  std::int64_t dy_row_stride, std::int64_t x_row_stride,
                  std::int64_t dx_row_stride, std::int64_t num_partials, int x_dtype,
                  int w_dtype, std::uintptr_t stream) {
  const char* fn = "rms_norm_bwd";
  check_dtypes(fn, x_dtype, w_dtype);
  check_shape(fn, rows, n);
  check_ptr(fn, "dy_ptr", dy);
  check_ptr(fn, "x_ptr", x);
  check_ptr(fn, "rstd_ptr", rstd);
  check_ptr(fn, "dx_ptr", dx);
  if (w != 0) {
    check_ptr(fn, "dw_partial_ptr (required when w_ptr is set)", dw_partial);
    require_arg(n <= kMaxBwdN, fn,
                "n=" + std::to_string(n) + " exceeds rms_norm_max_n() = " +
                    std::to_string(kMaxBwdN) + " for the backward with a weight");
  } else {
    require_arg(dw_partial == 0, fn, "dw_partial_ptr must be 0 when w_ptr is 0 (no weight)");
  }
  check_in_stride(fn, "dy_row_stride", dy_row_stride);
  check_in_stride(fn, "x_row_stride", x_row_stride);
  check_out_stride(fn, "dx_row_stride", dx_row_stride, rows, n);
  require_arg(num_partials >= 1 && num_partials <= INT_MAX, fn,
              "num_partials must be in [1, 2^31), got " + std::to_string(num_partials));
  require_cuda_device(fn);

  const BwdArgs a{dy, x, w, rstd, dx, dw_partial, rows, n, dy_row_stride, x_row_stride,
                  dx_row_stride, num_partials, reinterpret_cast<cudaStream_t>(stream)};
  dispatch_dtype(x_dtype, [&](auto xt) {
    using Tx = decltype(xt);
    dispatch_dtype(w != 0 ? w_dtype : x_dtype, [&](auto wt) {
      using Tw = decltype(wt);
      dispatch_bwd<Tx, Tw>(a);
    });
  });
}

std::int64_t rms_norm_bwd_num_partials(std::int64_t rows, std::int64_t n, int x_dtype,
                                       int w_dtype, bool has_weight, int device) {
  const char* fn = "rms_norm_bwd_num_partials";
  check_dtypes(fn, x_dtype, w_dtype);
  check_shape(fn, rows, n);
  if (has_weight)
    require_arg(n <= kMaxBwdN, fn,
                "n=" + std::to_string(n) + " exceeds rms_norm_max_n() = " + std::to_string(kMaxBwdN));
  require_cuda_device(fn);
  // The occupancy query runs on the current device; asking about another one would need a
  // device switch behind the caller's back.
  const int current = current_device(fn);
  require_arg(device < 0 || device == current, fn,
              "device " + std::to_string(device) + " is not the current device (" +
                  std::to_string(current) + "); call it under torch.cuda.device(...)");
  std::int64_t result = 1;
  dispatch_dtype(x_dtype, [&](auto xt) {
    using Tx = decltype(xt);
    dispatch_dtype(has_weight ? w_dtype : x_dtype, [&](auto wt) {
      using Tw = decltype(wt);
      constexpr int V = vec_width<Tx>();
      // Alignment is unknown here; n decides the path, which is what sizes the blocks.
      result = n % V == 0 ? bwd_num_partials<Tx, Tw, V>(rows, n, has_weight, current)
                          : bwd_num_partials<Tx, Tw, 1>(rows, n, has_weight, current);
    });
  });
  return result;
}

}  // namespace tokenforge
