// Shared helpers of the attention kernels: storage types, tensor-core MMA,
// ldmatrix / cp.async wrappers and masks on global token positions.
//
// No CUDA header is included on purpose: bf16/fp16 conversions are one PTX
// instruction each, so the kernels compile with a bare NVRTC (CI installs only
// the NVRTC wheel) and under CuPy whatever CUDA headers it ships.
#pragma once

typedef unsigned short u16;
typedef unsigned int u32;

// Storage tags: the kernels move raw 16-bit words and convert in registers.
struct bf16_t { u16 bits; };
struct f16_t { u16 bits; };

template <typename T> struct Ops;

template <> struct Ops<bf16_t> {
  // Two fp32 -> one register of two bf16, `lo` in the low half (the element with the lower index).
  __device__ __forceinline__ static u32 pack(float lo, float hi) {
    u32 r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
  }
  __device__ __forceinline__ static float to_float(u16 x) { return __uint_as_float(((u32)x) << 16); }
  // c += a·b on tensor cores, 16×8×16, fp32 accumulation.
  __device__ __forceinline__ static void mma(float c[4], const u32 a[4], const u32 b0, const u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

template <> struct Ops<f16_t> {
  __device__ __forceinline__ static u32 pack(float lo, float hi) {
    u32 r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
  }
  __device__ __forceinline__ static float to_float(u16 x) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x));
    return f;
  }
  __device__ __forceinline__ static void mma(float c[4], const u32 a[4], const u32 b0, const u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

// A large finite negative for masked scores (DESIGN.md §3: no −inf arithmetic).
#define MASKED (-1.0e30f)
// "No bound" for the window's left/right: positions stay below 2^30, so q ± NO_BOUND never overflows.
#define NO_BOUND (1 << 30)
#define LOG2E 1.4426950408889634f
#define LN2 0.6931471805599453f

__device__ __forceinline__ float ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ u32 smem_addr(const void* p) {
  u32 a;
  asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
  return a;
}

// ldmatrix: lanes 8i..8i+7 give the row addresses of 8×8 matrix i (16 B each).
// Addresses are shared-window byte addresses (u32): a per-thread base plus
// compile-time offsets, so the unrolled loops need no address registers.
__device__ __forceinline__ void ldsm_x4(u32 r[4], u32 addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldsm_x4_t(u32 r[4], u32 addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
// Per-lane element offsets (in a tile of pitch LD) for ldmatrix.x4 fragments:
// A operand (16×16, row-major rows m, cols k): lanes 0-15 rows, lanes 16-31 the +8 columns.
template <int LD> __device__ __forceinline__ int lds_a(int lane) { return (lane & 15) * LD + (lane >> 4) * 8; }
// B operand from rows n, cols k (two n8 blocks × k16): matrices (n,k) (n,k+8) (n+8,k) (n+8,k+8).
template <int LD> __device__ __forceinline__ int lds_b(int lane) {
  return ((lane >> 4) * 8 + (lane & 7)) * LD + ((lane >> 3) & 1) * 8;
}
// B operand from rows k, cols n, transposed (k16 × two n8 blocks): (k,n) (k+8,n) (k,n+8) (k+8,n+8).
template <int LD> __device__ __forceinline__ int lds_bt(int lane) {
  return (((lane >> 3) & 1) * 8 + (lane & 7)) * LD + (lane >> 4) * 8;
}

// 16-byte asynchronous global -> shared copy to a shared-window byte address (no 64-bit
// generic address per copy); `valid == false` writes zeros (no read).
__device__ __forceinline__ void cp_async16(u32 dst, const u16* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0));
}
// 4-byte asynchronous global -> shared copy of one float; `valid == false` writes 0 (no read).
__device__ __forceinline__ void cp_async4(float* dst, const float* src, bool valid) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;" ::"r"(smem_addr(dst)), "l"(src), "r"(valid ? 4 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;"); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(N));
}

// p[0] += a, p[1] += b in global memory, atomically (one vector reduction on sm_90).
__device__ __forceinline__ void red_add2(float* p, float a, float b) {
#if __CUDA_ARCH__ >= 900
  asm volatile("red.global.add.v2.f32 [%0], {%1, %2};" ::"l"(p), "f"(a), "f"(b) : "memory");
#else
  atomicAdd(p, a);
  atomicAdd(p + 1, b);
#endif
}

// Shared-memory row pitch: D + 8 elements shifts consecutive rows by 16 bytes, so
// the 8 rows of an ldmatrix (and of a cp.async wave) hit 8 different 16-byte bank groups.
template <int D> struct Pitch { static const int value = D + 8; };

// Copy `ROWS` rows of D elements (row `row0 + r` at g + (row0 + r)·stride) into s
// (pitch D + 8); rows at or past `nrows` are zero-filled so that they never make NaN.
// Addresses: one 64-bit pointer to the tile's first row, then 32-bit element offsets
// (r·stride < ROWS·stride stays far below 2^31) joined to it by one wide multiply-add per
// copy. A zero-filled copy keeps its out-of-range address: with src-size 0, cp.async reads
// nothing (CUTLASS's zfill copies do the same), which saves a 64-bit select per copy.
template <int ROWS, int D, int NT>
__device__ __forceinline__ void load_rows(u16* s, const u16* g, long long stride, int row0, int nrows) {
  const int C = D / 8;
  const u16* base = g + row0 * stride;
  const u32 sa = smem_addr(s);
  const int left = nrows - row0, st = (int)stride;
#pragma unroll
  for (int k = 0; k < (ROWS * C + NT - 1) / NT; ++k) {
    const int idx = threadIdx.x + k * NT;
    if (ROWS * C % NT == 0 || idx < ROWS * C) {
      // With NT a multiple of C every copy of a thread has the same column: said so, the
      // compiler keeps one column offset, not one 64-bit address per copy (the 64-key
      // forward spilled those).
      const int r = NT % C == 0 ? (int)threadIdx.x / C + k * (NT / C) : idx / C;
      const int c = NT % C == 0 ? (int)threadIdx.x % C : idx % C;
      cp_async16(sa + 2 * (r * (D + 8) + c * 8), base + (r * st + c * 8), r < left);
    }
  }
}

// cp.async ROWS rows × D columns (D a multiple of 64) from global rows row0… (stride in
// elements) into a 128-byte-swizzled tile; rows ≥ nrows are zero-filled. The tile is D/64
// "atom columns" of ROWS rows × 128 B (64 elements), ROWS·128 B apart; in each, row r sits
// at (r/8)·1024 + (r%8)·128 B with its 16-byte chunk j at chunk j ^ (r%8) (the hardware's
// 128B swizzle; the tile must be 1024-byte aligned). Eight lanes copy one row's 128 B: the
// global read is one contiguous segment and the shared write one 128-byte line.
template <int ROWS, int D, int NT>
__device__ __forceinline__ void load_rows_sw128(u16* s, const u16* g, long long stride, int row0, int nrows) {
  constexpr int UNITS = ROWS * (D / 8);
  static_assert(ROWS % 8 == 0 && D % 64 == 0 && UNITS % NT == 0, "swizzled copy shape");
  const u16* base = g + row0 * stride;
  const u32 sa = smem_addr(s);
  const int left = nrows - row0, st = (int)stride;
#pragma unroll
  for (int k = 0; k < UNITS / NT; ++k) {
    const int idx = threadIdx.x + k * NT, j = idx % 8, rest = idx / 8, r = rest % ROWS, a = rest / ROWS;
    const int dst = a * ROWS * 64 + (r / 8) * 512 + (r % 8) * 64 + ((j ^ (r % 8)) * 8);
    cp_async16(sa + 2 * dst, base + (r * st + a * 64 + j * 8), r < left);
  }
}

// A tile of ROWS rows: 128-byte-swizzled for wgmma (SW128), else padded rows for ldmatrix.
template <bool SW128, int ROWS, int D, int NT>
__device__ __forceinline__ void load_tile(u16* s, const u16* g, long long stride, int row0, int nrows) {
  if constexpr (SW128)
    load_rows_sw128<ROWS, D, NT>(s, g, stride, row0, nrows);
  else
    load_rows<ROWS, D, NT>(s, g, stride, row0, nrows);
}

#include "mask.cuh"

// Ordered accumulation (deterministic dQ): a counter per output tile, raised by one
// block at a time in a fixed order. Thread 0 waits/signals; the block's barrier
// carries the ordering to its other threads (the acquire/release pattern of CUTLASS'
// generic barrier).
__device__ __forceinline__ int ld_relaxed(const int* p) {
  int v;
  asm volatile("ld.relaxed.gpu.global.s32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ int ld_acquire(const int* p) {
  int v;
  asm volatile("ld.acquire.gpu.global.s32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}
// Spin until *p ≥ target. The blocks awaited are already running, so a wait is short;
// one past WAIT_LIMIT_NS means a counter that is never raised (a bug): trap, so the
// launch fails with an error that ends the job instead of hanging the GPU.
#ifndef WAIT_LIMIT_NS
#define WAIT_LIMIT_NS 20000000000ull
#endif
__device__ __forceinline__ unsigned long long global_ns() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}
__device__ __noinline__ void wait_slow(const int* p, int target) {
  const unsigned long long t0 = global_ns();
  while (ld_acquire(p) < target) {
    asm volatile("nanosleep.u32 64;");
    if (global_ns() - t0 > WAIT_LIMIT_NS) asm volatile("trap;");
  }
}
__device__ __forceinline__ void wait_at_least(const int* p, int target) {
  if (ld_acquire(p) < target) wait_slow(p, target);
}
__device__ __forceinline__ void release_add(int* p) {
  asm volatile("fence.acq_rel.gpu;\n\tred.relaxed.gpu.global.add.s32 [%0], 1;" ::"l"(p) : "memory");
}
