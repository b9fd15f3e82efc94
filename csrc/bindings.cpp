// pybind11 module tokenforge._C. Compiled by the host compiler with no CUDA or libtorch
// headers: every CUDA call lives behind csrc/tokenforge.h in the nvcc-compiled files.
// pybind11 turns std::invalid_argument into ValueError and std::runtime_error into RuntimeError.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "tokenforge.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() =
      "tokenforge CUDA C++ kernels (no libtorch). Functions take raw device pointers as ints, "
      "sizes and row strides in elements, dtype codes (0=float32, 1=float16, 2=bfloat16) and "
      "the caller's CUDA stream as an int. Use the wrappers in tokenforge.cuda, which check "
      "tensors before passing their pointers.";

  m.def(
      "build_info",
      []() {
        const tokenforge::BuildInfo info = tokenforge::build_info();
        py::dict d;
        d["cuda_version"] = info.cuda_version;
        d["nvcc_version"] = info.nvcc_version;
        d["archs"] = info.archs;
        d["cudart"] = info.cudart;
        d["version"] = info.version;
        d["rms_norm_max_n"] = tokenforge::rms_norm_max_n(-1);
        return d;
      },
      "Build facts: CUDA version compiled against, nvcc version, gencode targets, cudart "
      "linkage, package version, rms_norm backward max n.");

  m.def("device_count", &tokenforge::device_count,
        "Number of visible CUDA devices (0 without a driver or device; never raises).");
  m.def("device_error", &tokenforge::device_error,
        "Empty string when a CUDA device is usable, else why not.");
  m.def("driver_version", &tokenforge::driver_version,
        "CUDA driver API version (e.g. 13000), 0 without a driver.");

  m.def("rms_norm_max_n", &tokenforge::rms_norm_max_n, py::arg("device") = -1,
        "Largest n rms_norm_bwd accepts with a weight: build-wide for device=-1, else for "
        "that device (smaller on GPUs with less shared memory per block).");

  m.def("rms_norm_fwd", &tokenforge::rms_norm_fwd, py::arg("x_ptr"), py::arg("w_ptr"),
        py::arg("y_ptr"), py::arg("rstd_ptr"), py::arg("rows"), py::arg("n"),
        py::arg("x_row_stride"), py::arg("y_row_stride"), py::arg("eps"), py::arg("x_dtype"),
        py::arg("w_dtype"), py::arg("stream"),
        "y = x * rstd * w with rstd = 1/sqrt(mean(x^2) + eps) per row, in fp32. y has x's "
        "dtype; rstd is float32 [rows]; w_ptr == 0 means no weight. Columns contiguous.");

  m.def("rms_norm_bwd", &tokenforge::rms_norm_bwd, py::arg("dy_ptr"), py::arg("x_ptr"),
        py::arg("w_ptr"), py::arg("rstd_ptr"), py::arg("dx_ptr"), py::arg("dw_partial_ptr"),
        py::arg("rows"), py::arg("n"), py::arg("dy_row_stride"), py::arg("x_row_stride"),
        py::arg("dx_row_stride"), py::arg("num_partials"), py::arg("x_dtype"),
        py::arg("w_dtype"), py::arg("stream"),
        "dx = rstd * (g - xhat * mean(g * xhat)), g = dy * w, xhat = x * rstd (dx in x's "
        "dtype). With a weight, writes every row of dw_partial: float32 [num_partials, n] "
        "(sum over dim 0 gives dweight). num_partials is also the grid size.");

  m.def("rms_norm_bwd_num_partials", &tokenforge::rms_norm_bwd_num_partials, py::arg("rows"),
        py::arg("n"), py::arg("x_dtype"), py::arg("w_dtype"), py::arg("has_weight") = true,
        py::arg("device") = -1,
        "num_partials that fills the current device with one wave of backward blocks.");
  m.def("fp8_quantize_rows", &tokenforge::fp8_quantize_rows, py::arg("x_ptr"), py::arg("data_ptr"),
        py::arg("scale_ptr"), py::arg("rows"), py::arg("cols"), py::arg("x_row_stride"), py::arg("x_dtype"),
        py::arg("fp8_format"), py::arg("power_of_two"), py::arg("stream"),
        "Rowwise fp8 quantization: scale[r] = amax(row)/FP8_MAX (dequant factor), data = satfinite(x/scale).");
  m.def("fp8_amax_num_partials", &tokenforge::fp8_amax_num_partials, py::arg("device") = -1,
        "Scratch size (floats) for fp8_quantize_tensor.");
  m.def("fp8_quantize_tensor", &tokenforge::fp8_quantize_tensor, py::arg("x_ptr"), py::arg("data_ptr"),
        py::arg("scale_ptr"), py::arg("partial_ptr"), py::arg("rows"), py::arg("cols"), py::arg("x_row_stride"),
        py::arg("num_partials"), py::arg("x_dtype"), py::arg("fp8_format"), py::arg("power_of_two"),
        py::arg("stream"), "Tensorwise fp8 quantization: amax pass + cast pass, no host sync.");
  m.def("fp8_gemm_sm90_unavailable", &tokenforge::fp8_gemm_sm90_unavailable,
        "Empty when the CUTLASS sm_90a FP8 GEMM is in this build, else why not.");
  m.def("fp8_gemm_sm90_workspace_size", &tokenforge::fp8_gemm_sm90_workspace_size, py::arg("m"), py::arg("n"),
        py::arg("k"), py::arg("blockwise"), py::arg("out_dtype"),
        "Scratch bytes fp8_gemm_sm90 needs for this problem on the current device.");
  m.def("fp8_gemm_sm90", &tokenforge::fp8_gemm_sm90, py::arg("a_ptr"), py::arg("b_ptr"), py::arg("d_ptr"),
        py::arg("scale_a_ptr"), py::arg("scale_b_ptr"), py::arg("bias_ptr"), py::arg("workspace_ptr"),
        py::arg("workspace_bytes"), py::arg("m"), py::arg("n"), py::arg("k"), py::arg("lda"), py::arg("ldb"),
        py::arg("ldd"), py::arg("blockwise"), py::arg("out_dtype"), py::arg("stream"),
        "d = (a @ b^T) * scales + bias on sm_90a (CUTLASS, TMA + wgmma, warp-specialized persistent): "
        "a (m, k), b (n, k) e4m3 K-major; rowwise scales (m,), (n,) or blockwise (kb, m), (kb, n).");
  m.def("grouped_mm_sm90_unavailable", &tokenforge::grouped_mm_sm90_unavailable,
        "Empty when the CUTLASS sm_90a grouped GEMM is in this build, else why not.");
  m.def("grouped_mm_sm90_workspace_size", &tokenforge::grouped_mm_sm90_workspace_size, py::arg("experts"),
        py::arg("kind"), py::arg("b_k_major"), "Workspace bytes grouped_mm_sm90 needs on the current device.");
  m.def("grouped_mm_sm90", &tokenforge::grouped_mm_sm90, py::arg("a_ptr"), py::arg("b_ptr"), py::arg("out_ptr"),
        py::arg("offs_ptr"), py::arg("workspace_ptr"), py::arg("workspace_bytes"), py::arg("experts"),
        py::arg("tokens"), py::arg("n"), py::arg("k"), py::arg("lda"), py::arg("ldb_k"), py::arg("ldb_n"),
        py::arg("stride_be"), py::arg("ldo"), py::arg("kind"), py::arg("stream"),
        "bf16 grouped GEMM on sm_90a (CUTLASS ptr-array, TMA + wgmma, persistent): kind 0 out = a @ b[e] "
        "per expert's rows, kind 1 db[e] = a[rows]^T @ dout[rows]; the schedule is built on the device.");
  m.def("attention_sm90_unavailable", &tokenforge::attention_sm90_unavailable,
        "Empty when the CUDA C++ sm_90a attention is in this build, else why not.");
  m.def("attention_sm90_forward", &tokenforge::attention_sm90_forward, py::arg("q_ptr"), py::arg("k_ptr"),
        py::arg("v_ptr"), py::arg("out_ptr"), py::arg("lse_ptr"), py::arg("cu_q_ptr"), py::arg("cu_k_ptr"),
        py::arg("sizes"), py::arg("strides"), py::arg("scale"), py::arg("left"), py::arg("right"), py::arg("stream"),
        "bf16 attention forward on sm_90a (CuTe, FA3-style: TMA producer warp, wgmma consumers, softmax "
        "overlapped with the next GEMM): dense or varlen, GQA, causal/window; writes out and lse.");
  m.def("attention_sm90_backward", &tokenforge::attention_sm90_backward, py::arg("dout_ptr"), py::arg("q_ptr"),
        py::arg("k_ptr"), py::arg("v_ptr"), py::arg("out_ptr"), py::arg("lse_ptr"), py::arg("cu_q_ptr"),
        py::arg("cu_k_ptr"), py::arg("dq_ptr"), py::arg("dk_ptr"), py::arg("dv_ptr"), py::arg("dq_accum_ptr"),
        py::arg("delta_ptr"), py::arg("sizes"), py::arg("strides"), py::arg("grad_strides"), py::arg("scale"),
        py::arg("left"), py::arg("right"), py::arg("stream"),
        "bf16 attention backward on sm_90a (CuTe, 5 wgmma GEMMs per block pair, dq by fp32 atomics).");
  m.def("adamw_fp32_step", &tokenforge::adamw_fp32_step, py::arg("ptrs"), py::arg("meta"),
        py::arg("blockmap"), py::arg("hyper"), py::arg("grad_scale"), py::arg("n_tensors"),
        py::arg("n_blocks"), py::arg("chunk_size"), py::arg("amsgrad"), py::arg("maximize"),
        py::arg("aligned"), py::arg("stream"),
        "One multi-tensor AdamW step over fp32 params from device tables (see csrc/adamw.cu): "
        "ptrs int64 [7, n_tensors], meta int64 [2, n_tensors], blockmap int32 [2, n_blocks], "
        "hyper float64 [5]; grad_scale fp32 0-d or 0.");
}
