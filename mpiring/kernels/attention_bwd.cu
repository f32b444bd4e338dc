// Blockwise attention backward (FlashAttention-2 style) for one K/V block in hand.
//
// Layouts (all contiguous):
//   q, dout, out  (B, Sq, H, D)        input dtype
//   kv            (2, B, Sk, Hkv, D)   input dtype (travelling K then V)
//   lse, delta    (B, H, Sq)   fp32    lse natural log (−inf: row had no key); delta = rowsum(dout∘out)
//   dq_acc        (B, Sq, H, D) fp32   += scale·dS·K   (atomics: many K tiles add to one Q row)
//   dkv           (2, B, Sk, Hkv, D) fp32  += scale·dSᵀ·Q and Pᵀ·dO (the travelling dK/dV partials)
//
// One block owns BN = 16·NW keys of one (batch, kv head) and sweeps every query
// tile of BM rows of every q head of its GQA group, so dK/dV (summed over the
// group) stay in registers and are added to `dkv` once, without atomics. Each
// warp owns 16 keys and computes the transposed tiles Sᵀ = K·Qᵀ and dPᵀ = V·dOᵀ,
// whose register fragments are the A operands of dV += Pᵀ·dO and dK += dSᵀ·Q.
#include "common.cuh"

#ifndef HEAD_DIM
#define HEAD_DIM 128
#endif
#ifndef BWD_NW
#define BWD_NW 8
#endif
#ifndef BWD_BM
#define BWD_BM 64
#endif

template <typename T, int D, int NW, int BM>
__device__ __forceinline__ void attn_bwd_body(const u16* __restrict__ q, const u16* __restrict__ kv,
                                              const u16* __restrict__ dout, const float* __restrict__ lse,
                                              const float* __restrict__ delta, float* __restrict__ dq_acc,
                                              float* __restrict__ dkv, int B, int H, int Hkv, int Sq, int Sk,
                                              float scale_log2, float scale, Segs qs, Segs ks, MaskInfo mask) {
  const int BN = 16 * NW, NT = 32 * NW, LD = D + 8, LDS = BM + 8;
  extern __shared__ uint4 smem_u4[];
  u16* sK = reinterpret_cast<u16*>(smem_u4);
  u16* sV = sK + BN * LD;
  u16* sQ = sV + BN * LD;        // [2][BM][LD]
  u16* sdO = sQ + 2 * BM * LD;   // [2][BM][LD]
  u16* sdS = sdO + 2 * BM * LD;  // [BN][LDS]: dSᵀ, rows = keys
  float* sL = reinterpret_cast<float*>(sdS + BN * LDS);  // [2][BM]: lse·log2e (+1e30: row has no key)
  float* sD = sL + 2 * BM;                              // [2][BM]: delta

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int b = blockIdx.x / Hkv, hk = blockIdx.x % Hkv, G = H / Hkv;
  const int j0 = blockIdx.y * BN;
  const long long q_stride = (long long)H * D, k_stride = (long long)Hkv * D;
  const u16* gk = kv + ((long long)b * Sk * Hkv + hk) * D;
  const u16* gv = gk + (long long)B * Sk * Hkv * D;

  int klo, khi;
  ks.range(j0, min(j0 + BN, Sk), klo, khi);
  const int nqt = (Sq + BM - 1) / BM;
  auto tile_class = [&](int t) {
    int qlo, qhi;
    qs.range(t * BM, min(t * BM + BM, Sq), qlo, qhi);
    const int c = mask.classify(qlo, qhi, klo, khi);
    return (c == 1 && j0 + BN > Sk) ? 2 : c;  // padded keys of the ragged last tile are masked
  };
  // Work items w = g·nqt + t (q head hk·G + g, query tile t) with something allowed.
  auto next_work = [&](int w) {
    while (w < G * nqt && tile_class(w % nqt) == 0) ++w;
    return w;
  };
  auto prefetch = [&](int w, int st) {
    const int h = hk * G + w / nqt, i0 = (w % nqt) * BM;
    const long long off = ((long long)b * Sq * H + h) * D;
    load_rows<BM, D, NT>(sQ + st * BM * LD, q + off, q_stride, i0, Sq);
    load_rows<BM, D, NT>(sdO + st * BM * LD, dout + off, q_stride, i0, Sq);
    for (int r = threadIdx.x; r < BM; r += NT) {
      const int i = i0 + r;
      const long long srow = ((long long)b * H + h) * Sq + i;
      const float x = i < Sq ? lse[srow] : -__int_as_float(0x7f800000);
      // p = 2^(s·scale_log2 − L): L = +1e30 gives p = 0 on rows with no key (lse = −inf) and padding rows.
      sL[st * BM + r] = x == -__int_as_float(0x7f800000) ? 1.0e30f : x * LOG2E;
      sD[st * BM + r] = i < Sq ? delta[srow] : 0.f;
    }
  };

  int w = next_work(0);
  if (w >= G * nqt) return;  // dK/dV of this block get nothing from this step
  load_rows<BN, D, NT>(sK, gk, k_stride, j0, Sk);
  load_rows<BN, D, NT>(sV, gv, k_stride, j0, Sk);
  prefetch(w, 0);
  cp_async_commit();

  float dk[D / 8][4], dv[D / 8][4];
#pragma unroll
  for (int n = 0; n < D / 8; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[n][e] = dv[n][e] = 0.f;

  const int krow = warp * 16;  // this warp's keys within the tile
  const u32 ka = smem_addr(sK) + 2 * (krow * LD + lds_a<LD>(lane));
  const u32 va = smem_addr(sV) + 2 * (krow * LD + lds_a<LD>(lane));
  const u32 qb = smem_addr(sQ) + 2 * lds_b<LD>(lane), qbt = smem_addr(sQ) + 2 * lds_bt<LD>(lane);
  const u32 ob = smem_addr(sdO) + 2 * lds_b<LD>(lane), obt = smem_addr(sdO) + 2 * lds_bt<LD>(lane);
  // dQ = dS·K: warps tile (BM/16 row blocks) × (D/WN columns).
  const int WM = BM / 16, WN = NW / WM, DW = D / WN;
  const int dq_m = (warp % WM) * 16, dq_n = (warp / WM) * DW;
  // A = dS (rows m, cols keys) read transposed from dSᵀ: matrices (m,k) (m+8,k) (m,k+8) (m+8,k+8).
  const u32 dsa = smem_addr(sdS) + 2 * ((((lane >> 4) * 8 + (lane & 7)) * LDS) + dq_m + ((lane >> 3) & 1) * 8);
  const u32 kbt = smem_addr(sK) + 2 * (lds_bt<LD>(lane) + dq_n);

  int stage = 0;
  while (w < G * nqt) {
    const int wn = next_work(w + 1);
    if (wn < G * nqt) prefetch(wn, stage ^ 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    const int h = hk * G + w / nqt, t = w % nqt, i0 = t * BM;
    const u32 so = stage * (2 * BM * LD);
    const float* sLs = sL + stage * BM;
    const float* sDs = sD + stage * BM;

    // Sᵀ = K·Qᵀ and dPᵀ = V·dOᵀ for this warp's 16 keys × BM queries.
    float s[BM / 8][4], dp[BM / 8][4];
#pragma unroll
    for (int n = 0; n < BM / 8; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[n][e] = dp[n][e] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      u32 ak[4], av[4];
      ldsm_x4(ak, ka + 2 * kk * 16);
      ldsm_x4(av, va + 2 * kk * 16);
#pragma unroll
      for (int nb = 0; nb < BM / 16; ++nb) {
        u32 bq[4], bo[4];
        ldsm_x4(bq, qb + so + 2 * (nb * 16 * LD + kk * 16));
        ldsm_x4(bo, ob + so + 2 * (nb * 16 * LD + kk * 16));
        Ops<T>::mma(s[2 * nb], ak, bq[0], bq[1]);
        Ops<T>::mma(s[2 * nb + 1], ak, bq[2], bq[3]);
        Ops<T>::mma(dp[2 * nb], av, bo[0], bo[1]);
        Ops<T>::mma(dp[2 * nb + 1], av, bo[2], bo[3]);
      }
    }

    // P = 2^(S·scale_log2 − L) (0 where masked), dS = P∘(dP − delta); rows of the fragments are keys.
    const bool mixed = tile_class(t) == 2;
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      const int j = j0 + krow + lane / 4 + 8 * hr;
      const int kp = mixed ? ks.pos(min(j, Sk - 1)) : 0;
#pragma unroll
      for (int n = 0; n < BM / 8; ++n)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int m = n * 8 + 2 * (lane % 4) + e;
          float p = ex2(s[n][2 * hr + e] * scale_log2 - sLs[m]);
          if (mixed) {
            const int i = min(i0 + m, Sq - 1);
            if (j >= Sk || !mask.allowed(qs.pos(i), kp, i, min(j, Sk - 1))) p = 0.f;
          }
          s[n][2 * hr + e] = p;
          dp[n][2 * hr + e] = p * (dp[n][2 * hr + e] - sDs[m]);
        }
    }

    // dV += Pᵀ·dO and dK += dSᵀ·Q (P, dS rounded to the input dtype); dSᵀ to shared for dQ.
#pragma unroll
    for (int kk = 0; kk < BM / 16; ++kk) {
      u32 pa[4], da[4];
      pa[0] = Ops<T>::pack(s[2 * kk][0], s[2 * kk][1]);
      pa[1] = Ops<T>::pack(s[2 * kk][2], s[2 * kk][3]);
      pa[2] = Ops<T>::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]);
      pa[3] = Ops<T>::pack(s[2 * kk + 1][2], s[2 * kk + 1][3]);
      da[0] = Ops<T>::pack(dp[2 * kk][0], dp[2 * kk][1]);
      da[1] = Ops<T>::pack(dp[2 * kk][2], dp[2 * kk][3]);
      da[2] = Ops<T>::pack(dp[2 * kk + 1][0], dp[2 * kk + 1][1]);
      da[3] = Ops<T>::pack(dp[2 * kk + 1][2], dp[2 * kk + 1][3]);
      u32* row0 = reinterpret_cast<u32*>(sdS + (krow + lane / 4) * LDS + kk * 16 + 2 * (lane % 4));
      u32* row8 = reinterpret_cast<u32*>(sdS + (krow + lane / 4 + 8) * LDS + kk * 16 + 2 * (lane % 4));
      row0[0] = da[0];
      row8[0] = da[1];
      row0[4] = da[2];
      row8[4] = da[3];
#pragma unroll
      for (int nd = 0; nd < D / 16; ++nd) {
        u32 bo[4], bq[4];
        ldsm_x4_t(bo, obt + so + 2 * (kk * 16 * LD + nd * 16));
        ldsm_x4_t(bq, qbt + so + 2 * (kk * 16 * LD + nd * 16));
        Ops<T>::mma(dv[2 * nd], pa, bo[0], bo[1]);
        Ops<T>::mma(dv[2 * nd + 1], pa, bo[2], bo[3]);
        Ops<T>::mma(dk[2 * nd], da, bq[0], bq[1]);
        Ops<T>::mma(dk[2 * nd + 1], da, bq[2], bq[3]);
      }
    }
    __syncthreads();  // dSᵀ complete

    // dQ (BM × D) += scale · dS · K over this block's keys.
    {
      float dq[DW / 8][4];
#pragma unroll
      for (int n = 0; n < DW / 8; ++n) dq[n][0] = dq[n][1] = dq[n][2] = dq[n][3] = 0.f;
#pragma unroll
      for (int kk = 0; kk < BN / 16; ++kk) {
        u32 a[4];
        ldsm_x4_t(a, dsa + 2 * (kk * 16 * LDS));
#pragma unroll
        for (int nd = 0; nd < DW / 16; ++nd) {
          u32 bk[4];
          ldsm_x4_t(bk, kbt + 2 * (kk * 16 * LD + nd * 16));
          Ops<T>::mma(dq[2 * nd], a, bk[0], bk[1]);
          Ops<T>::mma(dq[2 * nd + 1], a, bk[2], bk[3]);
        }
      }
#pragma unroll
      for (int hr = 0; hr < 2; ++hr) {
        const int i = i0 + dq_m + lane / 4 + 8 * hr;
        if (i >= Sq) continue;
        float* row = dq_acc + ((long long)b * Sq + i) * q_stride + h * D + dq_n + 2 * (lane % 4);
#pragma unroll
        for (int n = 0; n < DW / 8; ++n) {
          atomicAdd(row + n * 8, dq[n][2 * hr] * scale);
          atomicAdd(row + n * 8 + 1, dq[n][2 * hr + 1] * scale);
        }
      }
    }
    __syncthreads();  // sdS, and this stage's Q/dO, are rewritten next
    stage ^= 1;
    w = wn;
  }
  cp_async_wait<0>();

  // dK/dV partials of this block's keys: one read-add-write each (the block owns them).
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    const int j = j0 + krow + lane / 4 + 8 * hr;
    if (j >= Sk) continue;
    float* rk = dkv + ((long long)b * Sk + j) * k_stride + hk * D + 2 * (lane % 4);
    float* rv = rk + (long long)B * Sk * k_stride;
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
      float2 x = *reinterpret_cast<float2*>(rk + n * 8), y = *reinterpret_cast<float2*>(rv + n * 8);
      x.x += dk[n][2 * hr] * scale;
      x.y += dk[n][2 * hr + 1] * scale;
      y.x += dv[n][2 * hr];
      y.y += dv[n][2 * hr + 1];
      *reinterpret_cast<float2*>(rk + n * 8) = x;
      *reinterpret_cast<float2*>(rv + n * 8) = y;
    }
  }
}

#define BWD_ENTRY(NAME, T)                                                                                     \
  extern "C" __global__ void __launch_bounds__(32 * BWD_NW) NAME(                                               \
      const u16* q, const u16* kv, const u16* dout, const float* lse, const float* delta, float* dq_acc,        \
      float* dkv, int B, int H, int Hkv, int Sq, int Sk, float scale_log2, float scale, int q_start0,           \
      int q_stride0, int q_len0, int q_start1, int q_stride1, int k_start0, int k_stride0, int k_len0,          \
      int k_start1, int k_stride1, int left, int right, const int* q_doc, const int* k_doc) {                   \
    Segs qs = {q_start0, q_stride0, q_len0, q_start1, q_stride1};                                               \
    Segs ks = {k_start0, k_stride0, k_len0, k_start1, k_stride1};                                               \
    MaskInfo mask = {left, right, q_doc, k_doc};                                                                \
    attn_bwd_body<T, HEAD_DIM, BWD_NW, BWD_BM>(q, kv, dout, lse, delta, dq_acc, dkv, B, H, Hkv, Sq, Sk,        \
                                               scale_log2, scale, qs, ks, mask);                               \
  }

BWD_ENTRY(attn_bwd_bf16, bf16_t)
BWD_ENTRY(attn_bwd_f16, f16_t)

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
