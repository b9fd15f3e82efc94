// Grouped GEMM for mixture-of-experts on Hopper (sm_90a), CUTLASS 3.x "ptr-array" grouped kernels:
//   forward  out[rows of e] = a[rows of e] @ b[e]          a (T, K), b (E, K, N), out (T, N)
//   dgrad    da[rows of e]  = dout[rows of e] @ b[e]^T     (the forward kernel with b K-major)
//   wgrad    db[e]          = a[rows of e]^T @ dout[rows of e]   (db zero for an expert with no rows)
// bf16 in and out, fp32 accumulation. Expert e owns rows offs[e-1] <= r < offs[e] (offs int32 on
// the device): a small kernel turns offs into CUTLASS's per-group problem shapes, pointers and
// strides on the device, so building the schedule never syncs with the host, and the persistent
// grouped tile scheduler walks (expert, tile) work on every SM.
//
// Schedule: TMA loads by a producer warp (the TMA descriptors are re-pointed per group in shared
// memory), two wgmma consumer warpgroups on a 128x256x64 tile (CUTLASS "cooperative"), TMA-store
// epilogue. Three instantiations, one per operand layout (forward: a K-major, b N-major; dgrad:
// both K-major; wgrad: a M-major, dout N-major): 16-bit wgmma reads either major from shared memory.
//
// Built only for sm_90a (setup.py compiles csrc/*_sm90.cu with that one target and the CUTLASS
// headers); elsewhere grouped_mm_sm90_unavailable() says why and the launchers refuse.
#include <string>

#include "common.cuh"
#include "cutlass_sm90.cuh"
#include "tokenforge.h"

#if defined(TOKENFORGE_CUTLASS_SM90)
#include <cute/tensor.hpp>
#include <cutlass/epilogue/collective/collective_builder.hpp>
#include <cutlass/epilogue/fusion/operations.hpp>
#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/gemm/device/gemm_universal_adapter.h>
#include <cutlass/gemm/dispatch_policy.hpp>
#include <cutlass/gemm/group_array_problem_shape.hpp>
#include <cutlass/gemm/kernel/gemm_universal.hpp>
#endif

namespace tokenforge {
namespace {

// What the Python launcher passes (see tokenforge.h); kind: 0 forward/dgrad, 1 wgrad.
struct GroupedArgs {
  std::uintptr_t a, b, out, offs, workspace;
  std::int64_t workspace_bytes, experts, tokens, n, k, lda, ldb_k, ldb_n, stride_be, ldo;
  int kind;
  std::uintptr_t stream;
};

void check_grouped_args(const GroupedArgs& g, const char* fn) {
  require_arg(g.experts >= 1 && g.experts < 65536, fn, "experts must be in [1, 65535]");
  require_arg(g.tokens >= 0 && g.n >= 0 && g.k >= 0, fn, "sizes must be >= 0");
  require_arg(g.tokens < (1ll << 31) && g.n < (1ll << 31) && g.k < (1ll << 31), fn, "sizes must be < 2^31");
  require_arg(g.n % 8 == 0 && g.k % 8 == 0, fn, "N and K must be multiples of 8 (16-byte TMA rows)");
  require_arg(g.lda % 8 == 0 && g.ldo % 8 == 0 && g.stride_be % 8 == 0, fn,
              "row strides and the expert stride must be multiples of 8 elements");
  require_arg((g.ldb_k == 1 && g.ldb_n % 8 == 0) || (g.ldb_n == 1 && g.ldb_k % 8 == 0), fn,
              "b[e] must have a unit stride along K or along N, the other a multiple of 8");
  require_arg(g.kind == 0 || g.kind == 1, fn, "kind must be 0 (forward/dgrad) or 1 (wgrad)");
  for (std::uintptr_t p : {g.a, g.b, g.out, g.offs})
    require_arg(p != 0 && is_aligned(p, 16), fn, "a, b, out and offs must be non-null and 16-byte aligned");
  require_arg(g.workspace != 0 && is_aligned(g.workspace, 256), fn, "workspace must be non-null and 256-byte aligned");
}

}  // namespace

#if defined(TOKENFORGE_CUTLASS_SM90)
namespace {

using namespace cute;

using Element = cutlass::bfloat16_t;
using ProblemShape = cutlass::gemm::GroupProblemShape<Shape<int, int, int>>;
using TileShape = Shape<_128, _256, _64>;
using ClusterShape = Shape<_1, _1, _1>;
constexpr int kAlign = 8;  // elements: 16-byte rows for TMA

// One epilogue for all three layouts: D = acc in bf16 (beta = 0: C is never read). Defined outside
// the layout template on purpose: gcc fails to resolve the builder's result inside it.
using LayoutD = cutlass::layout::RowMajor;
using GroupedEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
    cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
    cutlass::epilogue::collective::EpilogueTileAuto, float, float, Element, LayoutD*, kAlign, Element, LayoutD*,
    kAlign, cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative,
    cutlass::epilogue::fusion::LinearCombination<Element, float, Element, float>>::CollectiveOp;
constexpr int kEpilogueSmem = static_cast<int>(sizeof(typename GroupedEpilogue::SharedStorage));

template <class LayoutA, class LayoutB>
struct GroupedGemm {
  using CollectiveEpilogue = GroupedEpilogue;
  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Element, LayoutA*, kAlign, Element, LayoutB*, kAlign,
      float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<kEpilogueSmem>,
      cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperative>::CollectiveOp;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, CollectiveMainloop, CollectiveEpilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
  using StrideA = cute::remove_pointer_t<typename Kernel::StrideA>;
  using StrideB = cute::remove_pointer_t<typename Kernel::StrideB>;
  using StrideD = cute::remove_pointer_t<typename Kernel::StrideD>;
};

using RowMajor = cutlass::layout::RowMajor;
using ColumnMajor = cutlass::layout::ColumnMajor;
using ForwardGemm = GroupedGemm<RowMajor, RowMajor>;     // a K-major, b[e] (K, N) N-major
using DgradGemm = GroupedGemm<RowMajor, ColumnMajor>;    // b[e] K-major (b^T of the forward, a view)
using WgradGemm = GroupedGemm<ColumnMajor, RowMajor>;    // a^T M-major, dout N-major

// A CUTLASS stride (one dynamic leading dimension, the rest _1/_0) with that dimension set.
template <class Stride>
__host__ __device__ Stride stride_with(std::int64_t ld) {
  Stride s{};
  if constexpr (cute::is_same_v<cute::remove_cvref_t<decltype(cute::get<0>(s))>, std::int64_t>) {
    cute::get<0>(s) = ld;
  } else {
    cute::get<1>(s) = ld;
  }
  return s;
}

// The per-group tables CUTLASS reads, carved out of the front of the workspace.
template <class G>
struct Tables {
  typename ProblemShape::UnderlyingProblemShape* shapes;
  const Element** ptr_a;
  const Element** ptr_b;
  Element** ptr_d;
  typename G::StrideA* stride_a;
  typename G::StrideB* stride_b;
  typename G::StrideD* stride_d;
  std::int64_t bytes;  // including padding to 256 bytes, where CUTLASS's own workspace starts
};

template <class G>
Tables<G> carve(std::uintptr_t base, std::int64_t experts) {
  Tables<G> t{};
  std::int64_t at = 0;
  auto take = [&](std::int64_t each) {
    const std::int64_t off = at;
    at += (each * experts + 255) / 256 * 256;
    return base + off;
  };
  t.shapes = reinterpret_cast<decltype(t.shapes)>(take(sizeof(*t.shapes)));
  t.ptr_a = reinterpret_cast<const Element**>(take(sizeof(void*)));
  t.ptr_b = reinterpret_cast<const Element**>(take(sizeof(void*)));
  t.ptr_d = reinterpret_cast<Element**>(take(sizeof(void*)));
  t.stride_a = reinterpret_cast<typename G::StrideA*>(take(sizeof(typename G::StrideA)));
  t.stride_b = reinterpret_cast<typename G::StrideB*>(take(sizeof(typename G::StrideB)));
  t.stride_d = reinterpret_cast<typename G::StrideD*>(take(sizeof(typename G::StrideD)));
  t.bytes = at;
  return t;
}

// Row range of expert e from offs, clamped to [0, tokens] and non-decreasing, so a bad offs
// (unchecked on the host) can never send a tile out of bounds.
__device__ __forceinline__ void expert_rows(const int* offs, int e, int tokens, int* start, int* end) {
  const int prev = e == 0 ? 0 : min(max(offs[e - 1], 0), tokens);
  *start = prev;
  *end = max(min(max(offs[e], 0), tokens), prev);
}

template <class G>
__global__ void build_forward_tables(Tables<G> t, const Element* a, const Element* b, Element* out, const int* offs,
                                     int experts, int tokens, int n, int k, std::int64_t lda, std::int64_t ldb,
                                     std::int64_t stride_be, std::int64_t ldo) {
  const int e = blockIdx.x * blockDim.x + threadIdx.x;
  if (e >= experts) return;
  int start, end;
  expert_rows(offs, e, tokens, &start, &end);
  t.shapes[e] = {end - start, n, k};
  t.ptr_a[e] = a + std::int64_t(start) * lda;
  t.ptr_b[e] = b + std::int64_t(e) * stride_be;
  t.ptr_d[e] = out + std::int64_t(start) * ldo;
  t.stride_a[e] = stride_with<typename G::StrideA>(lda);
  t.stride_b[e] = stride_with<typename G::StrideB>(ldb);
  t.stride_d[e] = stride_with<typename G::StrideD>(ldo);
}

// wgrad: group e is the (k, n) GEMM over its rows; an expert with no rows gets an empty problem
// (its db is zeroed by zero_empty_experts instead: a K = 0 mainloop is not a case to rely on).
template <class G>
__global__ void build_wgrad_tables(Tables<G> t, const Element* a, const Element* dout, Element* db, const int* offs,
                                   int experts, int tokens, int n, int k, std::int64_t lda, std::int64_t ldo) {
  const int e = blockIdx.x * blockDim.x + threadIdx.x;
  if (e >= experts) return;
  int start, end;
  expert_rows(offs, e, tokens, &start, &end);
  const bool empty = end == start;
  t.shapes[e] = {empty ? 0 : k, empty ? 0 : n, end - start};
  t.ptr_a[e] = a + std::int64_t(start) * lda;
  t.ptr_b[e] = dout + std::int64_t(start) * ldo;
  t.ptr_d[e] = db + std::int64_t(e) * k * n;
  t.stride_a[e] = stride_with<typename G::StrideA>(lda);
  t.stride_b[e] = stride_with<typename G::StrideB>(ldo);
  t.stride_d[e] = stride_with<typename G::StrideD>(n);
}

__global__ void zero_empty_experts(Element* db, const int* offs, int tokens, std::int64_t per_expert) {
  const int e = blockIdx.y;
  int start, end;
  expert_rows(offs, e, tokens, &start, &end);
  if (end != start) return;
  uint4* dst = reinterpret_cast<uint4*>(db + std::int64_t(e) * per_expert);
  const std::int64_t vectors = per_expert / 8;  // k * n is a multiple of 64
  for (std::int64_t i = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < vectors;
       i += std::int64_t(gridDim.x) * blockDim.x)
    dst[i] = make_uint4(0, 0, 0, 0);
}

template <class G>
typename G::Gemm::Arguments make_arguments(const Tables<G>& t, int experts, int sm_count) {
  typename G::Gemm::Arguments args{};
  args.mode = cutlass::gemm::GemmUniversalMode::kGrouped;
  args.problem_shape = {experts, t.shapes, nullptr};  // shapes live on the device only
  args.mainloop = {t.ptr_a, t.stride_a, t.ptr_b, t.stride_b};
  args.epilogue.thread.alpha = 1.f;
  args.epilogue.thread.beta = 0.f;
  args.epilogue.ptr_C = nullptr;  // beta = 0: C is never read (a void C trips gcc on the builder)
  args.epilogue.dC = t.stride_d;
  args.epilogue.ptr_D = t.ptr_d;
  args.epilogue.dD = t.stride_d;
  args.hw_info.device_id = current_device("cutlass hw_info");  // the device the launch goes to
  args.hw_info.sm_count = sm_count;
  return args;
}

template <class G>
std::int64_t workspace_of(std::int64_t experts, int sm_count) {
  const Tables<G> t = carve<G>(256, experts);  // placeholder base: only the sizes matter here
  return t.bytes + std::int64_t(G::Gemm::get_workspace_size(make_arguments<G>(t, int(experts), sm_count)));
}

template <class G>
void run_grouped(const Tables<G>& t, const GroupedArgs& g, int sm_count, const char* fn) {
  run_cutlass<typename G::Gemm>(make_arguments<G>(t, int(g.experts), sm_count), g.workspace + t.bytes,
                                g.workspace_bytes - t.bytes, g.stream, fn, "CUTLASS cannot run this grouped problem");
}

}  // namespace
#endif

std::string grouped_mm_sm90_unavailable() { return cutlass_sm90_missing("CUTLASS grouped GEMM"); }

std::int64_t grouped_mm_sm90_workspace_size(std::int64_t experts, int kind, bool b_k_major) {
  const char* fn = "grouped_mm_sm90_workspace_size";
  const std::string why = grouped_mm_sm90_unavailable();
  if (!why.empty()) throw std::runtime_error(std::string(fn) + ": " + why);
  require_arg(experts >= 1 && experts < 65536, fn, "experts must be in [1, 65535]");
  require_arg(kind == 0 || kind == 1, fn, "kind must be 0 (forward/dgrad) or 1 (wgrad)");
  require_cuda_device(fn);
#if defined(TOKENFORGE_CUTLASS_SM90)
  const int sms = sm_count_of_current_device(fn);
  if (kind == 1) return workspace_of<WgradGemm>(experts, sms);
  return b_k_major ? workspace_of<DgradGemm>(experts, sms) : workspace_of<ForwardGemm>(experts, sms);
#else
  (void)b_k_major;
  return 0;
#endif
}

void grouped_mm_sm90(std::uintptr_t a, std::uintptr_t b, std::uintptr_t out, std::uintptr_t offs,
                     std::uintptr_t workspace, std::int64_t workspace_bytes, std::int64_t experts,
                     std::int64_t tokens, std::int64_t n, std::int64_t k, std::int64_t lda, std::int64_t ldb_k,
                     std::int64_t ldb_n, std::int64_t stride_be, std::int64_t ldo, int kind, std::uintptr_t stream) {
  const char* fn = "grouped_mm_sm90";
  const GroupedArgs g{a, b, out, offs, workspace, workspace_bytes, experts, tokens, n, k, lda, ldb_k, ldb_n,
                      stride_be, ldo, kind, stream};
  check_grouped_args(g, fn);
  const std::string why = grouped_mm_sm90_unavailable();
  if (!why.empty()) throw std::runtime_error(std::string(fn) + ": " + why);
  require_cuda_device(fn);
#if defined(TOKENFORGE_CUTLASS_SM90)
  require_sm90(fn, "the CUTLASS grouped GEMM");
  const int sms = sm_count_of_current_device(fn);
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  const int E = int(experts), T = int(tokens), N = int(n), K = int(k);
  const unsigned blocks = unsigned((E + 127) / 128);
  auto* ea = reinterpret_cast<const Element*>(a);
  auto* eb = reinterpret_cast<const Element*>(b);
  auto* eo = reinterpret_cast<Element*>(out);
  auto* eoffs = reinterpret_cast<const int*>(offs);
  if (kind == 1) {
    // wgrad: a (T, k) with row stride lda, b is dout (T, n) with row stride ldo, out is db (E, k, n).
    if (K == 0 || N == 0) return;
    const Tables<WgradGemm> t = carve<WgradGemm>(workspace, experts);
    build_wgrad_tables<WgradGemm><<<blocks, 128, 0, s>>>(t, ea, eb, eo, eoffs, E, T, N, K, lda, ldo);
    check_launch(fn);
    const std::int64_t per_expert = std::int64_t(K) * N;
    const std::int64_t grid_x = std::min<std::int64_t>(ceil_div(per_expert / 8, 256), 1024);
    zero_empty_experts<<<dim3(unsigned(grid_x), unsigned(E)), 256, 0, s>>>(eo, eoffs, T, per_expert);
    check_launch(fn);
    if (T > 0) run_grouped<WgradGemm>(t, g, sms, fn);
    return;
  }
  if (T == 0 || N == 0) return;
  require_arg(K > 0, fn, "K must be > 0 (the caller handles K == 0)");
  if (ldb_k == 1 && ldb_n != 1) {  // b[e] K-major: the dgrad view b^T, or (E, N, K)-stored weights
    const Tables<DgradGemm> t = carve<DgradGemm>(workspace, experts);
    build_forward_tables<DgradGemm><<<blocks, 128, 0, s>>>(t, ea, eb, eo, eoffs, E, T, N, K, lda, ldb_n, stride_be, ldo);
    check_launch(fn);
    run_grouped<DgradGemm>(t, g, sms, fn);
  } else {
    const Tables<ForwardGemm> t = carve<ForwardGemm>(workspace, experts);
    build_forward_tables<ForwardGemm><<<blocks, 128, 0, s>>>(t, ea, eb, eo, eoffs, E, T, N, K, lda, ldb_k, stride_be, ldo);
    check_launch(fn);
    run_grouped<ForwardGemm>(t, g, sms, fn);
  }
#endif
}

}  // namespace tokenforge
