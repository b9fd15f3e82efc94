// Multi-tensor AdamW step for fp32 params, no libtorch (the CUDA C++ twin of kernels/adamw.py).
//
// Per element, torch.optim.AdamW's formulas in its order of operations:
//   g  = grad * grad_scale (fused clipping), negated with maximize
//   p  = p * (1 - lr * weight_decay)
//   m  = lerp(m, g, 1 - beta1)                 (torch's two-sided lerp)
//   v  = v * beta2 + (1 - beta2) * g * g
//   vm = max(vmax, v) with amsgrad, else v
//   p  = p - lr / (1 - beta1^t) * m / (sqrt(vm) / sqrt(1 - beta2^t) + eps)
//
// Multi-tensor apply: the launch gets the tables built by tokenforge.optim.multi_tensor, all in
// device memory so a step is launch-only (graph-capturable):
//   ptrs     int64 [7, n_tensors]  data_ptr of param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq,
//                                  step (float32 0-d), master (unused here) for each tensor
//   meta     int64 [2, n_tensors]  numel, key
//   blockmap int32 [2, n_blocks]   (tensor, chunk) of each CUDA block; a block updates elements
//                                  [chunk * chunk_size, min((chunk + 1) * chunk_size, numel))
//   hyper    float64 [5]           lr, beta1, beta2, eps, weight_decay (lr may have been written
//                                  there by a device copy: no host sync)
// The bias corrections are computed per block in double from the tensor's step, as torch does on
// the host in Python floats.
#include "common.cuh"
#include "tokenforge.h"

#include <string>

namespace tokenforge {
namespace {

constexpr int kThreads = 256;

struct AdamWScalars {
  float step_size, bc2_sqrt, decay, w, one_minus_w, one_minus_b2, beta2, eps;
};

__device__ __forceinline__ AdamWScalars adamw_scalars(const double* hyper, double step) {
  const double lr = hyper[0], beta1 = hyper[1], beta2 = hyper[2], eps = hyper[3], wd = hyper[4];
  AdamWScalars s;
  s.step_size = static_cast<float>(lr / (1.0 - pow(beta1, step)));
  s.bc2_sqrt = static_cast<float>(sqrt(1.0 - pow(beta2, step)));
  s.decay = static_cast<float>(1.0 - lr * wd);
  s.w = static_cast<float>(1.0 - beta1);
  s.one_minus_w = 1.0f - s.w;
  s.one_minus_b2 = static_cast<float>(1.0 - beta2);
  s.beta2 = static_cast<float>(beta2);
  s.eps = static_cast<float>(eps);
  return s;
}

template <bool AMSGRAD>
__device__ __forceinline__ void adamw_element(float& p, float g, float& m, float& v, float& vmax,
                                              const AdamWScalars& s) {
  p = p * s.decay;
  // torch's lerp: exact at both ends of the weight.
  m = s.w < 0.5f ? m + s.w * (g - m) : g - (g - m) * s.one_minus_w;
  v = v * s.beta2 + s.one_minus_b2 * g * g;
  float denom;
  if constexpr (AMSGRAD) {
    vmax = fmaxf(vmax, v);
    denom = sqrtf(vmax) / s.bc2_sqrt + s.eps;
  } else {
    denom = sqrtf(v) / s.bc2_sqrt + s.eps;
  }
  p = p - s.step_size * (m / denom);
}

// VEC: every pointer of the launch is 16-byte aligned and chunk_size % 4 == 0, so whole chunks
// move as float4 (LDG.128/STG.128); the last, partial chunk of a tensor runs the scalar loop.
template <bool AMSGRAD, bool MAXIMIZE, bool HAS_SCALE, bool VEC>
__global__ void __launch_bounds__(kThreads)
adamw_fp32_kernel(const std::int64_t* __restrict__ ptrs, const std::int64_t* __restrict__ meta,
                  const int* __restrict__ blockmap, const double* __restrict__ hyper,
                  const float* __restrict__ grad_scale, std::int64_t n_tensors, std::int64_t n_blocks,
                  std::int64_t chunk_size) {
  const std::int64_t b = blockIdx.x;
  const std::int64_t t = blockmap[b];
  const std::int64_t chunk = blockmap[n_blocks + b];
  const std::int64_t numel = meta[t];
  const std::int64_t start = chunk * chunk_size;
  const std::int64_t end = min(start + chunk_size, numel);

  float* p = reinterpret_cast<float*>(ptrs[0 * n_tensors + t]);
  const float* g = reinterpret_cast<const float*>(ptrs[1 * n_tensors + t]);
  float* m = reinterpret_cast<float*>(ptrs[2 * n_tensors + t]);
  float* v = reinterpret_cast<float*>(ptrs[3 * n_tensors + t]);
  float* vmax = reinterpret_cast<float*>(ptrs[4 * n_tensors + t]);
  const float* step = reinterpret_cast<const float*>(ptrs[5 * n_tensors + t]);

  const AdamWScalars s = adamw_scalars(hyper, static_cast<double>(*step));
  float scale = 1.0f;
  if constexpr (HAS_SCALE) scale = *grad_scale;
  if constexpr (MAXIMIZE) scale = -scale;

  if (VEC && end - start == chunk_size) {
    for (std::int64_t i = start / 4 + threadIdx.x; i < end / 4; i += kThreads) {
      float4 pv = reinterpret_cast<float4*>(p)[i];
      const float4 gv = reinterpret_cast<const float4*>(g)[i];
      float4 mv = reinterpret_cast<float4*>(m)[i];
      float4 vv = reinterpret_cast<float4*>(v)[i];
      float4 xv = make_float4(0.f, 0.f, 0.f, 0.f);
      if constexpr (AMSGRAD) xv = reinterpret_cast<float4*>(vmax)[i];
      adamw_element<AMSGRAD>(pv.x, gv.x * scale, mv.x, vv.x, xv.x, s);
      adamw_element<AMSGRAD>(pv.y, gv.y * scale, mv.y, vv.y, xv.y, s);
      adamw_element<AMSGRAD>(pv.z, gv.z * scale, mv.z, vv.z, xv.z, s);
      adamw_element<AMSGRAD>(pv.w, gv.w * scale, mv.w, vv.w, xv.w, s);
      reinterpret_cast<float4*>(p)[i] = pv;
      reinterpret_cast<float4*>(m)[i] = mv;
      reinterpret_cast<float4*>(v)[i] = vv;
      if constexpr (AMSGRAD) reinterpret_cast<float4*>(vmax)[i] = xv;
    }
    return;
  }
  for (std::int64_t i = start + threadIdx.x; i < end; i += kThreads) {
    float pi = p[i], mi = m[i], vi = v[i], xi = 0.f;
    if constexpr (AMSGRAD) xi = vmax[i];
    adamw_element<AMSGRAD>(pi, g[i] * scale, mi, vi, xi, s);
    p[i] = pi;
    m[i] = mi;
    v[i] = vi;
    if constexpr (AMSGRAD) vmax[i] = xi;
  }
}

template <bool AMSGRAD, bool MAXIMIZE, bool HAS_SCALE>
void launch_vec(bool vec, dim3 grid, cudaStream_t stream, const std::int64_t* ptrs,
                const std::int64_t* meta, const int* blockmap, const double* hyper,
                const float* scale, std::int64_t n_tensors, std::int64_t n_blocks,
                std::int64_t chunk) {
  if (vec) {
    adamw_fp32_kernel<AMSGRAD, MAXIMIZE, HAS_SCALE, true><<<grid, kThreads, 0, stream>>>(
        ptrs, meta, blockmap, hyper, scale, n_tensors, n_blocks, chunk);
  } else {
    adamw_fp32_kernel<AMSGRAD, MAXIMIZE, HAS_SCALE, false><<<grid, kThreads, 0, stream>>>(
        ptrs, meta, blockmap, hyper, scale, n_tensors, n_blocks, chunk);
  }
}

template <bool AMSGRAD, bool MAXIMIZE>
void launch_scale(bool has_scale, bool vec, dim3 grid, cudaStream_t stream,
                  const std::int64_t* ptrs, const std::int64_t* meta, const int* blockmap,
                  const double* hyper, const float* scale, std::int64_t n_tensors,
                  std::int64_t n_blocks, std::int64_t chunk) {
  if (has_scale) {
    launch_vec<AMSGRAD, MAXIMIZE, true>(vec, grid, stream, ptrs, meta, blockmap, hyper, scale,
                                        n_tensors, n_blocks, chunk);
  } else {
    launch_vec<AMSGRAD, MAXIMIZE, false>(vec, grid, stream, ptrs, meta, blockmap, hyper, scale,
                                         n_tensors, n_blocks, chunk);
  }
}

}  // namespace

void adamw_fp32_step(std::uintptr_t ptrs, std::uintptr_t meta, std::uintptr_t blockmap,
                     std::uintptr_t hyper, std::uintptr_t grad_scale, std::int64_t n_tensors,
                     std::int64_t n_blocks, std::int64_t chunk_size, bool amsgrad, bool maximize,
                     bool aligned, std::uintptr_t stream) {
  const char* fn = "adamw_fp32_step";
  require_arg(ptrs != 0 && meta != 0 && blockmap != 0 && hyper != 0, fn,
              "ptrs, meta, blockmap and hyper must be device pointers (got a null pointer)");
  require_arg(n_tensors >= 0 && n_blocks >= 0, fn, "n_tensors and n_blocks must be >= 0");
  require_arg(n_blocks < (std::int64_t(1) << 31), fn,
              "n_blocks must be < 2^31; use a larger chunk_size");
  require_arg(chunk_size > 0 && chunk_size % 4 == 0, fn,
              "chunk_size must be a positive multiple of 4, got " + std::to_string(chunk_size));
  require_cuda_device(fn);
  if (n_blocks == 0) return;
  const dim3 grid(static_cast<unsigned>(n_blocks));
  const auto s = reinterpret_cast<cudaStream_t>(stream);
  const auto* P = reinterpret_cast<const std::int64_t*>(ptrs);
  const auto* M = reinterpret_cast<const std::int64_t*>(meta);
  const auto* B = reinterpret_cast<const int*>(blockmap);
  const auto* H = reinterpret_cast<const double*>(hyper);
  const auto* S = reinterpret_cast<const float*>(grad_scale);
  const bool has_scale = grad_scale != 0;
  if (amsgrad) {
    if (maximize) launch_scale<true, true>(has_scale, aligned, grid, s, P, M, B, H, S, n_tensors, n_blocks, chunk_size);
    else launch_scale<true, false>(has_scale, aligned, grid, s, P, M, B, H, S, n_tensors, n_blocks, chunk_size);
  } else {
    if (maximize) launch_scale<false, true>(has_scale, aligned, grid, s, P, M, B, H, S, n_tensors, n_blocks, chunk_size);
    else launch_scale<false, false>(has_scale, aligned, grid, s, P, M, B, H, S, n_tensors, n_blocks, chunk_size);
  }
  check_launch(fn);
}

}  // namespace tokenforge
