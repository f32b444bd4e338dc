// Hopper warpgroup MMA (wgmma, sm_90a only) for the FWD_WGMMA forward and the BWD_WGMMA
// backward.
//
// Shared-memory operands (Q, K, V alike) use the 128-byte-swizzle layout of
// load_rows_sw128 (common.cuh). Descriptors (bench/wgmma_probe.py measured them on an H100): Q and K
// are K-major (rows × D): SBO = 1024 B between 8-row groups, LBO unused, a k16 step is
// +32 B inside a 64-element atom column and the next atom column ROWS·128 B on. V is
// N-major for P·V (imm-trans-b = 1): SBO = 1024 B between 8-key groups, LBO = the distance
// between the two 64-wide atom columns of D, a 16-key step +2048 B. The backward's
// M-major A (dS for dQ, stored keys × queries, imm-trans-a = 1) takes the N-major form.
// Accumulators follow mma.sync's m16n8 C layout per warp (warp w of the warpgroup holds rows
// 16w…16w+15 of the m64 tile), and a register A operand mma.sync's A-fragment layout, so
// the online softmax and the P fragments are exactly those of the mma.sync path.
#pragma once

typedef unsigned long long u64;

// Shared-memory matrix descriptor, 128-byte swizzle (mode 1 in bits 62–63): address, LBO
// and SBO in 16-byte units.
__device__ __forceinline__ u64 wg_desc(u32 saddr, u32 lbo, u32 sbo) {
  return (u64)((saddr >> 4) & 0x3FFF) | ((u64)((lbo >> 4) & 0x3FFF) << 16) | ((u64)((sbo >> 4) & 0x3FFF) << 32) |
         (1ull << 62);
}

#define WG_FENCE() asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory")
#define WG_COMMIT() asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory")
#define WG_WAIT0() asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory")
// Writes to shared memory by this thread (cp.async, once complete) become visible to the
// async proxy that wgmma reads through; the block barrier after it publishes them.
#define WG_PROXY_FENCE() asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory")

// Keep the compiler from moving a register across the asynchronous MMA (CUTLASS's
// warpgroup_fence_operand).
__device__ __forceinline__ void wg_keep(float& x) { asm volatile("" : "+f"(x)::"memory"); }
__device__ __forceinline__ void wg_keep(u32& x) { asm volatile("" : "+r"(x)::"memory"); }
template <typename X, int N>
__device__ __forceinline__ void wg_keep(X (&a)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) wg_keep(a[i]);
}

#define WG_F4(a, j) "+f"(a[j][0]), "+f"(a[j][1]), "+f"(a[j][2]), "+f"(a[j][3])
#define WG_F32(a) WG_F4(a, 0), WG_F4(a, 1), WG_F4(a, 2), WG_F4(a, 3), WG_F4(a, 4), WG_F4(a, 5), WG_F4(a, 6), WG_F4(a, 7)
#define WG_F64(a)                                                                                             \
  WG_F32(a), WG_F4(a, 8), WG_F4(a, 9), WG_F4(a, 10), WG_F4(a, 11), WG_F4(a, 12), WG_F4(a, 13), WG_F4(a, 14),  \
      WG_F4(a, 15)
#define WG_R64                                                                                                \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, " \
  "%23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, "   \
  "%44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}"

// d (m64 × n128, fp32) = (accumulate ? d : 0) + A·Bᵀ, A and B K-major in shared memory
// (S for 128 keys). d[n][e]: row 16·warp + lane/4 + 8·(e/2), column 8n + 2·(lane%4) + e%2.
#define WG_SS_N128(TY)                                                                                       \
  __device__ __forceinline__ static void ss_n128(float (&d)[16][4], u64 da, u64 db, int accumulate) {        \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"                                                 \
                 "wgmma.mma_async.sync.aligned.m64n128k16.f32." TY "." TY " " WG_R64 ", %64, %65, p, 1, 1, 0, 0;\n}\n" \
                 : WG_F64(d)                                                                                  \
                 : "l"(da), "l"(db), "r"(accumulate));                                                        \
  }
// d (m64 × n128, fp32) += A·B, A from registers (mma.sync A-fragment layout), B N-major in
// shared memory (imm-trans-b = 1).
#define WG_RS_N128(TY)                                                                                       \
  __device__ __forceinline__ static void rs_n128(float (&d)[16][4], const u32 (&a)[4], u64 db) {              \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"                                                 \
                 "wgmma.mma_async.sync.aligned.m64n128k16.f32." TY "." TY " " WG_R64                          \
                 ", {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"                                              \
                 : WG_F64(d)                                                                                  \
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(1));                              \
  }

#define WG_R32                                                                                                \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, " \
  "%23, %24, %25, %26, %27, %28, %29, %30, %31}"
// d (m64 × n64, fp32) = (accumulate ? d : 0) + A·B, both in shared memory; TA / TB: A is
// M-major / B is N-major (imm-trans 1), else K-major (the backward's Sᵀ, dPᵀ and dQ).
#define WG_SS_N64(TY)                                                                                        \
  template <int TA, int TB>                                                                                  \
  __device__ __forceinline__ static void ss_n64(float (&d)[8][4], u64 da, u64 db, int accumulate) {          \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"                                                 \
                 "wgmma.mma_async.sync.aligned.m64n64k16.f32." TY "." TY " " WG_R32 ", %32, %33, p, 1, 1, %35, %36;\n}\n" \
                 : WG_F32(d)                                                                                  \
                 : "l"(da), "l"(db), "r"(accumulate), "n"(TA), "n"(TB));                                      \
  }

// d (m64 × n64, fp32) += A·B, A from registers, B N-major in shared memory (P·V at d64).
#define WG_RS_N64(TY)                                                                                        \
  __device__ __forceinline__ static void rs_n64(float (&d)[8][4], const u32 (&a)[4], u64 db) {                \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"                                                 \
                 "wgmma.mma_async.sync.aligned.m64n64k16.f32." TY "." TY " " WG_R32                           \
                 ", {%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"                                              \
                 : WG_F32(d)                                                                                  \
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(1));                              \
  }

template <typename T> struct Wg;
template <> struct Wg<bf16_t> {
  WG_SS_N128("bf16")
  WG_RS_N128("bf16")
  WG_SS_N64("bf16")
  WG_RS_N64("bf16")
};
template <> struct Wg<f16_t> {
  WG_SS_N128("f16")
  WG_RS_N128("f16")
  WG_SS_N64("f16")
  WG_RS_N64("f16")
};
