// Which (query, key) pairs a tile pair holds: positions of local rows, the tiles one
// side's rows may meet, and the tile classes. Integer code only, compiled both by NVRTC
// (inside the kernels) and by a host C++ compiler (tests/mask_harness.cpp checks it
// against brute force over random layouts, windows and documents).
#pragma once

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#define MASK_FN __device__ __forceinline__
#else
#include <algorithm>
using std::max;
using std::min;
#define MASK_FN inline
#endif

// Global positions of a block's local rows: up to two arithmetic segments
// (contiguous and striped: one; zigzag: two). Rows i < len0 are at start0 + stride0·i,
// the others at start1 + stride1·(i − len0). Positions increase with i (strides > 0,
// the second segment after the first: the launcher checks).
struct Segs {
  int start0, stride0, len0, start1, stride1;
  MASK_FN int pos(int i) const { return i < len0 ? start0 + stride0 * i : start1 + stride1 * (i - len0); }
  // Smallest and largest position of rows [i0, i1).
  MASK_FN void range(int i0, int i1, int& lo, int& hi) const {
    lo = pos(i0);
    hi = pos(i1 - 1);
  }
  // The first row (of n) whose position may be ≥ p (rounded down: never past it).
  MASK_FN int row_from(int p, int n) const {
    if (p <= start0) return 0;
    const int r0 = (p - start0) / stride0;
    if (r0 < len0 || len0 >= n) return min(r0, n);
    if (p <= start1) return len0;
    return min(len0 + (p - start1) / stride1, n);
  }
  // One past the last row (of n) whose position is ≤ p.
  MASK_FN int row_end(int p, int n) const {
    if (p < start0) return 0;
    const int r0 = (p - start0) / stride0 + 1;
    if (len0 >= n) return min(r0, n);
    if (p < start1) return min(r0, len0);
    return min(len0 + (p - start1) / stride1 + 1, n);
  }
};

// The backward's work item of deterministic ticket t (tickets 0, 1, … in block start order)
// over `rows` (batch·kv head) rows × `slots` key-tile slots: groups of `group` rows (the last
// group takes the rows left), a group's key tiles in order, its rows fastest. Every
// (row, slot) gets one ticket, and key tile j − 1 of a row an earlier one than key tile j:
// a block then only waits (deterministic dQ order) for blocks that already started.
// (`rows` unsigned, as gridDim.x: the group count is then a shift.)
MASK_FN void ticket_item(int t, unsigned rows, int slots, int group, int& row, int& slot) {
  const int full = rows / group * group;
  const bool in_full = t < full * slots;
  const int gh = in_full ? group : rows - full, first = in_full ? t / (group * slots) * group : full;
  const int rem = t - first * slots;
  row = first + rem % gh;
  slot = rem / gh;
}

// The tiles (of `tile` rows, over local rows [0, n)) of one side whose positions may
// lie in the other side's allowed range [lo, hi]: [first(), end()). Computed once per
// block, so the tile loop carries one bound, not the segment arithmetic. A tile whose
// position range spans [lo, hi] stays in, even when [lo, hi] falls between two of its
// rows (the zigzag gap, a stride): classify() counts it, and so does the deterministic
// dQ order, so every block must reach it (else the next key tile waits forever).
struct Sweep {
  Segs segs;
  int n, tile, lo, hi;
  MASK_FN int first() const { return segs.row_from(lo, n) / tile; }
  MASK_FN int end() const { return (segs.row_end(hi, n) + tile - 1) / tile; }
};

// The positions [a, b) spanned by the documents of a block's rows (first to last);
// `one`: they are one document. Without DOCS: everything, one document.
struct DocSpan {
  int a, b;
  bool one;
};

// The mask of one call: pos_q − left ≤ pos_k ≤ pos_q + right (NO_BOUND: unbounded;
// causal is right = 0). DOCS: `cu` (`ncu` entries) are the global boundaries of packed
// documents (cu_seqlens); only rows of the same document attend. A row's document is
// found from its position by binary search over `cu` (doc_of), once per block or per row
// of a block's set-up, never per tile. Without DOCS `cu` is not read (and the kernels
// compile as if it did not exist).
//
// Tile classes and sweeps need no document id of the tile that varies in a block's loop:
// a row at position p is in document d exactly when cu[d] ≤ p < cu[d + 1] (ids are
// searchsorted(cu, p, 'right') − 1; no row is in an empty document), so "documents
// d0..d1 meet rows with positions lo..hi" is a comparison of lo, hi with the block's own
// span [cu[d0], cu[d1 + 1]). The loops then carry no dependent global load per tile.
#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
// The kernels' mask arguments, in this order in every entry point: each side's segments
// (Segs), the window and the documents (MaskInfo); MASK_UNPACK(DOCS) makes `qs`, `ks` and
// `mask` of them.
#define MASK_PARAMS                                                                                          \
  int q_start0, int q_stride0, int q_len0, int q_start1, int q_stride1, int k_start0, int k_stride0,         \
      int k_len0, int k_start1, int k_stride1, int left, int right, const int* cu, int ncu
#define MASK_UNPACK(DOCS)                                                                                    \
  Segs qs = {q_start0, q_stride0, q_len0, q_start1, q_stride1};                                              \
  Segs ks = {k_start0, k_stride0, k_len0, k_start1, k_stride1};                                              \
  MaskInfo<DOCS> mask = {left, right, cu, ncu}
#endif

template <bool DOCS>
struct MaskInfo {
  int left, right;
  const int* cu;
  int ncu;
  // The document holding position p: the last d ≤ ncu − 2 with cu[d] ≤ p (NumPy's
  // searchsorted(cu, p, 'right') − 1, so empty documents are never chosen).
  MASK_FN int doc_of(int p) const {
    int lo = 0, hi = ncu - 2;
    while (lo < hi) {
      const int mid = (lo + hi + 1) / 2;
      if (cu[mid] <= p)
        lo = mid;
      else
        hi = mid - 1;
    }
    return lo;
  }
  // The span of the document of row i of one side (rows at positions `s`): the kernels
  // take it for each row of a block whose rows span several documents.
  MASK_FN DocSpan row_span(const Segs& s, int i) const {
    if (!DOCS) return {0, 0, true};
    const int d = doc_of(s.pos(i));
    return {cu[d], cu[d + 1], true};
  }
  // The span of the documents of rows [i0, i1) of one side (rows at positions `s`).
  MASK_FN DocSpan span(const Segs& s, int i0, int i1) const {
    if (!DOCS) return {0, 0, true};
    const int d0 = doc_of(s.pos(i0)), d1 = doc_of(s.pos(i1 - 1));
    return {cu[d0], cu[d1 + 1], d0 == d1};
  }
  // Tile class of query rows with positions qlo..qhi against key rows with klo..khi, where
  // one side's documents span `s` and the other side's positions are lo..hi:
  // 0 no pair allowed, 1 every pair allowed, 2 mixed.
  MASK_FN int classify(int qlo, int qhi, int klo, int khi, DocSpan s, int lo, int hi) const {
    if (klo > qhi + right || khi < qlo - left) return 0;
    if (DOCS && (hi < s.a || lo >= s.b)) return 0;
    const bool one_doc = !DOCS || (s.one && lo >= s.a && hi < s.b);
    return one_doc && khi <= qlo + right && klo >= qhi - left ? 1 : 2;
  }
  // Positions of the other side that rows with positions p0..p1 and documents spanning
  // `s` may meet: [p0 − below, p1 + above] within that span.
  MASK_FN void window(int p0, int p1, DocSpan s, int below, int above, int& lo, int& hi) const {
    lo = p0 - below;
    hi = p1 + above;
    if (DOCS) {
      lo = max(lo, s.a);
      hi = min(hi, s.b - 1);
    }
  }
  // Element masks: with qlo = qhi (one query row, s its document's span) this is exactly
  // the key positions that row may meet; the forward keeps it per row, the backward the
  // queries_window of each key, so a mixed tile's element test is two compares.
  // Key positions that query rows (positions qlo..qhi, documents spanning s) may see.
  MASK_FN void keys_window(int qlo, int qhi, DocSpan s, int& lo, int& hi) const {
    window(qlo, qhi, s, left, right, lo, hi);
  }
  // Query positions that key rows (klo..khi, documents spanning s) may be seen from.
  MASK_FN void queries_window(int klo, int khi, DocSpan s, int& lo, int& hi) const {
    window(klo, khi, s, right, left, lo, hi);
  }
  // Key rows ending at position khi lie before all that queries starting at position qlo
  // (in a document starting at qa) may see. With positions and documents non-decreasing
  // along the rows, classify() is 0 exactly on the key tiles for which this holds (a
  // prefix) and on those wholly after the queries (a suffix): the deterministic dQ order
  // counts on it.
  MASK_FN bool keys_before(int qlo, int qa, int khi) const { return khi < qlo - left || (DOCS && khi < qa); }
  // j_lo of the deterministic dQ order: how many key tiles (of `tile` rows, over key rows
  // [0, nk)) lie wholly before query row i0 (binary search on keys_before, a prefix).
  MASK_FN int key_tiles_before(const Segs& qs, int i0, const Segs& ks, int nk, int tile) const {
    const int qp0 = qs.pos(i0), qa = DOCS ? cu[doc_of(qp0)] : 0;
    int lo = 0, hi = (nk + tile - 1) / tile;
    while (lo < hi) {
      const int mid = (lo + hi) / 2;
      if (keys_before(qp0, qa, ks.pos(min(mid * tile + tile, nk) - 1)))
        lo = mid + 1;
      else
        hi = mid;
    }
    return lo;
  }
  // key_tiles_before stepped down from j, the answer for a later query tile (j_lo does not
  // increase as i0 decreases): the backward's descending sweep moves by 0 or 1 per tile.
  MASK_FN int key_tiles_before_from(const Segs& qs, int i0, const Segs& ks, int nk, int tile, int j) const {
    const int qp0 = qs.pos(i0), qa = DOCS ? cu[doc_of(qp0)] : 0;
    while (j > 0 && !keys_before(qp0, qa, ks.pos(min(j * tile, nk) - 1))) --j;
    return j;
  }
  // Key rows starting at position klo lie after all that queries ending at position qhi
  // (in a document ending before qb) may see: the suffix of the key tiles above.
  MASK_FN bool keys_after(int qhi, int qb, int klo) const { return klo > qhi + right || (DOCS && klo >= qb); }
  // j_hi of the deterministic dQ order: how many key tiles do not lie wholly after query
  // row i1 − 1 (binary search on keys_after, a suffix). (An O(1) form from the segments,
  // row_end's divisions, made the mma.sync document kernels spill: tenth session.)
  MASK_FN int key_tiles_through(const Segs& qs, int i1, const Segs& ks, int nk, int tile) const {
    const int qp1 = qs.pos(i1 - 1), qb = DOCS ? cu[doc_of(qp1) + 1] : 0;
    int lo = 0, hi = (nk + tile - 1) / tile;
    while (lo < hi) {
      const int mid = (lo + hi) / 2;
      if (keys_after(qp1, qb, ks.pos(mid * tile)))
        hi = mid;
      else
        lo = mid + 1;
    }
    return lo;
  }
  // key_tiles_through stepped up from j, the answer for an earlier query tile (j_hi does not
  // decrease as i1 increases): the ascending sweep with documents.
  MASK_FN int key_tiles_through_from(const Segs& qs, int i1, const Segs& ks, int nk, int tile, int j) const {
    const int qp1 = qs.pos(i1 - 1), qb = DOCS ? cu[doc_of(qp1) + 1] : 0, nt = (nk + tile - 1) / tile;
    while (j < nt && !keys_after(qp1, qb, ks.pos(j * tile))) ++j;
    return j;
  }
};
