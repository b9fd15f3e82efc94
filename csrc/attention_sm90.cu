// Attention for Hopper (sm_90a) in CuTe, FlashAttention-3 style, forward and backward, bf16:
// dense (batch, seqlen, heads, head_dim) or varlen (packed documents, cu_seqlens on the device),
// GQA/MQA, bottom-right aligned causal masks and sliding windows, head dims 64 and 128.
//
// Forward, one CTA per (128-query block, head, batch), 3 warpgroups:
//   warpgroup 0, the producer: one thread issues TMA loads (Q once; K and V blocks through two
//     2-stage mbarrier pipelines), on 24 registers;
//   warpgroups 1-2, the consumers, 64 query rows each, on 240 registers: S = Q K^T (wgmma, both
//     operands in shared memory), online softmax in registers, O += P V (wgmma with P straight from
//     registers and V read MN-major out of the same shared tile TMA wrote). The next block's Q K^T is
//     issued before this block's P V, so the softmax of one block runs while the tensor cores work on
//     the other (FA3's intra-warpgroup overlap). Key blocks are walked from the last one down, so the
//     blocks that need mask math (the diagonal, a window edge, the seqlen_k tail) come first and the
//     rest run without it.
//   Work items are a 1-D grid (heaviest query blocks first): no launch axis has a 65535 limit to hit.
//
// Backward, one CTA per (128-key block, kv head, batch), 3 warpgroups, no recompute of the scores:
//   the producer loads K and V once and streams (Q, dO) 64-query blocks of every query head sharing
//   this kv head (GQA: dK and dV need no reduction across CTAs); each consumer owns 64 keys and
//   computes S^T = K Q^T and dP^T = V dO^T (wgmma, shared operands), P^T and dS^T in registers,
//   dV += P^T dO and dK += dS^T Q (wgmma, P^T and dS^T from registers), then writes dS to shared
//   memory for dQ = dS K (both warpgroups, half of the head dim each), added into an fp32 dQ buffer
//   with atomics: five GEMMs per block pair, the FLOP convention's count. The atomics make dQ's
//   rounding order run-dependent (not bitwise deterministic); the Triton backend is the deterministic
//   one. Small kernels compute delta = rowsum(dO * O) before and round dQ to bf16 after.
//
// Built only for sm_90a (setup.py compiles csrc/*_sm90.cu with that one target and the CUTLASS
// headers); elsewhere attention_sm90_unavailable() says why and the launchers refuse.
#include <string>

#include "common.cuh"
#include "cutlass_sm90.cuh"
#include "tokenforge.h"

#if defined(TOKENFORGE_CUTLASS_SM90)
#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>
#include <cutlass/gemm/collective/builders/sm90_common.inl>
#include <cutlass/pipeline/pipeline.hpp>
#endif

namespace tokenforge {
namespace {

// What the Python launcher passes (see tokenforge.h). Strides are in elements; a varlen call has
// cu_q/cu_k set, batch = the number of documents and seqlen_* = the packed lengths (total tokens).
struct AttnArgs {
  std::uintptr_t q, k, v, o, lse, cu_q, cu_k;
  std::int64_t batch, seqlen_q, seqlen_k, max_seqlen_q, max_seqlen_k, heads, heads_kv, head_dim;
  std::int64_t q_batch, q_row, q_head, k_batch, k_row, k_head, v_batch, v_row, v_head, o_batch, o_row, o_head;
  std::int64_t lse_batch, lse_head;
  double scale;
  std::int64_t left, right;
};

// The backward's extra pointers: dout and the gradients, the fp32 dQ accumulator (rows, heads, D)
// and delta (lse's layout); strides in elements, (batch, row, head) each.
struct AttnGradArgs {
  std::uintptr_t dout, dq, dk, dv, dq_accum, delta;
  std::int64_t do_batch, do_row, do_head, dk_batch, dk_row, dk_head, dv_batch, dv_row, dv_head;
};

void check_attn_args(const AttnArgs& a, const char* fn) {
  require_arg(a.head_dim == 64 || a.head_dim == 128, fn, "head_dim must be 64 or 128 (pad others, or use triton)");
  require_arg(a.batch >= 1 && a.heads >= 1 && a.heads_kv >= 1 && a.heads % a.heads_kv == 0, fn,
              "need batch >= 1 and heads a positive multiple of heads_kv");
  require_arg(a.seqlen_q >= 1 && a.seqlen_k >= 1 && a.seqlen_q < (1ll << 31) && a.seqlen_k < (1ll << 31), fn,
              "sequence lengths must be in [1, 2^31) (empty inputs: use the torch reference)");
  require_arg(a.max_seqlen_q >= 0 && a.max_seqlen_k >= 0, fn, "max_seqlen must be >= 0");
  require_arg(a.scale > 0 && a.scale < 1e30, fn, "softmax scale must be positive and finite");
  require_arg(a.left >= -1 && a.right >= -1, fn, "window bounds must be >= -1");
  for (std::int64_t s : {a.q_row, a.q_head, a.q_batch, a.k_row, a.k_head, a.k_batch, a.v_row, a.v_head, a.v_batch})
    require_arg(s % 8 == 0 && s >= 0, fn, "q/k/v row, head and batch strides must be multiples of 8 elements (TMA)");
  for (std::uintptr_t p : {a.q, a.k, a.v, a.o, a.lse})
    require_arg(p != 0 && is_aligned(p, 16), fn, "q, k, v, out and lse must be non-null and 16-byte aligned");
  require_arg((a.cu_q == 0) == (a.cu_k == 0), fn, "give both cu_seqlens or neither");
}

}  // namespace

#if defined(TOKENFORGE_CUTLASS_SM90)
namespace attn_sm90 {

using namespace cute;

using Element = cutlass::bfloat16_t;
// A (seq, head_dim, heads, batch) view of q/k/v for TMA; 64-bit strides (offsets past 2^31 are fine).
using GmemShape = Shape<int32_t, int32_t, int32_t, int32_t>;
using GmemStride = Stride<int64_t, _1, int64_t, int64_t>;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

template <class SmemLayout, class Tile>
using TmaLoad = decltype(make_tma_copy(SM90_TMA_LOAD{},
                                       make_tensor(make_gmem_ptr(static_cast<Element const*>(nullptr)), GmemShape{},
                                                   GmemStride{}),
                                       SmemLayout{}, Tile{}, _1{}));

template <class Layout>
using SmemAtomK = decltype(cutlass::gemm::collective::detail::ss_smem_selector<GMMA::Major::K, Element,
                                                                             decltype(size<0>(Layout{})),
                                                                             decltype(size<1>(Layout{}))>());

// (rows, cols, stages) tiles of shared memory, K-major 128-byte swizzle: TMA writes them, wgmma
// reads them. Always rank 3 (a single tile is stage 0); TMA takes one stage's (rows, cols).
template <int Rows, int Cols, int Stages = 1>
using SmemTile = decltype(tile_to_shape(SmemAtomK<Shape<Int<Rows>, Int<Cols>>>{},
                                        Shape<Int<Rows>, Int<Cols>, Int<Stages>>{}));

// The same shared tile read transposed, (cols, rows, stages): the MN-major operand of P V, dS K...
template <class Tile>
using Transposed = decltype(composition(Tile{}, make_ordered_layout(make_shape(size<1>(Tile{}), size<0>(Tile{}),
                                                                               size<2>(Tile{})),
                                                                    Step<_2, _1, _3>{})));

// Accumulator ((2, 2, V), M, N) -> (rows (2, M), cols (2, V, N)): one row per r, for the softmax.
template <class L>
__device__ __forceinline__ auto rowcol(L l) {
  return make_layout(make_layout(get<0, 1>(l), get<1>(l)), make_layout(get<0, 0>(l), get<0, 2>(l), get<2>(l)));
}

// Accumulator ((2, 2, V), M, N) -> wgmma A-operand registers ((2, 2, 2), M, (V / 2, N)): two 8-column
// groups of the accumulator are one k16 slice of the next GEMM's A fragment (same threads, same rows).
template <class L>
__device__ __forceinline__ auto acc_as_a(L l) {
  auto v = logical_divide(get<0>(l), Shape<Underscore, Underscore, _2>{});
  return make_layout(make_layout(get<0>(v), get<1>(v), get<0>(get<2>(v))), get<1>(l),
                     make_layout(get<1>(get<2>(v)), get<2>(l)));
}

// One warpgroup GEMM: c (+)= a b over every k16 slice; kWait >= 0 waits until at most kWait
// batches are in flight, -1 leaves it running.
template <bool kZero, int kWait, class Mma, class TA, class TB, class TC>
__device__ __forceinline__ void wg_gemm(Mma& mma, TA const& a, TB const& b, TC& c) {
  constexpr bool kRegA = !is_same_v<remove_cvref_t<typename TA::engine_type::iterator>, GMMA::DescriptorIterator>;
  if constexpr (kRegA) warpgroup_fence_operand(const_cast<TA&>(a));
  warpgroup_fence_operand(c);
  warpgroup_arrive();
  if constexpr (kZero) mma.accumulate_ = GMMA::ScaleOut::Zero;
  CUTE_UNROLL
  for (int kb = 0; kb < size<2>(a); ++kb) {
    cute::gemm(mma, a(_, _, kb), b(_, _, kb), c);
    mma.accumulate_ = GMMA::ScaleOut::One;
  }
  warpgroup_commit_batch();
  if constexpr (kWait >= 0) warpgroup_wait<kWait>();
  warpgroup_fence_operand(c);
  if constexpr (kRegA) warpgroup_fence_operand(const_cast<TA&>(a));
}

template <class Src, class Dst>
__device__ __forceinline__ void to_bf16(Src const& src, Dst& dst) {
  CUTE_UNROLL
  for (int i = 0; i < size(src); ++i) dst(i) = Element(src(i));
}

__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffff, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffff, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffff, x, 1);
  return x + __shfl_xor_sync(0xffffffff, x, 2);
}

// The roles of a 3-warpgroup CTA in a TMA pipeline: thread 0 produces (warpgroup 0), the 256
// threads of warpgroups 1-2 consume; every stage carries `bytes` of TMA transactions.
template <class Pipe>
__device__ __forceinline__ typename Pipe::Params pipe_params(uint32_t bytes) {
  typename Pipe::Params pp;
  pp.transaction_bytes = bytes;
  pp.role = threadIdx.x < 128 ? Pipe::ThreadCategory::Producer : Pipe::ThreadCategory::Consumer;
  pp.is_leader = threadIdx.x == 0;
  pp.num_consumers = 256;
  return pp;
}

// Where document b lives: row offsets into the packed q/k (varlen) and the TMA batch index.
struct Seq {
  int off_q, off_k, len_q, len_k, tma_b;
};

template <class P>
__device__ __forceinline__ Seq seq_of(P const& p, int b) {
  if (p.cu_q == nullptr) return {0, 0, p.seqlen_q, p.seqlen_k, b};
  // Clamped, never trusted: a bad cu_seqlens reads the wrong rows but never leaves the tensors.
  const int q0 = min(max(p.cu_q[b], 0), p.seqlen_q), q1 = min(max(p.cu_q[b + 1], q0), p.seqlen_q);
  const int k0 = min(max(p.cu_k[b], 0), p.seqlen_k), k1 = min(max(p.cu_k[b + 1], k0), p.seqlen_k);
  return {q0, k0, min(q1 - q0, p.max_seqlen_q), min(k1 - k0, p.max_seqlen_k), 0};
}

// Query i sees key j when j < len_k and i + off - left <= j <= i + off + right (off = len_k - len_q,
// -1 = unbounded): bottom-right aligned, flash_attn's convention.
struct Window {
  int left, right, off, len_k;
  __device__ __forceinline__ bool keep(int i, int j) const {
    return j < len_k && (right < 0 || j <= i + off + right) && (left < 0 || j >= i + off - left);
  }
};

// ---------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------

template <int D>
struct Fwd {
  static constexpr int kBM = 128, kBN = 128, kStages = 2, kThreads = 384;
  using SmemQ = SmemTile<kBM, D>;
  using SmemK = SmemTile<kBN, D, kStages>;
  using SmemVt = Transposed<SmemK>;
  using MmaQK = decltype(make_tiled_mma(GMMA::ss_op_selector<Element, Element, float, Shape<_64, Int<kBN>, Int<D>>>(),
                                        Layout<Shape<_2, _1, _1>>{}));
  using MmaPV = decltype(make_tiled_mma(GMMA::rs_op_selector<Element, Element, float, Shape<_64, Int<D>, Int<kBN>>,
                                                             GMMA::Major::K, GMMA::Major::MN>(),
                                        Layout<Shape<_2, _1, _1>>{}));
  using TmaQ = TmaLoad<decltype(take<0, 2>(SmemQ{})), Shape<Int<kBM>, Int<D>>>;
  using TmaKV = TmaLoad<decltype(take<0, 2>(SmemK{})), Shape<Int<kBN>, Int<D>>>;
  using Pipe = cutlass::PipelineTmaAsync<kStages>;
  struct Smem {
    alignas(1024) array_aligned<Element, cosize_v<SmemQ>, 1024> q;
    alignas(1024) array_aligned<Element, cosize_v<SmemK>, 1024> k;
    alignas(1024) array_aligned<Element, cosize_v<SmemK>, 1024> v;
    alignas(16) cutlass::arch::ClusterTransactionBarrier bar_q;
    typename Pipe::SharedStorage pipe_k, pipe_v;
  };
  static constexpr int kSmemBytes = int(sizeof(Smem));
  static constexpr uint32_t kTileBytes = uint32_t(kBN * D * sizeof(Element));

  struct Params {
    TmaQ tma_q;
    TmaKV tma_k, tma_v;
    GmemShape shape_q, shape_k;
    Element* o;
    float* lse;
    const int* cu_q;
    const int* cu_k;
    int64_t o_batch, o_row, o_head, lse_batch, lse_head;
    int seqlen_q, seqlen_k, max_seqlen_q, max_seqlen_k, heads, group, batch, m_blocks, left, right;
    float scale_log2;
  };
};

template <int D>
__global__ void __launch_bounds__(384, 1) attention_fwd_kernel(const __grid_constant__ typename Fwd<D>::Params p) {
  using F = Fwd<D>;
  constexpr int BM = F::kBM, BN = F::kBN;
  extern __shared__ __align__(1024) char smem_raw[];
  auto& smem = *reinterpret_cast<typename F::Smem*>(smem_raw);

  const int bh_count = p.heads * p.batch;
  const int m_block = p.m_blocks - 1 - int(blockIdx.x / bh_count);  // heaviest (causal) blocks first
  const int bh = int(blockIdx.x % bh_count);
  const int b = bh / p.heads, h = bh % p.heads, h_kv = h / p.group;
  const Seq s = seq_of(p, b);
  if (m_block * BM >= s.len_q) return;  // past this document's end (varlen): every thread leaves
  const Window win{p.left, p.right, s.len_k - s.len_q, s.len_k};
  const int last_row = min(m_block * BM + BM, s.len_q) - 1;
  const int key_end = p.right < 0 ? s.len_k : max(0, min(s.len_k, last_row + win.off + p.right + 1));
  const int key_begin = p.left < 0 ? 0 : max(0, m_block * BM + win.off - p.left);
  const int n_end = (key_end + BN - 1) / BN, n_begin = min(key_begin / BN, n_end);
  const int wg = threadIdx.x / 128;

  if (n_end <= n_begin) {  // no query row of this block sees a key: out = 0, lse = +inf
    if (wg == 0) return;
    const int t = threadIdx.x - 128;
    for (int i = t; i < BM * D; i += 256) {
      const int r = i / D, c = i % D, row = m_block * BM + r;
      if (row < s.len_q)
        p.o[int64_t(s.off_q + row) * p.o_row + int64_t(h) * p.o_head + int64_t(s.tma_b) * p.o_batch + c] = Element(0.f);
    }
    for (int r = t; r < BM; r += 256) {
      const int row = m_block * BM + r;
      if (row < s.len_q) p.lse[int64_t(s.tma_b) * p.lse_batch + int64_t(h) * p.lse_head + s.off_q + row] = INFINITY;
    }
    return;
  }

  Tensor sQ = make_tensor(make_smem_ptr(smem.q.data()), typename F::SmemQ{})(_, _, 0);
  Tensor sK = make_tensor(make_smem_ptr(smem.k.data()), typename F::SmemK{});
  Tensor sV = make_tensor(make_smem_ptr(smem.v.data()), typename F::SmemK{});
  Tensor sVt = make_tensor(make_smem_ptr(smem.v.data()), typename F::SmemVt{});

  using Pipe = typename F::Pipe;
  const auto pp = pipe_params<Pipe>(F::kTileBytes);
  if (threadIdx.x == 0) smem.bar_q.init(1);
  Pipe pipe_k(smem.pipe_k, pp, Shape<_1, _1, _1>{});
  Pipe pipe_v(smem.pipe_v, pp, Shape<_1, _1, _1>{});
  cutlass::arch::fence_barrier_init();
  __syncthreads();

  if (wg == 0) {  // producer
    cutlass::arch::warpgroup_reg_dealloc<24>();
    if (threadIdx.x != 0) return;
    Tensor mQ = p.tma_q.get_tma_tensor(p.shape_q);
    Tensor mK = p.tma_k.get_tma_tensor(p.shape_k);
    Tensor mV = p.tma_v.get_tma_tensor(p.shape_k);
    Tensor gQ = local_tile(domain_offset(make_coord(s.off_q, _0{}), mQ(_, _, h, s.tma_b)), Shape<Int<BM>, Int<D>>{},
                           make_coord(m_block, _0{}));
    Tensor gK = local_tile(domain_offset(make_coord(s.off_k, _0{}), mK(_, _, h_kv, s.tma_b)),
                           Shape<Int<BN>, Int<D>>{}, make_coord(_, _0{}));
    Tensor gV = local_tile(domain_offset(make_coord(s.off_k, _0{}), mV(_, _, h_kv, s.tma_b)),
                           Shape<Int<BN>, Int<D>>{}, make_coord(_, _0{}));
    auto [tQg, tQs] = tma_partition(p.tma_q, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sQ), group_modes<0, 2>(gQ));
    auto [tKg, tKs] = tma_partition(p.tma_k, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sK), group_modes<0, 2>(gK));
    auto [tVg, tVs] = tma_partition(p.tma_v, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sV), group_modes<0, 2>(gV));
    smem.bar_q.arrive_and_expect_tx(uint32_t(BM * D * sizeof(Element)));
    copy(p.tma_q.with(reinterpret_cast<uint64_t&>(smem.bar_q), 0), tQg, tQs);
    auto st = cutlass::make_producer_start_state<Pipe>();
    for (int n = n_end - 1; n >= n_begin; --n) {
      pipe_k.producer_acquire(st);
      copy(p.tma_k.with(*pipe_k.producer_get_barrier(st), 0), tKg(_, n), tKs(_, st.index()));
      pipe_v.producer_acquire(st);
      copy(p.tma_v.with(*pipe_v.producer_get_barrier(st), 0), tVg(_, n), tVs(_, st.index()));
      ++st;
    }
    return;
  }

  // consumers
  cutlass::arch::warpgroup_reg_alloc<240>();
  const int t = threadIdx.x - 128;
  typename F::MmaQK mma_qk;
  typename F::MmaPV mma_pv;
  auto thr_qk = mma_qk.get_thread_slice(t);
  auto thr_pv = mma_pv.get_thread_slice(t);
  Tensor tSrQ = thr_qk.partition_fragment_A(sQ);
  Tensor tSrK = thr_qk.partition_fragment_B(sK);
  Tensor tOrV = thr_pv.partition_fragment_B(sVt);
  Tensor tSrS = partition_fragment_C(mma_qk, Shape<Int<BM>, Int<BN>>{});
  Tensor tOrO = partition_fragment_C(mma_pv, Shape<Int<BM>, Int<D>>{});
  Tensor rP = make_tensor<Element>(tSrS.layout());
  Tensor tOrP = make_tensor(rP.data(), acc_as_a(rP.layout()));
  Tensor tScS = thr_qk.partition_C(make_identity_tensor(Shape<Int<BM>, Int<BN>>{}));
  Tensor S = make_tensor(tSrS.data(), rowcol(tSrS.layout()));
  Tensor cS = make_tensor(tScS.data(), rowcol(tScS.layout()));
  Tensor O = make_tensor(tOrO.data(), rowcol(tOrO.layout()));
  constexpr int R = decltype(size<0>(S))::value;  // rows held by this thread (2)
  float row_max[R], row_sum[R], rescale[R];
  CUTE_UNROLL
  for (int r = 0; r < R; ++r) row_max[r] = -INFINITY, row_sum[r] = 0.f, rescale[r] = 1.f;
  clear(tOrO);

  // Mask, then the online softmax over one block of scores: S becomes P = exp(S - max) (max in
  // log2 units, -inf rows count as 0 so exp gives 0, never NaN), rescale[] what O must be scaled by.
  auto softmax = [&](int n, bool masked) {
    if (masked) {
      CUTE_UNROLL
      for (int r = 0; r < R; ++r) {
        CUTE_UNROLL
        for (int c = 0; c < size<1>(S); ++c) {
          const int i = m_block * BM + get<0>(cS(r, c)), j = n * BN + get<1>(cS(r, c));
          if (!win.keep(i, j)) S(r, c) = -INFINITY;
        }
      }
    }
    CUTE_UNROLL
    for (int r = 0; r < R; ++r) {
      float m = row_max[r];
      CUTE_UNROLL
      for (int c = 0; c < size<1>(S); ++c) m = fmaxf(m, S(r, c));
      m = quad_max(m);
      const float m_old = row_max[r] == -INFINITY ? 0.f : row_max[r] * p.scale_log2;
      const float m_new = m == -INFINITY ? 0.f : m * p.scale_log2;
      rescale[r] = exp2f(m_old - m_new);
      row_max[r] = m;
      float sum = 0.f;
      CUTE_UNROLL
      for (int c = 0; c < size<1>(S); ++c) {
        S(r, c) = exp2f(S(r, c) * p.scale_log2 - m_new);
        sum += S(r, c);
      }
      row_sum[r] = row_sum[r] * rescale[r] + sum;
    }
  };
  auto needs_mask = [&](int n) {
    const int j0 = n * BN, j1 = n * BN + BN - 1, i0 = m_block * BM, i1 = last_row;
    return j1 >= s.len_k || (p.right >= 0 && j1 > i0 + win.off + p.right) ||
           (p.left >= 0 && j0 < i1 + win.off - p.left);
  };
  auto rescale_o = [&]() {
    CUTE_UNROLL
    for (int r = 0; r < R; ++r) {
      CUTE_UNROLL
      for (int c = 0; c < size<1>(O); ++c) O(r, c) *= rescale[r];
    }
  };

  smem.bar_q.wait(0);
  cutlass::PipelineState<F::kStages> st;
  pipe_k.consumer_wait(st);
  wg_gemm<true, 0>(mma_qk, tSrQ, tSrK(_, _, _, st.index()), tSrS);
  pipe_k.consumer_release(st);
  softmax(n_end - 1, needs_mask(n_end - 1));
  to_bf16(tSrS, rP);
  for (int n = n_end - 2; n >= n_begin; --n) {
    auto next = st;
    ++next;
    pipe_k.consumer_wait(next);
    wg_gemm<true, -1>(mma_qk, tSrQ, tSrK(_, _, _, next.index()), tSrS);  // next block's scores...
    rescale_o();
    pipe_v.consumer_wait(st);
    wg_gemm<false, -1>(mma_pv, tOrP, tOrV(_, _, _, st.index()), tOrO);  // ...while this block's P V runs
    warpgroup_wait<1>();
    pipe_k.consumer_release(next);
    softmax(n, needs_mask(n));
    warpgroup_wait<0>();
    pipe_v.consumer_release(st);
    to_bf16(tSrS, rP);
    st = next;
  }
  rescale_o();
  pipe_v.consumer_wait(st);
  wg_gemm<false, 0>(mma_pv, tOrP, tOrV(_, _, _, st.index()), tOrO);
  pipe_v.consumer_release(st);

  // out = O / rowsum, lse = max * scale + log(rowsum); a row that saw no key: 0 and +inf.
  Tensor tOcO = thr_pv.partition_C(make_identity_tensor(Shape<Int<BM>, Int<D>>{}));
  Tensor cO = make_tensor(tOcO.data(), rowcol(tOcO.layout()));
  Element* o_head = p.o + int64_t(h) * p.o_head + int64_t(s.tma_b) * p.o_batch;
  float* lse_head = p.lse + int64_t(s.tma_b) * p.lse_batch + int64_t(h) * p.lse_head + s.off_q;
  CUTE_UNROLL
  for (int r = 0; r < R; ++r) {
    const float sum = quad_sum(row_sum[r]);
    const float inv = sum > 0.f ? 1.f / sum : 0.f;
    const int row = m_block * BM + get<0>(cO(r, 0));
    if (row >= s.len_q) continue;
    Element* o_row = o_head + int64_t(s.off_q + row) * p.o_row;
    CUTE_UNROLL
    for (int c = 0; c < size<1>(O); ++c) o_row[get<1>(cO(r, c))] = Element(O(r, c) * inv);
    if (get<1>(cO(r, 0)) == 0) {
      const float m = row_max[r] == -INFINITY ? 0.f : row_max[r] * p.scale_log2;
      lse_head[row] = sum > 0.f ? (m + log2f(sum)) * kLn2 : INFINITY;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------

template <int D>
struct Bwd {
  static constexpr int kBM = 64, kBN = 128, kStages = 2, kThreads = 384;
  using SmemK = SmemTile<kBN, D>;
  using SmemKt = Transposed<SmemK>;
  using SmemQ = SmemTile<kBM, D, kStages>;
  using SmemQt = Transposed<SmemQ>;
  using SmemDS = SmemTile<kBM, kBN>;  // dS (queries, keys), keys contiguous: the K-major A of dS K
  using SmemDSt = Transposed<SmemDS>;
  // S^T = K Q^T and dP^T = V dO^T: 64 keys per warpgroup.
  using MmaSdp = decltype(make_tiled_mma(GMMA::ss_op_selector<Element, Element, float, Shape<_64, Int<kBM>, Int<D>>>(),
                                         Layout<Shape<_2, _1, _1>>{}));
  // dV += P^T dO and dK += dS^T Q: A from registers, B read MN-major.
  using MmaKV = decltype(make_tiled_mma(GMMA::rs_op_selector<Element, Element, float, Shape<_64, Int<D>, Int<kBM>>,
                                                             GMMA::Major::K, GMMA::Major::MN>(),
                                        Layout<Shape<_2, _1, _1>>{}));
  // dQ = dS K: 64 queries, half the head dim per warpgroup.
  using MmaDQ = decltype(make_tiled_mma(GMMA::ss_op_selector<Element, Element, float, Shape<_64, Int<D / 2>, Int<kBN>>,
                                                             GMMA::Major::K, GMMA::Major::MN>(),
                                        Layout<Shape<_1, _2, _1>>{}));
  using TmaQ = TmaLoad<decltype(take<0, 2>(SmemQ{})), Shape<Int<kBM>, Int<D>>>;
  using TmaK = TmaLoad<decltype(take<0, 2>(SmemK{})), Shape<Int<kBN>, Int<D>>>;
  using Pipe = cutlass::PipelineTmaAsync<kStages>;
  struct Smem {
    alignas(1024) array_aligned<Element, cosize_v<SmemK>, 1024> k;
    alignas(1024) array_aligned<Element, cosize_v<SmemK>, 1024> v;
    alignas(1024) array_aligned<Element, cosize_v<SmemQ>, 1024> q;
    alignas(1024) array_aligned<Element, cosize_v<SmemQ>, 1024> dout;
    alignas(1024) array_aligned<Element, cosize_v<SmemDS>, 1024> ds;
    alignas(16) cutlass::arch::ClusterTransactionBarrier bar_kv;
    typename Pipe::SharedStorage pipe_q;
  };
  static constexpr int kSmemBytes = int(sizeof(Smem));
  static constexpr uint32_t kQTileBytes = uint32_t(kBM * D * sizeof(Element));

  struct Params {
    TmaQ tma_q, tma_do;
    TmaK tma_k, tma_v;
    GmemShape shape_q, shape_k;
    Element* dk;
    Element* dv;
    float* dq_accum;  // (rows, heads, D) fp32 laid out like a contiguous q
    const float* lse;
    const float* delta;  // rowsum(dO * O), laid out like lse
    const int* cu_q;
    const int* cu_k;
    int64_t dk_batch, dk_row, dk_head, dv_batch, dv_row, dv_head, dq_batch, dq_row, lse_batch, lse_head;
    int seqlen_q, seqlen_k, max_seqlen_q, max_seqlen_k, heads, group, batch_kv_items, n_blocks, left, right;
    float scale, scale_log2;
  };
};

template <int D>
__global__ void __launch_bounds__(384, 1) attention_bwd_kernel(const __grid_constant__ typename Bwd<D>::Params p) {
  using B = Bwd<D>;
  constexpr int BM = B::kBM, BN = B::kBN;
  extern __shared__ __align__(1024) char smem_raw[];
  auto& smem = *reinterpret_cast<typename B::Smem*>(smem_raw);

  const int heads_kv = p.heads / p.group;
  const int items = p.batch_kv_items;  // batch * heads_kv
  const int n_block = int(blockIdx.x / items);
  const int b = int(blockIdx.x % items) / heads_kv, h_kv = int(blockIdx.x % items) % heads_kv;
  const Seq s = seq_of(p, b);
  if (n_block * BN >= s.len_k) return;
  const Window win{p.left, p.right, s.len_k - s.len_q, s.len_k};
  const int j0 = n_block * BN, j1 = min(j0 + BN, s.len_k);  // this CTA's keys [j0, j1)
  const int q_begin = p.right < 0 ? 0 : max(0, j0 - win.off - p.right);
  const int q_end = p.left < 0 ? s.len_q : max(0, min(s.len_q, j1 - 1 - win.off + p.left + 1));
  const int m_begin = q_begin / BM, m_end = max(m_begin, (q_end + BM - 1) / BM);
  const int steps = (m_end - m_begin) * p.group;  // (query head of the group, query block) pairs
  const int wg = threadIdx.x / 128;

  Tensor sK = make_tensor(make_smem_ptr(smem.k.data()), typename B::SmemK{})(_, _, 0);
  Tensor sV = make_tensor(make_smem_ptr(smem.v.data()), typename B::SmemK{})(_, _, 0);
  Tensor sKt = make_tensor(make_smem_ptr(smem.k.data()), typename B::SmemKt{})(_, _, 0);
  Tensor sQ = make_tensor(make_smem_ptr(smem.q.data()), typename B::SmemQ{});
  Tensor sDO = make_tensor(make_smem_ptr(smem.dout.data()), typename B::SmemQ{});
  Tensor sQt = make_tensor(make_smem_ptr(smem.q.data()), typename B::SmemQt{});
  Tensor sDOt = make_tensor(make_smem_ptr(smem.dout.data()), typename B::SmemQt{});
  Tensor sDS = make_tensor(make_smem_ptr(smem.ds.data()), typename B::SmemDS{})(_, _, 0);
  Tensor sDSt = make_tensor(make_smem_ptr(smem.ds.data()), typename B::SmemDSt{})(_, _, 0);

  using Pipe = typename B::Pipe;
  const auto pp = pipe_params<Pipe>(2 * B::kQTileBytes);  // q and dO of one step
  if (threadIdx.x == 0) smem.bar_kv.init(1);
  Pipe pipe_q(smem.pipe_q, pp, Shape<_1, _1, _1>{});
  cutlass::arch::fence_barrier_init();
  __syncthreads();

  if (wg == 0) {  // producer
    cutlass::arch::warpgroup_reg_dealloc<24>();
    if (threadIdx.x != 0 || steps == 0) return;
    Tensor mK = p.tma_k.get_tma_tensor(p.shape_k);
    Tensor mV = p.tma_v.get_tma_tensor(p.shape_k);
    Tensor gK = local_tile(domain_offset(make_coord(s.off_k, _0{}), mK(_, _, h_kv, s.tma_b)),
                           Shape<Int<BN>, Int<D>>{}, make_coord(n_block, _0{}));
    Tensor gV = local_tile(domain_offset(make_coord(s.off_k, _0{}), mV(_, _, h_kv, s.tma_b)),
                           Shape<Int<BN>, Int<D>>{}, make_coord(n_block, _0{}));
    auto [tKg, tKs] = tma_partition(p.tma_k, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sK), group_modes<0, 2>(gK));
    auto [tVg, tVs] = tma_partition(p.tma_v, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sV), group_modes<0, 2>(gV));
    smem.bar_kv.arrive_and_expect_tx(uint32_t(2 * BN * D * sizeof(Element)));
    copy(p.tma_k.with(reinterpret_cast<uint64_t&>(smem.bar_kv), 0), tKg, tKs);
    copy(p.tma_v.with(reinterpret_cast<uint64_t&>(smem.bar_kv), 0), tVg, tVs);
    Tensor mQ = p.tma_q.get_tma_tensor(p.shape_q);
    Tensor mDO = p.tma_do.get_tma_tensor(p.shape_q);
    auto st = cutlass::make_producer_start_state<Pipe>();
    for (int g = 0; g < p.group; ++g) {
      const int h = h_kv * p.group + g;
      Tensor gQ = local_tile(domain_offset(make_coord(s.off_q, _0{}), mQ(_, _, h, s.tma_b)),
                             Shape<Int<BM>, Int<D>>{}, make_coord(_, _0{}));
      Tensor gDO = local_tile(domain_offset(make_coord(s.off_q, _0{}), mDO(_, _, h, s.tma_b)),
                              Shape<Int<BM>, Int<D>>{}, make_coord(_, _0{}));
      auto [tQg, tQs] = tma_partition(p.tma_q, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sQ), group_modes<0, 2>(gQ));
      auto [tDg, tDs] =
          tma_partition(p.tma_do, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sDO), group_modes<0, 2>(gDO));
      for (int m = m_begin; m < m_end; ++m) {
        pipe_q.producer_acquire(st);
        copy(p.tma_q.with(*pipe_q.producer_get_barrier(st), 0), tQg(_, m), tQs(_, st.index()));
        copy(p.tma_do.with(*pipe_q.producer_get_barrier(st), 0), tDg(_, m), tDs(_, st.index()));
        ++st;
      }
    }
    return;
  }

  // consumers: warpgroup w - 1 owns keys [j0 + 64 (w - 1), +64)
  cutlass::arch::warpgroup_reg_alloc<240>();
  const int t = threadIdx.x - 128;
  typename B::MmaSdp mma_sdp;
  typename B::MmaKV mma_kv;
  typename B::MmaDQ mma_dq;
  auto thr_sdp = mma_sdp.get_thread_slice(t);
  auto thr_kv = mma_kv.get_thread_slice(t);
  auto thr_dq = mma_dq.get_thread_slice(t);
  Tensor tSrK = thr_sdp.partition_fragment_A(sK);
  Tensor tSrV = thr_sdp.partition_fragment_A(sV);
  Tensor tSrQ = thr_sdp.partition_fragment_B(sQ);     // (MMA, N, K, stages)
  Tensor tSrDO = thr_sdp.partition_fragment_B(sDO);
  Tensor tKVrDOt = thr_kv.partition_fragment_B(sDOt);  // dV's B: dO read (D, queries)
  Tensor tKVrQt = thr_kv.partition_fragment_B(sQt);    // dK's B: Q read (D, queries)
  Tensor tDQrDS = thr_dq.partition_fragment_A(sDS);
  Tensor tDQrKt = thr_dq.partition_fragment_B(sKt);
  Tensor tSrS = partition_fragment_C(mma_sdp, Shape<Int<BN>, Int<BM>>{});
  Tensor tSrDP = partition_fragment_C(mma_sdp, Shape<Int<BN>, Int<BM>>{});
  Tensor tdVrdV = partition_fragment_C(mma_kv, Shape<Int<BN>, Int<D>>{});
  Tensor tdKrdK = partition_fragment_C(mma_kv, Shape<Int<BN>, Int<D>>{});
  Tensor tdQrdQ = partition_fragment_C(mma_dq, Shape<Int<BM>, Int<D>>{});
  Tensor rP = make_tensor<Element>(tSrS.layout());
  Tensor rDS = make_tensor<Element>(tSrS.layout());
  Tensor tKVrP = make_tensor(rP.data(), acc_as_a(rP.layout()));
  Tensor tKVrDS = make_tensor(rDS.data(), acc_as_a(rDS.layout()));
  Tensor tScS = thr_sdp.partition_C(make_identity_tensor(Shape<Int<BN>, Int<BM>>{}));
  Tensor tSsDSt = thr_sdp.partition_C(sDSt);  // where this thread's dS^T values go in shared memory
  Tensor S = make_tensor(tSrS.data(), rowcol(tSrS.layout()));  // rows: keys, cols: queries
  Tensor DP = make_tensor(tSrDP.data(), rowcol(tSrDP.layout()));
  Tensor cS = make_tensor(tScS.data(), rowcol(tScS.layout()));
  Tensor tQcQ = thr_dq.partition_C(make_identity_tensor(Shape<Int<BM>, Int<D>>{}));
  clear(tdVrdV);
  clear(tdKrdK);
  constexpr int R = decltype(size<0>(S))::value, C = decltype(size<1>(S))::value;
  cutlass::arch::NamedBarrier ds_free(256, 1), ds_ready(256, 2);

  if (steps > 0) smem.bar_kv.wait(0);
  cutlass::PipelineState<B::kStages> st;
  for (int step = 0; step < steps; ++step, ++st) {
    const int g = step / (m_end - m_begin), m = m_begin + step % (m_end - m_begin);
    const int h = h_kv * p.group + g;
    const int64_t lse_off = int64_t(s.tma_b) * p.lse_batch + int64_t(h) * p.lse_head + s.off_q;
    pipe_q.consumer_wait(st);
    wg_gemm<true, -1>(mma_sdp, tSrK, tSrQ(_, _, _, st.index()), tSrS);
    wg_gemm<true, -1>(mma_sdp, tSrV, tSrDO(_, _, _, st.index()), tSrDP);
    warpgroup_wait<1>();
    const bool masked = (j0 + BN > s.len_k) || (p.right >= 0 && j0 + BN - 1 > m * BM + win.off + p.right) ||
                        (p.left >= 0 && j0 < m * BM + BM - 1 + win.off - p.left);
    // P = exp(S * scale - lse) per query column (lse read where it is used: registers are the
    // limit at d128); rows past len_q have lse +inf and delta 0, so P = dS = 0 there.
    CUTE_UNROLL
    for (int c = 0; c < C; ++c) {
      const int i = m * BM + get<1>(cS(0, c));
      const float lse = i < s.len_q ? p.lse[lse_off + i] * kLog2e : INFINITY;
      CUTE_UNROLL
      for (int r = 0; r < R; ++r) {
        const bool keep = !masked || win.keep(i, j0 + get<0>(cS(r, c)));
        S(r, c) = keep ? exp2f(S(r, c) * p.scale_log2 - lse) : 0.f;
      }
    }
    warpgroup_wait<0>();
    CUTE_UNROLL
    for (int c = 0; c < C; ++c) {
      const int i = m * BM + get<1>(cS(0, c));
      const float delta = i < s.len_q ? p.delta[lse_off + i] : 0.f;
      CUTE_UNROLL
      for (int r = 0; r < R; ++r) DP(r, c) = S(r, c) * (DP(r, c) - delta);  // dS (unscaled)
    }
    to_bf16(tSrS, rP);
    to_bf16(tSrDP, rDS);
    wg_gemm<false, -1>(mma_kv, tKVrP, tKVrDOt(_, _, _, st.index()), tdVrdV);
    wg_gemm<false, -1>(mma_kv, tKVrDS, tKVrQt(_, _, _, st.index()), tdKrdK);
    ds_free.arrive_and_wait();  // both warpgroups are done reading the previous dS
    CUTE_UNROLL
    for (int i = 0; i < size(rDS); ++i) tSsDSt(i) = rDS(i);
    cutlass::arch::fence_view_async_shared();  // generic-proxy writes, read next by wgmma
    ds_ready.arrive_and_wait();
    wg_gemm<true, 0>(mma_dq, tDQrDS, tDQrKt, tdQrdQ);  // also retires dV and dK's batches
    pipe_q.consumer_release(st);
    float* dq_rows = p.dq_accum + int64_t(s.tma_b) * p.dq_batch + int64_t(h) * D;
    CUTE_UNROLL
    for (int i = 0; i < size(tdQrdQ); ++i) {
      const int qi = m * BM + get<0>(tQcQ(i));
      if (qi < s.len_q) atomicAdd(dq_rows + int64_t(s.off_q + qi) * p.dq_row + get<1>(tQcQ(i)), tdQrdQ(i));
    }
  }

  // dK = scale * dS^T Q, dV = P^T dO; keys past len_k are not written. A CTA with no query step
  // writes zeros (no query sees these keys).
  Tensor tKVcKV = thr_kv.partition_C(make_identity_tensor(Shape<Int<BN>, Int<D>>{}));
  Element* dk = p.dk + int64_t(s.tma_b) * p.dk_batch + int64_t(h_kv) * p.dk_head;
  Element* dv = p.dv + int64_t(s.tma_b) * p.dv_batch + int64_t(h_kv) * p.dv_head;
  CUTE_UNROLL
  for (int i = 0; i < size(tdKrdK); ++i) {
    const int j = j0 + get<0>(tKVcKV(i)), c = get<1>(tKVcKV(i));
    if (j < s.len_k) {
      dk[int64_t(s.off_k + j) * p.dk_row + c] = Element(tdKrdK(i) * p.scale);
      dv[int64_t(s.off_k + j) * p.dv_row + c] = Element(tdVrdV(i));
    }
  }
}

// delta[row] = sum_d dO[row, d] * O[row, d] in fp32, one warp per (row, head), in lse's layout.
__global__ void attention_bwd_delta_kernel(const __nv_bfloat16* dout, const __nv_bfloat16* out, float* delta,
                                           int64_t rows, int heads, int d, int64_t rows_per_batch,
                                           int64_t do_batch, int64_t do_row, int64_t do_head, int64_t o_batch,
                                           int64_t o_row, int64_t o_head, int64_t lse_batch, int64_t lse_head) {
  const int64_t warp = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (warp >= rows * heads) return;
  const int64_t row = warp / heads, b = row / rows_per_batch, i = row % rows_per_batch;
  const int h = int(warp % heads);
  const __nv_bfloat16* pd = dout + b * do_batch + i * do_row + h * do_head;
  const __nv_bfloat16* po = out + b * o_batch + i * o_row + h * o_head;
  float acc = 0.f;
  for (int c = lane; c < d; c += 32) acc += __bfloat162float(pd[c]) * __bfloat162float(po[c]);
  acc = warp_sum(acc);
  if (lane == 0) delta[b * lse_batch + h * lse_head + i] = acc;
}

// dq = bf16(dq_accum * scale), both (rows, heads, d) contiguous.
__global__ void attention_bwd_dq_kernel(const float* dq_accum, __nv_bfloat16* dq, int64_t n, float scale) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    dq[i] = __float2bfloat16_rn(dq_accum[i] * scale);
}

// (seq, D, heads, batch) gmem view for TMA.
inline auto gmem_view(std::uintptr_t ptr, int64_t seq, int64_t d, int64_t heads, int64_t batch, int64_t row,
                      int64_t head, int64_t bstride) {
  return make_tensor(make_gmem_ptr(reinterpret_cast<Element const*>(ptr)),
                     make_shape(int32_t(seq), int32_t(d), int32_t(heads), int32_t(batch)),
                     make_stride(row, _1{}, head, bstride));
}

template <class Kernel>
void set_smem(Kernel kernel, int bytes, const char* fn) {
  check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes), fn,
             "cudaFuncSetAttribute(max dynamic shared memory)");
}

template <int D>
void run_forward(const AttnArgs& a, cudaStream_t stream, const char* fn) {
  using F = Fwd<D>;
  const bool varlen = a.cu_q != 0;
  const int64_t tma_batch = varlen ? 1 : a.batch;
  auto mq = gmem_view(a.q, a.seqlen_q, D, a.heads, tma_batch, a.q_row, a.q_head, a.q_batch);
  auto mk = gmem_view(a.k, a.seqlen_k, D, a.heads_kv, tma_batch, a.k_row, a.k_head, a.k_batch);
  auto mv = gmem_view(a.v, a.seqlen_k, D, a.heads_kv, tma_batch, a.v_row, a.v_head, a.v_batch);
  typename F::Params p{
      make_tma_copy(SM90_TMA_LOAD{}, mq, take<0, 2>(typename F::SmemQ{}), Shape<Int<F::kBM>, Int<D>>{}, _1{}),
      make_tma_copy(SM90_TMA_LOAD{}, mk, take<0, 2>(typename F::SmemK{}), Shape<Int<F::kBN>, Int<D>>{}, _1{}),
      make_tma_copy(SM90_TMA_LOAD{}, mv, take<0, 2>(typename F::SmemK{}), Shape<Int<F::kBN>, Int<D>>{}, _1{}),
      mq.shape(),
      mk.shape(),
      reinterpret_cast<Element*>(a.o),
      reinterpret_cast<float*>(a.lse),
      reinterpret_cast<const int*>(a.cu_q),
      reinterpret_cast<const int*>(a.cu_k),
      varlen ? 0 : a.o_batch,
      a.o_row,
      a.o_head,
      varlen ? 0 : a.lse_batch,
      a.lse_head,
      int(a.seqlen_q),
      int(a.seqlen_k),
      int(varlen ? a.max_seqlen_q : a.seqlen_q),
      int(varlen ? a.max_seqlen_k : a.seqlen_k),
      int(a.heads),
      int(a.heads / a.heads_kv),
      int(a.batch),
      int(ceil_div(varlen ? a.max_seqlen_q : a.seqlen_q, F::kBM)),
      int(a.left),
      int(a.right),
      float(a.scale * double(kLog2e))};
  const int64_t grid = int64_t(p.m_blocks) * a.heads * a.batch;
  if (grid == 0) return;
  require_arg(grid < (1ll << 31), fn, "too many (query block, head, batch) work items for one launch");
  set_smem(attention_fwd_kernel<D>, F::kSmemBytes, fn);
  attention_fwd_kernel<D><<<dim3(unsigned(grid)), dim3(F::kThreads), F::kSmemBytes, stream>>>(p);
  check_launch(fn);
}

template <int D>
void run_backward(const AttnArgs& a, const AttnGradArgs& g, cudaStream_t stream, const char* fn) {
  using Bw = Bwd<D>;
  const bool varlen = a.cu_q != 0;
  const int64_t tma_batch = varlen ? 1 : a.batch;
  const int64_t rows_q = varlen ? a.seqlen_q : a.batch * a.seqlen_q;
  // delta = rowsum(dO * O), in lse's layout
  {
    const int64_t warps = rows_q * a.heads;
    const int64_t blocks = ceil_div(warps * 32, 256);
    if (blocks > 0) {
      attention_bwd_delta_kernel<<<dim3(unsigned(blocks)), 256, 0, stream>>>(
          reinterpret_cast<const __nv_bfloat16*>(g.dout), reinterpret_cast<const __nv_bfloat16*>(a.o),
          reinterpret_cast<float*>(g.delta), rows_q, int(a.heads), int(a.head_dim),
          a.seqlen_q, varlen ? 0 : g.do_batch, g.do_row, g.do_head, varlen ? 0 : a.o_batch,
          a.o_row, a.o_head, varlen ? 0 : a.lse_batch, a.lse_head);
      check_launch(fn);
    }
  }
  check_cuda(cudaMemsetAsync(reinterpret_cast<void*>(g.dq_accum), 0, size_t(rows_q * a.heads * D) * sizeof(float),
                             stream),
             fn, "cudaMemsetAsync(dq_accum)");
  auto mq = gmem_view(a.q, a.seqlen_q, D, a.heads, tma_batch, a.q_row, a.q_head, a.q_batch);
  auto mdo = gmem_view(g.dout, a.seqlen_q, D, a.heads, tma_batch, g.do_row, g.do_head, g.do_batch);
  auto mk = gmem_view(a.k, a.seqlen_k, D, a.heads_kv, tma_batch, a.k_row, a.k_head, a.k_batch);
  auto mv = gmem_view(a.v, a.seqlen_k, D, a.heads_kv, tma_batch, a.v_row, a.v_head, a.v_batch);
  const int64_t max_k = varlen ? a.max_seqlen_k : a.seqlen_k;
  typename Bw::Params p{
      make_tma_copy(SM90_TMA_LOAD{}, mq, take<0, 2>(typename Bw::SmemQ{}), Shape<Int<Bw::kBM>, Int<D>>{}, _1{}),
      make_tma_copy(SM90_TMA_LOAD{}, mdo, take<0, 2>(typename Bw::SmemQ{}), Shape<Int<Bw::kBM>, Int<D>>{}, _1{}),
      make_tma_copy(SM90_TMA_LOAD{}, mk, take<0, 2>(typename Bw::SmemK{}), Shape<Int<Bw::kBN>, Int<D>>{}, _1{}),
      make_tma_copy(SM90_TMA_LOAD{}, mv, take<0, 2>(typename Bw::SmemK{}), Shape<Int<Bw::kBN>, Int<D>>{}, _1{}),
      mq.shape(),
      mk.shape(),
      reinterpret_cast<Element*>(g.dk),
      reinterpret_cast<Element*>(g.dv),
      reinterpret_cast<float*>(g.dq_accum),
      reinterpret_cast<const float*>(a.lse),
      reinterpret_cast<const float*>(g.delta),
      reinterpret_cast<const int*>(a.cu_q),
      reinterpret_cast<const int*>(a.cu_k),
      varlen ? 0 : g.dk_batch,
      g.dk_row,
      g.dk_head,
      varlen ? 0 : g.dv_batch,
      g.dv_row,
      g.dv_head,
      varlen ? 0 : a.seqlen_q * a.heads * D,
      a.heads * D,
      varlen ? 0 : a.lse_batch,
      a.lse_head,
      int(a.seqlen_q),
      int(a.seqlen_k),
      int(varlen ? a.max_seqlen_q : a.seqlen_q),
      int(max_k),
      int(a.heads),
      int(a.heads / a.heads_kv),
      int(a.batch * a.heads_kv),
      int(ceil_div(max_k, Bw::kBN)),
      int(a.left),
      int(a.right),
      float(a.scale),
      float(a.scale * double(kLog2e))};
  const int64_t grid = int64_t(p.n_blocks) * a.batch * a.heads_kv;
  require_arg(grid < (1ll << 31), fn, "too many (key block, kv head, batch) work items for one launch");
  if (grid > 0) {
    set_smem(attention_bwd_kernel<D>, Bw::kSmemBytes, fn);
    attention_bwd_kernel<D><<<dim3(unsigned(grid)), dim3(Bw::kThreads), Bw::kSmemBytes, stream>>>(p);
    check_launch(fn);
  }
  const int64_t n = rows_q * a.heads * D;
  if (n > 0) {
    const int blocks = int(std::min<int64_t>(ceil_div(n, 256), 65536));
    attention_bwd_dq_kernel<<<blocks, 256, 0, stream>>>(reinterpret_cast<const float*>(g.dq_accum),
                                                        reinterpret_cast<__nv_bfloat16*>(g.dq), n, float(a.scale));
    check_launch(fn);
  }
}

}  // namespace attn_sm90
#endif  // TOKENFORGE_CUTLASS_SM90

std::string attention_sm90_unavailable() { return cutlass_sm90_missing("CUDA C++ attention"); }

namespace {
AttnArgs make_args(std::uintptr_t q, std::uintptr_t k, std::uintptr_t v, std::uintptr_t o, std::uintptr_t lse,
                   std::uintptr_t cu_q, std::uintptr_t cu_k, const std::vector<std::int64_t>& sizes,
                   const std::vector<std::int64_t>& strides, double scale, std::int64_t left, std::int64_t right,
                   const char* fn) {
  // sizes: batch, seqlen_q, seqlen_k, max_seqlen_q, max_seqlen_k, heads, heads_kv, head_dim
  // strides: q (batch, row, head), k (...), v (...), o (...), lse (batch, head)
  require_arg(sizes.size() == 8, fn, "sizes must hold 8 values");
  require_arg(strides.size() == 14, fn, "strides must hold 14 values");
  return AttnArgs{q, k, v, o, lse, cu_q, cu_k, sizes[0], sizes[1], sizes[2], sizes[3], sizes[4], sizes[5],
                  sizes[6], sizes[7], strides[0], strides[1], strides[2], strides[3], strides[4], strides[5],
                  strides[6], strides[7], strides[8], strides[9], strides[10], strides[11], strides[12],
                  strides[13], scale, left, right};
}
}  // namespace

void attention_sm90_forward(std::uintptr_t q, std::uintptr_t k, std::uintptr_t v, std::uintptr_t o,
                            std::uintptr_t lse, std::uintptr_t cu_q, std::uintptr_t cu_k,
                            const std::vector<std::int64_t>& sizes, const std::vector<std::int64_t>& strides,
                            double scale, std::int64_t left, std::int64_t right, std::uintptr_t stream) {
  const char* fn = "attention_sm90_forward";
  const std::string why = attention_sm90_unavailable();
  require_arg(why.empty(), fn, why);
  const AttnArgs a = make_args(q, k, v, o, lse, cu_q, cu_k, sizes, strides, scale, left, right, fn);
  check_attn_args(a, fn);
  require_cuda_device(fn);
  require_sm90(fn, "the CUDA C++ attention");
#if defined(TOKENFORGE_CUTLASS_SM90)
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  if (a.head_dim == 64)
    attn_sm90::run_forward<64>(a, s, fn);
  else
    attn_sm90::run_forward<128>(a, s, fn);
#else
  (void)stream;
#endif
}

void attention_sm90_backward(std::uintptr_t dout, std::uintptr_t q, std::uintptr_t k, std::uintptr_t v,
                             std::uintptr_t o, std::uintptr_t lse, std::uintptr_t cu_q, std::uintptr_t cu_k,
                             std::uintptr_t dq, std::uintptr_t dk, std::uintptr_t dv, std::uintptr_t dq_accum,
                             std::uintptr_t delta, const std::vector<std::int64_t>& sizes,
                             const std::vector<std::int64_t>& strides, const std::vector<std::int64_t>& grad_strides,
                             double scale, std::int64_t left, std::int64_t right, std::uintptr_t stream) {
  const char* fn = "attention_sm90_backward";
  const std::string why = attention_sm90_unavailable();
  require_arg(why.empty(), fn, why);
  const AttnArgs a = make_args(q, k, v, o, lse, cu_q, cu_k, sizes, strides, scale, left, right, fn);
  check_attn_args(a, fn);
  // grad_strides: dout (batch, row, head), dk (batch, row, head), dv (batch, row, head)
  require_arg(grad_strides.size() == 9, fn, "grad_strides must hold 9 values");
  const AttnGradArgs g{dout, dq, dk, dv, dq_accum, delta, grad_strides[0], grad_strides[1], grad_strides[2],
                       grad_strides[3], grad_strides[4], grad_strides[5], grad_strides[6], grad_strides[7],
                       grad_strides[8]};
  for (std::int64_t st : {g.do_batch, g.do_row, g.do_head})
    require_arg(st % 8 == 0 && st >= 0, fn, "dout strides must be multiples of 8 elements (TMA)");
  for (std::uintptr_t p : {dout, dq, dk, dv, dq_accum, delta})
    require_arg(p != 0 && is_aligned(p, 16), fn, "dout, dq, dk, dv and the buffers must be non-null and 16-byte aligned");
  require_cuda_device(fn);
  require_sm90(fn, "the CUDA C++ attention");
#if defined(TOKENFORGE_CUTLASS_SM90)
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  if (a.head_dim == 64)
    attn_sm90::run_backward<64>(a, g, s, fn);
  else
    attn_sm90::run_backward<128>(a, g, s, fn);
#else
  (void)stream;
#endif
}

}  // namespace tokenforge
