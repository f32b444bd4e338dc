// Blockwise attention backward (FlashAttention-2 style) for one K/V block in hand.
//
// Layouts (all contiguous):
//   q, dout, out  (B, Sq, H, D)        input dtype
//   k, v          (B, Sk, Hkv, D) each input dtype (the travelling buffer's halves, or the caller's)
//   lse2, delta   (B, H, Sq)   fp32    lse·log2(e), +1e30 where lse = −inf (the row had no key: p = 0);
//                                      delta = rowsum(dout∘out)
//   dq_acc        (B, Sq, H, D) fp32   += scale·dS·K   (atomic adds: many K tiles add to one Q row)
//   (the kernel keeps dS as scale·dS, so dQ and dK need no multiply of their own)
//   dq_sem        null, or int32 [1 + B·H·ceil(Sq/BM)], zero: deterministic dQ (below)
//   dkv           (2, B, Sk, Hkv, D) fp32  += scale·dSᵀ·Q and Pᵀ·dO (the travelling dK/dV partials);
//                                      `fresh`: = instead of += (dkv holds nothing yet: every row of
//                                      it is written, zero where no query meets the key)
//   hk0           the first KV head of the launch: the grid's x covers B · (KV heads launched),
//                 KV heads hk0 … of every batch (the ring launches a step in two parts by heads)
//
// One block owns BN keys of one (batch, kv head) and sweeps every query tile of BM
// rows of every q head of its GQA group, so dK/dV (summed over the group) stay in
// registers and are added to `dkv` once, without atomics. Per query tile, three
// phases with their own warp grids (FA2's): S = Q·Kᵀ and dP = dO·Vᵀ, then P and dS
// (rounded to the input dtype) go to shared memory; dV += Pᵀ·dO and dK += dSᵀ·Q read
// them transposed (ldmatrix.trans); dQ += dS·K is reduced into fp32 dq_acc.
//
// Deterministic dQ (dq_sem set): the key tiles that meet a query tile form a run
// [j_lo, j_hi) (positions and documents increase with the row index), and they add into
// it in a fixed order: one sequence, increasing (key tile j waits until the tile's
// counter reaches j − j_lo, adds, and raises it); packed documents, decreasing (key tile
// j waits for j_hi − 1 − j). Blocks take their (batch·kv head, key tile) from a ticket
// (dq_sem[0]), key tiles in the order they add, so a block only ever waits for blocks
// already running: no deadlock whatever order the hardware starts them in.
#include "common.cuh"

// Heads per group of the deterministic tickets (below).
#ifndef TICKET_GROUP
#define TICKET_GROUP 4
#endif
// Decreasing deterministic dQ order (and query tiles swept ascending) with documents
// (DQ_DESC_DOCS) and without (DQ_DESC_PLAIN); see `DESC` below. The launcher compiles
// DQ_DESC_DOCS=0 too and takes it for long documents (cupy_.DQ_INCREASING_DOCUMENTS).
#ifndef DQ_DESC_DOCS
#define DQ_DESC_DOCS 1
#endif
#ifndef DQ_DESC_PLAIN
#define DQ_DESC_PLAIN 0
#endif
// Documents: cu_seqlens copied to shared memory where it has at most this many entries.
#ifndef CU_SMEM
#define CU_SMEM 1024
#endif

#ifndef HEAD_DIM
#define HEAD_DIM 128
#endif
#ifndef BWD_NW
#define BWD_NW 8
#endif
#ifndef BWD_BM
#define BWD_BM 64
#endif
#ifndef BWD_BN
#define BWD_BN 128
#endif
// BWD_WGMMA=1 (sm_90a, head_dim 128, 8 warps, BM 64, BN 128): the five products on Hopper's
// warpgroup MMA (wgmma.cuh), FlashAttention-3's way. Warpgroup g owns keys 64g…64g+63 and
// computes Sᵀ = K·Qᵀ and dPᵀ = V·dOᵀ for them, so Pᵀ and dSᵀ come out in registers as the
// A operands of dV += Pᵀ·dO and dK += dSᵀ·Q; dSᵀ also goes to shared memory (keys × queries,
// swizzled), from where dQ = dS·K reads it as an M-major A operand, warpgroup g taking
// dims 64g…64g+63. Q, dO, K, V sit in 128-byte-swizzled tiles (load_rows_sw128); the
// work order, masks, documents and the deterministic dQ order are the mma.sync path's.
#ifndef BWD_WGMMA
#define BWD_WGMMA 0
#endif
#if BWD_WGMMA
#include "wgmma.cuh"
#endif

template <typename T, int D, int NW, int BM, int BN, bool DOCS>
__device__ __forceinline__ void attn_bwd_body(const u16* __restrict__ q, const u16* __restrict__ k,
                                              const u16* __restrict__ v,
                                              const u16* __restrict__ dout, const float* __restrict__ lse2,
                                              const float* __restrict__ delta, float* __restrict__ dq_acc,
                                              float* __restrict__ dkv, int* __restrict__ dq_sem, int B, int H, int Hkv, int Sq,
                                              int Sk, float scale_log2, float scale, Segs qs, Segs ks,
                                              MaskInfo<DOCS> mask, int fresh, int hk0) {
  constexpr bool WG = BWD_WGMMA;
  static_assert(!WG || (NW == 8 && BM == 64 && BN == 128 && D == 128), "BWD_WGMMA: d128, 8 warps, 64 × 128 tiles");
  // mma.sync reads rows padded to D + 8 (ldmatrix without bank conflicts); wgmma reads
  // unpadded swizzled tiles.
  const int NT = 32 * NW, LD = WG ? D : D + 8, LP = BN + 8;
  // Warp grids of the three phases (each warp: 32 rows = two 16-row MMA blocks).
  const int WM1 = BM / 32, KW1 = BN / (NW / WM1);  // S, dP: 32 queries × KW1 keys per warp
  const int DW2 = D / (NW / (BN / 32));            // dV, dK: 32 keys × DW2 dims
  const int DW3 = D / (NW / (BM / 32));            // dQ: 32 queries × DW3 dims
  static_assert(KW1 % 16 == 0 && DW2 % 16 == 0 && DW3 % 16 == 0, "tile shape does not split over the warps");
  // dK/dV accumulators of this thread: MI2 row blocks of 16 keys × NB2 blocks of 8 dims
  // (wgmma: the warp's 16 keys of its warpgroup's 64, all D dims).
  constexpr int MI2 = WG ? 1 : 2, NB2 = WG ? D / 8 : DW2 / 8;
  extern __shared__ __align__(1024) uint4 smem_u4[];
  u16* sK = reinterpret_cast<u16*>(smem_u4);
  // wgmma's swizzled tiles need 1024-byte alignment (the launcher adds 1 KB for it).
  if (WG) sK += ((1024 - (smem_addr(smem_u4) & 1023)) & 1023) / 2;
  u16* sV = sK + BN * LD;
  u16* sQ = sV + BN * LD;        // [2][BM][LD]
  u16* sdO = sQ + 2 * BM * LD;   // [2][BM][LD]
  u16* sP = sdO + 2 * BM * LD;   // [BM][LP]: P in the input dtype (mma.sync only)
  u16* sdS = sP + (WG ? 0 : BM * LP);  // mma.sync: [BM][LP] dS; wgmma: dSᵀ [BN][BM] swizzled
  float* sL = reinterpret_cast<float*>(sdS + (WG ? BN * BM : BM * LP));  // [2][BM]: lse2
  float* sD = sL + 2 * BM;                             // [2][BM]: delta
  int2* sCol = reinterpret_cast<int2*>(sD + 2 * BM);  // [BN] the query positions each key may meet

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  // Documents: the block's document searches (thread 0's dQ target per query tile among
  // them) read cu_seqlens from shared memory where it fits. From global memory each search
  // was a chain of dependent loads that missed L1 (the dQ waits' acquire loads invalidate
  // it) and held up warp 0, and the block at its next barrier, per query tile.
  __shared__ int sCu[CU_SMEM > 0 ? CU_SMEM : 1];
  if (DOCS && mask.ncu <= CU_SMEM) {
    for (int i = threadIdx.x; i < mask.ncu; i += NT) sCu[i] = mask.cu[i];
    __syncthreads();
    mask.cu = sCu;
  }
  int bx = blockIdx.x, jt = blockIdx.z * gridDim.y + blockIdx.y;  // key tiles along y, then z
  // The order of the deterministic dQ adds and of each block's query tiles. Increasing,
  // query tiles descending: key tile j starts at the last query tile it shares with j − 1
  // and waits about one tile behind it; the heaviest key tiles of a causal sequence (the
  // first) start first. But the key tiles of a document start side by side and each waits
  // behind the one before: a chain as long as the blocks in flight (one H100, 65k tokens:
  // the waits took 6 % of block time at 8 documents, 15 % at 64; bench/dq_wait_probe.py).
  // Decreasing, query tiles ascending: key tile j first sweeps the BN/BM query tiles
  // that j + 1 does not meet (it started earlier), so the chain does not wait.
  constexpr bool DESC = DOCS ? DQ_DESC_DOCS : DQ_DESC_PLAIN;
  if (dq_sem != 0) {
    __shared__ int ticket;
    if (threadIdx.x == 0) ticket = atomicAdd(dq_sem, 1);
    __syncthreads();
    // Tickets walk groups of TICKET_GROUP (batch·kv head) rows, key tiles of a group in
    // order (mask.cuh's ticket_item). The blocks in flight then cover a few heads' key tiles
    // side by side, which share those heads' Q, dO and dQ rows in L2; ticketed heads-fastest,
    // 132 blocks covered ~4 key tiles of each of 32 heads, each streaming its own rows
    // (eighth session: backward 1.31× / 1.20× at 32k tokens, 32 heads, non-causal / causal;
    // bitwise the same gradients).
    ticket_item(ticket, gridDim.x, gridDim.y * gridDim.z, TICKET_GROUP, bx, jt);
    if (DESC) jt = gridDim.y * gridDim.z - 1 - jt;  // the slots past the last key tile come first, and return
  }
  const int nkt = (Sk + BN - 1) / BN;
  if (jt >= nkt) return;  // past the last key tile (the grid rounds up along z)
  // The grid covers KV heads hk0 … hk0 + gridDim.x / B − 1 of every batch (all: hk0 = 0).
  const int hkn = gridDim.x / B, b = bx / hkn, hk = hk0 + bx % hkn, G = H / Hkv;
  const int j0 = jt * BN, j1 = min(j0 + BN, Sk);
  const long long q_stride = (long long)H * D, k_stride = (long long)Hkv * D;
  const long long kv_off = ((long long)b * Sk * Hkv + hk) * D;
  const u16* gk = k + kv_off;
  const u16* gv = v + kv_off;

  int klo, khi;
  ks.range(j0, j1, klo, khi);
  const DocSpan kspan = mask.span(ks, j0, j1);
  const int nqt = (Sq + BM - 1) / BM;
  auto tile_class = [&](int t) {  // positions only: no load per query tile
    const int i0 = t * BM, i1 = min(i0 + BM, Sq);
    int qlo, qhi;
    qs.range(i0, i1, qlo, qhi);
    const int c = mask.classify(qlo, qhi, klo, khi, kspan, qlo, qhi);
    return (c == 1 && j0 + BN > Sk) ? 2 : c;  // padded keys of the ragged last tile are masked
  };
  // Work items (g, t) (q head hk·G + g, query tile t; g = G: none left) with something allowed:
  // the query tiles whose positions may see this key tile (window, documents). Swept
  // heads ascending, query tiles in the direction of the dQ order (DESC above): with the
  // increasing order, descending, so that key tile j waits about one item behind key tile
  // j − 1 (both start at the last query tile they share), not the ~BN/BM + 1 items that
  // ascending order would cost per key tile (each would start at its own diagonal, which
  // the tiles before it reach last).
  int wlo, whi;
  mask.queries_window(klo, khi, kspan, wlo, whi);
  const Sweep sweep = {qs, Sq, BM, wlo, whi};
  const int t_first = sweep.first(), t_end = sweep.end();
  // Kept as a pair, not one index g·nqt + t: dividing that by nqt in the loop cost a
  // signed 32-bit division sequence (~25 instructions) several times per query tile.
  auto next_work = [&](int g, int t) {  // the first item with work at or after (g, t) in sweep order
    if (DESC) {
      for (; g < G; ++g, t = t_first)
        for (t = max(t, t_first); t < t_end; ++t)
          if (tile_class(t) != 0) return make_int2(g, t);
    } else {
      for (; g < G; ++g, t = t_end - 1)
        for (t = min(t, t_end - 1); t >= t_first; --t)
          if (tile_class(t) != 0) return make_int2(g, t);
    }
    return make_int2(G, 0);
  };
  const int t_start = DESC ? t_first : t_end - 1, t_step = DESC ? 1 : -1;
  // Deterministic dQ: the counter value each query tile waits for, per stage (thread 0
  // computes it with the tile's prefetch, off the path to the wait).
  __shared__ int sTarget[2];
  // Thread 0's j_lo (increasing order) or j_hi (decreasing) of the last query tile, from
  // which the next tile of the sweep steps (by 0 or 1 tiles), not a binary search on warp
  // 0's path per query tile; a sweep that starts over (the next head) searches again. The
  // mma.sync documents kernels search each time (the stepped j_hi spilled there at d128;
  // their cu_seqlens is in shared memory).
  int last_t = DESC ? 0x7fffffff : -1, last_j = 0;
  auto prefetch = [&](int2 w, int st) {
    const int h = hk * G + w.x, i0 = w.y * BM;
    if (dq_sem != 0 && threadIdx.x == 0) {
      if constexpr (DESC && !WG) {
        sTarget[st] = mask.key_tiles_through(qs, min(i0 + BM, Sq), ks, Sk, BN) - 1 - jt;
      } else if constexpr (DESC) {
        const int i1 = min(i0 + BM, Sq);
        last_j = w.y < last_t ? mask.key_tiles_through(qs, i1, ks, Sk, BN)
                              : mask.key_tiles_through_from(qs, i1, ks, Sk, BN, last_j);
        last_t = w.y;
        sTarget[st] = last_j - 1 - jt;
      } else {
        last_j = w.y > last_t ? mask.key_tiles_before(qs, i0, ks, Sk, BN)
                              : mask.key_tiles_before_from(qs, i0, ks, Sk, BN, last_j);
        last_t = w.y;
        sTarget[st] = jt - last_j;
      }
    }
    const long long off = ((long long)b * Sq * H + h) * D;
    load_tile<WG, BM, D, NT>(sQ + st * BM * LD, q + off, q_stride, i0, Sq);
    load_tile<WG, BM, D, NT>(sdO + st * BM * LD, dout + off, q_stride, i0, Sq);
    // lse2 and delta rows, copied asynchronously like Q and dO (a plain load here stalled
    // the loading warps, and the block at the next barrier, for a global-memory latency
    // per query tile). Padding rows read 0: their Q and dO rows are zero, so P there
    // meets only dO = 0 and dS = P∘(0 − 0) = 0.
    // One copy per thread where the block has enough threads (the tuned shapes): no loop.
    // (A zero-filled copy keeps its out-of-range address: src-size 0 reads nothing.)
    const long long row0 = ((long long)b * H + h) * Sq + i0;
    for (int r = threadIdx.x; r < 2 * BM; r += NT) {
      const int rr = r < BM ? r : r - BM;
      cp_async4((r < BM ? sL : sD) + st * BM + rr, (r < BM ? lse2 : delta) + row0 + rr, rr < Sq - i0);
      if (2 * BM <= NT) break;
    }
  };

  int2 w = next_work(0, t_start);
  if (w.x >= G) {  // dK/dV of this block get nothing from this step (zero, into a fresh partial)
    if (fresh)
      for (int e = threadIdx.x; e < BN * (D / 4); e += NT) {
        const int j = j0 + e / (D / 4);
        if (j >= Sk) break;
        float* rk = dkv + ((long long)b * Sk + j) * k_stride + hk * D + (e % (D / 4)) * 4;
        *reinterpret_cast<float4*>(rk) = make_float4(0.f, 0.f, 0.f, 0.f);
        *reinterpret_cast<float4*>(rk + (long long)B * Sk * k_stride) = make_float4(0.f, 0.f, 0.f, 0.f);
      }
    return;
  }
  // Each key's allowed query positions, one interval [lo, hi] (its window within its
  // document; empty for the ragged tile's padding; read after a barrier): a mixed tile's
  // element mask is then lo ≤ qpos ≤ hi.
  for (int c = threadIdx.x; c < BN; c += NT) {
    const int j = min(j0 + c, Sk - 1), p = ks.pos(j);
    const DocSpan cs = DOCS && !kspan.one ? mask.row_span(ks, j) : kspan;
    int lo, hi;
    mask.queries_window(p, p, cs, lo, hi);
    sCol[c] = j0 + c < Sk ? make_int2(lo, hi) : make_int2(1, 0);
  }
  load_tile<WG, BN, D, NT>(sK, gk, k_stride, j0, Sk);
  load_tile<WG, BN, D, NT>(sV, gv, k_stride, j0, Sk);
  prefetch(w, 0);
  cp_async_commit();

#if !BWD_WGMMA
  // Phase 1 (S = Q·Kᵀ, dP = dO·Vᵀ): warp rows m1, keys n1.
  const int m1 = (warp % WM1) * 32, n1 = (warp / WM1) * KW1;
  const u32 qa = smem_addr(sQ) + 2 * (m1 * LD + lds_a<LD>(lane)), oa = smem_addr(sdO) + 2 * (m1 * LD + lds_a<LD>(lane));
  const u32 kb = smem_addr(sK) + 2 * (n1 * LD + lds_b<LD>(lane)), vb = smem_addr(sV) + 2 * (n1 * LD + lds_b<LD>(lane));
  // Phase 2 (dV += Pᵀ·dO, dK += dSᵀ·Q): warp keys n2, dims d2; Pᵀ/dSᵀ are P/dS read transposed.
  const int n2 = (warp % (BN / 32)) * 32, d2 = (warp / (BN / 32)) * DW2;
  const int at_off = ((lane >> 4) * 8 + (lane & 7)) * LP + ((lane >> 3) & 1) * 8;  // A = Xᵀ from X [k][m]
  const u32 pta = smem_addr(sP) + 2 * (n2 + at_off), dsta = smem_addr(sdS) + 2 * (n2 + at_off);
  const u32 obt = smem_addr(sdO) + 2 * (d2 + lds_bt<LD>(lane)), qbt = smem_addr(sQ) + 2 * (d2 + lds_bt<LD>(lane));
  // Phase 3 (dQ = dS·K): warp rows m3, dims d3.
  const int m3 = (warp % (BM / 32)) * 32, d3 = (warp / (BM / 32)) * DW3;
  const u32 dsa = smem_addr(sdS) + 2 * (m3 * LP + lds_a<LP>(lane));
  const u32 kbt = smem_addr(sK) + 2 * (d3 + lds_bt<LD>(lane));
  // This thread's dK/dV rows (keys) key_row(mi) + lane/4 + 8·hr, dims dim0 + 8n + 2·(lane%4) + e;
  // its dQ rows q_row(mi) + lane/4 + 8·hr, dims q_dim0 + 8n + 2·(lane%4) + e.
  auto key_row = [&](int mi) { return n2 + mi * 16; };
  const int dim0 = d2;
  auto q_row = [&](int mi) { return m3 + mi * 16; };
  const int q_dim0 = d3;
  constexpr int MI3 = 2, NB3 = DW3 / 8;
#else
  const int g = warp / 4, wr = 16 * (warp % 4);  // warpgroup g: keys (and dQ dims) 64g…; the warp's 16 rows
  auto key_row = [&](int) { return 64 * g + wr; };
  const int dim0 = 0;
  auto q_row = [&](int) { return wr; };
  const int q_dim0 = 64 * g;
  constexpr int MI3 = 1, NB3 = 8;
  const u32 sk0 = smem_addr(sK), sv0 = smem_addr(sV), sds0 = smem_addr(sdS);
#endif

  float dk[MI2][NB2][4], dv[MI2][NB2][4];
#pragma unroll
  for (int mi = 0; mi < MI2; ++mi)
#pragma unroll
    for (int n = 0; n < NB2; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) dk[mi][n][e] = dv[mi][n][e] = 0.f;

  int stage = 0;
  int* added = 0;  // counter of the query tile whose dQ we added last, raised one phase later
  while (w.x < G) {
    const int2 wn = next_work(w.x, w.y + t_step);
    // Two block barriers per query tile (three until the sixth session: 1.07x in a same-process
    // A/B). This one: this tile's rows have landed, and every warp is done with the previous
    // tile, so the next tile's rows may now go to the other stage, and phase 1 may rewrite P, dS.
    cp_async_wait<0>();
#if BWD_WGMMA
    WG_PROXY_FENCE();  // this thread's copies, now complete, for wgmma's reads
#endif
    __syncthreads();
    if (wn.x < G) prefetch(wn, stage ^ 1);
    cp_async_commit();
    const int h = hk * G + w.x, t = w.y, i0 = t * BM;
    int* const sem = dq_sem == 0 ? 0 : dq_sem + 1 + ((long long)b * H + h) * nqt + t;
    const float* sLs = sL + stage * BM;
    const float* sDs = sD + stage * BM;
    // The previous tile's counter is raised, and this tile's read, after the barrier that
    // follows phase 1 (see raise_and_peek's caller below).
    int seen = 0;
    auto raise_and_peek = [&]() {
      // Raise the previous tile's counter now, not right after its adds: by now they have
      // landed, so the fence before the raise does not stall the block.
      if (added != 0 && threadIdx.x == 0) release_add(added);
      added = 0;
      // Each warp reads its query tile's counter now, a phase before it needs it: by then the
      // key tile before ours (one query tile ahead) has usually raised it, and the load's
      // latency hides under phase 2 instead of stalling the block at the wait.
      // A relaxed load at gpu scope (read at L2; no L1 invalidation): as an acquire load its
      // CCTL.IVALL waited for the value on the spot, 4 % of the stall samples (Nsight Compute,
      // sixth session). Our dQ reds still land after the adds it vouches for: they are issued
      // only after the value came back (lane 0 branches on it, __syncwarp follows; GPUs do not
      // issue memory operations speculatively), and the raise it saw was made after a
      // fence.acq_rel that waited until the earlier tile's reds were performed at L2. A counter
      // found short is awaited with acquire loads (wait_at_least).
      if (sem != 0 && lane == 0) seen = ld_relaxed(sem);
    };
    float dq[MI3][NB3][4];

#if BWD_WGMMA
    {
      const u32 q0 = smem_addr(sQ) + stage * (2 * BM * D), o0 = smem_addr(sdO) + stage * (2 * BM * D);
      // Sᵀ = K·Qᵀ and dPᵀ = V·dOᵀ: this warpgroup's 64 keys × the BM queries. All four operands
      // K-major: an m64 block of K/V is 8 groups of 1024 B; k-step kk is +32 B in atom column
      // kk/4, atom columns rows·128 B apart.
      float s[BM / 8][4], dp[BM / 8][4];
      WG_FENCE();
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk)
        Wg<T>::template ss_n64<0, 0>(s, wg_desc(sk0 + g * 8192 + (kk / 4) * BN * 128 + (kk % 4) * 32, 16, 1024),
                                     wg_desc(q0 + (kk / 4) * BM * 128 + (kk % 4) * 32, 16, 1024), kk);
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk)
        Wg<T>::template ss_n64<0, 0>(dp, wg_desc(sv0 + g * 8192 + (kk / 4) * BN * 128 + (kk % 4) * 32, 16, 1024),
                                     wg_desc(o0 + (kk / 4) * BM * 128 + (kk % 4) * 32, 16, 1024), kk);
      WG_COMMIT();
      WG_WAIT0();
      wg_keep(s);
      wg_keep(dp);
      // Fragment rows are keys (key_row + lane/4 + 8·hr), columns queries 8n + 2·(lane%4) + e.
      const bool mixed = tile_class(t) == 2;
      if (mixed) {  // masked scores → −inf (scale_log2 > 0: the launcher sees to it), so p = 0
        int2 kw[2];
#pragma unroll
        for (int hr = 0; hr < 2; ++hr) kw[hr] = sCol[key_row(0) + lane / 4 + 8 * hr];
#pragma unroll
        for (int n = 0; n < BM / 8; ++n)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int qp = qs.pos(min(i0 + n * 8 + 2 * (lane % 4) + e, Sq - 1));
#pragma unroll
            for (int hr = 0; hr < 2; ++hr)
              if (qp < kw[hr].x || qp > kw[hr].y) s[n][2 * hr + e] = -__int_as_float(0x7f800000);
          }
      }
      // Pᵀ and dSᵀ (scale folded in, as in the mma.sync path) straight into A fragments:
      // query block kk of 16 is fragments 2kk, 2kk + 1 (the forward's pack_p layout).
      u32 pa[BM / 16][4], da[BM / 16][4];
#pragma unroll
      for (int n = 0; n < BM / 8; ++n) {
        const int c = n * 8 + 2 * (lane % 4);
        const float2 lr = *reinterpret_cast<const float2*>(sLs + c), dl = *reinterpret_cast<const float2*>(sDs + c);
        const float dr[2] = {dl.x * scale, dl.y * scale};
        float p[4], ds[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          p[e] = ex2(s[n][e] * scale_log2 - (e % 2 ? lr.y : lr.x));
          ds[e] = p[e] * fmaf(dp[n][e], scale, -dr[e % 2]);
        }
#pragma unroll
        for (int hr = 0; hr < 2; ++hr) {
          pa[n / 2][2 * (n % 2) + hr] = Ops<T>::pack(p[2 * hr], p[2 * hr + 1]);
          da[n / 2][2 * (n % 2) + hr] = Ops<T>::pack(ds[2 * hr], ds[2 * hr + 1]);
          // dSᵀ to shared memory: key row r (r % 8 = lane/4) at (r/8)·1024 + (r%8)·128 B, its
          // 16-byte chunk n swizzled to n ^ (r%8): the 32 lanes hit 32 banks.
          const int r = key_row(0) + lane / 4 + 8 * hr;
          const u32 off = (r / 8) * 1024 + (lane / 4) * 128 + ((n ^ (lane / 4)) * 16) + (lane % 4) * 4;
          asm volatile("st.shared.b32 [%0], %1;" ::"r"(sds0 + off), "r"(da[n / 2][2 * (n % 2) + hr]) : "memory");
        }
      }
      WG_PROXY_FENCE();  // the dSᵀ stores, for the dQ product's reads (after the barrier)
      // dV += Pᵀ·dO and dK += dSᵀ·Q over the BM queries: dO and Q N-major (a 16-query step is
      // 2048 B; LBO = the distance between D's two atom columns).
      WG_FENCE();
#pragma unroll
      for (int kk = 0; kk < BM / 16; ++kk) {
        Wg<T>::rs_n128(dv[0], pa[kk], wg_desc(o0 + kk * 2048, BM * 128, 1024));
        Wg<T>::rs_n128(dk[0], da[kk], wg_desc(q0 + kk * 2048, BM * 128, 1024));
      }
      WG_COMMIT();
      __syncthreads();  // dSᵀ complete (both warpgroups)
      raise_and_peek();
      // dQ (BM queries × this warpgroup's 64 dims) = dS·K: dS M-major from dSᵀ (16-key step
      // 2048 B), K N-major in atom column g.
#pragma unroll
      for (int kk = 0; kk < BN / 16; ++kk)
        Wg<T>::template ss_n64<1, 1>(dq[0], wg_desc(sds0 + kk * 2048, BN * 128, 1024),
                                     wg_desc(sk0 + g * BN * 128 + kk * 2048, BN * 128, 1024), kk);
      WG_COMMIT();
      WG_WAIT0();
      wg_keep(pa);
      wg_keep(da);
      wg_keep(dk);
      wg_keep(dv);
      wg_keep(dq);
    }
#else
    const u32 so = stage * (2 * BM * LD);
    {  // Phase 1: S and dP for 32 queries × KW1 keys, then P and dS (input dtype) to shared memory.
      float s[2][KW1 / 8][4], dp[2][KW1 / 8][4];
#pragma unroll
      for (int mi = 0; mi < 2; ++mi)
#pragma unroll
        for (int n = 0; n < KW1 / 8; ++n)
#pragma unroll
          for (int e = 0; e < 4; ++e) s[mi][n][e] = dp[mi][n][e] = 0.f;
      // Unrolled (no spills since the fifth session's addressing and scale changes): the
      // ldmatrix of step kk + 1 issue under step kk's MMAs, and no loop counter or address math.
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        u32 aq[2][4], ao[2][4];
#pragma unroll
        for (int mi = 0; mi < 2; ++mi) {
          ldsm_x4(aq[mi], qa + so + 2 * (mi * 16 * LD + kk * 16));
          ldsm_x4(ao[mi], oa + so + 2 * (mi * 16 * LD + kk * 16));
        }
#pragma unroll
        for (int nb = 0; nb < KW1 / 16; ++nb) {
          u32 bk[4], bv[4];
          ldsm_x4(bk, kb + 2 * (nb * 16 * LD + kk * 16));
          ldsm_x4(bv, vb + 2 * (nb * 16 * LD + kk * 16));
#pragma unroll
          for (int mi = 0; mi < 2; ++mi) {
            Ops<T>::mma(s[mi][2 * nb], aq[mi], bk[0], bk[1]);
            Ops<T>::mma(s[mi][2 * nb + 1], aq[mi], bk[2], bk[3]);
            Ops<T>::mma(dp[mi][2 * nb], ao[mi], bv[0], bv[1]);
            Ops<T>::mma(dp[mi][2 * nb + 1], ao[mi], bv[2], bv[3]);
          }
        }
      }
      // P = 2^(S·scale_log2 − L) (0 where masked: S = −inf), dS = scale·P∘(dP − delta) (the scale of dQ
      // and dK folded in: one multiply-add per element, as the subtraction alone cost);
      // fragment rows are queries.
      const bool mixed = tile_class(t) == 2;
      if (mixed) {  // masked scores → −inf (scale_log2 > 0: the launcher sees to it), so p = 0
        int qp[2][2];
#pragma unroll
        for (int mi = 0; mi < 2; ++mi)
#pragma unroll
          for (int hr = 0; hr < 2; ++hr) qp[mi][hr] = qs.pos(min(i0 + m1 + mi * 16 + lane / 4 + 8 * hr, Sq - 1));
#pragma unroll
        for (int n = 0; n < KW1 / 8; ++n)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int2 w = sCol[n1 + n * 8 + 2 * (lane % 4) + e];  // one load per key column
#pragma unroll
            for (int mi = 0; mi < 2; ++mi)
#pragma unroll
              for (int hr = 0; hr < 2; ++hr)
                if (qp[mi][hr] < w.x || qp[mi][hr] > w.y) s[mi][n][2 * hr + e] = -__int_as_float(0x7f800000);
          }
      }
#pragma unroll
      for (int mi = 0; mi < 2; ++mi)
#pragma unroll
        for (int hr = 0; hr < 2; ++hr) {
          const int r = m1 + mi * 16 + lane / 4 + 8 * hr;
          const float lr = sLs[r], dr = sDs[r] * scale;
#pragma unroll
          for (int n = 0; n < KW1 / 8; ++n) {
            float pe[2], dse[2];
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              const float p = ex2(s[mi][n][2 * hr + e] * scale_log2 - lr);
              pe[e] = p;
              dse[e] = p * fmaf(dp[mi][n][2 * hr + e], scale, -dr);
            }
            const int off = r * LP + n1 + n * 8 + 2 * (lane % 4);
            *reinterpret_cast<u32*>(sP + off) = Ops<T>::pack(pe[0], pe[1]);
            *reinterpret_cast<u32*>(sdS + off) = Ops<T>::pack(dse[0], dse[1]);
          }
        }
    }
    __syncthreads();  // P, dS complete
    raise_and_peek();

    // Phase 2: dV += Pᵀ·dO, dK += dSᵀ·Q over the BM queries.
#pragma unroll
    for (int kk = 0; kk < BM / 16; ++kk) {
      u32 ap[2][4], ad[2][4];
#pragma unroll
      for (int mi = 0; mi < 2; ++mi) {
        ldsm_x4_t(ap[mi], pta + 2 * (kk * 16 * LP + mi * 16));
        ldsm_x4_t(ad[mi], dsta + 2 * (kk * 16 * LP + mi * 16));
      }
#pragma unroll
      for (int nd = 0; nd < DW2 / 16; ++nd) {
        u32 bo[4], bq[4];
        ldsm_x4_t(bo, obt + so + 2 * (kk * 16 * LD + nd * 16));
        ldsm_x4_t(bq, qbt + so + 2 * (kk * 16 * LD + nd * 16));
#pragma unroll
        for (int mi = 0; mi < 2; ++mi) {
          Ops<T>::mma(dv[mi][2 * nd], ap[mi], bo[0], bo[1]);
          Ops<T>::mma(dv[mi][2 * nd + 1], ap[mi], bo[2], bo[3]);
          Ops<T>::mma(dk[mi][2 * nd], ad[mi], bq[0], bq[1]);
          Ops<T>::mma(dk[mi][2 * nd + 1], ad[mi], bq[2], bq[3]);
        }
      }
    }

    {  // Phase 3: dQ (32 queries × DW3 dims per warp) = dS · K (dS holds the scale).
#pragma unroll
      for (int mi = 0; mi < 2; ++mi)
#pragma unroll
        for (int n = 0; n < DW3 / 8; ++n) dq[mi][n][0] = dq[mi][n][1] = dq[mi][n][2] = dq[mi][n][3] = 0.f;
#pragma unroll
      for (int kk = 0; kk < BN / 16; ++kk) {
        u32 a[2][4];
#pragma unroll
        for (int mi = 0; mi < 2; ++mi) ldsm_x4(a[mi], dsa + 2 * (mi * 16 * LP + kk * 16));
#pragma unroll
        for (int nd = 0; nd < DW3 / 16; ++nd) {
          u32 bk[4];
          ldsm_x4_t(bk, kbt + 2 * (kk * 16 * LD + nd * 16));
#pragma unroll
          for (int mi = 0; mi < 2; ++mi) {
            Ops<T>::mma(dq[mi][2 * nd], a[mi], bk[0], bk[1]);
            Ops<T>::mma(dq[mi][2 * nd + 1], a[mi], bk[2], bk[3]);
          }
        }
      }
    }
#endif
    // dQ reduced into dq_acc.
    if (sem != 0) {  // our turn: the key tiles before ours that meet query tile t have added
      // Per warp (lane 0 waits, __syncwarp orders the warp's adds after it): no block barrier.
      const int target = sTarget[stage];
      if (lane == 0 && seen < target) wait_at_least(sem, target);
      __syncwarp();
    }
    {  // One 64-bit address per query tile; rows are 32-bit offsets from it.
      float* const dq_tile = dq_acc + ((long long)b * Sq + i0) * q_stride + h * D + q_dim0 + 2 * (lane % 4);
#pragma unroll
      for (int mi = 0; mi < MI3; ++mi)
#pragma unroll
        for (int hr = 0; hr < 2; ++hr) {
          const int r = q_row(mi) + lane / 4 + 8 * hr;
          if (r >= Sq - i0) continue;
          float* row = dq_tile + r * (int)q_stride;
#pragma unroll
          for (int n = 0; n < NB3; ++n) red_add2(row + n * 8, dq[mi][n][2 * hr], dq[mi][n][2 * hr + 1]);
        }
    }
    // No barrier here: the next tile's first barrier (above) keeps P, dS and this stage's
    // Q/dO until every warp is done with them.
    added = sem;  // the next key tile's turn (raised after the next tile's phase 1)
    stage ^= 1;
    w = wn;
  }
  cp_async_wait<0>();
  if (added != 0 && threadIdx.x == 0) release_add(added);

  // dK/dV partials of this block's keys: one read-add-write each (the block owns them), a
  // write where the partial is fresh.
#pragma unroll
  for (int mi = 0; mi < MI2; ++mi)
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      const int j = j0 + key_row(mi) + lane / 4 + 8 * hr;
      if (j >= Sk) continue;
      float* rk = dkv + ((long long)b * Sk + j) * k_stride + hk * D + dim0 + 2 * (lane % 4);
      float* rv = rk + (long long)B * Sk * k_stride;
#pragma unroll
      for (int n = 0; n < NB2; ++n) {
        float2 x = make_float2(0.f, 0.f), y = x;
        if (!fresh) {
          x = *reinterpret_cast<float2*>(rk + n * 8);
          y = *reinterpret_cast<float2*>(rv + n * 8);
        }
        x.x += dk[mi][n][2 * hr];
        x.y += dk[mi][n][2 * hr + 1];
        y.x += dv[mi][n][2 * hr];
        y.y += dv[mi][n][2 * hr + 1];
        *reinterpret_cast<float2*>(rk + n * 8) = x;
        *reinterpret_cast<float2*>(rv + n * 8) = y;
      }
    }
}

#define BWD_ENTRY(NAME, T, DOCS)                                                                               \
  extern "C" __global__ void __launch_bounds__(32 * BWD_NW) NAME(                                               \
      const u16* q, const u16* k, const u16* v, const u16* dout, const float* lse2, const float* delta,          \
      float* dq_acc, float* dkv, int* dq_sem, int B, int H, int Hkv, int Sq, int Sk, float scale_log2,          \
      float scale, MASK_PARAMS, int fresh, int hk0) {                                                           \
    MASK_UNPACK(DOCS);                                                                                          \
    attn_bwd_body<T, HEAD_DIM, BWD_NW, BWD_BM, BWD_BN, DOCS>(q, k, v, dout, lse2, delta, dq_acc, dkv, dq_sem, B, H, \
                                                             Hkv, Sq, Sk, scale_log2, scale, qs, ks, mask, fresh, \
                                                             hk0);                                              \
  }

// `_doc`: packed documents (cu_seqlens read); the others ignore them.
BWD_ENTRY(attn_bwd_bf16, bf16_t, false)
BWD_ENTRY(attn_bwd_f16, f16_t, false)
BWD_ENTRY(attn_bwd_bf16_doc, bf16_t, true)
BWD_ENTRY(attn_bwd_f16_doc, f16_t, true)

// delta = rowsum(dout ∘ out) in fp32, (B, Sq, H) rows -> (B, H, Sq); one warp per row.
template <typename T, int D>
__device__ __forceinline__ void bwd_delta_body(const u16* dout, const u16* out, float* delta, int B, int H,
                                               int Sq) {
  const long long row = (long long)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= (long long)B * Sq * H) return;
  const u32* a = reinterpret_cast<const u32*>(dout + row * D);
  const u32* c = reinterpret_cast<const u32*>(out + row * D);
  float sum = 0.f;
  for (int k = lane; k < D / 2; k += 32) {
    const u32 x = a[k], y = c[k];
    sum += Ops<T>::to_float(x & 0xffff) * Ops<T>::to_float(y & 0xffff) +
           Ops<T>::to_float(x >> 16) * Ops<T>::to_float(y >> 16);
  }
#pragma unroll
  for (int o = 16; o > 0; o /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, o);
  if (lane == 0) {
    const long long h = row % H, bi = row / H, i = bi % Sq, b = bi / Sq;
    delta[(b * H + h) * Sq + i] = sum;
  }
}

extern "C" __global__ void bwd_delta_bf16(const u16* dout, const u16* out, float* delta, int B, int H, int Sq) {
  bwd_delta_body<bf16_t, HEAD_DIM>(dout, out, delta, B, H, Sq);
}
extern "C" __global__ void bwd_delta_f16(const u16* dout, const u16* out, float* delta, int B, int H, int Sq) {
  bwd_delta_body<f16_t, HEAD_DIM>(dout, out, delta, B, H, Sq);
}

// The backward's outputs in the input dtype: x·mul (dQ with its sign, the dK/dV sums),
// fp32 → T rounded to nearest even, four elements per thread and step (grid-stride). CuPy's
// astype to bfloat16 took 0.95 ms per call for dQ, dK and dV at 65k tokens, 8 heads, d128
// (H200; bench/varlen_probe.py --trace), several times these bytes' time.
template <typename T>
__device__ __forceinline__ void cast_out_body(const float4* __restrict__ src, uint2* __restrict__ dst, long long n4,
                                              float mul) {
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n4; i += (long long)gridDim.x * blockDim.x) {
    const float4 x = src[i];
    dst[i] = make_uint2(Ops<T>::pack(x.x * mul, x.y * mul), Ops<T>::pack(x.z * mul, x.w * mul));
  }
}

extern "C" __global__ void cast_out_bf16(const float4* src, uint2* dst, long long n4, float mul) {
  cast_out_body<bf16_t>(src, dst, n4, mul);
}
extern "C" __global__ void cast_out_f16(const float4* src, uint2* dst, long long n4, float mul) {
  cast_out_body<f16_t>(src, dst, n4, mul);
}
