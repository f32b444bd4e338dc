// Blockwise attention forward: continues the online softmax of the local Q
// against one K/V block in place (DESIGN.md §3), FlashAttention-2 style.
//
// Layouts (all contiguous):
//   q, out   (B, Sq, H, D)            input dtype
//   k, v     (B, Sk, Hkv, D) each     input dtype (the two halves of the travelling buffer, or
//                                     the caller's K and V on one rank: no copy)
//   acc      (B, Sq, H, D)  fp32      unnormalised output
//   m, l     (B, H, Sq)     fp32      running max (log2 units, scale folded in) and sum
//   lse      (B, H, Sq)     fp32      natural log, −inf on rows with no allowed key
// `first`: acc/m/l hold nothing yet (not read); `last`: write out and lse instead of acc/m/l.
//
// One block: BM = 16·MI·NW query rows of one (batch, head); each warp owns 16·MI
// rows and sweeps the K/V tiles of BN keys that have work, with the next tile's
// cp.async copy in flight while the current one is computed (two stages).
#include "common.cuh"

#ifndef HEAD_DIM
#define HEAD_DIM 128
#endif

// Tile shape (the launcher passes -D options from its per-head-dim table; these
// defaults let the file compile alone): NW warps, each owning FWD_MI blocks of 16
// query rows, and FWD_BN keys per K/V tile.
#ifndef FWD_NW
#define FWD_NW 4
#endif
#ifndef FWD_MI
#define FWD_MI 2
#endif
#ifndef FWD_BN
#define FWD_BN 64
#endif
// FWD_WGMMA=1 (sm_90a, head_dim 64 or 128): the two products on Hopper's warpgroup MMA
// (wgmma.cuh) instead of mma.sync; everything else is shared. Each warpgroup (4 warps)
// owns MI blocks of 64 query rows (m64 tiles); 128 keys per tile.
#ifndef FWD_WGMMA
#define FWD_WGMMA 0
#endif
#ifndef FWD_WG_STAGES
#define FWD_WG_STAGES 2
#endif
#if FWD_WGMMA
#include "wgmma.cuh"
#endif

template <typename T, int D, int MI, int NW, int BN, bool DOCS>
__device__ __forceinline__ void attn_fwd_body(
    const u16* __restrict__ q, const u16* __restrict__ k, const u16* __restrict__ v, float* __restrict__ acc, float* __restrict__ m_state,
    float* __restrict__ l_state, u16* __restrict__ out, float* __restrict__ lse, int B, int H, int Hkv, int Sq,
    int Sk, float scale_log2, Segs qs, Segs ks, MaskInfo<DOCS> mask, int first, int last) {
  // mma.sync reads rows padded to D + 8 (ldmatrix without bank conflicts); wgmma reads
  // unpadded core-matrix tiles (wgmma.cuh).
  constexpr bool WG = FWD_WGMMA;
  static_assert(!WG || (NW % 4 == 0 && BN == 128 && (D == 128 || D == 64)), "FWD_WGMMA: d64/d128, warpgroups, 128 keys");
  const int BM = 16 * MI * NW, NT = 32 * NW, LD = WG ? D : D + 8;
  // K/V pipeline stages: the copy of the tile STAGES − 1 ahead is in flight during a tile's
  // compute (wgmma computes a tile faster than one copy's latency: three stages).
  constexpr int STAGES = WG ? FWD_WG_STAGES : 2;
  extern __shared__ __align__(1024) uint4 smem_u4[];  // (wgmma's swizzled tiles need 1024 B)
  u16* sQ = reinterpret_cast<u16*>(smem_u4);
  u16* sK = sQ + BM * LD;  // [STAGES][BN][LD]
  u16* sV = sK + STAGES * BN * LD;
  int2* sRow = reinterpret_cast<int2*>(sV + STAGES * BN * LD);  // [BM] each row's allowed key positions

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int b = blockIdx.x / H, h = blockIdx.x % H, hk = h / (H / Hkv);
  // Query tiles along y, continued along z past the grid's y limit (65535).
  const int nqt = (Sq + BM - 1) / BM, tile = blockIdx.z * gridDim.y + blockIdx.y;
  if (tile >= nqt) return;
  // Heaviest (last, under causal) query tiles first, across all heads.
  const int i0 = (nqt - 1 - tile) * BM;
  const long long q_stride = (long long)H * D, k_stride = (long long)Hkv * D;
  const u16* gq = q + ((long long)b * Sq * H + h) * D;
  const long long kv_off = ((long long)b * Sk * Hkv + hk) * D;
  const u16* gk = k + kv_off;
  const u16* gv = v + kv_off;

  const int i1 = min(i0 + BM, Sq), nkt = (Sk + BN - 1) / BN;
  int qlo, qhi;
  qs.range(i0, i1, qlo, qhi);
  const DocSpan qspan = mask.span(qs, i0, i1);
  auto tile_class = [&](int t) {  // positions only: no load per key tile
    const int j0 = t * BN, j1 = min(j0 + BN, Sk);
    int klo, khi;
    ks.range(j0, j1, klo, khi);
    const int c = mask.classify(qlo, qhi, klo, khi, qspan, klo, khi);
    return (c == 1 && j0 + BN > Sk) ? 2 : c;  // the ragged last tile masks its padding
  };
  // The key tiles whose positions this query tile may see (window, documents).
  int wlo, whi;
  mask.keys_window(qlo, qhi, qspan, wlo, whi);
  const Sweep sweep = {ks, Sk, BN, wlo, whi};
  const int t_end = sweep.end();
  auto next_tile = [&](int t) {
    while (t < t_end && tile_class(t) == 0) ++t;
    return t < t_end ? t : nkt;
  };

  int t = next_tile(sweep.first());
  if (t >= nkt && !first && !last) return;  // nothing to add, state unchanged

  // Per thread: rows r(mi, hr) = rbase(mi) + lane/4 + 8·hr; columns n·8 + 2·(lane%4) + {0,1}.
  // mma.sync: each warp owns 16·MI consecutive rows; wgmma: row block mi is the m64 tile mi,
  // of which warp w holds rows 16w…16w+15.
  float o[MI][D / 8][4];
  float m_r[MI][2], l_r[MI][2];
  const int row_base = warp * 16 * MI;
  // wgmma: m64 tile (warp/4)·MI + mi, of which this warp holds 16 rows.
  auto rbase = [&](int mi) { return WG ? ((warp / 4) * MI + mi) * 64 + (warp % 4) * 16 : row_base + mi * 16; };
#pragma unroll
  for (int mi = 0; mi < MI; ++mi)
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      const int i = i0 + rbase(mi) + lane / 4 + 8 * hr;
      const bool in = i < Sq && !first;
      const long long srow = ((long long)b * H + h) * Sq + i;
      m_r[mi][hr] = in ? m_state[srow] : MASKED;
      // l is kept as per-thread partial sums (reduced over the quad at the end).
      l_r[mi][hr] = (in && lane % 4 == 0) ? l_state[srow] : 0.f;
      const float* arow = acc + ((long long)b * Sq + i) * q_stride + h * D;
#pragma unroll
      for (int n = 0; n < D / 8; ++n) {
        float2 v = make_float2(0.f, 0.f);
        if (in) v = *reinterpret_cast<const float2*>(arow + n * 8 + 2 * (lane % 4));
        o[mi][n][2 * hr] = v.x;
        o[mi][n][2 * hr + 1] = v.y;
      }
    }

  // Each row's allowed key positions, one interval [lo, hi] (its window within its
  // document; read after a barrier): a mixed tile's element mask is then lo ≤ kpos ≤ hi.
  if (t < nkt)
    for (int r = threadIdx.x; r < BM; r += NT) {
      const int i = min(i0 + r, Sq - 1), p = qs.pos(i);
      const DocSpan rs = DOCS && !qspan.one ? mask.row_span(qs, i) : qspan;
      int lo, hi;
      mask.keys_window(p, p, rs, lo, hi);
      sRow[r] = make_int2(lo, hi);
    }
  // wgmma: 128-byte-swizzled tiles; mma.sync: rows padded to LD. (load_tile called as is:
  // a generic lambda around it did not compile with the NVRTC of CUDA 13.0 in JIT mode.)
  if (t < nkt) {
    load_tile<WG, BM, D, NT>(sQ, gq, q_stride, i0, Sq);
    load_tile<WG, BN, D, NT>(sK, gk, k_stride, t * BN, Sk);
    load_tile<WG, BN, D, NT>(sV, gv, k_stride, t * BN, Sk);
    cp_async_commit();
  }
  // ldmatrix base addresses (bytes); the loops add compile-time offsets.
  const u32 qa = smem_addr(sQ) + 2 * (row_base * LD + lds_a<LD>(lane));
  const u32 ka = smem_addr(sK) + 2 * lds_b<LD>(lane);
  const u32 va = smem_addr(sV) + 2 * lds_bt<LD>(lane);
  // The tiles t0, t1, … (those with work) go to stages 0, 1, …, 0, … in turn; `pre` is the
  // last tile whose copy was issued. One commit group per tile (empty past the last).
  int stage = 0, pre = t;
  if (STAGES == 3 && t < nkt) {
    pre = next_tile(t + 1);
    if (pre < nkt) {
      load_tile<WG, BN, D, NT>(sK + BN * LD, gk, k_stride, pre * BN, Sk);
      load_tile<WG, BN, D, NT>(sV + BN * LD, gv, k_stride, pre * BN, Sk);
    }
    cp_async_commit();
  }
  while (t < nkt) {
    const int tn = next_tile(t + 1);
    const int pf = STAGES == 2 ? tn : (pre < nkt ? next_tile(pre + 1) : nkt);  // the copy to issue now
    if (pf < nkt) {  // into the stage the previous tile used (free since its closing barrier)
      const int ps = (stage + STAGES - 1) % STAGES;
      load_tile<WG, BN, D, NT>(sK + ps * BN * LD, gk, k_stride, pf * BN, Sk);
      load_tile<WG, BN, D, NT>(sV + ps * BN * LD, gv, k_stride, pf * BN, Sk);
    }
    cp_async_commit();
    cp_async_wait<STAGES - 1>();
#if FWD_WGMMA
    WG_PROXY_FENCE();  // this thread's copies, now complete, for wgmma's reads
#endif
    __syncthreads();
    const u32 kst = ka + stage * (2 * BN * LD), vst = va + stage * (2 * BN * LD);  // bytes
#if FWD_WGMMA
    (void)kst, (void)vst;  // the mma.sync path's ldmatrix addresses
#endif

    // S = Q·Kᵀ
    float s[MI][BN / 8][4];
#if FWD_WGMMA
    {
      // K-major, swizzled (wgmma.cuh): an m64 block is 8 groups of 1024 B; k-step kk is
      // +32 B in atom column kk/4, atom columns rows·128 B apart.
      const u32 qs0 = smem_addr(sQ), ks0 = smem_addr(sK) + stage * (2 * BN * D);
      WG_FENCE();
#pragma unroll
      for (int mi = 0; mi < MI; ++mi)
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk)
          Wg<T>::ss_n128(s[mi], wg_desc(qs0 + ((warp / 4) * MI + mi) * 8192 + (kk / 4) * BM * 128 + (kk % 4) * 32,
                                        16, 1024),
                         wg_desc(ks0 + (kk / 4) * BN * 128 + (kk % 4) * 32, 16, 1024), kk);
      WG_COMMIT();
      WG_WAIT0();
      wg_keep(s);
    }
#else
#pragma unroll
    for (int mi = 0; mi < MI; ++mi)
#pragma unroll
      for (int n = 0; n < BN / 8; ++n) s[mi][n][0] = s[mi][n][1] = s[mi][n][2] = s[mi][n][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      u32 a[MI][4];
#pragma unroll
      for (int mi = 0; mi < MI; ++mi) ldsm_x4(a[mi], qa + 2 * (mi * 16 * LD + kk * 16));
#pragma unroll
      for (int nb = 0; nb < BN / 16; ++nb) {
        u32 bk[4];
        ldsm_x4(bk, kst + 2 * (nb * 16 * LD + kk * 16));
#pragma unroll
        for (int mi = 0; mi < MI; ++mi) {
          Ops<T>::mma(s[mi][2 * nb], a[mi], bk[0], bk[1]);
          Ops<T>::mma(s[mi][2 * nb + 1], a[mi], bk[2], bk[3]);
        }
      }
    }
#endif

    // Mask on global positions where the tile is mixed. Scores stay unscaled here: the
    // scale (> 0, the launcher sees to it) is applied to the row maximum and folded into
    // the exponent's multiply-add, as FlashAttention does, not multiplied into every score.
    // A masked score is −inf: it only meets fmaxf and that multiply-add (−inf·scale − shift
    // with a finite shift), so it gives p = 0 and never NaN.
    const bool mixed = tile_class(t) == 2;
    if (mixed) {
      // This thread's key columns are c0 + n·8 + e. Inside one segment (not the ragged last
      // tile) their positions are kb + kst·(n·8 + e): one multiply-add and two compares per
      // element; otherwise (a tile across the zigzag seam, the ragged tile) the generic form.
      const int c0 = t * BN + 2 * (lane % 4), j1 = t * BN + BN;
      const bool seg1 = t * BN >= ks.len0, one_seg = (seg1 || j1 <= ks.len0) && j1 <= Sk;
      const int kst = seg1 ? ks.stride1 : ks.stride0, kb = ks.pos(c0);
      auto mask_elements = [&](const bool affine) {  // called with a constant: two specialised copies
#pragma unroll
        for (int mi = 0; mi < MI; ++mi)
#pragma unroll
          for (int hr = 0; hr < 2; ++hr) {
            const int2 w = sRow[rbase(mi) + lane / 4 + 8 * hr];
#pragma unroll
            for (int n = 0; n < BN / 8; ++n)
#pragma unroll
              for (int e = 0; e < 2; ++e) {
                const int c = n * 8 + e, kp = affine ? kb + kst * c : ks.pos(c0 + c);
                if (kp < w.x || kp > w.y || (!affine && c0 + c >= Sk)) s[mi][n][2 * hr + e] = -__int_as_float(0x7f800000);
              }
          }
      };
      if (one_seg)
        mask_elements(true);
      else
        mask_elements(false);
    }

    // Online softmax: new running max, rescale the accumulators, P = 2^(S − max).
    float alphas[MI][2];
#pragma unroll
    for (int mi = 0; mi < MI; ++mi)
#pragma unroll
      for (int hr = 0; hr < 2; ++hr) {
        float mx = s[mi][0][2 * hr];  // the tile's row maximum, unscaled
#pragma unroll
        for (int n = 0; n < BN / 8; ++n) mx = fmaxf(mx, fmaxf(s[mi][n][2 * hr], s[mi][n][2 * hr + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        mx = fmaxf(m_r[mi][hr], mx * scale_log2);
        // A row with no allowed key so far keeps max = MASKED: shift by 0 so that its p = 2^(−inf) = 0.
        const float shift = mx == MASKED ? 0.f : mx;
        const float alpha = ex2(m_r[mi][hr] - shift);
        m_r[mi][hr] = mx;
        float sum = 0.f;
#pragma unroll
        for (int n = 0; n < BN / 8; ++n)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const float p = ex2(fmaf(s[mi][n][2 * hr + e], scale_log2, -shift));
            s[mi][n][2 * hr + e] = p;
            sum += p;
          }
        l_r[mi][hr] = l_r[mi][hr] * alpha + sum;
        alphas[mi][hr] = alpha;
      }
    // Once the running maxima settle (most tiles of a long row), alpha is exactly 1 in
    // the whole warp: skip the D/2·MI multiplies per thread (the result is bitwise the same).
    bool settled = true;
#pragma unroll
    for (int mi = 0; mi < MI; ++mi) settled = settled && alphas[mi][0] == 1.f && alphas[mi][1] == 1.f;
    if (!__all_sync(0xffffffffu, settled)) {
#pragma unroll
      for (int mi = 0; mi < MI; ++mi)
#pragma unroll
        for (int n = 0; n < D / 8; ++n) {
          o[mi][n][0] *= alphas[mi][0];
          o[mi][n][1] *= alphas[mi][0];
          o[mi][n][2] *= alphas[mi][1];
          o[mi][n][3] *= alphas[mi][1];
        }
    }

    // O += P·V, P rounded to the input dtype (register C fragments become A fragments:
    // key block kk of row block mi, the same layout for mma.sync and wgmma).
    auto pack_p = [&](u32(&p)[4], int mi, int kk) {
      p[0] = Ops<T>::pack(s[mi][2 * kk][0], s[mi][2 * kk][1]);
      p[1] = Ops<T>::pack(s[mi][2 * kk][2], s[mi][2 * kk][3]);
      p[2] = Ops<T>::pack(s[mi][2 * kk + 1][0], s[mi][2 * kk + 1][1]);
      p[3] = Ops<T>::pack(s[mi][2 * kk + 1][2], s[mi][2 * kk + 1][3]);
    };
#if FWD_WGMMA
    {
      // V is N-major for this product: a 16-key step is 2 groups of 1024 B; LBO = the
      // distance between D's two atom columns (wgmma.cuh).
      u32 pa[BN / 16][MI][4];
#pragma unroll
      for (int kk = 0; kk < BN / 16; ++kk)
#pragma unroll
        for (int mi = 0; mi < MI; ++mi) pack_p(pa[kk][mi], mi, kk);
      const u32 vs0 = smem_addr(sV) + stage * (2 * BN * D);
      WG_FENCE();
#pragma unroll
      for (int kk = 0; kk < BN / 16; ++kk)
#pragma unroll
        for (int mi = 0; mi < MI; ++mi) {
          const u64 dv = wg_desc(vs0 + kk * 2048, BN * 128, 1024);
          if constexpr (D == 128)
            Wg<T>::rs_n128(o[mi], pa[kk][mi], dv);
          else
            Wg<T>::rs_n64(o[mi], pa[kk][mi], dv);
        }
      WG_COMMIT();
      WG_WAIT0();
      wg_keep(pa);
      wg_keep(o);
    }
#else
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      u32 pa[MI][4];
#pragma unroll
      for (int mi = 0; mi < MI; ++mi) pack_p(pa[mi], mi, kk);
#pragma unroll
      for (int nd = 0; nd < D / 16; ++nd) {
        u32 bv[4];
        ldsm_x4_t(bv, vst + 2 * (kk * 16 * LD + nd * 16));
#pragma unroll
        for (int mi = 0; mi < MI; ++mi) {
          Ops<T>::mma(o[mi][2 * nd], pa[mi], bv[0], bv[1]);
          Ops<T>::mma(o[mi][2 * nd + 1], pa[mi], bv[2], bv[3]);
        }
      }
    }
#endif
    __syncthreads();  // this stage is refilled by the next iteration's prefetch
    stage = (stage + 1) % STAGES;
    t = tn;
    pre = pf;
  }
  cp_async_wait<0>();

  // Epilogue: out/lse on the last step, else the running state.
#pragma unroll
  for (int mi = 0; mi < MI; ++mi)
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      float l = l_r[mi][hr];
      l += __shfl_xor_sync(0xffffffffu, l, 1);
      l += __shfl_xor_sync(0xffffffffu, l, 2);
      const int i = i0 + rbase(mi) + lane / 4 + 8 * hr;
      if (i >= Sq) continue;
      const long long srow = ((long long)b * H + h) * Sq + i;
      const long long orow = ((long long)b * Sq + i) * q_stride + h * D;
      if (last) {
        const float inv = l > 0.f ? 1.f / l : 0.f;
        if (lane % 4 == 0) lse[srow] = l > 0.f ? (m_r[mi][hr] + __log2f(l)) * LN2 : -__int_as_float(0x7f800000);
#pragma unroll
        for (int n = 0; n < D / 8; ++n)
          *reinterpret_cast<u32*>(out + orow + n * 8 + 2 * (lane % 4)) =
              Ops<T>::pack(o[mi][n][2 * hr] * inv, o[mi][n][2 * hr + 1] * inv);
      } else {
        if (lane % 4 == 0) {
          m_state[srow] = m_r[mi][hr];
          l_state[srow] = l;
        }
#pragma unroll
        for (int n = 0; n < D / 8; ++n)
          *reinterpret_cast<float2*>(acc + orow + n * 8 + 2 * (lane % 4)) =
              make_float2(o[mi][n][2 * hr], o[mi][n][2 * hr + 1]);
      }
    }
}

#define FWD_ENTRY(NAME, T, DOCS)                                                                              \
  extern "C" __global__ void __launch_bounds__(32 * FWD_NW) NAME(                                              \
      const u16* q, const u16* k, const u16* v, float* acc, float* m_state, float* l_state, u16* out, float* lse, \
      int B, int H, int Hkv, int Sq, int Sk, float scale_log2, MASK_PARAMS, int first, int last) {               \
    MASK_UNPACK(DOCS);                                                                                         \
    attn_fwd_body<T, HEAD_DIM, FWD_MI, FWD_NW, FWD_BN, DOCS>(q, k, v, acc, m_state, l_state, out, lse, B, H, Hkv, \
                                                             Sq, Sk, scale_log2, qs, ks, mask, first, last);  \
  }

// `_doc`: packed documents (cu_seqlens read); the others ignore them.
FWD_ENTRY(attn_fwd_bf16, bf16_t, false)
FWD_ENTRY(attn_fwd_f16, f16_t, false)
FWD_ENTRY(attn_fwd_bf16_doc, bf16_t, true)
FWD_ENTRY(attn_fwd_f16_doc, f16_t, true)
