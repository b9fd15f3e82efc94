// FP8 GEMM for Hopper (sm_90a) on CUTLASS 3.x: D (M, N) = (A (M, K) @ B^T) * scales (+ bias).
//
// A is K-major (row-major M x K), B is K-major too (N x K row-major, i.e. the K x N operand in
// column-major): the only operand layout FP8 wgmma reads from shared memory. tokenforge.fp8.gemm
// makes every Float8Linear GEMM (forward, dgrad, wgrad) reach this layout before the call.
//
// Schedule: TMA loads by a producer warp, two consumer warpgroups issuing wgmma on one 128x128x128
// tile (CUTLASS's "cooperative" warp-specialized kernel), persistent over output tiles, a 1x2
// cluster multicasting A, a TMA-store epilogue. The fp32 accumulator is promoted out of the tensor
// core's limited-precision accumulation every 4 wgmma k-steps (no "fast accumulation"), so the
// result matches the float64 product of the dequantized operands to fp32 accumulation error.
//
// Two scale families, each built for bf16 and fp32 output: four kernels in all (the build cost is
// what bounds this: the four take about 80 s of nvcc on one core):
//   rowwise   D = acc * scale_a[m] * scale_b[n] + bias[n] in the epilogue (an epilogue visitor
//             tree); tensorwise scales arrive expanded to vectors (M + N floats, no extra kernel);
//   blockwise every 128-deep K block's partial product is scaled by scale_a[kb][m] * scale_b[kb][n]
//             before it is added to the fp32 accumulator (DeepSeek-V3's promotion), then + bias[n].
//             Scales are "MN-major" (kb, M) and (kb, N) fp32: a 1x128 activation block is its own
//             row's scale, a 128x128 weight block is repeated over its 128 rows by the caller.
//
// Built only for sm_90a (setup.py compiles this file with that one target); elsewhere, and when the
// CUTLASS headers were not found at build time, fp8_gemm_sm90_unavailable() says why and the
// launcher refuses.
#include <string>

#include "common.cuh"
#include "cutlass_sm90.cuh"
#include "tokenforge.h"

#if defined(TOKENFORGE_CUTLASS_SM90)
#include <cute/tensor.hpp>
#include <cutlass/detail/blockwise_scale_layout.hpp>
#include <cutlass/epilogue/collective/collective_builder.hpp>
#include <cutlass/epilogue/fusion/sm90_callbacks_tma_warpspecialized.hpp>
#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/gemm/device/gemm_universal_adapter.h>
#include <cutlass/gemm/dispatch_policy.hpp>
#include <cutlass/gemm/kernel/gemm_universal.hpp>
#endif

namespace tokenforge {
namespace {

// One call's operands, as the bindings pass them (see tokenforge.h).
struct Fp8GemmArgs {
  std::uintptr_t a, b, d, scale_a, scale_b, bias, workspace;
  std::int64_t workspace_bytes, m, n, k, lda, ldb, ldd;
  bool blockwise;
  int out_dtype;
  std::uintptr_t stream;
};

void check_args(const Fp8GemmArgs& g, const char* fn) {
  require_arg(g.out_dtype == kBFloat16 || g.out_dtype == kFloat32, fn, "out dtype must be bfloat16 or float32");
  require_arg(g.m >= 0 && g.n >= 0 && g.k >= 0, fn, "sizes must be >= 0");
  require_arg(g.m < (1ll << 31) && g.n < (1ll << 31) && g.k < (1ll << 31), fn, "M, N and K must be < 2^31");
  require_arg(g.k % 16 == 0 && g.n % 16 == 0, fn, "K and N must be multiples of 16");
  require_arg(g.lda >= g.k && g.ldb >= g.k && g.ldd >= g.n, fn, "row strides must be >= the row length");
  const std::int64_t out_bytes = g.out_dtype == kFloat32 ? 4 : 2;
  require_arg(g.lda % 16 == 0 && g.ldb % 16 == 0 && (g.ldd * out_bytes) % 16 == 0, fn,
              "row strides must be multiples of 16 bytes (TMA)");
  for (std::uintptr_t p : {g.a, g.b, g.d, g.scale_a, g.scale_b})
    require_arg(p != 0 && is_aligned(p, 16), fn, "a, b, d and the scales must be non-null and 16-byte aligned");
  require_arg(g.bias == 0 || is_aligned(g.bias, 16), fn, "bias must be 16-byte aligned");
  require_arg(g.workspace_bytes >= 0 && (g.workspace_bytes == 0 || g.workspace != 0), fn, "bad workspace");
}

}  // namespace

#if defined(TOKENFORGE_CUTLASS_SM90)
namespace {

using namespace cute;

using ElementA = cutlass::float_e4m3_t;
using ElementB = cutlass::float_e4m3_t;
using LayoutA = cutlass::layout::RowMajor;     // M x K, K contiguous
using LayoutB = cutlass::layout::ColumnMajor;  // K x N, K contiguous
using LayoutD = cutlass::layout::RowMajor;
constexpr int kAlignAB = 16;  // elements: TMA wants 16-byte aligned rows
using TileShape = Shape<_128, _128, _128>;
using ClusterShape = Shape<_1, _2, _1>;
using EpilogueSchedule = cutlass::epilogue::TmaWarpSpecializedCooperative;

namespace fusion = cutlass::epilogue::fusion;
constexpr auto kRound = cutlass::FloatRoundStyle::round_to_nearest;
// bias and scale vectors along N (one value per output column) and along M (per output row).
using PerColumn = fusion::Sm90RowBroadcast<0, TileShape, float, float, Stride<_0, _1, int64_t>>;
using PerRow = fusion::Sm90ColBroadcast<0, TileShape, float, float, Stride<_1, _0, int64_t>>;

template <class ElementD, class Fusion, class MainloopSchedule, class LayoutAArg, class LayoutBArg>
struct GemmOf {
  static constexpr int kAlignD = 16 / sizeof(ElementD);
  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, void, LayoutD, kAlignD, ElementD,
      LayoutD, kAlignD, EpilogueSchedule, Fusion>::CollectiveOp;
  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, ElementA, LayoutAArg, kAlignAB, ElementB,
      LayoutBArg, kAlignAB, float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename CollectiveEpilogue::SharedStorage))>,
      MainloopSchedule>::CollectiveOp;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, CollectiveMainloop,
                                                      CollectiveEpilogue, cutlass::gemm::PersistentScheduler>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
};

// Rowwise: D = scale_a[m] * (acc * scale_b[n]) + bias[n], one rounding to ElementD at the end.
template <class ElementD>
using RowwiseFusion = fusion::Sm90EVT<
    fusion::Sm90Compute<cutlass::homogeneous_multiply_add, ElementD, float, kRound>, PerRow,
    fusion::Sm90EVT<fusion::Sm90Compute<cutlass::multiplies, float, float, kRound>, fusion::Sm90AccFetch,
                    PerColumn>,
    PerColumn>;

template <class ElementD>
using RowwiseGemm = typename GemmOf<ElementD, RowwiseFusion<ElementD>,
                                    cutlass::gemm::KernelTmaWarpSpecializedCooperative, LayoutA, LayoutB>::Gemm;

// Blockwise: per-row/per-column scales for every 128-deep K block (granularity 1 x 1 x 128).
using BlockScale = cutlass::detail::Sm90BlockwiseScaleConfig<1, 1, 128>;
using LayoutSFA = decltype(BlockScale::deduce_layoutSFA());
using LayoutSFB = decltype(BlockScale::deduce_layoutSFB());

template <class ElementD>
using BiasFusion = fusion::Sm90EVT<fusion::Sm90Compute<cutlass::plus, ElementD, float, kRound>,
                                   fusion::Sm90AccFetch, PerColumn>;

template <class ElementD>
using BlockwiseGemm =
    typename GemmOf<ElementD, BiasFusion<ElementD>, cutlass::gemm::KernelTmaWarpSpecializedCooperativeFP8Blockwise,
                    cute::tuple<LayoutA, LayoutSFA>, cute::tuple<LayoutB, LayoutSFB>>::Gemm;

template <class Gemm, bool kBlockwise>
typename Gemm::Arguments make_arguments(const Fp8GemmArgs& g, int sm_count) {
  using Kernel = typename Gemm::GemmKernel;
  using ElementD = typename Gemm::ElementD;
  typename Kernel::StrideA stride_a{g.lda, _1{}, int64_t(0)};
  typename Kernel::StrideB stride_b{g.ldb, _1{}, int64_t(0)};
  typename Kernel::StrideD stride_d{g.ldd, _1{}, int64_t(0)};
  const int M = int(g.m), N = int(g.n), K = int(g.k);
  auto* a = reinterpret_cast<const ElementA*>(g.a);
  auto* b = reinterpret_cast<const ElementB*>(g.b);
  auto* scale_a = reinterpret_cast<const float*>(g.scale_a);
  auto* scale_b = reinterpret_cast<const float*>(g.scale_b);
  // bias == nullptr reads as 0 (the broadcast's null default): one kernel serves both cases.
  typename PerColumn::Arguments bias{reinterpret_cast<const float*>(g.bias), 0.f, {}};

  typename Gemm::Arguments args{};
  args.mode = cutlass::gemm::GemmUniversalMode::kGemm;
  args.problem_shape = {M, N, K, 1};
  if constexpr (kBlockwise) {
    args.mainloop = {a, stride_a, b, stride_b, scale_a, BlockScale::tile_atom_to_shape_SFA(make_shape(M, N, K, 1)),
                     scale_b, BlockScale::tile_atom_to_shape_SFB(make_shape(M, N, K, 1))};
    args.epilogue.thread = {{}, bias, {}};
  } else {
    args.mainloop = {a, stride_a, b, stride_b};
    typename PerRow::Arguments row_scale{scale_a, 1.f, {}};
    typename PerColumn::Arguments column_scale{scale_b, 1.f, {}};
    args.epilogue.thread = {row_scale, {{}, column_scale, {}}, bias, {}};
  }
  args.epilogue.ptr_C = nullptr;
  args.epilogue.ptr_D = reinterpret_cast<ElementD*>(g.d);
  args.epilogue.dD = stride_d;
  args.hw_info.device_id = current_device("cutlass hw_info");  // the device the launch goes to
  args.hw_info.sm_count = sm_count;
  return args;
}

template <class Gemm, bool kBlockwise>
std::int64_t workspace_size(const Fp8GemmArgs& g, int sm_count) {
  return std::int64_t(Gemm::get_workspace_size(make_arguments<Gemm, kBlockwise>(g, sm_count)));
}

template <class Gemm, bool kBlockwise>
void run(const Fp8GemmArgs& g, int sm_count, const char* fn) {
  run_cutlass<Gemm>(make_arguments<Gemm, kBlockwise>(g, sm_count), g.workspace, g.workspace_bytes, g.stream, fn,
                    "CUTLASS cannot run this problem (operands must be K-major with 16-byte aligned rows)");
}

// Calls f.template operator()<Gemm, kBlockwise>() for the kernel serving (scaling, out_dtype).
template <class F>
auto dispatch(const Fp8GemmArgs& g, F&& f) {
  if (g.blockwise) {
    if (g.out_dtype == kBFloat16) return f.template operator()<BlockwiseGemm<cutlass::bfloat16_t>, true>();
    return f.template operator()<BlockwiseGemm<float>, true>();
  }
  if (g.out_dtype == kBFloat16) return f.template operator()<RowwiseGemm<cutlass::bfloat16_t>, false>();
  return f.template operator()<RowwiseGemm<float>, false>();
}

struct RunKernel {
  const Fp8GemmArgs& g;
  int sm_count;
  const char* fn;
  template <class Gemm, bool kBlockwise>
  void operator()() const { run<Gemm, kBlockwise>(g, sm_count, fn); }
};

struct WorkspaceOf {
  const Fp8GemmArgs& g;
  int sm_count;
  template <class Gemm, bool kBlockwise>
  std::int64_t operator()() const { return workspace_size<Gemm, kBlockwise>(g, sm_count); }
};

}  // namespace
#endif

std::string fp8_gemm_sm90_unavailable() { return cutlass_sm90_missing("CUTLASS FP8 GEMM"); }

std::int64_t fp8_gemm_sm90_workspace_size(std::int64_t m, std::int64_t n, std::int64_t k, bool blockwise,
                                          int out_dtype) {
  const char* fn = "fp8_gemm_sm90_workspace_size";
  const std::string why = fp8_gemm_sm90_unavailable();
  if (!why.empty()) throw std::runtime_error(std::string(fn) + ": " + why);
#if defined(TOKENFORGE_CUTLASS_SM90)
  require_cuda_device(fn);
  // Placeholder pointers: the size depends on the problem and the schedule, not on the data.
  const Fp8GemmArgs g{16, 16, 16, 16, 16, 0, 0, 0, m, n, k, k, k, n, blockwise, out_dtype, 0};
  check_args(g, fn);
  return dispatch(g, WorkspaceOf{g, sm_count_of_current_device(fn)});
#else
  (void)m, (void)n, (void)k, (void)blockwise, (void)out_dtype;
  return 0;
#endif
}

void fp8_gemm_sm90(std::uintptr_t a, std::uintptr_t b, std::uintptr_t d, std::uintptr_t scale_a,
                   std::uintptr_t scale_b, std::uintptr_t bias, std::uintptr_t workspace,
                   std::int64_t workspace_bytes, std::int64_t m, std::int64_t n, std::int64_t k, std::int64_t lda,
                   std::int64_t ldb, std::int64_t ldd, bool blockwise, int out_dtype, std::uintptr_t stream) {
  const char* fn = "fp8_gemm_sm90";
  const Fp8GemmArgs g{a, b, d, scale_a, scale_b, bias, workspace, workspace_bytes, m, n, k, lda, ldb, ldd,
                      blockwise, out_dtype, stream};
  check_args(g, fn);
  const std::string why = fp8_gemm_sm90_unavailable();
  if (!why.empty()) throw std::runtime_error(std::string(fn) + ": " + why);
  require_cuda_device(fn);
#if defined(TOKENFORGE_CUTLASS_SM90)
  require_sm90(fn, "the CUTLASS FP8 GEMM");
  require_arg(k > 0, fn, "K must be > 0 (the caller writes bias or zeros for K == 0)");
  if (m == 0 || n == 0) return;
  dispatch(g, RunKernel{g, sm_count_of_current_device(fn), fn});
#endif
}

}  // namespace tokenforge
