// Host check of mpiring/kernels/mask.cuh (the kernels' tile skipping) against brute force.
//
//   g++ -std=c++17 -O2 -I mpiring/kernels tests/mask_harness.cpp -o mask_harness
//   ./mask_harness CASES SEED        -> "ok ..." (exit 0) or the first failure (exit 1)
//
// Each case draws a layout (contiguous, striped, zigzag, or two random increasing
// segments), block lengths, a window, tile sizes and, half of the time, packed documents
// (cu_seqlens with empty and length-1 documents). For every (query tile, key tile) it
// compares MaskInfo::classify with the pairs that brute force allows, checks that the
// Sweep of each side (keys_window / queries_window) holds every tile with work, and that
// the deterministic dQ order (j − j_lo from keys_before; j_hi − 1 − j from keys_after, the
// decreasing order with documents) counts the key tiles with work before (after) each one
// exactly, and that every key tile it counts sweeps over that query tile.
// Also the backward's ticket order (ticket_item): every (row, key-tile slot) gets exactly
// one ticket, and key tile j − 1 of a row an earlier one than key tile j.
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "mask.cuh"

namespace {

const int kNoBound = 1 << 30;

struct Side {
  Segs segs;
  int n;
  std::vector<int> pos, doc;
};

std::mt19937 rng;
int uniform(int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); }

// Segments of rank r of `size` with n local rows, as mpiring.layout.segments builds them,
// or two random increasing segments.
Segs make_segs(int kind, int r, int size, int n) {
  if (kind == 0) return {r * n, 1, n, 0, 0};     // contiguous
  if (kind == 1) return {r, size, n, 0, 0};       // striped
  if (kind == 2) {                                // zigzag: chunks r and 2·size − 1 − r
    const int c = n / 2;
    return {r * c, 1, c, (2 * size - 1 - r) * c, 1};
  }
  const int len0 = uniform(1, n - 1), start0 = uniform(0, 40), stride0 = uniform(1, 3);
  const int start1 = start0 + stride0 * (len0 - 1) + uniform(1, 60);
  return {start0, stride0, len0, start1, uniform(1, 3)};
}

Side make_side(const Segs& segs, int n, const std::vector<int>& cu) {
  Side s{segs, n, {}, {}};
  for (int i = 0; i < n; ++i) {
    const int p = segs.pos(i);
    s.pos.push_back(p);
    int d = 0;  // the document holding p: the last boundary ≤ p
    while (d + 1 < (int)cu.size() - 1 && cu[d + 1] <= p) ++d;
    s.doc.push_back(d);
  }
  return s;
}

int fails = 0;
void fail(const char* what, int seed_case, int tq, int tk) {
  if (fails++ < 10) std::printf("FAIL case %d: %s (query tile %d, key tile %d)\n", seed_case, what, tq, tk);
}

template <bool DOCS>
long long run_case(int id, const Side& q, const Side& k, int left, int right, int BM, int BN,
                   const std::vector<int>& cu) {
  const MaskInfo<DOCS> mask = {left, right, cu.data(), (int)cu.size()};
  const int nqt = (q.n + BM - 1) / BM, nkt = (k.n + BN - 1) / BN;
  std::vector<char> any(nqt * nkt, 0), all(nqt * nkt, 1);
  std::vector<DocSpan> qspan, kspan;  // each tile's document span, as the kernels take it
  for (int t = 0; t < nqt; ++t) qspan.push_back(mask.span(q.segs, t * BM, std::min(t * BM + BM, q.n)));
  for (int t = 0; t < nkt; ++t) kspan.push_back(mask.span(k.segs, t * BN, std::min(t * BN + BN, k.n)));
  if (DOCS) {  // each row's document from its position (binary search) against the brute-force one
    for (int i = 0; i < q.n; ++i)
      if (mask.doc_of(q.pos[i]) != q.doc[i]) fail("doc_of differs from brute force (query row)", id, i / BM, -1);
    for (int j = 0; j < k.n; ++j)
      if (mask.doc_of(k.pos[j]) != k.doc[j]) fail("doc_of differs from brute force (key row)", id, -1, j / BN);
  }
  for (int i = 0; i < q.n; ++i)
    for (int j = 0; j < k.n; ++j) {
      const long long d = (long long)q.pos[i] - k.pos[j];
      const bool ok = d <= left && -d <= right && (!DOCS || q.doc[i] == k.doc[j]);
      any[i / BM * nkt + j / BN] |= ok;
      all[i / BM * nkt + j / BN] &= ok;
      // The element masks of mixed tiles, one interval per row: the forward's (the key
      // positions of the row's window within its document: its query tile's span, or the
      // row's own where the tile spans documents) and the backward's (the query positions
      // of the key's window within its document, by the key tile's span or the key's own).
      const DocSpan fs = qspan[i / BM].one ? qspan[i / BM] : mask.row_span(q.segs, i);
      const DocSpan bs = kspan[j / BN].one ? kspan[j / BN] : mask.row_span(k.segs, j);
      int lo, hi;
      mask.keys_window(q.pos[i], q.pos[i], fs, lo, hi);
      if ((lo <= k.pos[j] && k.pos[j] <= hi) != ok) fail("forward element mask differs from brute force", id, i / BM, j / BN);
      mask.queries_window(k.pos[j], k.pos[j], bs, lo, hi);
      if ((lo <= q.pos[i] && q.pos[i] <= hi) != ok)
        fail("backward element mask differs from brute force", id, i / BM, j / BN);
    }
  // The class of a tile pair as each kernel computes it: the forward from its query
  // tile's document span and the key tile's positions, the backward from its key tile's
  // span and the query tile's positions.
  auto cls = [&](int tq, int tk, bool backward) {
    const int i0 = tq * BM, i1 = std::min(i0 + BM, q.n), j0 = tk * BN, j1 = std::min(j0 + BN, k.n);
    int qlo, qhi, klo, khi;
    q.segs.range(i0, i1, qlo, qhi);
    k.segs.range(j0, j1, klo, khi);
    return backward ? mask.classify(qlo, qhi, klo, khi, mask.span(k.segs, j0, j1), qlo, qhi)
                    : mask.classify(qlo, qhi, klo, khi, mask.span(q.segs, i0, i1), klo, khi);
  };
  // The sweep of tile t of one side over the other side's tiles, as the kernel whose
  // blocks hold that side computes it: the forward (query tiles: keys_window), the
  // backward (key tiles: queries_window).
  auto sweep_of = [&](const Side& own, int t, int tile, const Side& other, int other_tile, bool queries) {
    const int i0 = t * tile, i1 = std::min(i0 + tile, own.n);
    int lo, hi, wlo, whi;
    own.segs.range(i0, i1, lo, hi);
    const DocSpan span = mask.span(own.segs, i0, i1);
    if (queries)
      mask.keys_window(lo, hi, span, wlo, whi);
    else
      mask.queries_window(lo, hi, span, wlo, whi);
    return Sweep{other.segs, other.n, other_tile, wlo, whi};
  };
  long long pairs = 0;
  // The backward steps j_lo down from the next query tile's (its descending sweep):
  // key_tiles_before_from must land on the search's answer.
  for (int tq = nqt - 2; tq >= 0; --tq) {
    const int next = mask.key_tiles_before(q.segs, (tq + 1) * BM, k.segs, k.n, BN);
    if (mask.key_tiles_before_from(q.segs, tq * BM, k.segs, k.n, BN, next) !=
        mask.key_tiles_before(q.segs, tq * BM, k.segs, k.n, BN))
      fail("deterministic order: j_lo stepped down from the next tile's is not j_lo", id, tq, next);
  }
  // With documents the backward steps j_hi up from the previous query tile's (ascending sweep).
  for (int tq = 1; tq < nqt; ++tq) {
    const int prev = mask.key_tiles_through(q.segs, std::min(tq * BM, q.n), k.segs, k.n, BN);
    const int i1 = std::min(tq * BM + BM, q.n);
    if (mask.key_tiles_through_from(q.segs, i1, k.segs, k.n, BN, prev) !=
        mask.key_tiles_through(q.segs, i1, k.segs, k.n, BN))
      fail("decreasing order: j_hi stepped up from the previous tile's is not j_hi", id, tq, prev);
  }
  for (int tq = 0; tq < nqt; ++tq) {
    const Sweep sweep = sweep_of(q, tq, BM, k, BN, true);
    const int lo = mask.key_tiles_before(q.segs, tq * BM, k.segs, k.n, BN);  // j_lo, as the backward kernel takes it
    // j_hi of the decreasing order (documents): key tile j waits for j_hi − 1 − j adds
    const int hi = mask.key_tiles_through(q.segs, std::min(tq * BM + BM, q.n), k.segs, k.n, BN);
    int with_work = 0;
    for (int tk = 0; tk < nkt; ++tk, ++pairs) {
      const int c = cls(tq, tk, false);
      if (c != cls(tq, tk, true)) fail("forward and backward classes differ", id, tq, tk);
      const bool a = any[tq * nkt + tk], f = all[tq * nkt + tk];
      if (c == 0 && a) fail("classify 0 but a pair is allowed", id, tq, tk);
      if (c == 1 && !f) fail("classify 1 but a pair is masked", id, tq, tk);
      if (a && (tk < sweep.first() || tk >= sweep.end())) fail("forward sweep misses a key tile", id, tq, tk);
      if (c != 0) {
        if (tk - lo != with_work) fail("deterministic order: j - j_lo is not the count before", id, tq, tk);
        ++with_work;
      }
    }
    // With the check above (the tiles with work are j_lo, j_lo + 1, …), this makes
    // j_hi − 1 − j the count of tiles with work after j, for each of them.
    if (hi - lo != with_work) fail("decreasing order: j_hi - j_lo is not the count", id, tq, hi);
  }
  for (int tk = 0; tk < nkt; ++tk) {
    const Sweep sweep = sweep_of(k, tk, BN, q, BM, false);
    for (int tq = 0; tq < nqt; ++tq) {
      const bool out = tq < sweep.first() || tq >= sweep.end();
      if (any[tq * nkt + tk] && out) fail("backward sweep misses a query tile", id, tq, tk);
      // The deterministic dQ order counts every key tile that classify() gives work for
      // this query tile; one that its sweep passes over never raises the counter, and the
      // next one waits forever (a GPU hang, not a wrong answer).
      if (cls(tq, tk, true) != 0 && out) fail("backward sweep skips a query tile the dQ order counts", id, tq, tk);
    }
  }
  return pairs;
}

// ticket_item over `rows` × `slots` in groups of `group`: a bijection from the tickets, with
// each row's slots in ticket order (a block waits only for earlier tickets).
void check_tickets(int id, int rows, int slots, int group) {
  std::vector<int> ticket_of(rows * slots, -1);
  for (int t = 0; t < rows * slots; ++t) {
    int row, slot;
    ticket_item(t, rows, slots, group, row, slot);
    if (row < 0 || row >= rows || slot < 0 || slot >= slots) {
      fail("ticket maps outside the grid", id, row, slot);
      return;
    }
    if (ticket_of[row * slots + slot] >= 0) fail("ticket: two tickets for one work item", id, row, slot);
    ticket_of[row * slots + slot] = t;
  }
  for (int row = 0; row < rows; ++row)
    for (int slot = 1; slot < slots; ++slot)
      if (ticket_of[row * slots + slot] < ticket_of[row * slots + slot - 1])
        fail("ticket order: key tile j before key tile j - 1", id, row, slot);
}

}  // namespace

int main(int argc, char** argv) {
  const int cases = argc > 1 ? std::atoi(argv[1]) : 2000;
  rng.seed(argc > 2 ? std::atoi(argv[2]) : 0);
  const int tiles[] = {16, 32, 64, 128};
  long long pairs = 0;
  for (int id = 0; id < cases; ++id) {
    const int kind = uniform(0, 3), size = uniform(1, 5);
    int n = uniform(kind >= 2 ? 2 : 1, 300);
    if (kind == 2) n += n % 2;
    const Segs qs = make_segs(kind, uniform(0, size - 1), size, n);
    const Segs ks = make_segs(kind, uniform(0, size - 1), size, n);
    const int total = std::max(qs.pos(n - 1), ks.pos(n - 1)) + 1;
    std::vector<int> cu = {0};  // documents: lengths 0, 1 and random, up to `total`
    while (cu.back() < total) {
      const int r = uniform(0, 9);
      cu.push_back(std::min(total, cu.back() + (r == 0 ? 0 : r == 1 ? 1 : uniform(1, total / 3 + 1))));
    }
    const int left = uniform(0, 2) ? kNoBound : uniform(0, 120);
    const int right = uniform(0, 2) == 0 ? kNoBound : uniform(0, 1) ? 0 : uniform(0, 60);
    const int BM = tiles[uniform(0, 3)], BN = tiles[uniform(0, 3)];
    const Side q = make_side(qs, n, cu), k = make_side(ks, n, cu);
    pairs += uniform(0, 1) ? run_case<true>(id, q, k, left, right, BM, BN, cu)
                           : run_case<false>(id, q, k, left, right, BM, BN, cu);
    const int groups[] = {1, 4, 16, 1 << 30};
    check_tickets(id, uniform(1, 40), uniform(1, 20), groups[uniform(0, 3)]);
  }
  if (fails) {
    std::printf("%d failures in %d cases\n", fails, cases);
    return 1;
  }
  std::printf("ok %d cases, %lld tile pairs\n", cases, pairs);
  return 0;
}
