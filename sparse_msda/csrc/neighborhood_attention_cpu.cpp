// Fused CPU kernel of multi-level sparse neighborhood attention (sparse_msda.functional.neighborhood).
//
// The plan is a list of tiles (queries of one batch item sharing their coarsest-level window
// centre). Tile t owns queries qids[qptr[t] .. qptr[t+1]) and the voxels present in the union of
// their windows: key entries e in [kptr[t], kptr[t+1]) with key row krow[e] (rows of k and v); the
// level klev[r] and cell kcell[r] (int64 [n_keys, D], the level's grid) are per key row r = krow[e]
// (one table per key, not per entry). This file does no coordinate lookup: the entries come from
// the coordinate index. Query i sees entry e iff the cell lies in its window at that level,
// |kcell[r] - centre[i, l]| <= radius[l] on every axis (axis order (y, x) / (z, y, x)). These windows
// are enumerated once per plan (neighborhood_windows: per entry one bit per query of its tile, per
// query one bit per background slot, and the counts) and read back by every forward and backward:
// the plan is shared by all layers of an encoder, so no call re-tests a cell.
//
// Background (optional): the in-bounds window slots of query i that hold no voxel. Slot k (levels
// in order, row-major offsets within a level) is scored as <ql[i, level(k)], tables[b, k]> where ql
// is the query rotated back by its window centre (computed here from per-axis cos/sin tables of the
// centre coordinates, angles added) and tables the background key rotated at the slot's offset
// (rotations compose, see background_tables in neighborhood.py); its value is bg_v[b, level(k)].
//
// Work is per tile and head: the tile's queries and keys are gathered into small blocks, scores and
// weighted sums are blocked products (register-blocked micro-kernels below), and each query's
// softmax runs over its own window keys and background slots only (the tile's other keys get weight
// 0: a 0/1 mask over the whole padded score row, expanded from the key bits once per tile). One softmax per (query, head). Forward writes the output and the log-sum-exp; backward
// recomputes the scores from them (nothing per pair is ever stored). Threads split the heads: every
// gradient row written for head h is (row, h), so no two threads ever write the same memory (no
// atomics, no copies); only the (small) frequency gradient has one partial sum per thread.
#include <torch/extension.h>

#include "simd.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <limits>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>

namespace {

struct Tiles {
  const int64_t *qptr, *qids, *kptr, *krow, *klev, *kcell, *tbatch, *centres;
  const int64_t *shapes, *radius, *slot_start, *offsets, *slot_level;
  int64_t n_tiles, n_queries, n_levels, n_slots;
  int dim;
  // the windows (neighborhood_windows, once per plan): bit g % 32 of key_bits[e * key_words + g / 32]
  // is set iff the tile's g-th query sees entry e; bit k % 32 of slot_bits[i * slot_words + k / 32]
  // iff slot k is a background slot of query i; counts [2, Q]: voxel keys and background slots per query
  const uint32_t *key_bits = nullptr, *slot_bits = nullptr;
  const int64_t* counts = nullptr;
  int64_t key_words = 0, slot_words = 0;

  bool sees(int64_t e, int64_t g) const { return (key_bits[e * key_words + (g >> 5)] >> (g & 31)) & 1u; }
};

// tiles = [qptr, qids, kptr, krow, klev, kcell, tbatch, centres, shapes, radius, slot_start, offsets, slot_level]
// (klev [n_keys] and kcell [n_keys, D] per key row), with_windows: followed by neighborhood_windows'
// [key_bits int32 [E, W], slot_bits int32 [Q, SW], counts int64 [2, Q]].
Tiles make_tiles(const std::vector<at::Tensor>& t, bool with_windows = true) {
  const size_t n = with_windows ? 16 : 13;
  TORCH_CHECK(t.size() == n, "tiles: ", n, " tensors expected (the plan's kernel_tiles()), got ", t.size());
  for (size_t j = 0; j < 13; ++j)
    TORCH_CHECK(t[j].device().is_cpu() && t[j].scalar_type() == at::kLong && t[j].is_contiguous(), "tiles: contiguous CPU int64");
  Tiles T{t[0].data_ptr<int64_t>(), t[1].data_ptr<int64_t>(), t[2].data_ptr<int64_t>(), t[3].data_ptr<int64_t>(),
          t[4].data_ptr<int64_t>(), t[5].data_ptr<int64_t>(), t[6].data_ptr<int64_t>(), t[7].data_ptr<int64_t>(),
          t[8].data_ptr<int64_t>(), t[9].data_ptr<int64_t>(), t[10].data_ptr<int64_t>(), t[11].data_ptr<int64_t>(),
          t[12].data_ptr<int64_t>(), t[0].size(0) - 1, t[7].size(0), t[8].size(0), t[12].size(0),
          static_cast<int>(t[8].size(1))};
  TORCH_CHECK(T.dim >= 1 && T.dim <= 3, "position_dim must be 1..3");
  TORCH_CHECK(t[7].dim() == 3 && t[7].size(1) == T.n_levels && t[7].size(2) == T.dim, "centres must be [Q, L, D]");
  if (with_windows) {
    const at::Tensor &kb = t[13], &sb = t[14], &c = t[15];
    TORCH_CHECK(kb.device().is_cpu() && kb.scalar_type() == at::kInt && kb.is_contiguous() && kb.dim() == 2 &&
                    kb.size(0) == t[3].size(0), "tiles: key bits must be contiguous int32 [E, W]");
    TORCH_CHECK(sb.device().is_cpu() && sb.scalar_type() == at::kInt && sb.is_contiguous() && sb.dim() == 2 &&
                    sb.size(0) == T.n_queries, "tiles: slot bits must be contiguous int32 [Q, SW]");
    TORCH_CHECK(c.device().is_cpu() && c.scalar_type() == at::kLong && c.is_contiguous() &&
                    c.sizes() == at::IntArrayRef({2, T.n_queries}), "tiles: counts must be int64 [2, Q]");
    T.key_bits = reinterpret_cast<const uint32_t*>(kb.data_ptr<int32_t>());
    T.slot_bits = reinterpret_cast<const uint32_t*>(sb.data_ptr<int32_t>());
    T.counts = c.data_ptr<int64_t>();
    T.key_words = kb.size(1);
    T.slot_words = sb.size(1);
    int64_t most = 0;
    for (int64_t x = 0; x < T.n_tiles; ++x) most = std::max(most, T.qptr[x + 1] - T.qptr[x]);
    TORCH_CHECK(most <= 32 * T.key_words, "tiles: key bits have too few words for the largest tile");
  }
  return T;
}

// The keys of every query of one tile: the tile's entries u (0-based within the tile) inside the
// query's windows, and (with background) its absent in-bounds slots; CSR over the tile's queries.
// find() enumerates them from the cells (once per plan, neighborhood_windows); load() reads them
// back from the plan's bits (the keys only where asked: small tiles, whose queries are scored row by row).
struct TileWindows {
  std::vector<int32_t> keys, slots;
  std::vector<int64_t> key_ptr, slot_ptr;
  std::vector<uint8_t> present;

  void load(const Tiles& T, int64_t tile, bool with_keys, bool background) {
    const int64_t e0 = T.kptr[tile], U = T.kptr[tile + 1] - e0, q0 = T.qptr[tile], G = T.qptr[tile + 1] - q0;
    keys.clear();
    slots.clear();
    key_ptr.assign(1, 0);
    slot_ptr.assign(1, 0);
    for (int64_t g = 0; g < G; ++g) {
      if (with_keys)
        for (int64_t u = 0; u < U; ++u)
          if (T.sees(e0 + u, g)) keys.push_back(static_cast<int32_t>(u));
      key_ptr.push_back(static_cast<int64_t>(keys.size()));
      if (background) {
        const uint32_t* bits = T.slot_bits + T.qids[q0 + g] * T.slot_words;
        for (int64_t j = 0; j < T.slot_words; ++j)
          for (uint32_t x = bits[j]; x; x &= x - 1) slots.push_back(static_cast<int32_t>(j * 32 + __builtin_ctz(x)));
      }
      slot_ptr.push_back(static_cast<int64_t>(slots.size()));
    }
  }

  void find(const Tiles& T, int64_t tile, bool background) {
    const int64_t e0 = T.kptr[tile], e1 = T.kptr[tile + 1];
    const int D = T.dim;
    keys.clear();
    slots.clear();
    key_ptr.assign(1, 0);
    slot_ptr.assign(1, 0);
    for (int64_t qi = T.qptr[tile]; qi < T.qptr[tile + 1]; ++qi) {
      const int64_t* c = T.centres + T.qids[qi] * T.n_levels * D;
      if (background) present.assign(T.n_slots, 0);
      for (int64_t e = e0; e < e1; ++e) {
        const int64_t row = T.krow[e], l = T.klev[row], r = T.radius[l];
        const int64_t* kc = T.kcell + row * D;
        const int64_t* cl = c + l * D;
        bool inside = true;
        int64_t slot = 0;
        for (int a = 0; a < D; ++a) {
          const int64_t rel = kc[a] - cl[a] + r;
          inside = inside && rel >= 0 && rel <= 2 * r;
          slot = slot * (2 * r + 1) + rel;
        }
        if (!inside) continue;
        keys.push_back(static_cast<int32_t>(e - e0));
        if (background) present[T.slot_start[l] + slot] = 1;
      }
      key_ptr.push_back(static_cast<int64_t>(keys.size()));
      if (background) {
        for (int64_t k = 0; k < T.n_slots; ++k) {
          if (present[k]) continue;
          const int64_t l = T.slot_level[k];
          const int64_t* cl = c + l * D;
          bool inside = true;
          for (int a = 0; a < D; ++a) {
            const int64_t cell = cl[a] + T.offsets[k * D + a];
            inside = inside && cell >= 0 && cell < T.shapes[l * D + a];
          }
          if (inside) slots.push_back(static_cast<int32_t>(k));
        }
      }
      slot_ptr.push_back(static_cast<int64_t>(slots.size()));
    }
  }
};

// f(h0, h1): thread p takes heads [h0, h1) of every query.
template <typename F>
void split_heads(int64_t n_heads, int n_threads, const F& f) {
  const int parts = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(n_threads, n_heads)));
  if (parts == 1) {
    f(0, n_heads);
    return;
  }
  std::vector<std::thread> threads;
  for (int p = 1; p < parts; ++p)
    threads.emplace_back([&f, p, parts, n_heads] { f(p * n_heads / parts, (p + 1) * n_heads / parts); });
  f(0, n_heads / parts);
  for (auto& t : threads) t.join();
}

using sparse_msda_simd::Vec;  // one register of the target ISA (simd.h)

// Dot product of dh values: vector partial sums when the head dim is a compile-time multiple of the
// vector width, else a plain loop.
template <typename scalar_t, int DH>
inline scalar_t dot(const scalar_t* a, const scalar_t* b, int64_t dh) {
  using V = Vec<scalar_t>;
  if constexpr (DH > 0 && DH % V::N == 0) {
    typename V::type acc = {};
    for (int64_t e = 0; e < DH; e += V::N) acc += V::load(a + e) * V::load(b + e);
    scalar_t s = 0;
    for (int64_t j = 0; j < V::N; ++j) s += acc[j];
    return s;
  } else {
    scalar_t s = 0;
    for (int64_t e = 0; e < dh; ++e) s += a[e] * b[e];
    return s;
  }
}

template <typename scalar_t, int DH>
inline void axpy(scalar_t* y, scalar_t a, const scalar_t* x, int64_t dh) {
  using V = Vec<scalar_t>;
  if constexpr (DH > 0 && DH % V::N == 0) {
    for (int64_t e = 0; e < DH; e += V::N) V::store(y + e, V::load(y + e) + a * V::load(x + e));
  } else {
    for (int64_t e = 0; e < dh; ++e) y[e] += a * x[e];
  }
}

// exp(v) for v <= 0 (softmax weights): Cephes' expf polynomial after reduction by ln 2 (within
// 2 ulp of expf; inputs below -87 give ~1e-38 instead of 0), written so that loops calling it
// vectorise (no branch, no libm call; the int -> float bit cast builds 2^k).
__attribute__((always_inline)) inline float exp_nonpositive(float v) {
  v = v > -87.0f ? v : -87.0f;
  const int32_t k = static_cast<int32_t>(v * 1.44269504088896341f - 0.5f);  // round(v / ln 2) (v <= 0)
  const float kf = static_cast<float>(k);
  v = v - kf * 0.693359375f - kf * -2.12194440e-4f;  // |v| <= ln(2) / 2
  float p = 1.9875691500e-4f;
  p = p * v + 1.3981999507e-3f;
  p = p * v + 8.3334519073e-3f;
  p = p * v + 4.1665795894e-2f;
  p = p * v + 1.6666665459e-1f;
  p = p * v + 5.0000001201e-1f;
  p = p * v * v + v + 1.0f;
  return p * std::bit_cast<float>((k + 127) << 23);
}

// x[j] <- exp(x[j] - shift) for j < n, with x[j] - shift <= 0. float: exp_nonpositive; double:
// std::exp (the gradcheck dtype).
inline void exp_shifted(float* __restrict__ x, int64_t n, float shift) {
  for (int64_t j = 0; j < n; ++j) x[j] = exp_nonpositive(x[j] - shift);
}

// x[j] <- mask[j] * exp(scale * x[j] - shift) for j < n, mask[j] in {0, 1}: a masked entry gives
// exactly 0 whatever x[j] holds (it is never exponentiated); scale * x[j] - shift <= 0 where unmasked.
inline void exp_masked(float* __restrict__ x, const float* __restrict__ mask, int64_t n, float scale, float shift) {
  for (int64_t j = 0; j < n; ++j) {
    const float v = mask[j] != 0.0f ? x[j] * scale - shift : -87.0f;
    x[j] = exp_nonpositive(v) * mask[j];
  }
}

// y[j] <- mask[j] * exp(scale * x[j] - shift) for j < n, mask[j] in {0, 1} (as exp_masked, into y).
inline void exp_masked_to(const float* __restrict__ x, const float* __restrict__ mask, float* __restrict__ y, int64_t n,
                          float scale, float shift) {
  for (int64_t j = 0; j < n; ++j) {
    const float v = mask[j] != 0.0f ? x[j] * scale - shift : -87.0f;
    y[j] = exp_nonpositive(v) * mask[j];
  }
}

inline void exp_masked_to(const double* x, const double* mask, double* y, int64_t n, double scale, double shift) {
  for (int64_t j = 0; j < n; ++j) y[j] = mask[j] != 0.0 ? std::exp(x[j] * scale - shift) : 0.0;
}

// Sum and maximum of x[0 .. n) with 8 independent partial results (vectorised, no add-latency chain).
template <typename scalar_t>
inline scalar_t sum8(const scalar_t* x, int64_t n) {
  scalar_t acc[8] = {};
  int64_t j = 0;
  for (; j + 8 <= n; j += 8)
    for (int l = 0; l < 8; ++l) acc[l] += x[j + l];
  scalar_t s = 0;
  for (; j < n; ++j) s += x[j];
  for (int l = 0; l < 8; ++l) s += acc[l];
  return s;
}

template <typename scalar_t>
inline scalar_t max8(const scalar_t* x, int64_t n) {  // n >= 1
  scalar_t acc[8];
  for (int l = 0; l < 8; ++l) acc[l] = x[0];
  int64_t j = 0;
  for (; j + 8 <= n; j += 8)
    for (int l = 0; l < 8; ++l) acc[l] = acc[l] > x[j + l] ? acc[l] : x[j + l];
  scalar_t m = x[0];
  for (; j < n; ++j) m = m > x[j] ? m : x[j];
  for (int l = 0; l < 8; ++l) m = m > acc[l] ? m : acc[l];
  return m;
}

inline void exp_shifted(double* x, int64_t n, double shift) {
  for (int64_t j = 0; j < n; ++j) x[j] = std::exp(x[j] - shift);
}

inline void exp_masked(double* x, const double* mask, int64_t n, double scale, double shift) {
  for (int64_t j = 0; j < n; ++j) x[j] = mask[j] != 0.0 ? std::exp(x[j] * scale - shift) : 0.0;
}

// Maximum of x[j] over the unmasked j < n (mask[j] != 0), at least `init`; 8 independent partials.
template <typename scalar_t>
inline scalar_t max_masked(const scalar_t* x, const scalar_t* mask, int64_t n, scalar_t init) {
  scalar_t acc[8];
  for (int l = 0; l < 8; ++l) acc[l] = init;
  int64_t j = 0;
  for (; j + 8 <= n; j += 8)
    for (int l = 0; l < 8; ++l) {
      const scalar_t y = mask[j + l] != 0 ? x[j + l] : init;  // select, then max: vectorises
      acc[l] = acc[l] > y ? acc[l] : y;
    }
  scalar_t m = init;
  for (; j < n; ++j) {
    const scalar_t y = mask[j] != 0 ? x[j] : init;
    m = m > y ? m : y;
  }
  for (int l = 0; l < 8; ++l) m = m > acc[l] ? m : acc[l];
  return m;
}

// max_masked for n a whole number of vectors (the padded score rows): vector selects and maxima
// (GCC left the 8-partial loop above scalar; a maximum is exact, so the result is the same).
template <typename scalar_t>
inline scalar_t max_masked_rows(const scalar_t* x, const scalar_t* mask, int64_t n, scalar_t init) {
  using V = Vec<scalar_t>;
  using v_t = typename V::type;
  constexpr int64_t N = V::N;
  if (n % N != 0) return max_masked(x, mask, n, init);
  const v_t lo = V::broadcast(init), zero = {};
  v_t acc = lo;
  for (int64_t j = 0; j < n; j += N) {
    const v_t y = V::load(mask + j) != zero ? V::load(x + j) : lo;
    acc = acc > y ? acc : y;
  }
  scalar_t m = init;
  for (int64_t l = 0; l < N; ++l) m = m > acc[l] ? m : acc[l];
  return m;
}

// The tensors of one call. Layouts: q [Q, H, dh]; k, v [N, H, dh]; tables [B, K, H, dh];
// bg_v [B, L, H, dh]; out [Q, H, dh]; lse [Q, H]. Window-centre rotations (background only):
// rcos/rsin [R, Hf, dh/2] hold cos/sin of the RoPE angle of query i's window-centre coordinate on
// axis a of level l at row rrow[i, l, a] (rows only for the centre coordinates the plan's queries
// use: memory follows the queries, not the map's extent); axis 0's rows include the level angle.
// Hf = 1 (shared frequencies) or H. full [D]: the full-scale shape.
template <typename scalar_t>
struct Operands {
  const scalar_t *q, *k, *v, *tab, *bgv, *rcos, *rsin;
  const int64_t *rrow, *full;
  int64_t H, dh, L, K, Hf, half;
  bool background;
  scalar_t scale;

  Operands(const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_, const std::vector<at::Tensor>& rot,
           const at::Tensor& tab_, const at::Tensor& bgv_, const Tiles& T, double scale_)
      : q(q_.data_ptr<scalar_t>()), k(k_.data_ptr<scalar_t>()), v(v_.data_ptr<scalar_t>()),
        tab(tab_.defined() ? tab_.data_ptr<scalar_t>() : nullptr), bgv(bgv_.defined() ? bgv_.data_ptr<scalar_t>() : nullptr),
        rcos(rot.empty() ? nullptr : rot[0].data_ptr<scalar_t>()), rsin(rot.empty() ? nullptr : rot[1].data_ptr<scalar_t>()),
        rrow(rot.empty() ? nullptr : rot[2].data_ptr<int64_t>()), full(rot.empty() ? nullptr : rot[3].data_ptr<int64_t>()),
        H(q_.size(1)), dh(q_.size(2)), L(T.n_levels), K(T.n_slots), Hf(rot.empty() ? 1 : rot[0].size(1)),
        half(q_.size(2) / 2), background(tab_.defined()), scale(static_cast<scalar_t>(scale_)) {}

  const scalar_t* query(int64_t i, int64_t h) const { return q + (i * H + h) * dh; }
  const scalar_t* key(int64_t r, int64_t h) const { return k + (r * H + h) * dh; }
  const scalar_t* value(int64_t r, int64_t h) const { return v + (r * H + h) * dh; }
  const scalar_t* table(int64_t b, int64_t s, int64_t h) const { return tab + ((b * K + s) * H + h) * dh; }
  const scalar_t* bg_value(int64_t b, int64_t l, int64_t h) const { return bgv + ((b * L + l) * H + h) * dh; }
};

// The queries of a tile rotated back by their window centres at every level,
// ql[l, g] = R(-theta_{g,l}) q_g (split-half pairs; level-major rows [L, gp, dh], zero rows for
// queries without background slots), so that <ql[l, g], tables[b, k]> is the score of query g
// with the background cell of slot k; and, in the backward, the way back:
// dq += R(theta) dql, dtheta = dql1 ql2 - dql2 ql1, dfreqs += dtheta * u(centre).
template <typename scalar_t>
struct TileRotation {
  std::vector<scalar_t> ql, dql, cr, ci;  // [L, gp, dh] x 2, [gp, L, half] x 2
  std::vector<int64_t> centre;            // [gp, L, D] clamped centres
  int64_t gp = 0;

  void compute(const Tiles& T, const Operands<scalar_t>& op, const TileWindows& w, int64_t tile, int64_t h, int64_t gp_) {
    const int64_t L = op.L, D = T.dim, half = op.half, dh = op.dh, hf = op.Hf == 1 ? 0 : h;
    const int64_t q0 = T.qptr[tile], G = T.qptr[tile + 1] - q0;
    gp = gp_;
    ql.assign(L * gp * dh, scalar_t(0));
    cr.resize(gp * L * half);
    ci.resize(gp * L * half);
    centre.resize(gp * L * D);
    for (int64_t g = 0; g < G; ++g) {
      if (w.slot_ptr[g + 1] == w.slot_ptr[g]) continue;
      const int64_t i = T.qids[q0 + g];
      const scalar_t* x = op.query(i, h);
      for (int64_t l = 0; l < L; ++l) {
        scalar_t* c = cr.data() + (g * L + l) * half;
        scalar_t* s = ci.data() + (g * L + l) * half;
        const int64_t r = T.radius[l];
        for (int64_t a = 0; a < D; ++a) {
          const int64_t cc = std::min(std::max(T.centres[(i * L + l) * D + a], -r - 1), T.shapes[l * D + a] + r);
          centre[(g * L + l) * D + a] = cc;
          const int64_t row = op.rrow[(i * L + l) * D + a];
          const scalar_t* fc = op.rcos + (row * op.Hf + hf) * half;
          const scalar_t* fs = op.rsin + (row * op.Hf + hf) * half;
          if (a == 0) {
            std::copy_n(fc, half, c);
            std::copy_n(fs, half, s);
          } else {
            for (int64_t j = 0; j < half; ++j) {  // angles add: (c + i s)(fc + i fs)
              const scalar_t cj = c[j] * fc[j] - s[j] * fs[j];
              s[j] = c[j] * fs[j] + s[j] * fc[j];
              c[j] = cj;
            }
          }
        }
        scalar_t* y = ql.data() + (l * gp + g) * dh;
        for (int64_t j = 0; j < half; ++j) {
          y[j] = x[j] * c[j] + x[half + j] * s[j];
          y[half + j] = x[half + j] * c[j] - x[j] * s[j];
        }
      }
    }
  }

  // Query g (with background slots; dql filled): dq += sum_l R(theta_l) dql[l, g] and
  // dfreqs[hf, :, j] += dtheta_l[j] * u(centre_l) (dfreqs: [Hf, D + 1, dh/2], transposed by the caller).
  void backward(const Tiles& T, const Operands<scalar_t>& op, int64_t g, int64_t h, scalar_t* dq, double* dfreqs) const {
    const int64_t L = op.L, D = T.dim, half = op.half, dh = op.dh, hf = op.Hf == 1 ? 0 : h;
    for (int64_t l = 0; l < L; ++l) {
      const scalar_t* c = cr.data() + (g * L + l) * half;
      const scalar_t* s = ci.data() + (g * L + l) * half;
      const scalar_t* gr = dql.data() + (l * gp + g) * dh;
      const scalar_t* y = ql.data() + (l * gp + g) * dh;
      if (dq)
        for (int64_t j = 0; j < half; ++j) {
          dq[j] += gr[j] * c[j] - gr[half + j] * s[j];
          dq[half + j] += gr[j] * s[j] + gr[half + j] * c[j];
        }
      if (dfreqs) {
        double u[4];
        for (int64_t a = 0; a < D; ++a)
          u[a] = (static_cast<double>(centre[(g * L + l) * D + a]) + 0.5) / static_cast<double>(T.shapes[l * D + a]) *
                 static_cast<double>(op.full[a]);
        u[D] = static_cast<double>(l);
        for (int64_t a = 0; a <= D; ++a) {  // the caller's layout [Hf, D + 1, half]: vector loops over j
          double* f = dfreqs + (hf * (D + 1) + a) * half;
          const double ua = u[a];
          for (int64_t j = 0; j < half; ++j) f[j] += static_cast<double>(gr[j] * y[half + j] - gr[half + j] * y[j]) * ua;
        }
      }
    }
  }
};

// ---- tile micro-kernels ----
// Register blocks of Vec, sized for the target's registers (simd.h; DH = 0: run-time dh, plain
// loops): kRows rows of A times kBlockVectors vectors of B per block, i.e. kRows x kBlockVectors
// accumulators. AVX2 (16 ymm): 4 x 2 = 8 accumulators with the two B vectors and a broadcast.
// AVX-512: 4 x 1. Measured on a Zen 4 (2026-11-30, one tile's products gp = 20, up = 160, dh = 32,
// L1-resident, 20k calls): the 4 x 2 block, which GCC compiles with every B load folded into
// its FMAs (12 zmm loads per 8 FMAs: load-bound), took 2.5 us (scores) and 3.6-3.9 us (the
// value products), 4 x 1 1.9-2.1 and 1.8-2.2 us; on AVX2 4 x 1 was slower (3.7-5.8 us against
// 2.0-4.2), so AVX2 keeps 4 x 2.
constexpr int64_t kRows = 4;    // rows of A per register block
constexpr int64_t kLanes = 16;  // column padding of the score blocks (a whole number of vectors)
constexpr int64_t kBlockVectors = sparse_msda_simd::kVecRegisters == 32 ? 1 : 2;

inline int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// C[rows, up] = A[rows, dh] x BT[dh, up]; rows a multiple of kRows, up of kLanes.
template <typename scalar_t, int DH>
void gemm_nt(const scalar_t* __restrict__ A, const scalar_t* __restrict__ BT, int64_t rows, int64_t up, int64_t dh,
             scalar_t* __restrict__ C) {
  using V = Vec<scalar_t>;
  using v_t = typename V::type;
  constexpr int64_t N = V::N, CV = kBlockVectors;
  const int64_t D = DH > 0 ? DH : dh;
  for (int64_t g0 = 0; g0 < rows; g0 += kRows) {
    const scalar_t* a = A + g0 * D;
    int64_t u0 = 0;
    for (; u0 + CV * N <= up; u0 += CV * N) {  // kRows x CV independent accumulators
      v_t acc[kRows][CV] = {};
      for (int64_t e = 0; e < D; ++e) {
        v_t b[CV];
        for (int64_t w = 0; w < CV; ++w) b[w] = V::load(BT + e * up + u0 + w * N);
        for (int64_t r = 0; r < kRows; ++r) {
          const scalar_t x = a[r * D + e];
          for (int64_t w = 0; w < CV; ++w) acc[r][w] += x * b[w];
        }
      }
      for (int64_t r = 0; r < kRows; ++r)
        for (int64_t w = 0; w < CV; ++w) V::store(C + (g0 + r) * up + u0 + w * N, acc[r][w]);
    }
    for (; u0 < up; u0 += N) {  // tail: kRows x 1 vector
      v_t c0 = {}, c1 = {}, c2 = {}, c3 = {};
      for (int64_t e = 0; e < D; ++e) {
        const v_t b0 = V::load(BT + e * up + u0);
        c0 += a[e] * b0; c1 += a[D + e] * b0; c2 += a[2 * D + e] * b0; c3 += a[3 * D + e] * b0;
      }
      scalar_t* c = C + g0 * up + u0;
      V::store(c, c0); V::store(c + up, c1); V::store(c + 2 * up, c2); V::store(c + 3 * up, c3);
    }
  }
}

// Vectors per register block of gemm_nn: kBlockVectors, or W if fewer.
template <int64_t W>
constexpr int64_t chunk() {
  return W < kBlockVectors ? W : kBlockVectors;
}

// C[rows, dh] = A[rows, inner] x B[inner, dh] (ACC: C += A x B), A read as A[r * rs + j * js] (so a
// transposed A is a stride swap); rows a multiple of kRows.
template <typename scalar_t, int DH, bool ACC = false>
void gemm_nn(const scalar_t* __restrict__ A, int64_t rs, int64_t js, const scalar_t* __restrict__ B, int64_t rows,
             int64_t inner, int64_t dh, scalar_t* __restrict__ C) {
  using V = Vec<scalar_t>;
  using v_t = typename V::type;
  constexpr int64_t N = V::N;
  if constexpr (DH > 0 && DH % N == 0) {
    constexpr int64_t W = DH / N;      // vectors per row
    constexpr int64_t CW = chunk<W>();  // vectors per register block: kRows x CW accumulators
    for (int64_t g0 = 0; g0 < rows; g0 += kRows)
      for (int64_t w0 = 0; w0 < W; w0 += CW) {
        v_t acc[kRows][CW] = {};
        if constexpr (ACC)
          for (int64_t r = 0; r < kRows; ++r)
            for (int64_t w = 0; w < CW; ++w) acc[r][w] = V::load(C + (g0 + r) * DH + (w0 + w) * N);
        for (int64_t j = 0; j < inner; ++j) {
          v_t b[CW];
          for (int64_t w = 0; w < CW; ++w) b[w] = V::load(B + j * DH + (w0 + w) * N);
          for (int64_t r = 0; r < kRows; ++r) {
            const scalar_t x = A[(g0 + r) * rs + j * js];
            for (int64_t w = 0; w < CW; ++w) acc[r][w] += x * b[w];
          }
        }
        for (int64_t r = 0; r < kRows; ++r)
          for (int64_t w = 0; w < CW; ++w) V::store(C + (g0 + r) * DH + (w0 + w) * N, acc[r][w]);
      }
  } else {
    if constexpr (!ACC) std::fill(C, C + rows * dh, scalar_t(0));
    for (int64_t g = 0; g < rows; ++g)
      for (int64_t j = 0; j < inner; ++j) {
        const scalar_t x = A[g * rs + j * js];
        for (int64_t l = 0; l < dh; ++l) C[g * dh + l] += x * B[j * dh + l];
      }
  }
}

// r[j][i] <-> r[i][j]: an N x N block (N = lanes of one vector) transposed in registers by log2(N)
// rounds of two-vector shuffles (round s swaps the off-diagonal s x s blocks of every 2s x 2s block).
template <typename scalar_t, int64_t S>
inline void transpose_round(typename Vec<scalar_t>::type* r) {
  using V = Vec<scalar_t>;
  using v_t = typename V::type;
  constexpr int64_t N = V::N;
  using m_t = typename std::conditional<sizeof(scalar_t) == 4, int32_t, int64_t>::type;
  typedef m_t mask_t __attribute__((vector_size(sizeof(v_t))));
  mask_t lo, hi;
  for (int64_t l = 0; l < N; ++l) {
    lo[l] = static_cast<m_t>((l & S) ? N + l - S : l);
    hi[l] = static_cast<m_t>((l & S) ? N + l : l + S);
  }
  for (int64_t i = 0; i < N; ++i)
    if ((i & S) == 0) {
      const v_t a = r[i], b = r[i + S];
      r[i] = __builtin_shuffle(a, b, lo);
      r[i + S] = __builtin_shuffle(a, b, hi);
    }
  if constexpr (S > 1) transpose_round<scalar_t, S / 2>(r);
}

template <typename scalar_t>
inline void transpose_in_registers(typename Vec<scalar_t>::type* r) {
  transpose_round<scalar_t, Vec<scalar_t>::N / 2>(r);
}

#if defined(__clang__)
constexpr bool kRegisterTranspose = false;  // __builtin_shuffle with a vector mask is GCC's
#else
constexpr bool kRegisterTranspose = true;
#endif

// One head of one tile in the layouts of the micro-kernels: the tile's G queries padded to
// gp = G rounded up to kRows, its U keys padded to up = U rounded up to kLanes (zero rows/columns).
template <typename scalar_t>
struct TileHead {
  std::vector<scalar_t> qg, gg, kt, vt, kr, vr, s, p, ds, dkr, dvr, og;
  int64_t G = 0, gp = 0, U = 0, up = 0;

  // rows[x][g] = src(row of query g, h) for the tile's queries (zero padded), [gp, dh]; with a head
  // dim that is a whole number of vectors, copied by vector loads and stores (not a memmove call per row).
  template <int DH>
  void gather_queries(const Tiles& T, int64_t tile, const scalar_t* src, int64_t H, int64_t h, int64_t dh,
                      std::vector<scalar_t>& rows) {
    using V = Vec<scalar_t>;
    const int64_t q0 = T.qptr[tile];
    G = T.qptr[tile + 1] - q0;
    gp = round_up(std::max<int64_t>(G, 1), kRows);
    rows.resize(gp * dh);
    for (int64_t g = 0; g < G; ++g) {
      const scalar_t* x = src + (T.qids[q0 + g] * H + h) * dh;
      scalar_t* y = rows.data() + g * dh;
      if constexpr (DH > 0 && DH % V::N == 0)
        for (int64_t e = 0; e < DH; e += V::N) V::store(y + e, V::load(x + e));
      else
        std::copy_n(x, dh, y);
    }
    std::fill(rows.begin() + G * dh, rows.end(), scalar_t(0));
  }

  // gather_queries of the output gradient, and per query delta[g] = <grad, out> of its row (the
  // rows' loads independent of each other, so their cache misses overlap); the query gradient's
  // rows (if any) prefetched for the write at the end of the tile.
  template <int DH>
  void gather_gradients(const Tiles& T, int64_t tile, const scalar_t* grad, const scalar_t* out, const scalar_t* dq,
                        int64_t H, int64_t h, int64_t dh, std::vector<scalar_t>& rows, std::vector<scalar_t>& delta) {
    const int64_t q0 = T.qptr[tile];
    const int64_t n = T.qptr[tile + 1] - q0;
    for (int64_t g = 0; g < n; ++g) {
      const int64_t r = (T.qids[q0 + g] * H + h) * dh;
      for (int64_t c = 0; c < dh; c += 64 / static_cast<int64_t>(sizeof(scalar_t))) {
        __builtin_prefetch(out + r + c);
        if (dq) __builtin_prefetch(dq + r + c, 1);
      }
    }
    gather_queries<DH>(T, tile, grad, H, h, dh, rows);
    delta.resize(gp);
    for (int64_t g = 0; g < G; ++g) delta[g] = dot<scalar_t, DH>(rows.data() + g * dh, out + (T.qids[q0 + g] * H + h) * dh, dh);
  }

  // The tile's keys of x [N, H, dh] at head h: transposed [dh, up] and/or as rows [up, dh]. With
  // a head dim that is a whole number of vectors, the transposed block is built from N x N blocks
  // transposed in registers (one vector store per N values instead of N scalar stores).
  template <int DH>
  void gather_keys(const Tiles& T, int64_t tile, const scalar_t* x, int64_t H, int64_t h, int64_t dh,
                   std::vector<scalar_t>* transposed, std::vector<scalar_t>* rows) {
    using V = Vec<scalar_t>;
    using v_t = typename V::type;
    constexpr int64_t N = V::N;
    const int64_t e0 = T.kptr[tile];
    U = T.kptr[tile + 1] - e0;
    up = round_up(std::max<int64_t>(U, 1), kLanes);
    if constexpr (kRegisterTranspose && DH > 0 && DH % N == 0 && kLanes % N == 0) {
      if (transposed) {
        transposed->resize(DH * up);
        if (rows) rows->resize(up * DH);
        scalar_t* kt = transposed->data();
        for (int64_t u0 = 0; u0 < up; u0 += N) {
          const scalar_t* src[N];
          for (int64_t j = 0; j < N; ++j) src[j] = u0 + j < U ? x + (T.krow[e0 + u0 + j] * H + h) * DH : nullptr;
          for (int64_t j = u0 + N; j < std::min(u0 + 2 * N, U); ++j)  // the next block's rows: random reads
            for (int64_t c = 0; c < DH; c += 64 / static_cast<int64_t>(sizeof(scalar_t)))
              __builtin_prefetch(x + (T.krow[e0 + j] * H + h) * DH + c);
          for (int64_t c = 0; c < DH; c += N) {
            v_t r[N];
            for (int64_t j = 0; j < N; ++j) r[j] = src[j] ? V::load(src[j] + c) : v_t{};
            if (rows)
              for (int64_t j = 0; j < N; ++j) V::store(rows->data() + (u0 + j) * DH + c, r[j]);
            transpose_in_registers<scalar_t>(r);
            for (int64_t j = 0; j < N; ++j) V::store(kt + (c + j) * up + u0, r[j]);
          }
        }
        return;
      }
    }
    if (transposed) transposed->assign(dh * up, scalar_t(0));
    if (rows) rows->assign(up * dh, scalar_t(0));
    constexpr int64_t kAhead = 8;  // rows prefetched ahead (random reads)
    for (int64_t u = 0; u < U; ++u) {
      if (u + kAhead < U)
        for (int64_t c = 0; c < dh; c += 64 / static_cast<int64_t>(sizeof(scalar_t)))
          __builtin_prefetch(x + (T.krow[e0 + u + kAhead] * H + h) * dh + c);
      const scalar_t* xr = x + (T.krow[e0 + u] * H + h) * dh;
      if (rows) std::copy_n(xr, dh, rows->data() + u * dh);
      if (transposed)
        for (int64_t e = 0; e < dh; ++e) (*transposed)[e * up + u] = xr[e];
    }
  }

  // Add rows [up, dh] back into the gradient rows (row(u), h).
  void scatter_keys(const Tiles& T, int64_t tile, const std::vector<scalar_t>& rows, int64_t H, int64_t h, int64_t dh,
                    scalar_t* dest) const {
    const int64_t e0 = T.kptr[tile];
    constexpr int64_t kAhead = 8;  // rows prefetched ahead (random read-modify-writes)
    for (int64_t u = 0; u < U; ++u) {
      if (u + kAhead < U)
        for (int64_t c = 0; c < dh; c += 64 / static_cast<int64_t>(sizeof(scalar_t)))
          __builtin_prefetch(dest + (T.krow[e0 + u + kAhead] * H + h) * dh + c, 1);
      scalar_t* d = dest + (T.krow[e0 + u] * H + h) * dh;
      const scalar_t* r = rows.data() + u * dh;
      for (int64_t e = 0; e < dh; ++e) d[e] += r[e];
    }
  }
};

// The background keys rotated at the slot offsets, per (batch item, head, level) in the layouts of
// the micro-kernels: transposed tt [dh, kp_l] and rows tr [kp_l, dh], kp_l = slots of level l
// padded to kLanes (zero columns / rows). Built once per call (B x H x K x dh values).
template <typename scalar_t>
struct BackgroundBlocks {
  std::vector<int64_t> kp, off, k0;  // per level: padded slots, offset among all padded slots, first slot
  int64_t total = 0, dh = 0, H = 0;
  std::vector<scalar_t> tt, tr;

  BackgroundBlocks(const Tiles& T, const Operands<scalar_t>& op, int64_t B, bool rows) : dh(op.dh), H(op.H) {
    const int64_t L = op.L;
    for (int64_t l = 0; l < L; ++l) {
      const int64_t first = T.slot_start[l];
      const int64_t n = (l + 1 < L ? T.slot_start[l + 1] : T.n_slots) - first;
      k0.push_back(first);
      kp.push_back(round_up(std::max<int64_t>(n, 1), kLanes));
      off.push_back(total);
      total += kp.back();
    }
    tt.assign(B * H * total * dh, scalar_t(0));
    if (rows) tr.assign(B * H * total * dh, scalar_t(0));
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < H; ++h)
        for (int64_t l = 0; l < L; ++l) {
          const int64_t n = (l + 1 < L ? k0[l + 1] : T.n_slots) - k0[l];
          scalar_t* t = tt.data() + base(b, h, l);
          scalar_t* r = rows ? tr.data() + base(b, h, l) : nullptr;
          for (int64_t kk = 0; kk < n; ++kk) {
            const scalar_t* x = op.table(b, k0[l] + kk, h);
            for (int64_t e = 0; e < dh; ++e) t[e * kp[l] + kk] = x[e];
            if (r) std::copy_n(x, dh, r + kk * dh);
          }
        }
  }

  int64_t base(int64_t b, int64_t h, int64_t l) const { return ((b * H + h) * total + off[l]) * dh; }
};

// Per tile and head: scores of the tile's queries with every slot of a level, for the levels some
// query of the tile has background slots at: s_bg[off_l * gp + g * kp_l + kk] = <ql[l, g], table_l[kk]>.
template <typename scalar_t, int DH>
void background_scores(const BackgroundBlocks<scalar_t>& bb, const TileRotation<scalar_t>& rot,
                       const std::vector<uint8_t>& level_any, int64_t b, int64_t h, std::vector<scalar_t>& s_bg) {
  const int64_t gp = rot.gp, dh = bb.dh;
  s_bg.resize(bb.total * gp);
  for (int64_t l = 0; l < static_cast<int64_t>(bb.kp.size()); ++l)
    if (level_any[l])
      gemm_nt<scalar_t, DH>(rot.ql.data() + l * gp * dh, bb.tt.data() + bb.base(b, h, l), gp, bb.kp[l], dh,
                            s_bg.data() + bb.off[l] * gp);
}

// level_sum[l] = sum of a[j] over the slots of level l (slots ascending, so levels come in runs:
// one running sum per run, no store-to-load chain through level_sum).
template <typename scalar_t>
inline void level_sums(const Tiles& T, const int32_t* slots, const scalar_t* a, int64_t n, std::vector<scalar_t>& level_sum) {
  std::fill(level_sum.begin(), level_sum.end(), scalar_t(0));
  int64_t j = 0;
  while (j < n) {
    const int64_t l = T.slot_level[slots[j]];
    scalar_t acc = 0;
    for (; j < n && T.slot_level[slots[j]] == l; ++j) acc += a[j];
    level_sum[l] = acc;
  }
}

// Levels at which some query of the tile has a background slot.
inline void levels_with_slots(const Tiles& T, const TileWindows& w, std::vector<uint8_t>& level_any) {
  std::fill(level_any.begin(), level_any.end(), 0);
  for (int32_t k : w.slots) level_any[T.slot_level[k]] = 1;
}

// The background slots of a tile's queries as a 0/1 mask in the layout of the background score
// blocks (mask[off_l * gp + g * kp_l + kk] = 1 iff slot k0_l + kk is a background slot of query g),
// so that each query's softmax runs over whole padded rows of s_bg (vector loops, no per-slot
// indexing); built once per tile, shared by its heads.
template <typename scalar_t>
void background_mask(const Tiles& T, const TileWindows& w, const BackgroundBlocks<scalar_t>& bb, int64_t G, int64_t gp,
                     std::vector<scalar_t>& mask) {
  mask.assign(bb.total * gp, scalar_t(0));
  for (int64_t g = 0; g < G; ++g)
    for (int64_t j = w.slot_ptr[g]; j < w.slot_ptr[g + 1]; ++j) {
      const int64_t k = w.slots[j], l = T.slot_level[k];
      mask[bb.off[l] * gp + g * bb.kp[l] + (k - bb.k0[l])] = scalar_t(1);
    }
}

// The voxel keys of a tile's queries as a 0/1 mask in the layout of the score block
// (mask[g * up + u] = 1 iff query g sees the tile's entry u; zero padding), from the plan's key bits,
// so that each query's softmax runs over its whole padded score row (vector loops, no per-key
// indexing); built once per tile, shared by its heads.
template <typename scalar_t>
void key_mask(const Tiles& T, int64_t tile, int64_t gp, int64_t up, std::vector<scalar_t>& mask) {
  const int64_t e0 = T.kptr[tile], U = T.kptr[tile + 1] - e0, G = T.qptr[tile + 1] - T.qptr[tile];
  mask.assign(gp * up, scalar_t(0));
  for (int64_t g = 0; g < G; ++g) {
    scalar_t* row = mask.data() + g * up;
    const uint32_t* bits = T.key_bits + e0 * T.key_words + (g >> 5);
    const int sh = static_cast<int>(g & 31);
    if (T.key_words == 1)
      for (int64_t u = 0; u < U; ++u) row[u] = static_cast<scalar_t>(static_cast<int32_t>((bits[u] >> sh) & 1u));
    else
      for (int64_t u = 0; u < U; ++u) row[u] = static_cast<scalar_t>(static_cast<int32_t>((bits[u * T.key_words] >> sh) & 1u));
  }
}

// Tiles of at most kSmallTile queries (decoder queries are mostly alone in their tile) skip the
// blocked layouts: each query is scored against its own keys straight from the k / v / tables rows
// (vector dot products), so no tile block is gathered, transposed or padded for one query.
constexpr int64_t kSmallTile = 2;

// Scaled scores of the g-th query (query i) of a small tile with its own keys, from the rows.
template <typename scalar_t, int DH>
inline int64_t row_scores(const Tiles& T, const Operands<scalar_t>& op, const TileWindows& w, const TileRotation<scalar_t>& rot,
                          int64_t t, int64_t g, int64_t i, int64_t b, int64_t h, scalar_t* s) {
  const int64_t e0 = T.kptr[t], k0 = w.key_ptr[g], nk = w.key_ptr[g + 1] - k0;
  const int64_t b0 = w.slot_ptr[g], nb = w.slot_ptr[g + 1] - b0;
  const scalar_t* x = op.query(i, h);
  for (int64_t j = 0; j < nk; ++j) s[j] = op.scale * dot<scalar_t, DH>(x, op.key(T.krow[e0 + w.keys[k0 + j]], h), op.dh);
  for (int64_t j = 0; j < nb; ++j) {
    const int64_t slot = w.slots[b0 + j], l = T.slot_level[slot];
    s[nk + j] = op.scale * dot<scalar_t, DH>(rot.ql.data() + (l * rot.gp + g) * op.dh, op.table(b, slot, h), op.dh);
  }
  return nk;
}

// Per tile and head: scores S = Q K^T by one blocked product (and the background scores by one
// per level), per query the softmax over its own keys (the tile's other keys get weight 0) and
// background slots, then O = P V by another product.
template <typename scalar_t, int DH>
void forward_impl(const Tiles& T, const Operands<scalar_t>& op, int64_t B, scalar_t* out, scalar_t* lse, int n_threads) {
  const int64_t H = op.H, dh = op.dh, L = op.L;
  std::unique_ptr<BackgroundBlocks<scalar_t>> bb;
  if (op.background) bb = std::make_unique<BackgroundBlocks<scalar_t>>(T, op, B, false);
  split_heads(H, n_threads, [&](int64_t h0, int64_t h1) {
    TileWindows w;
    TileHead<scalar_t> th;
    TileRotation<scalar_t> rot;
    std::vector<scalar_t> s, s_bg, mask, kmask, level_sum(L), z;
    std::vector<uint8_t> level_any(L);
    for (int64_t t = 0; t < T.n_tiles; ++t) {
      const int64_t b = T.tbatch[t], q0 = T.qptr[t];
      const int64_t G = T.qptr[t + 1] - q0;
      w.load(T, t, G <= kSmallTile, op.background);
      const bool tile_bg = !w.slots.empty();
      if (tile_bg) levels_with_slots(T, w, level_any);
      if (G <= kSmallTile) {
        for (int64_t h = h0; h < h1; ++h) {
          if (tile_bg) rot.compute(T, op, w, t, h, round_up(G, kRows));
          for (int64_t g = 0; g < G; ++g) {
            const int64_t i = T.qids[q0 + g];
            const int64_t n = (w.key_ptr[g + 1] - w.key_ptr[g]) + (w.slot_ptr[g + 1] - w.slot_ptr[g]);
            scalar_t* o = out + (i * H + h) * dh;
            std::fill(o, o + dh, scalar_t(0));
            lse[i * H + h] = 0;
            if (n == 0) continue;
            s.resize(n);
            const int64_t nk = row_scores<scalar_t, DH>(T, op, w, rot, t, g, i, b, h, s.data());
            const scalar_t m = max8(s.data(), n);
            exp_shifted(s.data(), n, m);
            const scalar_t zg = sum8(s.data(), n);
            lse[i * H + h] = m + std::log(zg);
            for (int64_t j = 0; j < nk; ++j) axpy<scalar_t, DH>(o, s[j], op.value(T.krow[T.kptr[t] + w.keys[w.key_ptr[g] + j]], h), dh);
            if (n > nk) {
              level_sums(T, w.slots.data() + w.slot_ptr[g], s.data() + nk, n - nk, level_sum);
              for (int64_t l = 0; l < L; ++l)
                if (level_sum[l] != 0) axpy<scalar_t, DH>(o, level_sum[l], op.bg_value(b, l, h), dh);
            }
            const scalar_t inv = scalar_t(1) / zg;
            for (int64_t e = 0; e < dh; ++e) o[e] *= inv;
          }
        }
        continue;
      }
      if (tile_bg) background_mask(T, w, *bb, G, round_up(std::max<int64_t>(G, 1), kRows), mask);
      key_mask(T, t, round_up(std::max<int64_t>(G, 1), kRows), round_up(std::max<int64_t>(T.kptr[t + 1] - T.kptr[t], 1), kLanes), kmask);
      for (int64_t h = h0; h < h1; ++h) {
        th.template gather_queries<DH>(T, t, op.q, H, h, dh, th.qg);
        th.template gather_keys<DH>(T, t, op.k, H, h, dh, &th.kt, nullptr);
        th.template gather_keys<DH>(T, t, op.v, H, h, dh, nullptr, &th.vr);
        th.s.resize(th.gp * th.up);
        gemm_nt<scalar_t, DH>(th.qg.data(), th.kt.data(), th.gp, th.up, dh, th.s.data());
        if (tile_bg) {
          rot.compute(T, op, w, t, h, th.gp);
          background_scores<scalar_t, DH>(*bb, rot, level_any, b, h, s_bg);
        }
        th.p.resize(th.gp * th.up);  // rows written below; zero rows for padding and queries without keys
        std::fill(th.p.begin() + th.G * th.up, th.p.end(), scalar_t(0));
        th.og.resize(th.gp * dh);
        z.assign(th.gp, scalar_t(0));
        for (int64_t g = 0; g < th.G; ++g) {
          const int64_t i = T.qids[q0 + g];
          const int64_t nk = T.counts[i], n = nk + T.counts[T.n_queries + i], gp = th.gp, up = th.up;
          scalar_t* o = out + (i * H + h) * dh;
          std::fill(o, o + dh, scalar_t(0));
          if (n == 0) {  // no key: zero output (z[g] = 0 below)
            lse[i * H + h] = 0;
            std::fill_n(th.p.data() + g * th.up, th.up, scalar_t(0));
            continue;
          }
          // softmax over the query's voxel keys (whole masked score row) and its background slots
          // (whole masked rows of s_bg)
          const scalar_t* srow = th.s.data() + g * up;
          const scalar_t* krow_mask = kmask.data() + g * up;
          scalar_t m = nk ? op.scale * max_masked_rows(srow, krow_mask, up, -std::numeric_limits<scalar_t>::infinity())
                          : -std::numeric_limits<scalar_t>::infinity();
          if (n > nk)
            for (int64_t l = 0; l < L; ++l)
              if (level_any[l]) {
                const int64_t x = bb->off[l] * gp + g * bb->kp[l];
                m = std::max(m, op.scale * max_masked_rows(s_bg.data() + x, mask.data() + x, bb->kp[l], -std::numeric_limits<scalar_t>::infinity()));
              }
          scalar_t* prow = th.p.data() + g * up;
          exp_masked_to(srow, krow_mask, prow, up, op.scale, m);
          scalar_t zg = sum8(prow, up);
          if (n > nk)  // background values, weighted per level, straight into the output row
            for (int64_t l = 0; l < L; ++l)
              if (level_any[l]) {
                const int64_t x = bb->off[l] * gp + g * bb->kp[l];
                exp_masked(s_bg.data() + x, mask.data() + x, bb->kp[l], op.scale, m);
                const scalar_t ls = sum8(s_bg.data() + x, bb->kp[l]);
                zg += ls;
                if (ls != 0) axpy<scalar_t, DH>(o, ls, op.bg_value(b, l, h), dh);
              }
          z[g] = zg;
          lse[i * H + h] = m + std::log(zg);
        }
        gemm_nn<scalar_t, DH>(th.p.data(), th.up, 1, th.vr.data(), th.gp, th.up, dh, th.og.data());
        for (int64_t g = 0; g < th.G; ++g) {
          scalar_t* o = out + (T.qids[q0 + g] * H + h) * dh;
          const scalar_t* og = th.og.data() + g * dh;
          const scalar_t inv = z[g] > 0 ? scalar_t(1) / z[g] : scalar_t(0);
          for (int64_t e = 0; e < dh; ++e) o[e] = (o[e] + og[e]) * inv;
        }
      }
    }
  });
}

struct Grads {
  void *dq, *dk, *dv, *dtab, *dbv;  // null where not needed
  double* dfreqs;                   // [Hf, dh/2, D + 1] or null
};

// Per tile and head, from the saved log-sum-exp: S = Q K^T, P (the attention weights, zero off
// each query's window), GV = G V^T, dS = P (GV - delta) scale (delta = <grad, out> of the query and head, from the saved output); then dQ = dS K, dK += dS^T Q and
// dV += P^T G by blocked products. Background slots per level: dtables += dS_bg^T QL and
// dQL = dS_bg T, rotated back into dq (and the frequencies' gradient) per query.
template <typename scalar_t, int DH>
void backward_impl(const Tiles& T, const Operands<scalar_t>& op, int64_t B, const scalar_t* out_rows, const scalar_t* lse,
                   const scalar_t* grad, const Grads& G, int n_threads) {
  const int64_t H = op.H, dh = op.dh, L = op.L, K = op.K;
  scalar_t* dq = static_cast<scalar_t*>(G.dq);
  scalar_t* dk = static_cast<scalar_t*>(G.dk);
  scalar_t* dv = static_cast<scalar_t*>(G.dv);
  scalar_t* dtab = static_cast<scalar_t*>(G.dtab);
  scalar_t* dbv = static_cast<scalar_t*>(G.dbv);
  const bool rotation_grads = dq || G.dfreqs;
  std::unique_ptr<BackgroundBlocks<scalar_t>> bb;
  if (op.background) bb = std::make_unique<BackgroundBlocks<scalar_t>>(T, op, B, rotation_grads);
  // frequency gradients: one partial sum per thread (keyed by its first head; layout [Hf, D + 1, dh/2]),
  // added at the end
  const int64_t n_freq = G.dfreqs ? op.Hf * op.half * (T.dim + 1) : 0;
  std::vector<std::vector<double>> dfreq_parts(H);
  split_heads(H, n_threads, [&](int64_t h0, int64_t h1) {
    TileWindows w;
    TileHead<scalar_t> th;
    TileRotation<scalar_t> rot;
    std::vector<scalar_t> a, gv, s_bg, mask, kmask, level_sum(L), level_gv(L), delta_g;
    // the tables' gradient of this thread's heads, [B, h1 - h0, padded slots, dh] (the layout of
    // the background blocks): accumulated by the products, added into dtab once at the end
    std::vector<scalar_t> dtab_local(dtab && bb ? B * (h1 - h0) * bb->total * dh : 0, scalar_t(0));
    std::vector<uint8_t> level_any(L);
    double* dfreqs = nullptr;
    if (n_freq) {
      dfreq_parts[h0].assign(n_freq, 0.0);
      dfreqs = dfreq_parts[h0].data();
    }
    for (int64_t t = 0; t < T.n_tiles; ++t) {
      const int64_t b = T.tbatch[t], q0 = T.qptr[t];
      const int64_t G = T.qptr[t + 1] - q0;
      w.load(T, t, G <= kSmallTile, op.background);
      const bool tile_bg = !w.slots.empty();
      if (tile_bg) levels_with_slots(T, w, level_any);
      const bool tile_keys = T.kptr[t + 1] > T.kptr[t];
      if (G <= kSmallTile) {
        for (int64_t h = h0; h < h1; ++h) {
          if (tile_bg) {
            rot.compute(T, op, w, t, h, round_up(G, kRows));
            if (rotation_grads) rot.dql.assign(L * rot.gp * dh, scalar_t(0));
          }
          for (int64_t g = 0; g < G; ++g) {
            const int64_t i = T.qids[q0 + g];
            const int64_t k0 = w.key_ptr[g], b0 = w.slot_ptr[g];
            const int64_t nk = w.key_ptr[g + 1] - k0, n = nk + (w.slot_ptr[g + 1] - b0);
            if (n == 0) continue;
            a.resize(n);
            row_scores<scalar_t, DH>(T, op, w, rot, t, g, i, b, h, a.data());
            exp_shifted(a.data(), n, lse[i * H + h]);
            const scalar_t* gr = grad + (i * H + h) * dh;
            const scalar_t* x = op.query(i, h);
            const scalar_t delta = dot<scalar_t, DH>(gr, out_rows + (i * H + h) * dh, dh);  // <grad, out>
            scalar_t* dqi = dq ? dq + (i * H + h) * dh : nullptr;
            for (int64_t j = 0; j < nk; ++j) {
              const int64_t r = T.krow[T.kptr[t] + w.keys[k0 + j]];
              const scalar_t d = a[j] * (dot<scalar_t, DH>(gr, op.value(r, h), dh) - delta) * op.scale;
              if (dv) axpy<scalar_t, DH>(dv + (r * H + h) * dh, a[j], gr, dh);
              if (dk) axpy<scalar_t, DH>(dk + (r * H + h) * dh, d, x, dh);
              if (dqi) axpy<scalar_t, DH>(dqi, d, op.key(r, h), dh);
            }
            if (n == nk) continue;
            for (int64_t l = 0; l < L; ++l) level_gv[l] = dot<scalar_t, DH>(gr, op.bg_value(b, l, h), dh);
            level_sums(T, w.slots.data() + b0, a.data() + nk, n - nk, level_sum);
            if (dbv)
              for (int64_t l = 0; l < L; ++l)
                if (level_sum[l] != 0) axpy<scalar_t, DH>(dbv + ((b * L + l) * H + h) * dh, level_sum[l], gr, dh);
            for (int64_t j = nk; j < n; ++j) {
              const int64_t slot = w.slots[b0 + j - nk], l = T.slot_level[slot];
              const scalar_t d = a[j] * (level_gv[l] - delta) * op.scale;
              if (dtab) axpy<scalar_t, DH>(dtab + ((b * K + slot) * H + h) * dh, d, rot.ql.data() + (l * rot.gp + g) * dh, dh);
              if (rotation_grads) axpy<scalar_t, DH>(rot.dql.data() + (l * rot.gp + g) * dh, d, op.table(b, slot, h), dh);
            }
            if (rotation_grads) rot.backward(T, op, g, h, dqi, dfreqs);
          }
        }
        continue;
      }
      if (tile_bg) background_mask(T, w, *bb, G, round_up(std::max<int64_t>(G, 1), kRows), mask);
      key_mask(T, t, round_up(std::max<int64_t>(G, 1), kRows), round_up(std::max<int64_t>(T.kptr[t + 1] - T.kptr[t], 1), kLanes), kmask);
      for (int64_t h = h0; h < h1; ++h) {
        th.template gather_queries<DH>(T, t, op.q, H, h, dh, th.qg);
        th.template gather_gradients<DH>(T, t, grad, out_rows, dq, H, h, dh, th.gg, delta_g);
        th.template gather_keys<DH>(T, t, op.k, H, h, dh, &th.kt, dq ? &th.kr : nullptr);
        th.template gather_keys<DH>(T, t, op.v, H, h, dh, &th.vt, nullptr);
        const int64_t gp = th.gp, up = th.up;
        th.s.resize(gp * up);
        gemm_nt<scalar_t, DH>(th.qg.data(), th.kt.data(), gp, up, dh, th.s.data());
        gv.resize(gp * up);
        gemm_nt<scalar_t, DH>(th.gg.data(), th.vt.data(), gp, up, dh, gv.data());
        th.p.resize(gp * up);  // rows written below; zero rows for padding and queries without voxel keys
        th.ds.resize(gp * up);
        std::fill(th.p.begin() + th.G * up, th.p.end(), scalar_t(0));
        std::fill(th.ds.begin() + th.G * up, th.ds.end(), scalar_t(0));
        if (tile_bg) {
          rot.compute(T, op, w, t, h, gp);
          background_scores<scalar_t, DH>(*bb, rot, level_any, b, h, s_bg);  // turned into dS_bg in place below
        }
        // row g of every background block: dS_bg of query g, zero where it has no background slot
        auto zero_bg_rows = [&](int64_t g) {
          for (int64_t l = 0; l < L; ++l)
            if (level_any[l]) std::fill_n(s_bg.data() + bb->off[l] * gp + g * bb->kp[l], bb->kp[l], scalar_t(0));
        };
        for (int64_t g = 0; g < th.G; ++g) {
          const int64_t i = T.qids[q0 + g];
          const int64_t nk = T.counts[i], nb = w.slot_ptr[g + 1] - w.slot_ptr[g];
          if (nb == 0 && tile_bg) zero_bg_rows(g);
          if (nk == 0) {
            std::fill_n(th.p.data() + g * up, up, scalar_t(0));
            std::fill_n(th.ds.data() + g * up, up, scalar_t(0));
          }
          if (nk + nb == 0) continue;
          const scalar_t* gr = th.gg.data() + g * dh;
          const scalar_t delta = delta_g[g];  // <grad, out> = sum over keys of a <grad, v>
          if (nk) {  // the attention weights (zero off the query's windows) and dS, whole padded rows
            scalar_t* prow = th.p.data() + g * up;
            scalar_t* dsrow = th.ds.data() + g * up;
            const scalar_t* gvrow = gv.data() + g * up;
            exp_masked_to(th.s.data() + g * up, kmask.data() + g * up, prow, up, op.scale, lse[i * H + h]);
            for (int64_t u = 0; u < up; ++u) dsrow[u] = prow[u] * (gvrow[u] - delta) * op.scale;
          }
          if (nb == 0) continue;
          for (int64_t l = 0; l < L; ++l) {
            level_sum[l] = 0;
            if (!level_any[l]) continue;
            scalar_t* row = s_bg.data() + bb->off[l] * gp + g * bb->kp[l];
            exp_masked(row, mask.data() + bb->off[l] * gp + g * bb->kp[l], bb->kp[l], op.scale, lse[i * H + h]);
            level_sum[l] = sum8(row, bb->kp[l]);
            const scalar_t f = (dot<scalar_t, DH>(gr, op.bg_value(b, l, h), dh) - delta) * op.scale;
            for (int64_t kk = 0; kk < bb->kp[l]; ++kk) row[kk] *= f;
          }
          if (dbv)
            for (int64_t l = 0; l < L; ++l)
              if (level_sum[l] != 0) axpy<scalar_t, DH>(dbv + ((b * L + l) * H + h) * dh, level_sum[l], gr, dh);
        }
        if (tile_bg) {
          for (int64_t g = th.G; g < gp; ++g) zero_bg_rows(g);
          if (rotation_grads) rot.dql.assign(L * gp * dh, scalar_t(0));
          for (int64_t l = 0; l < L; ++l) {
            if (!level_any[l]) continue;
            const int64_t kp = bb->kp[l], nl = (l + 1 < L ? bb->k0[l + 1] : K) - bb->k0[l];
            const scalar_t* dsl = s_bg.data() + bb->off[l] * gp;  // dS_bg of level l, [gp, kp]
            if (dtab)  // dtables_l += dS_bg^T QL (rows are slots, A read transposed), into this thread's padded copy
              gemm_nn<scalar_t, DH, true>(dsl, 1, kp, rot.ql.data() + l * gp * dh, kp, gp, dh,
                                          dtab_local.data() + (b * (h1 - h0) + h - h0) * bb->total * dh + bb->off[l] * dh);
            if (rotation_grads)  // dQL_l = dS_bg T_l
              gemm_nn<scalar_t, DH>(dsl, kp, 1, bb->tr.data() + bb->base(b, h, l), gp, kp, dh, rot.dql.data() + l * gp * dh);
          }
          if (rotation_grads) {  // the query gradient through the rotations, into the tile's dq rows
            if (dq) th.og.assign(gp * dh, scalar_t(0));
            for (int64_t g = 0; g < th.G; ++g)
              if (w.slot_ptr[g + 1] > w.slot_ptr[g]) rot.backward(T, op, g, h, dq ? th.og.data() + g * dh : nullptr, dfreqs);
          }
        }
        const bool dq_rot = dq && tile_bg && rotation_grads;  // th.og holds the rotations' part
        if (dq && (tile_keys || dq_rot)) {  // dQ = dS K (+ that part), added into dq once per row
          th.og.resize(gp * dh);
          if (tile_keys && dq_rot)
            gemm_nn<scalar_t, DH, true>(th.ds.data(), up, 1, th.kr.data(), gp, up, dh, th.og.data());
          else if (tile_keys)
            gemm_nn<scalar_t, DH>(th.ds.data(), up, 1, th.kr.data(), gp, up, dh, th.og.data());
          for (int64_t g = 0; g < th.G; ++g) {
            scalar_t* d = dq + (T.qids[q0 + g] * H + h) * dh;
            const scalar_t* og = th.og.data() + g * dh;
            for (int64_t e = 0; e < dh; ++e) d[e] += og[e];
          }
        }
        if (!tile_keys) continue;
        if (dk) {  // dS^T Q: rows are keys, A read transposed
          th.dkr.resize(up * dh);
          gemm_nn<scalar_t, DH>(th.ds.data(), 1, up, th.qg.data(), up, gp, dh, th.dkr.data());
          th.scatter_keys(T, t, th.dkr, H, h, dh, dk);
        }
        if (dv) {
          th.dvr.resize(up * dh);
          gemm_nn<scalar_t, DH>(th.p.data(), 1, up, th.gg.data(), up, gp, dh, th.dvr.data());
          th.scatter_keys(T, t, th.dvr, H, h, dh, dv);
        }
      }
    }
    if (!dtab_local.empty())  // rows (b, slot, h) of this thread's heads: no other thread writes them
      for (int64_t b = 0; b < B; ++b)
        for (int64_t h = h0; h < h1; ++h)
          for (int64_t l = 0; l < L; ++l) {
            const scalar_t* src = dtab_local.data() + ((b * (h1 - h0) + h - h0) * bb->total + bb->off[l]) * dh;
            const int64_t nl = (l + 1 < L ? bb->k0[l + 1] : K) - bb->k0[l];
            for (int64_t kk = 0; kk < nl; ++kk) {
              scalar_t* d = dtab + ((b * K + bb->k0[l] + kk) * H + h) * dh;
              for (int64_t e = 0; e < dh; ++e) d[e] += src[kk * dh + e];
            }
          }
  });
  const int64_t half = op.half, D1 = T.dim + 1;
  for (const auto& part : dfreq_parts)  // [Hf, D + 1, half] -> [Hf, half, D + 1]
    if (!part.empty())
      for (int64_t hf = 0; hf < op.Hf; ++hf)
        for (int64_t a = 0; a < D1; ++a)
          for (int64_t j = 0; j < half; ++j) G.dfreqs[(hf * half + j) * D1 + a] += part[(hf * D1 + a) * half + j];
}

#define NBHD_BY_DH(dh, CALL) \
  switch (dh) {              \
    case 16: CALL(16); break; \
    case 32: CALL(32); break; \
    case 64: CALL(64); break; \
    default: CALL(0);        \
  }

void check_operands(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::vector<at::Tensor>& rotation,
                    const at::Tensor& tables, const at::Tensor& bg_v, const Tiles& T) {
  TORCH_CHECK(q.device().is_cpu() && q.dim() == 3 && q.is_contiguous() && q.size(2) % 2 == 0,
              "q must be a contiguous CPU [Q, H, dh] with even dh");
  TORCH_CHECK(q.size(0) == T.n_queries, "q rows must match the plan's queries");
  for (const at::Tensor* x : {&k, &v}) {
    TORCH_CHECK(x->scalar_type() == q.scalar_type() && x->is_contiguous() && x->dim() == 3 &&
                    x->size(1) == q.size(1) && x->size(2) == q.size(2), "k/v must be contiguous [N, H, dh] of q's dtype");
  }
  TORCH_CHECK(tables.defined() == bg_v.defined() && tables.defined() == !rotation.empty(),
              "rotation/tables/bg_v: all or none");
  if (!tables.defined()) return;
  TORCH_CHECK(rotation.size() == 4, "rotation: [cos, sin, rows, full]");
  for (int j = 0; j < 2; ++j)
    TORCH_CHECK(rotation[j].scalar_type() == q.scalar_type() && rotation[j].is_contiguous() && rotation[j].dim() == 3 &&
                    (rotation[j].size(1) == 1 || rotation[j].size(1) == q.size(1)) && rotation[j].size(2) == q.size(2) / 2,
                "rotation cos/sin must be contiguous [R, 1 or H, dh/2] of q's dtype");
  TORCH_CHECK(rotation[2].scalar_type() == at::kLong && rotation[2].is_contiguous() &&
                  rotation[2].numel() == T.n_queries * T.n_levels * T.dim,
              "rotation rows must be int64 [Q, L, D]");
  TORCH_CHECK(rotation[3].scalar_type() == at::kLong && rotation[3].numel() == T.dim, "rotation full must be int64 [D]");
  TORCH_CHECK(tables.scalar_type() == q.scalar_type() && tables.is_contiguous() && tables.dim() == 4 &&
                  tables.size(1) == T.n_slots && tables.size(2) == q.size(1) && tables.size(3) == q.size(2),
              "tables must be [B, K, H, dh]");
  TORCH_CHECK(bg_v.scalar_type() == q.scalar_type() && bg_v.is_contiguous() &&
                  bg_v.sizes() == at::IntArrayRef({tables.size(0), T.n_levels, q.size(1), q.size(2)}), "bg_v must be [B, L, H, dh]");
}

}  // namespace

#define NBHD_FORWARD(DH) \
  forward_impl<scalar_t, DH>(T, op, n_items, out.data_ptr<scalar_t>(), lse.data_ptr<scalar_t>(), static_cast<int>(n_threads))
#define NBHD_BACKWARD(DH)                                                                                    \
  backward_impl<scalar_t, DH>(T, op, n_items, out.data_ptr<scalar_t>(), lse.data_ptr<scalar_t>(), grad.data_ptr<scalar_t>(), \
                              G, static_cast<int>(n_threads))

// The plan's windows, enumerated once from the cells (TileWindows::find) and reused by every forward
// and backward on the plan: key bits int32 [E, W] (W = ceil(largest tile / 32); bit g % 32 of word
// g / 32 of entry e: the tile's g-th query sees entry e), slot bits int32 [Q, SW] (SW = ceil(K / 32)
// with background, else 0; bit k: slot k is a background slot of the query), counts int64 [2, Q]
// (voxel keys and background slots of each query). Threads take contiguous runs of tiles (every
// tile writes only its own entries and queries).
std::vector<at::Tensor> neighborhood_windows(const std::vector<at::Tensor>& tiles, bool background, int64_t n_threads) {
  const Tiles T = make_tiles(tiles, false);
  int64_t most = 1;
  for (int64_t t = 0; t < T.n_tiles; ++t) most = std::max(most, T.qptr[t + 1] - T.qptr[t]);
  const int64_t W = (most + 31) / 32, SW = background ? (T.n_slots + 31) / 32 : 0;
  auto key_bits = at::zeros({tiles[3].size(0), W}, at::kInt);
  auto slot_bits = at::zeros({T.n_queries, SW}, at::kInt);
  auto counts = at::zeros({2, T.n_queries}, at::kLong);
  uint32_t* kb = reinterpret_cast<uint32_t*>(key_bits.data_ptr<int32_t>());
  uint32_t* sb = reinterpret_cast<uint32_t*>(slot_bits.data_ptr<int32_t>());
  int64_t* c = counts.data_ptr<int64_t>();
  // Without background: per entry, the bits of all the tile's queries at once, from the queries'
  // window bounds laid out [level, axis, query] (loops over the queries, no per-query key list).
  auto run_keys = [&](int64_t t0, int64_t t1) {
    const int64_t L = T.n_levels, D = T.dim, GW = 32 * W;
    std::vector<int64_t> lo(L * D * GW), hi(L * D * GW), cnt(GW);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t q0 = T.qptr[t], G = T.qptr[t + 1] - q0;
      for (int64_t l = 0; l < L; ++l)
        for (int64_t a = 0; a < D; ++a) {
          int64_t* bl = lo.data() + (l * D + a) * GW;
          int64_t* bh = hi.data() + (l * D + a) * GW;
          const int64_t r = T.radius[l];
          for (int64_t g = 0; g < G; ++g) {
            const int64_t cc = T.centres[(T.qids[q0 + g] * L + l) * D + a];
            bl[g] = cc - r;
            bh[g] = cc + r;
          }
          for (int64_t g = G; g < GW; ++g) {  // no query: an empty window
            bl[g] = 1;
            bh[g] = 0;
          }
        }
      std::fill(cnt.begin(), cnt.end(), 0);
      for (int64_t e = T.kptr[t]; e < T.kptr[t + 1]; ++e) {
        const int64_t row = T.krow[e], l = T.klev[row];
        const int64_t* kc = T.kcell + row * D;
        const int64_t* bl = lo.data() + l * D * GW;
        const int64_t* bh = hi.data() + l * D * GW;
        for (int64_t word = 0; word * 32 < G; ++word) {
          uint32_t bits = 0;
          const int64_t j1 = std::min<int64_t>(32, G - word * 32);
          for (int64_t j = 0; j < j1; ++j) {
            const int64_t g = word * 32 + j;
            bool inside = (bl[g] <= kc[0]) & (kc[0] <= bh[g]);
            for (int64_t a = 1; a < D; ++a) inside = inside & (bl[a * GW + g] <= kc[a]) & (kc[a] <= bh[a * GW + g]);
            bits |= static_cast<uint32_t>(inside) << j;
            cnt[g] += inside;
          }
          kb[e * W + word] = bits;
        }
      }
      for (int64_t g = 0; g < G; ++g) c[T.qids[q0 + g]] = cnt[g];
    }
  };
  auto run = [&](int64_t t0, int64_t t1) {
    if (!background) return run_keys(t0, t1);
    TileWindows w;
    for (int64_t t = t0; t < t1; ++t) {
      w.find(T, t, background);
      const int64_t e0 = T.kptr[t];
      for (int64_t g = 0; g + T.qptr[t] < T.qptr[t + 1]; ++g) {
        const int64_t i = T.qids[T.qptr[t] + g];
        c[i] = w.key_ptr[g + 1] - w.key_ptr[g];
        c[T.n_queries + i] = w.slot_ptr[g + 1] - w.slot_ptr[g];
        for (int64_t j = w.key_ptr[g]; j < w.key_ptr[g + 1]; ++j) kb[(e0 + w.keys[j]) * W + (g >> 5)] |= 1u << (g & 31);
        for (int64_t j = w.slot_ptr[g]; j < w.slot_ptr[g + 1]; ++j) sb[i * SW + (w.slots[j] >> 5)] |= 1u << (w.slots[j] & 31);
      }
    }
  };
  const int parts = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(n_threads, T.n_tiles / 64)));
  std::vector<std::thread> threads;
  for (int p = 1; p < parts; ++p) threads.emplace_back(run, p * T.n_tiles / parts, (p + 1) * T.n_tiles / parts);
  run(0, T.n_tiles / parts);
  for (auto& t : threads) t.join();
  return {key_bits, slot_bits, counts};
}

// rotation: [cos, sin, rows, full] of the window-centre rotations (see Operands), empty without
// background (then tables and bg_v are None). Returns (out [Q, H, dh], log-sum-exp [Q, H], and per
// query its number of voxel keys and of background slots, int64 [Q] each).
std::vector<at::Tensor> neighborhood_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                             const std::vector<at::Tensor>& rotation, const c10::optional<at::Tensor>& tables,
                                             const c10::optional<at::Tensor>& bg_v, const std::vector<at::Tensor>& tiles,
                                             double scale, int64_t n_threads) {
  const Tiles T = make_tiles(tiles);
  const at::Tensor tabt = tables.value_or(at::Tensor()), bvt = bg_v.value_or(at::Tensor());
  check_operands(q, k, v, rotation, tabt, bvt, T);
  auto out = at::empty_like(q);
  auto lse = at::empty({q.size(0), q.size(1)}, q.options());
  const at::Tensor counts = tiles[15].clone();  // the plan's (neighborhood_windows)
  const int64_t n_items = tabt.defined() ? tabt.size(0) : 0;
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "neighborhood_forward", [&] {
    const Operands<scalar_t> op(q, k, v, rotation, tabt, bvt, T, scale);
    NBHD_BY_DH(q.size(2), NBHD_FORWARD)
  });
  return {out, lse, counts[0], counts[1]};
}

// Gradients of (q, k, v, frequencies (float64 [Hf, dh/2, D + 1], through the window-centre
// rotations only), tables, bg_v); undefined where needs[j] is false or without background.
std::vector<at::Tensor> neighborhood_backward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                              const std::vector<at::Tensor>& rotation, const c10::optional<at::Tensor>& tables,
                                              const c10::optional<at::Tensor>& bg_v, const std::vector<at::Tensor>& tiles,
                                              const at::Tensor& out, const at::Tensor& lse, const at::Tensor& grad,
                                              double scale, std::vector<bool> needs, int64_t n_threads) {
  const Tiles T = make_tiles(tiles);
  const at::Tensor tabt = tables.value_or(at::Tensor()), bvt = bg_v.value_or(at::Tensor());
  check_operands(q, k, v, rotation, tabt, bvt, T);
  TORCH_CHECK(needs.size() == 6, "needs: 6 flags");
  TORCH_CHECK(grad.sizes() == q.sizes() && grad.is_contiguous() && grad.scalar_type() == q.scalar_type(), "grad must be like q");
  TORCH_CHECK(out.sizes() == q.sizes() && out.is_contiguous() && lse.is_contiguous(), "out/lse must be the forward's");
  const bool bg = tabt.defined();
  const int64_t n_items = bg ? tabt.size(0) : 0;
  std::vector<at::Tensor> g(6);
  for (int j = 0; j < 3; ++j)
    if (needs[j]) g[j] = at::zeros_like(j == 0 ? q : (j == 1 ? k : v));
  if (bg && needs[3])
    g[3] = at::zeros({rotation[0].size(1), q.size(2) / 2, T.dim + 1}, q.options().dtype(at::kDouble));
  if (bg && needs[4]) g[4] = at::zeros_like(tabt);
  if (bg && needs[5]) g[5] = at::zeros_like(bvt);
  auto ptr = [](const at::Tensor& t) -> void* { return t.defined() ? t.data_ptr() : nullptr; };
  const Grads G{ptr(g[0]), ptr(g[1]), ptr(g[2]), ptr(g[4]), ptr(g[5]), static_cast<double*>(ptr(g[3]))};
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "neighborhood_backward", [&] {
    const Operands<scalar_t> op(q, k, v, rotation, tabt, bvt, T, scale);
    NBHD_BY_DH(q.size(2), NBHD_BACKWARD)
  });
  return g;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("simd_isa", [] { return std::string(sparse_msda_simd::kIsa); }, "the vector ISA this build targets (simd.h)");
  m.def("neighborhood_windows", &neighborhood_windows, "the plan's windows: key bits, background slot bits, counts (CPU)");
  m.def("neighborhood_forward", &neighborhood_forward, "fused multi-level sparse neighborhood attention (CPU)");
  m.def("neighborhood_backward", &neighborhood_backward, "its backward (CPU)");
}
