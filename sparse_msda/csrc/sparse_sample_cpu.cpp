// Fused CPU kernels of the sparse bilinear / trilinear weighted gather (sparse_msda.functional.sampling).
//
// out[s] = sum_j a[s, j] * sum_k c_k(frac[s, j]) * table[row(s, j, k)]
//
// Positions are in level cells, axis order (y, x) / (z, y, x); base cell floor(p - 0.5), fractional
// part p - 0.5 - base (exactly grid_sample(align_corners=False)). The corner rows come from the
// coordinate index's corner table (ids[s, j] -> corner_rows[id, k], -1 where absent); this file does
// no coordinate lookup of its own. Row of a present corner: r * n_heads + head. An absent corner inside
// its level holds background row bg_offset + (b * n_levels + l) * n_heads + head when bg_offset >= 0,
// else nothing; a corner outside its level holds nothing.
//
// batch / level / head are int64 [S, J] tensors read through their strides (broadcast views welcome);
// the caller (sparse_weighted_gather) has checked them against the batch size, level and head counts.
//
// Deformable mode (the attention module's sampling, sparse_msda.functional.deformable_fused): the
// positions are not given but formed from the raw sampling offsets and the queries' reference points,
// loc[s, j, d] = fma(ref[s / ref_group, d], shape[level(s, j), d], offsets[s, j, d]) (ref_group: the
// heads, one reference point per query), and the weights are given as logits, one softmax per row s
// (over j) taken inside the kernels; the backward then returns the logits' gradient. The same loc
// formula feeds sample_base_cells (the base cells hashed before the kernel runs), so both agree exactly.
//
// Non-finite positions follow F.grid_sample: a sample with a NaN or infinite coordinate contributes
// NaN to its output row, touches no table row (no table gradient), and gets NaN position and weight
// gradients. Base cells are clamped to [-2, 2**40] before the integer conversion (outside every level).
#include <torch/extension.h>

// 32-byte vectors on AVX-512 targets too (simd.h): the sampling loops are gather/memory-bound
#define SPARSE_MSDA_SIMD_256
#include "simd.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <thread>
#include <type_traits>
#include <vector>

namespace {


struct Layout {
  const int64_t* batch; int64_t bs0, bs1;
  const int64_t* level; int64_t ls0, ls1;
  const int64_t* head; int64_t hs0, hs1;
  const int64_t* shapes;  // [L, D]
  int64_t n_heads, n_levels, bg_offset;
  int dim;
};

Layout make_layout(const at::Tensor& batch, const at::Tensor& level, const at::Tensor& head, const at::Tensor& shapes,
                   int64_t n_heads, int64_t n_levels, int64_t bg_offset) {
  return Layout{batch.data_ptr<int64_t>(), batch.stride(0), batch.stride(1),
                level.data_ptr<int64_t>(), level.stride(0), level.stride(1),
                head.data_ptr<int64_t>(), head.stride(0), head.stride(1),
                shapes.data_ptr<int64_t>(), n_heads, n_levels, bg_offset, static_cast<int>(shapes.size(1))};
}

// Split [0, n) over up to n_threads std::threads (no OpenMP: the extension must not bring its own runtime).
template <typename F>
void parallel_range(int64_t n, int n_threads, const F& f) {
  int parts = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(n_threads, n / 256)));
  if (parts <= 1) {
    f(0, n, 0);
    return;
  }
  std::vector<std::thread> threads;
  int64_t step = (n + parts - 1) / parts;
  for (int p = 1; p < parts; ++p) {
    int64_t b = p * step, e = std::min(n, b + step);
    if (b < e) threads.emplace_back([&f, b, e, p] { f(b, e, p); });
  }
  f(0, std::min(n, step), 0);
  for (auto& t : threads) t.join();
}

// sum_e a[e] * b[e] over a row of DH (> 0: known at compile time) or dh entries. With DH a multiple
// of the vector width: lane-wise products in one register, then a tree sum of the lanes (GCC keeps
// a plain loop's floating-point sum in order, i.e. scalar and latency-bound).
template <typename scalar_t, int DH>
inline scalar_t dot_row(const scalar_t* a, const scalar_t* b, int64_t dh) {
  using V = sparse_msda_simd::Vec<scalar_t>;
  if constexpr (DH > 0 && DH % V::N == 0) {
    typename V::type acc = V::load(a) * V::load(b);
    for (int e = V::N; e < DH; e += V::N) acc += V::load(a + e) * V::load(b + e);
    alignas(64) scalar_t lanes[V::N];
    V::store(lanes, acc);
    for (int w = V::N / 2; w >= 1; w /= 2)
      for (int i = 0; i < w; ++i) lanes[i] += lanes[i + w];
    return lanes[0];
  } else {
    scalar_t acc = 0;
    for (int64_t e = 0; e < (DH > 0 ? DH : dh); ++e) acc += a[e] * b[e];
    return acc;
  }
}

// exp(x) lane-wise for x <= 0 (a softmax row's logits minus their maximum), float: x = n ln2 + r
// with n = round(x / ln2), |r| <= ln2 / 2 (ln2 in two parts, so r is exact to ~1e-10), then e^r by
// its Taylor polynomial of degree 7 (truncation < 6e-9 relative, below float rounding) times 2^n
// from the exponent bits. Within 2 ulp of std::exp for x in [-87, 0] (tests/test_cpu_kernels.py
// compares it with the float64 softmax); 0 for x < -87 (std::exp: below 1.7e-38, denormal or
// 0), -inf -> 0, NaN -> NaN. x > 0 is outside its domain (the caller subtracts the row's maximum).
inline sparse_msda_simd::Vec<float>::type exp_nonpositive(sparse_msda_simd::Vec<float>::type x) {
  using V = sparse_msda_simd::Vec<float>;
  typedef int32_t vi __attribute__((vector_size(sparse_msda_simd::kVecBytes)));
  const V::type lo = V::broadcast(-87.0f);
  const V::type xc = x < lo ? lo : x;  // NaN stays NaN here, selected back below
  // x / ln2 rounded to an integer by adding 1.5 * 2^23: n sits in the low bits of t's mantissa
  const V::type shifter = V::broadcast(12582912.0f);
  const V::type t = xc * V::broadcast(1.44269504088896341f) + shifter;
  const V::type n = t - shifter;
  V::type r = xc - n * V::broadcast(0.693145751953125f);  // ln2's 16 leading bits: n * hi exact
  r = r - n * V::broadcast(1.42860682030941723212e-6f);  // ln2 - hi
  V::type p = V::broadcast(1.0f / 5040.0f);
  p = p * r + V::broadcast(1.0f / 720.0f);
  p = p * r + V::broadcast(1.0f / 120.0f);
  p = p * r + V::broadcast(1.0f / 24.0f);
  p = p * r + V::broadcast(1.0f / 6.0f);
  p = p * r + V::broadcast(0.5f);
  p = p * r + V::broadcast(1.0f);
  p = p * r + V::broadcast(1.0f);
  // 2^n: (n + 127) << 23 as float bits; n = bits(t) - bits(shifter) in [-126, 0]
  const vi two_n = (((vi)t - 0x4B400000) + 127) << 23;
  const V::type e = p * (V::type)two_n;
  const V::type zero = V::broadcast(0.0f);
  const V::type below = x < lo ? zero : e;  // -inf and x < -87: 0
  return x != x ? x : below;                  // NaN: NaN
}

// softmax of the float row x[0, n) into a[0, n), as the scalar loop (and torch.softmax) on
// non-finite input: NaN logits are skipped by the maximum (as std::max), so a row with a NaN, a
// +inf, or only -inf logits comes out NaN. Vectors of V::N entries, the last padded with -inf;
// sums in a fixed order (deterministic).
inline void softmax_row(const float* x, int64_t n, float* a) {
  using V = sparse_msda_simd::Vec<float>;
  constexpr int64_t N = V::N;
  const int64_t full = n / N * N;
  const bool part = n > full;
  alignas(64) float tail[N];
  if (part)
    for (int64_t i = 0; i < N; ++i) tail[i] = i < n - full ? x[full + i] : -std::numeric_limits<float>::infinity();
  V::type m = V::broadcast(-std::numeric_limits<float>::infinity());
  for (int64_t j = 0; j <= full; j += N) {
    if (j == full && !part) break;
    const V::type v = V::load(j < full ? x + j : tail);
    m = m < v ? v : m;  // std::max(m, v) lane-wise: a NaN v leaves m
  }
  alignas(64) float lanes[N];
  V::store(lanes, m);
  float mx = lanes[0];
  for (int64_t i = 1; i < N; ++i) mx = std::max(mx, lanes[i]);
  const V::type vm = V::broadcast(mx);
  V::type sum = V::broadcast(0.0f);
  for (int64_t j = 0; j <= full; j += N) {
    if (j == full && !part) break;
    const V::type e = exp_nonpositive(V::load(j < full ? x + j : tail) - vm);
    V::store(j < full ? a + j : tail, e);
    sum += e;
  }
  V::store(lanes, sum);
  for (int64_t w = N / 2; w >= 1; w /= 2)
    for (int64_t i = 0; i < w; ++i) lanes[i] += lanes[i + w];
  const V::type inv = V::broadcast(1.0f / lanes[0]);
  for (int64_t j = 0; j < full; j += N) V::store(a + j, V::load(a + j) * inv);
  for (int64_t i = 0; i < n - full; ++i) a[full + i] = tail[i] * inv[0];
}

// softmax of the row x[0, n) into a[0, n): float by softmax_row (vectorised), double one std::exp
// at a time.
template <typename scalar_t>
inline void softmax_weights(const scalar_t* x, int64_t n, scalar_t* a) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    softmax_row(x, n, a);
  } else {
    scalar_t m = -std::numeric_limits<scalar_t>::infinity();
    for (int64_t j = 0; j < n; ++j) m = std::max(m, x[j]);
    scalar_t sum = 0;
    for (int64_t j = 0; j < n; ++j) {
      a[j] = std::exp(x[j] - m);
      sum += a[j];
    }
    const scalar_t inv = scalar_t(1) / sum;
    for (int64_t j = 0; j < n; ++j) a[j] *= inv;
  }
}

// Base cell floor(p - 0.5) clamped to [-2, 2**40] (NaN: -2), as functional.sampling._base_cells.
template <typename scalar_t>
inline int64_t base_cell(scalar_t b) {
  return static_cast<int64_t>(std::isnan(b) ? scalar_t(-2) : std::min(std::max(b, scalar_t(-2)), scalar_t(1LL << 40)));
}

// The present corners of the sample at pos (row s, sample j) appended to rows / w / corner from n
// on, in corner order k = 0 .. 2**D - 1 (bit D - 1 - d of k: the upper neighbour along axis d);
// returns the new count. rows: table row; w: the corner's weight c_k = prod_d (frac_d or 1 - frac_d);
// frac [DIM]: the per-axis fractions. finite: whether the position is finite (if not: no corner,
// frac 0). Branch-free for the absent voxel corners when there are no background rows (each
// corner written, the count advanced only for a present one): a sample's corners are present at
// random (a quarter of them in the 3D encoder), so branching on them was mispredicted ~1 in 4.
template <typename scalar_t, int DIM>
inline int64_t append_corners(const Layout& L, const scalar_t* pos, const int32_t* crow, int64_t s, int64_t j,
                              int64_t* rows, scalar_t* w, uint8_t* corner, int64_t n, scalar_t* frac, bool& finite) {
  constexpr int K = 1 << DIM;
  int64_t base[DIM];
  scalar_t lo[DIM];
  finite = true;
#pragma GCC unroll 3
  for (int d = 0; d < DIM; ++d) {
    scalar_t shifted = pos[d] - scalar_t(0.5);
    scalar_t b = std::floor(shifted);
    finite = finite && std::isfinite(pos[d]);
    base[d] = base_cell(b);
    frac[d] = shifted - b;
    lo[d] = scalar_t(1) - frac[d];
  }
  if (!finite) {
    for (int d = 0; d < DIM; ++d) frac[d] = 0;
    return n;
  }
  const int64_t h = L.head[s * L.hs0 + j * L.hs1];
  if (L.bg_offset < 0) {
#pragma GCC unroll 8
    for (int k = 0; k < K; ++k) {
      scalar_t wk = 1;
#pragma GCC unroll 3
      for (int d = 0; d < DIM; ++d) wk *= ((k >> (DIM - 1 - d)) & 1) ? frac[d] : lo[d];
      const int32_t r = crow[k];
      rows[n] = static_cast<int64_t>(r) * L.n_heads + h;
      w[n] = wk;
      corner[n] = static_cast<uint8_t>(k);
      n += r >= 0;
    }
    return n;
  }
  const int64_t l = L.level[s * L.ls0 + j * L.ls1];
  for (int k = 0; k < K; ++k) {
    scalar_t wk = 1;
    for (int d = 0; d < DIM; ++d) wk *= ((k >> (DIM - 1 - d)) & 1) ? frac[d] : lo[d];
    const int32_t r = crow[k];
    int64_t row = -1;
    if (r >= 0) {
      row = static_cast<int64_t>(r) * L.n_heads + h;
    } else if (l >= 0 && l < L.n_levels) {  // a background row where the corner is inside its level
      bool inside = true;
      for (int d = 0; d < DIM; ++d) {
        const int64_t c = base[d] + ((k >> (DIM - 1 - d)) & 1);
        inside = inside && c >= 0 && c < L.shapes[l * DIM + d];
      }
      if (inside) row = L.bg_offset + (L.batch[s * L.bs0 + j * L.bs1] * L.n_levels + l) * L.n_heads + h;
    }
    if (row < 0) continue;
    rows[n] = row;
    w[n] = wk;
    corner[n] = static_cast<uint8_t>(k);
    ++n;
  }
  return n;
}

// Deformable mode: the sample's location from its offset and its query's reference point (see the top).
// shape: the level's [DIM] shape in scalar_t (Layout::shapes converted once per call).
template <typename scalar_t, int DIM>
inline void location(const scalar_t* off, const scalar_t* ref, const scalar_t* shape, scalar_t* loc) {
  for (int d = 0; d < DIM; ++d) loc[d] = std::fma(ref[d], shape[d], off[d]);
}

// Layout::shapes [L, DIM] as scalar_t.
template <typename scalar_t>
std::vector<scalar_t> float_shapes(const Layout& L) {
  std::vector<scalar_t> out(L.n_levels * L.dim);
  for (size_t i = 0; i < out.size(); ++i) out[i] = static_cast<scalar_t>(L.shapes[i]);
  return out;
}

// The per-sample inputs of both passes: positions [S, J, D] (or offsets and reference points),
// attention weights (or logits) [S, J], base-cell ids [S, J] and the corner table, read through the layout.
template <typename scalar_t, int DIM>
struct SampleInputs {
  const Layout& L;
  const scalar_t* pos;
  const scalar_t* ref;  // deformable mode: [S / ref_group, D] reference points (pos holds offsets); else null
  int64_t ref_group;
  const scalar_t* att;
  const int32_t* id;
  const int32_t* cr;
  int64_t S, J;
  bool logits;  // att holds logits: one softmax per row s
  std::vector<scalar_t> shape_f;  // deformable mode: the level shapes as scalar_t

  SampleInputs(const at::Tensor& positions, const at::Tensor& weights, const at::Tensor& ids,
               const at::Tensor& corner_rows, const Layout& layout, const at::Tensor& ref_points, int64_t group,
               bool att_logits)
      : L(layout), pos(positions.data_ptr<scalar_t>()),
        ref(ref_points.defined() && ref_points.numel() ? ref_points.data_ptr<scalar_t>() : nullptr),
        ref_group(std::max<int64_t>(1, group)), att(weights.data_ptr<scalar_t>()),
        id(ids.data_ptr<int32_t>()), cr(corner_rows.data_ptr<int32_t>()), S(positions.size(0)),
        J(positions.size(1)), logits(att_logits), shape_f(float_shapes<scalar_t>(layout)) {}

  // Deformable mode: the reference point of row s (null otherwise); pass it to append().
  const scalar_t* ref_row(int64_t s) const { return ref != nullptr ? ref + (s / ref_group) * DIM : nullptr; }

  // The present corners of (s, j) appended at n (see append_corners()); returns the new count.
  // rp: ref_row(s).
  int64_t append(int64_t s, int64_t j, const scalar_t* rp, int64_t* rows, scalar_t* w, uint8_t* corner, int64_t n,
                 scalar_t* frac, bool& finite) const {
    const int64_t sj = s * J + j;
    const int32_t* crow = cr + static_cast<int64_t>(id[sj]) * (1 << DIM);
    if (rp != nullptr) {
      scalar_t loc[DIM];
      location<scalar_t, DIM>(pos + sj * DIM, rp, shape_f.data() + L.level[s * L.ls0 + j * L.ls1] * DIM, loc);
      return append_corners<scalar_t, DIM>(L, loc, crow, s, j, rows, w, corner, n, frac, finite);
    }
    return append_corners<scalar_t, DIM>(L, pos + sj * DIM, crow, s, j, rows, w, corner, n, frac, finite);
  }

  // Prefetch the corner-table rows of row s's samples (cr[id[s, j]]: random reads, the ids sequential).
  void prefetch_corner_rows(int64_t s) const {
    for (int64_t j = 0; j < J; ++j) __builtin_prefetch(cr + static_cast<int64_t>(id[s * J + j]) * (1 << DIM), 0, 3);
  }

  // The attention weights of row s into a[0, J): as given, or the softmax of the row's logits.
  void weights(int64_t s, scalar_t* a) const {
    const scalar_t* x = att + s * J;
    if (logits)
      softmax_weights(x, J, a);
    else
      std::copy(x, x + J, a);
  }
};

// Prefetch the cache lines of one table row (bytes [p, p + bytes)): RW 0 for reading, 1 for a
// read-modify-write (the table gradient).
template <int RW>
inline void prefetch_lines(const void* p, int64_t bytes) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  for (uintptr_t l = a & ~uintptr_t(63); l < a + bytes; l += 64) __builtin_prefetch(reinterpret_cast<const void*>(l), RW, 3);
}

// The present corners of the J samples of one row s, in (j, k) order: sample j's are
// [start[j], start[j + 1]) of rows (table row), w (corner weight) and corner (k); frac [J, DIM] and
// finite [J] (see append_corners()); all_finite: every sample finite. fill() prefetches each
// present corner's table row (and, for the backward, its table-gradient row) as soon as its index
// is known; the kernels fill a row's corners some rows before they use them (pipelined_rows).
template <typename scalar_t, int DIM>
struct RowCorners {
  static constexpr int K = 1 << DIM;
  std::vector<int64_t> rows;
  std::vector<scalar_t> w, frac;
  std::vector<uint8_t> corner;
  std::vector<int64_t> start;
  std::vector<char> finite;
  bool all_finite = true;
  explicit RowCorners(int64_t J) : rows(J * K), w(J * K), frac(J * DIM), corner(J * K), start(J + 1), finite(J) {}

  // Row s's samples with keep(j) (the others: no corner); prefetches the present corners' rows of
  // tab (when not null) and of gt (when not null).
  template <typename Keep>
  void fill(const SampleInputs<scalar_t, DIM>& in, int64_t s, const scalar_t* tab, const scalar_t* gt,
            int64_t dh, const Keep& keep) {
    const scalar_t* rp = in.ref_row(s);
    const int64_t row_bytes = dh * static_cast<int64_t>(sizeof(scalar_t));
    int64_t n = 0;
    all_finite = true;
    for (int64_t j = 0; j < in.J; ++j) {
      start[j] = n;
      if (!keep(j)) {
        finite[j] = 1;
        continue;
      }
      bool fin;
      const int64_t n0 = n;
      n = in.append(s, j, rp, rows.data(), w.data(), corner.data(), n, frac.data() + j * DIM, fin);
      finite[j] = fin;
      all_finite = all_finite && fin;
      for (int64_t i = n0; i < n; ++i) {
        if (tab != nullptr) prefetch_lines<0>(tab + rows[i] * dh, row_bytes);
        if (gt != nullptr) prefetch_lines<1>(gt + rows[i] * dh, row_bytes);
      }
    }
    start[in.J] = n;
  }
};

// Software pipeline over the rows row(0), ..., row(n - 1) in that order: body(s, c) with c row s's corners
// (its (s, j) with keep(s, j); the others hold nothing), filled (its table rows, and gt's when gt is
// not null, prefetched) kRowsAhead rows before, and its samples' corner-table rows prefetched
// kIdsAhead rows before. The 3D encoder's kernels are bound by the latency of these random reads
// (its value table and table gradient, 121 MB each, exceed the L3 cache): a row's reads are in
// flight while the rows before it are computed instead of after.
#ifndef SPARSE_MSDA_ROWS_AHEAD
#define SPARSE_MSDA_ROWS_AHEAD 1
#endif
#ifndef SPARSE_MSDA_IDS_AHEAD
#define SPARSE_MSDA_IDS_AHEAD 2
#endif
constexpr int kRowsAhead = SPARSE_MSDA_ROWS_AHEAD;
constexpr int kIdsAhead = SPARSE_MSDA_IDS_AHEAD;
static_assert(kRowsAhead >= 0 && kIdsAhead >= kRowsAhead, "corner-table rows are needed before the table rows");

template <typename scalar_t, int DIM, typename Row, typename Keep, typename Body>
void pipelined_rows(const SampleInputs<scalar_t, DIM>& in, const Row& row, int64_t n, const Keep& keep,
                    const scalar_t* tab, const scalar_t* gt, int64_t dh, const Body& body) {
  constexpr int R = kRowsAhead + 1;
  std::vector<RowCorners<scalar_t, DIM>> ring(R, RowCorners<scalar_t, DIM>(in.J));
  const auto fill = [&](int64_t i) {
    const int64_t s = row(i);
    ring[i % R].fill(in, s, tab, gt, dh, [&](int64_t j) { return keep(s, j); });
  };
  for (int64_t i = 0; i < std::min<int64_t>(n, kIdsAhead); ++i) in.prefetch_corner_rows(row(i));
  for (int64_t i = 0; i < std::min<int64_t>(n, kRowsAhead); ++i) fill(i);
  for (int64_t i = 0; i < n; ++i) {
    if (kIdsAhead > 0 && i + kIdsAhead < n) in.prefetch_corner_rows(row(i + kIdsAhead));
    if (i + kRowsAhead < n && kRowsAhead > 0) fill(i + kRowsAhead);
    if (kRowsAhead == 0) fill(i);
    body(row(i), ring[i % R]);
  }
}

// DH > 0: the head dim at compile time (fully unrolled, vectorised row loops); DH == 0: dh at run time.
template <typename scalar_t, int DIM, int DH>
void forward_impl(const at::Tensor& table, const at::Tensor& positions, const at::Tensor& weights,
                  const at::Tensor& ids, const at::Tensor& corner_rows, const Layout& L, at::Tensor& out,
                  int n_threads, const at::Tensor& ref, int64_t ref_group, bool logits) {
  constexpr int K = 1 << DIM;
  const SampleInputs<scalar_t, DIM> in(positions, weights, ids, corner_rows, L, ref, ref_group, logits);
  const int64_t S = in.S, J = in.J;
  const int64_t dh = DH > 0 ? DH : table.size(1);
  const scalar_t* tab = table.data_ptr<scalar_t>();
  scalar_t* o = out.data_ptr<scalar_t>();
  parallel_range(S, n_threads, [&](int64_t s0, int64_t s1, int) {
    std::vector<scalar_t> a(J);
    // the row's sum in a local array (registers when DH is known), stored once per row
    std::vector<scalar_t> heap(DH > 0 ? 0 : dh);
    alignas(64) scalar_t fixed[DH > 0 ? DH : 1];
    scalar_t* acc = DH > 0 ? fixed : heap.data();
    const auto all = [](int64_t, int64_t) { return true; };
    pipelined_rows(in, [s0](int64_t i) { return s0 + i; }, s1 - s0, all, tab, static_cast<const scalar_t*>(nullptr), dh,
                   [&](int64_t s, const RowCorners<scalar_t, DIM>& c) {
      for (int64_t e = 0; e < (DH > 0 ? DH : dh); ++e) acc[e] = 0;
      in.weights(s, a.data());
      for (int64_t j = 0; j < J; ++j)
        for (int64_t i = c.start[j]; i < c.start[j + 1]; ++i) {
          const scalar_t cw = a[j] * c.w[i];
          const scalar_t* t = tab + c.rows[i] * dh;
          for (int64_t e = 0; e < (DH > 0 ? DH : dh); ++e) acc[e] += cw * t[e];
        }
      if (!c.all_finite)  // F.grid_sample: a non-finite sample makes its row NaN
        for (int64_t e = 0; e < (DH > 0 ? DH : dh); ++e) acc[e] = std::numeric_limits<scalar_t>::quiet_NaN();
      std::copy(acc, acc + dh, o + s * dh);
    });
  });
}

template <typename scalar_t, int DIM, int DH>
void backward_impl(const at::Tensor& table, const at::Tensor& positions, const at::Tensor& weights,
                   const at::Tensor& ids, const at::Tensor& corner_rows, const Layout& L, const at::Tensor& grad_out,
                   at::Tensor& g_table, at::Tensor& g_pos, at::Tensor& g_w, bool need_table, bool need_pos,
                   bool need_w, int n_threads, int64_t max_table_copies, const at::Tensor& ref, int64_t ref_group,
                   bool logits) {
  constexpr int K = 1 << DIM;
  const SampleInputs<scalar_t, DIM> in(positions, weights, ids, corner_rows, L, ref, ref_group, logits);
  const int64_t S = in.S, J = in.J;
  const int64_t dh = DH > 0 ? DH : table.size(1);
  const scalar_t* tab = table.data_ptr<scalar_t>();
  const scalar_t* go = grad_out.data_ptr<scalar_t>();
  scalar_t* gp = need_pos ? g_pos.data_ptr<scalar_t>() : nullptr;
  scalar_t* gw = need_w ? g_w.data_ptr<scalar_t>() : nullptr;
  const bool need_dots = need_pos || need_w;
  // One (s, j) of attention weight a: corners, value/gradient dots, the gradients of a and of the
  // position, and (gt not null) the scatter of a * c_k * grad_out[s] into the table-gradient rows gt.
  // g: the row's output gradient (a local copy: no reload after each table-gradient store)
  auto process = [&](int64_t s, int64_t j, scalar_t a, scalar_t* gt, const scalar_t* g,
                     const RowCorners<scalar_t, DIM>& c) {
    const scalar_t* frac = c.frac.data() + j * DIM;
    const bool finite = c.finite[j];
    scalar_t dots[K] = {};  // 0 where the corner holds nothing
    const int64_t sj = s * J + j;
    scalar_t gwj = finite ? scalar_t(0) : std::numeric_limits<scalar_t>::quiet_NaN();
    for (int64_t i = c.start[j]; i < c.start[j + 1]; ++i) {
      const int64_t r = c.rows[i];
      if (need_dots) {
        const scalar_t acc = dot_row<scalar_t, DH>(tab + r * dh, g, dh);
        dots[c.corner[i]] = acc;
        gwj += c.w[i] * acc;
      }
      if (gt != nullptr) {
        const scalar_t cw = a * c.w[i];
        scalar_t* t = gt + r * dh;
        for (int64_t e = 0; e < (DH > 0 ? DH : dh); ++e) t[e] += cw * g[e];
      }
    }
    if (need_w) gw[sj] = gwj;
    if (need_pos) {
      for (int d = 0; d < DIM; ++d) {
        scalar_t acc = 0;
        for (int k = 0; k < K; ++k) {
          scalar_t dw = ((k >> (DIM - 1 - d)) & 1) ? scalar_t(1) : scalar_t(-1);
          for (int e = 0; e < DIM; ++e)
            if (e != d) dw *= ((k >> (DIM - 1 - e)) & 1) ? frac[e] : scalar_t(1) - frac[e];
          acc += dw * dots[k];  // dots[k] == 0 where the corner holds nothing
        }
        gp[sj * DIM + d] = finite ? a * acc : std::numeric_limits<scalar_t>::quiet_NaN();
      }
    }
  };
  // Row s (its (s, j) whose head passes keep(s, j); c: its corners), then, with logits, the softmax's
  // backward over the row: g_logit[j] = a[j] * (g_a[j] - sum_i a[i] g_a[i]) (logits mode has one head per row).
  auto process_row = [&](int64_t s, scalar_t* gt, scalar_t* a, const RowCorners<scalar_t, DIM>& c, int parts, int t) {
    alignas(64) scalar_t fixed[DH > 0 ? DH : 1];
    std::vector<scalar_t> heap(DH > 0 ? 0 : dh);
    scalar_t* g = DH > 0 ? fixed : heap.data();
    std::copy(go + s * dh, go + (s + 1) * dh, g);
    in.weights(s, a);
    for (int64_t j = 0; j < J; ++j)
      if (parts <= 1 || L.head[s * L.hs0 + j * L.hs1] % parts == t) process(s, j, a[j], gt, g, c);
    if (logits && need_w) {
      scalar_t* row = gw + s * J;
      scalar_t dot = 0;
      for (int64_t j = 0; j < J; ++j) dot += a[j] * row[j];
      for (int64_t j = 0; j < J; ++j) row[j] = a[j] * (row[j] - dot);
    }
  };
  // the rows row(0..n), their (s, j) of the heads h with h % parts == t (all when parts is 1: the
  // rows are chosen by head when there is one per row), pipelined (pipelined_rows): the table rows
  // prefetched when the dots read them, gt's when it is written
  const scalar_t* tab_read = need_dots ? tab : nullptr;
  const auto run_rows = [&](const auto& row, int64_t n, scalar_t* gt, int parts, int t) {
    std::vector<scalar_t> a(J);
    const auto keep = [&](int64_t s, int64_t j) { return parts <= 1 || L.head[s * L.hs0 + j * L.hs1] % parts == t; };
    pipelined_rows(in, row, n, keep, tab_read, static_cast<const scalar_t*>(gt), dh,
                   [&](int64_t s, const RowCorners<scalar_t, DIM>& c) { process_row(s, gt, a.data(), c, parts, t); });
  };
  int parts = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(n_threads, S / 256)));
  scalar_t* g_table_ptr = need_table ? g_table.data_ptr<scalar_t>() : nullptr;
  if (need_table && parts > 1 && L.n_heads >= parts) {
    // Table gradient without copies or atomics: every row written for a sample of head h is
    // r * n_heads + h (voxel or background row), so thread t takes the (s, j) of heads h with
    // h % parts == t and no two threads ever write the same row; each thread goes through its rows
    // in order, so every table-gradient row gets its contributions in sample order.
    std::vector<std::thread> threads;
    auto by_head = [&](int t) {
      if (L.hs1 != 0) {  // several heads per row: every row, its (s, j) filtered by head
        run_rows([](int64_t i) { return i; }, S, g_table_ptr, parts, t);
        return;
      }
      std::vector<int64_t> mine;  // one head per row: the thread's rows (no per-sample head test)
      for (int64_t s = 0; s < S; ++s)
        if (L.head[s * L.hs0] % parts == t) mine.push_back(s);
      run_rows([&mine](int64_t i) { return mine[i]; }, static_cast<int64_t>(mine.size()), g_table_ptr, 1, 0);
    };
    for (int t = 1; t < parts; ++t) threads.emplace_back(by_head, t);
    by_head(0);
    for (auto& th : threads) th.join();
    return;
  }
  // Otherwise: thread 0 writes g_table, thread p > 0 its own zeroed copy, summed at the end (no
  // atomics). At most max_table_copies copies: fewer threads when the table is large.
  if (need_table) parts = static_cast<int>(std::min<int64_t>(parts, max_table_copies + 1));
  std::vector<at::Tensor> partial;
  if (need_table)
    for (int p = 1; p < parts; ++p) partial.push_back(at::zeros_like(g_table));
  parallel_range(S, parts, [&](int64_t s0, int64_t s1, int p) {
    scalar_t* gt = need_table ? (p == 0 ? g_table_ptr : partial[p - 1].data_ptr<scalar_t>()) : nullptr;
    run_rows([s0](int64_t i) { return s0 + i; }, s1 - s0, gt, 1, 0);
  });
  for (auto& t : partial) g_table.add_(t);
}

// Base cells of every sample (deformable mode when ref is given), int64 [S, J, D]: what the
// coordinate index hashes (adapters.SparseCoordinateIndex.base_cell_ids) before the kernels run.
template <typename scalar_t, int DIM>
void base_cells_impl(const at::Tensor& positions, const Layout& L, const at::Tensor& ref, int64_t ref_group,
                     at::Tensor& out, int n_threads) {
  const int64_t S = positions.size(0), J = positions.size(1);
  const scalar_t* pos = positions.data_ptr<scalar_t>();
  const scalar_t* rp = ref.defined() && ref.numel() ? ref.data_ptr<scalar_t>() : nullptr;
  const int64_t group = std::max<int64_t>(1, ref_group);
  const std::vector<scalar_t> shape_f = float_shapes<scalar_t>(L);
  int64_t* o = out.data_ptr<int64_t>();
  parallel_range(S, n_threads, [&](int64_t s0, int64_t s1, int) {
    for (int64_t s = s0; s < s1; ++s)
      for (int64_t j = 0; j < J; ++j) {
        const int64_t sj = s * J + j;
        scalar_t loc[DIM];
        if (rp != nullptr)
          location<scalar_t, DIM>(pos + sj * DIM, rp + (s / group) * DIM, shape_f.data() + L.level[s * L.ls0 + j * L.ls1] * DIM, loc);
        else
          for (int d = 0; d < DIM; ++d) loc[d] = pos[sj * DIM + d];
        for (int d = 0; d < DIM; ++d) o[sj * DIM + d] = base_cell(std::floor(loc[d] - scalar_t(0.5)));
      }
  });
}

// CALL(D, DH) for the runtime position dim (1..3) and head dim (16, 32, 64 unrolled, else 0: run time).
#define SPARSE_SAMPLE_BY_DH(D, dh, CALL) \
  switch (dh) {                          \
    case 16: CALL(D, 16); break;         \
    case 32: CALL(D, 32); break;         \
    case 64: CALL(D, 64); break;         \
    default: CALL(D, 0);                 \
  }
#define SPARSE_SAMPLE_DISPATCH(dim, dh, CALL) \
  if ((dim) == 1) {                           \
    SPARSE_SAMPLE_BY_DH(1, dh, CALL)          \
  } else if ((dim) == 2) {                    \
    SPARSE_SAMPLE_BY_DH(2, dh, CALL)          \
  } else {                                    \
    SPARSE_SAMPLE_BY_DH(3, dh, CALL)          \
  }

void check_inputs(const at::Tensor& table, const at::Tensor& positions, const at::Tensor& weights,
                  const at::Tensor& ids, const at::Tensor& corner_rows) {
  TORCH_CHECK(table.device().is_cpu() && table.is_contiguous() && table.dim() == 2, "table must be a contiguous CPU [R, Dh]");
  TORCH_CHECK(positions.scalar_type() == table.scalar_type() && positions.is_contiguous() && positions.dim() == 3,
              "positions must be contiguous [S, J, D] of the table's dtype");
  TORCH_CHECK(positions.size(2) >= 1 && positions.size(2) <= 3, "position_dim must be 1..3");
  TORCH_CHECK(weights.scalar_type() == table.scalar_type() && weights.is_contiguous(), "weights: contiguous, table dtype");
  TORCH_CHECK(ids.scalar_type() == at::kInt && ids.is_contiguous(), "ids must be contiguous int32");
  TORCH_CHECK(corner_rows.scalar_type() == at::kInt && corner_rows.is_contiguous() &&
                  corner_rows.size(1) == (1 << positions.size(2)), "corner_rows must be contiguous int32 [T, 2**D]");
}

}  // namespace

#define SPARSE_SAMPLE_FORWARD(D, DH)                                                                          \
  forward_impl<scalar_t, D, DH>(table, positions, weights, ids, corner_rows, L, out, static_cast<int>(n_threads), \
                                ref, ref_group, logits)
#define SPARSE_SAMPLE_BACKWARD(D, DH)                                                                         \
  backward_impl<scalar_t, D, DH>(table, positions, weights, ids, corner_rows, L, grad_out, g_table, g_pos, g_w, \
                                 need_table, need_pos, need_w, static_cast<int>(n_threads), max_table_copies,  \
                                 ref, ref_group, logits)

// ref: empty (positions given) or [S / ref_group, D] reference points (positions holds offsets);
// logits: weights holds logits, one softmax per row.
void check_deformable(const at::Tensor& positions, const at::Tensor& ref, int64_t ref_group, bool logits,
                      const at::Tensor& head) {
  if (ref.defined() && ref.numel()) {
    TORCH_CHECK(ref.scalar_type() == positions.scalar_type() && ref.is_contiguous() && ref.dim() == 2 &&
                    ref.size(1) == positions.size(2) && ref_group >= 1 && ref.size(0) * ref_group == positions.size(0),
                "ref must be contiguous [S / ref_group, D] of the positions' dtype");
  }
  TORCH_CHECK(!logits || head.stride(1) == 0 || head.size(1) == 1, "logits need one head per row");
}

// out_into: empty, or the contiguous [S, Dh] tensor of the table's dtype to write the result into
// (e.g. the caller's slice of its whole output: no per-chunk result to copy); returned.
at::Tensor sample_forward(const at::Tensor& table, const at::Tensor& positions, const at::Tensor& weights,
                          const at::Tensor& ids, const at::Tensor& corner_rows, const at::Tensor& batch,
                          const at::Tensor& level, const at::Tensor& head, const at::Tensor& shapes, int64_t n_heads,
                          int64_t bg_offset, int64_t n_threads, const at::Tensor& ref, int64_t ref_group, bool logits,
                          const at::Tensor& out_into) {
  check_inputs(table, positions, weights, ids, corner_rows);
  check_deformable(positions, ref, ref_group, logits, head);
  at::Tensor out;
  if (out_into.defined() && out_into.numel()) {
    TORCH_CHECK(out_into.dim() == 2 && out_into.size(0) == positions.size(0) && out_into.size(1) == table.size(1) &&
                    out_into.scalar_type() == table.scalar_type() && out_into.is_contiguous(),
                "out_into must be a contiguous [S, Dh] tensor of the table's dtype");
    out = out_into;
  } else {
    out = at::empty({positions.size(0), table.size(1)}, table.options());
  }
  const Layout L = make_layout(batch, level, head, shapes, n_heads, shapes.size(0), bg_offset);
  AT_DISPATCH_FLOATING_TYPES(table.scalar_type(), "sample_forward", [&] {
    SPARSE_SAMPLE_DISPATCH(positions.size(2), table.size(1), SPARSE_SAMPLE_FORWARD)
  });
  return out;
}

// g_table_into: empty, or the table gradient to add into (e.g. across chunks of samples).
std::vector<at::Tensor> sample_backward(const at::Tensor& table, const at::Tensor& positions,
                                        const at::Tensor& weights, const at::Tensor& ids,
                                        const at::Tensor& corner_rows, const at::Tensor& batch,
                                        const at::Tensor& level, const at::Tensor& head, const at::Tensor& shapes,
                                        int64_t n_heads, int64_t bg_offset, const at::Tensor& grad_out,
                                        bool need_table, bool need_pos, bool need_w, int64_t n_threads,
                                        int64_t max_table_copies, const at::Tensor& ref, int64_t ref_group,
                                        bool logits, const at::Tensor& g_table_into) {
  check_inputs(table, positions, weights, ids, corner_rows);
  check_deformable(positions, ref, ref_group, logits, head);
  TORCH_CHECK(grad_out.is_contiguous() && grad_out.scalar_type() == table.scalar_type(), "grad_out: contiguous, table dtype");
  at::Tensor g_table;
  if (need_table && g_table_into.defined() && g_table_into.numel()) {
    TORCH_CHECK(g_table_into.sizes() == table.sizes() && g_table_into.scalar_type() == table.scalar_type() &&
                    g_table_into.is_contiguous(), "g_table_into must be a contiguous tensor like table");
    g_table = g_table_into;
  } else if (need_table) {
    g_table = at::zeros_like(table);
  }
  auto g_pos = need_pos ? at::empty_like(positions) : at::Tensor();
  auto g_w = need_w ? at::empty_like(weights) : at::Tensor();
  const Layout L = make_layout(batch, level, head, shapes, n_heads, shapes.size(0), bg_offset);
  AT_DISPATCH_FLOATING_TYPES(table.scalar_type(), "sample_backward", [&] {
    SPARSE_SAMPLE_DISPATCH(positions.size(2), table.size(1), SPARSE_SAMPLE_BACKWARD)
  });
  return {g_table, g_pos, g_w};
}

at::Tensor sample_base_cells(const at::Tensor& positions, const at::Tensor& level, const at::Tensor& shapes,
                             const at::Tensor& ref, int64_t ref_group, int64_t n_threads) {
  TORCH_CHECK(positions.is_contiguous() && positions.dim() == 3 && positions.size(2) >= 1 && positions.size(2) <= 3,
              "positions must be contiguous [S, J, D], D in 1..3");
  TORCH_CHECK(level.scalar_type() == at::kLong && shapes.scalar_type() == at::kLong, "level, shapes: int64");
  const at::Tensor no_head = at::zeros({1, 1}, level.options()).expand({positions.size(0), positions.size(1)});
  check_deformable(positions, ref, ref_group, false, no_head);
  auto out = at::empty(positions.sizes(), positions.options().dtype(at::kLong));
  const Layout L = make_layout(level, level, no_head, shapes, 1, shapes.size(0), -1);
  AT_DISPATCH_FLOATING_TYPES(positions.scalar_type(), "sample_base_cells", [&] {
    const int dim = static_cast<int>(positions.size(2));
    if (dim == 1) base_cells_impl<scalar_t, 1>(positions, L, ref, ref_group, out, static_cast<int>(n_threads));
    else if (dim == 2) base_cells_impl<scalar_t, 2>(positions, L, ref, ref_group, out, static_cast<int>(n_threads));
    else base_cells_impl<scalar_t, 3>(positions, L, ref, ref_group, out, static_cast<int>(n_threads));
  });
  return out;
}

// The attention weights the kernels take from logits [S, J] (float32 or float64): one softmax per
// row, by the code the kernels run (SampleInputs::weights); for the tests.
at::Tensor sample_softmax(const at::Tensor& logits) {
  TORCH_CHECK(logits.device().is_cpu() && logits.dim() == 2 && logits.is_contiguous(), "logits must be a contiguous CPU [S, J]");
  auto out = at::empty_like(logits);
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "sample_softmax", [&] {
    const int64_t S = logits.size(0), J = logits.size(1);
    const scalar_t* x = logits.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    for (int64_t s = 0; s < S; ++s) softmax_weights<scalar_t>(x + s * J, J, o + s * J);
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("simd_isa", [] { return std::string(sparse_msda_simd::kIsa); }, "the vector ISA this build targets (simd.h)");
  m.def("sample_forward", &sample_forward, "fused sparse bilinear/trilinear weighted gather (CPU)");
  m.def("sample_backward", &sample_backward, "its backward (CPU)");
  m.def("sample_softmax", &sample_softmax, "the kernels' softmax of logit rows [S, J] (tests)");
  m.def("sample_base_cells", &sample_base_cells, "int64 base cells of the samples (positions, or offsets + reference points)");
}
