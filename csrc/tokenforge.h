// Host API of tokenforge._C, shared by the nvcc-compiled kernel files and the host-compiled
// pybind11 bindings. Plain C++ on purpose: bindings.cpp must build without CUDA headers, and
// nothing here may mention libtorch (the extension never links it; see DESIGN.md).
//
// Conventions for every launcher:
//   * pointers are raw device addresses (Python ints); 0 means "absent" where allowed;
//   * sizes and strides are in elements; the last dimension is always contiguous;
//   * dtype codes: 0 = float32, 1 = float16, 2 = bfloat16;
//   * stream is the caller's cudaStream_t as an integer (torch's `cuda_stream`).
// Bad arguments throw std::invalid_argument (Python ValueError); a missing device, a failed
// launch or an unusable configuration throws std::runtime_error (Python RuntimeError).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace tokenforge {

// ---- runtime / build information (device.cu) -------------------------------------------------
struct BuildInfo {
  std::string cuda_version;       // CUDA runtime the extension was compiled against, "13.0"
  std::string nvcc_version;       // compiler that built the kernels, "13.0.88"
  std::vector<std::string> archs; // gencode targets: "sm_80", "sm_90a", "compute_90" (PTX)
  std::string cudart;             // "static"
  std::string version;            // tokenforge version at build time
};
BuildInfo build_info();

// Number of CUDA devices; 0 when there is no driver or no device (never throws).
int device_count();
// Empty when a device is usable, else a sentence saying why not (driver missing, no device, ...).
std::string device_error();
// Driver API version (e.g. 13000), 0 when no driver is installed.
int driver_version();

// ---- RMSNorm (rms_norm.cu) ------------------------------------------------------------------
// Largest n the backward accepts when it also computes dweight (the forward, and the backward
// without a weight, accept any n < 2^31). device < 0: the build-wide limit; device >= 0: the
// limit on that device, which is smaller on GPUs with < 160 KB of shared memory per block.
int rms_norm_max_n(int device);

void rms_norm_fwd(std::uintptr_t x, std::uintptr_t w, std::uintptr_t y, std::uintptr_t rstd,
                  std::int64_t rows, std::int64_t n, std::int64_t x_row_stride,
                  std::int64_t y_row_stride, double eps, int x_dtype, int w_dtype,
                  std::uintptr_t stream);

void rms_norm_bwd(std::uintptr_t dy, std::uintptr_t x, std::uintptr_t w, std::uintptr_t rstd,
                  std::uintptr_t dx, std::uintptr_t dw_partial, std::int64_t rows, std::int64_t n,
                  std::int64_t dy_row_stride, std::int64_t x_row_stride,
                  std::int64_t dx_row_stride, std::int64_t num_partials, int x_dtype,
                  int w_dtype, std::uintptr_t stream);

// Grid size for rms_norm_bwd that fills `device` with one wave of resident blocks (each block
// owns one row of dw_partial), capped by the number of row groups. Always >= 1.
std::int64_t rms_norm_bwd_num_partials(std::int64_t rows, std::int64_t n, int x_dtype,
                                       int w_dtype, bool has_weight, int device);

// ---- FP8 quantization (fp8_quantize.cu) -----------------------------------------------------
// fp8_format: 0 = float8_e4m3fn, 1 = float8_e5m2. data is contiguous (rows, cols) fp8 bytes;
// scale is float32 (rows,) for rowwise, one float for tensorwise (dequantization factors).
void fp8_quantize_rows(std::uintptr_t x, std::uintptr_t data, std::uintptr_t scale, std::int64_t rows,
                       std::int64_t cols, std::int64_t x_row_stride, int x_dtype, int fp8_format,
                       bool power_of_two, std::uintptr_t stream);
// Partials for fp8_quantize_tensor's amax pass on `device` (-1: current): 4 per SM, <= 1024.
int fp8_amax_num_partials(int device);
// partial: float32 scratch of num_partials elements.
void fp8_quantize_tensor(std::uintptr_t x, std::uintptr_t data, std::uintptr_t scale, std::uintptr_t partial,
                         std::int64_t rows, std::int64_t cols, std::int64_t x_row_stride, int num_partials,
                         int x_dtype, int fp8_format, bool power_of_two, std::uintptr_t stream);

// ---- FP8 GEMM for sm_90a on CUTLASS (fp8_gemm_sm90.cu) ---------------------------------------
// Empty when the CUTLASS kernels are in this build, else why not (no headers, no sm_90a target).
std::string fp8_gemm_sm90_unavailable();
// Bytes of scratch fp8_gemm_sm90 needs for this problem on the current device (often 0).
std::int64_t fp8_gemm_sm90_workspace_size(std::int64_t m, std::int64_t n, std::int64_t k, bool blockwise,
                                          int out_dtype);
// d (m, n) = a (m, k) @ b (n, k)^T with scales, + bias (n,) fp32 or 0. a, b: float8_e4m3fn, rows
// K-contiguous with strides lda, ldb; d: bfloat16 or float32 (out_dtype), row stride ldd.
// blockwise = false: scale_a fp32 (m,), scale_b fp32 (n,), applied in the epilogue.
// blockwise = true: scale_a fp32 (ceil(k/128), m), scale_b fp32 (ceil(k/128), n), applied to each
// 128-deep K block's partial product. k and n multiples of 16, 16-byte aligned pointers and rows.
void fp8_gemm_sm90(std::uintptr_t a, std::uintptr_t b, std::uintptr_t d, std::uintptr_t scale_a,
                   std::uintptr_t scale_b, std::uintptr_t bias, std::uintptr_t workspace,
                   std::int64_t workspace_bytes, std::int64_t m, std::int64_t n, std::int64_t k, std::int64_t lda,
                   std::int64_t ldb, std::int64_t ldd, bool blockwise, int out_dtype, std::uintptr_t stream);

// ---- Grouped GEMM for mixture-of-experts on sm_90a, CUTLASS (grouped_mm_sm90.cu) --------------
// Empty when the CUTLASS kernels are in this build, else why not.
std::string grouped_mm_sm90_unavailable();
// Bytes of device workspace grouped_mm_sm90 needs (its per-expert tables + CUTLASS's own).
std::int64_t grouped_mm_sm90_workspace_size(std::int64_t experts, int kind, bool b_k_major);
// bf16, offs int32 (experts,) cumulative row ends on the device (clamped, never trusted).
// kind 0: out (tokens, n) = a (tokens, k) @ b[e] per expert's rows; b[e] (k, n) at b + e*stride_be
//         with strides (ldb_k, ldb_n), one of them 1 (b^T views for dgrad take the K-major kernel).
// kind 1: out = db (experts, k, n) contiguous, db[e] = a[rows]^T @ b[rows] with b = dout (tokens, n)
//         of row stride ldo; experts with no rows get zeros.
void grouped_mm_sm90(std::uintptr_t a, std::uintptr_t b, std::uintptr_t out, std::uintptr_t offs,
                     std::uintptr_t workspace, std::int64_t workspace_bytes, std::int64_t experts,
                     std::int64_t tokens, std::int64_t n, std::int64_t k, std::int64_t lda, std::int64_t ldb_k,
                     std::int64_t ldb_n, std::int64_t stride_be, std::int64_t ldo, int kind, std::uintptr_t stream);

// ---- Attention on sm_90a, CuTe FA3-style (attention_sm90.cu) ----------------------------------
// Empty when the CUDA C++ attention is in this build, else why not.
std::string attention_sm90_unavailable();
// bf16, head_dim 64 or 128 with unit stride. sizes = (batch, seqlen_q, seqlen_k, max_seqlen_q,
// max_seqlen_k, heads, heads_kv, head_dim); strides (elements) = q, k, v, out as (batch, row, head)
// then lse as (batch, head). Dense: q (batch, seqlen_q, heads, d), lse (batch, heads, seqlen_q).
// Varlen (cu_q, cu_k int32 (batch + 1,) on the device, clamped): seqlen_* are the packed totals,
// batch strides are ignored, lse is (heads, total_q). Window (left, right), -1 unbounded, bottom-right
// aligned (causal = (-1, 0)). Rows that see no key: out 0, lse +inf.
void attention_sm90_forward(std::uintptr_t q, std::uintptr_t k, std::uintptr_t v, std::uintptr_t o,
                            std::uintptr_t lse, std::uintptr_t cu_q, std::uintptr_t cu_k,
                            const std::vector<std::int64_t>& sizes, const std::vector<std::int64_t>& strides,
                            double scale, std::int64_t left, std::int64_t right, std::uintptr_t stream);
// The backward of the same call: dq (contiguous like q), dk, dv written (grad_strides = dout, dk,
// dv as (batch, row, head)); dq_accum fp32 (rows, heads, head_dim) and delta fp32 (lse's layout)
// are scratch. dq accumulates with fp32 atomics: not bitwise deterministic.
void attention_sm90_backward(std::uintptr_t dout, std::uintptr_t q, std::uintptr_t k, std::uintptr_t v,
                             std::uintptr_t o, std::uintptr_t lse, std::uintptr_t cu_q, std::uintptr_t cu_k,
                             std::uintptr_t dq, std::uintptr_t dk, std::uintptr_t dv, std::uintptr_t dq_accum,
                             std::uintptr_t delta, const std::vector<std::int64_t>& sizes,
                             const std::vector<std::int64_t>& strides, const std::vector<std::int64_t>& grad_strides,
                             double scale, std::int64_t left, std::int64_t right, std::uintptr_t stream);

// ---- AdamW (adamw.cu) -----------------------------------------------------------------------
// One multi-tensor AdamW step over fp32 params from the device tables built by
// tokenforge.optim.multi_tensor (ptrs int64 [7, n_tensors], meta int64 [2, n_tensors], blockmap
// int32 [2, n_blocks], hyper float64 [5] = lr, beta1, beta2, eps, weight_decay; grad_scale: fp32
// 0-d or 0 for none). aligned: every table pointer is 16-byte aligned (float4 accesses).
void adamw_fp32_step(std::uintptr_t ptrs, std::uintptr_t meta, std::uintptr_t blockmap,
                     std::uintptr_t hyper, std::uintptr_t grad_scale, std::int64_t n_tensors,
                     std::int64_t n_blocks, std::int64_t chunk_size, bool amsgrad, bool maximize,
                     bool aligned, std::uintptr_t stream);

}  // namespace tokenforge
