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
// Non-finite positions follow F.grid_sample: a sample with a NaN or infinite coordinate contributes
// NaN to its output row, touches no table row (no table gradient), and gets NaN position and weight
// gradients. Base cells are clamped to [-2, 2**40] before the integer conversion (outside every level).
#include <torch/extension.h>

#include "simd.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <thread>
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

// Corners of sample (s, j): rows (-1: holds nothing), weights c_k and per-axis fractions. Returns
// false for a non-finite sample (then every row is -1 and every weight 0).
template <typename scalar_t, int DIM>
inline bool corners(const Layout& L, const scalar_t* pos, const int32_t* crow, int64_t s, int64_t j,
                    int64_t* rows, scalar_t* w, scalar_t* frac) {
  constexpr int K = 1 << DIM;
  int64_t base[DIM];
  bool finite = true;
  for (int d = 0; d < DIM; ++d) {
    scalar_t shifted = pos[d] - scalar_t(0.5);
    scalar_t b = std::floor(shifted);
    finite = finite && std::isfinite(pos[d]);
    base[d] = static_cast<int64_t>(std::isnan(b) ? scalar_t(-2) : std::min(std::max(b, scalar_t(-2)), scalar_t(1LL << 40)));
    frac[d] = shifted - b;
  }
  if (!finite) {
    for (int d = 0; d < DIM; ++d) frac[d] = 0;
    for (int k = 0; k < K; ++k) {
      rows[k] = -1;
      w[k] = 0;
    }
    return false;
  }
  const int64_t h = L.head[s * L.hs0 + j * L.hs1];
  for (int k = 0; k < K; ++k) {
    scalar_t wk = 1;
    for (int d = 0; d < DIM; ++d) wk *= ((k >> (DIM - 1 - d)) & 1) ? frac[d] : scalar_t(1) - frac[d];
    w[k] = wk;
    const int32_t r = crow[k];
    if (r >= 0) {
      rows[k] = static_cast<int64_t>(r) * L.n_heads + h;
      continue;
    }
    rows[k] = -1;
    if (L.bg_offset < 0) continue;
    const int64_t l = L.level[s * L.ls0 + j * L.ls1];
    if (l < 0 || l >= L.n_levels) continue;
    bool inside = true;
    for (int d = 0; d < DIM; ++d) {
      const int64_t c = base[d] + ((k >> (DIM - 1 - d)) & 1);
      inside = inside && c >= 0 && c < L.shapes[l * DIM + d];
    }
    if (inside) rows[k] = L.bg_offset + (L.batch[s * L.bs0 + j * L.bs1] * L.n_levels + l) * L.n_heads + h;
  }
  return true;
}

// The per-sample inputs of both passes: positions [S, J, D], attention weights [S, J], base-cell
// ids [S, J] and the corner table, read through the layout.
template <typename scalar_t, int DIM>
struct SampleInputs {
  const Layout& L;
  const scalar_t* pos;
  const scalar_t* att;
  const int32_t* id;
  const int32_t* cr;
  int64_t S, J;

  SampleInputs(const at::Tensor& positions, const at::Tensor& weights, const at::Tensor& ids,
               const at::Tensor& corner_rows, const Layout& layout)
      : L(layout), pos(positions.data_ptr<scalar_t>()), att(weights.data_ptr<scalar_t>()),
        id(ids.data_ptr<int32_t>()), cr(corner_rows.data_ptr<int32_t>()), S(positions.size(0)),
        J(positions.size(1)) {}

  // Corners of (s, j) into rows / w / frac (see corners()); returns its attention weight, and in
  // finite whether the position is finite.
  scalar_t at(int64_t s, int64_t j, int64_t* rows, scalar_t* w, scalar_t* frac, bool& finite) const {
    const int64_t sj = s * J + j;
    finite = corners<scalar_t, DIM>(L, pos + sj * DIM, cr + static_cast<int64_t>(id[sj]) * (1 << DIM), s, j, rows, w, frac);
    return att[sj];
  }
};

// DH > 0: the head dim at compile time (fully unrolled, vectorised row loops); DH == 0: dh at run time.
template <typename scalar_t, int DIM, int DH>
void forward_impl(const at::Tensor& table, const at::Tensor& positions, const at::Tensor& weights,
                  const at::Tensor& ids, const at::Tensor& corner_rows, const Layout& L, at::Tensor& out,
                  int n_threads) {
  constexpr int K = 1 << DIM;
  const SampleInputs<scalar_t, DIM> in(positions, weights, ids, corner_rows, L);
  const int64_t S = in.S, J = in.J;
  const int64_t dh = DH > 0 ? DH : table.size(1);
  const scalar_t* tab = table.data_ptr<scalar_t>();
  scalar_t* o = out.data_ptr<scalar_t>();
  parallel_range(S, n_threads, [&](int64_t s0, int64_t s1, int) {
    int64_t rows[K];
    scalar_t w[K], frac[DIM];
    for (int64_t s = s0; s < s1; ++s) {
      scalar_t* os = o + s * dh;
      std::fill(os, os + dh, scalar_t(0));
      for (int64_t j = 0; j < J; ++j) {
        bool finite;
        const scalar_t a = in.at(s, j, rows, w, frac, finite);
        if (!finite) std::fill(os, os + dh, std::numeric_limits<scalar_t>::quiet_NaN());  // F.grid_sample
        for (int k = 0; k < K; ++k) {
          if (rows[k] < 0) continue;
          const scalar_t c = a * w[k];
          const scalar_t* t = tab + rows[k] * dh;
          for (int64_t e = 0; e < (DH > 0 ? DH : dh); ++e) os[e] += c * t[e];
        }
      }
    }
  });
}

template <typename scalar_t, int DIM, int DH>
void backward_impl(const at::Tensor& table, const at::Tensor& positions, const at::Tensor& weights,
                   const at::Tensor& ids, const at::Tensor& corner_rows, const Layout& L, const at::Tensor& grad_out,
                   at::Tensor& g_table, at::Tensor& g_pos, at::Tensor& g_w, bool need_table, bool need_pos,
                   bool need_w, int n_threads, int64_t max_table_copies) {
  constexpr int K = 1 << DIM;
  const SampleInputs<scalar_t, DIM> in(positions, weights, ids, corner_rows, L);
  const int64_t S = in.S, J = in.J;
  const int64_t dh = DH > 0 ? DH : table.size(1);
  const scalar_t* tab = table.data_ptr<scalar_t>();
  const scalar_t* go = grad_out.data_ptr<scalar_t>();
  scalar_t* gp = need_pos ? g_pos.data_ptr<scalar_t>() : nullptr;
  scalar_t* gw = need_w ? g_w.data_ptr<scalar_t>() : nullptr;
  const bool need_dots = need_pos || need_w;
  // One (s, j): corners, value/gradient dots, the gradients of a and of the position, and (gt not
  // null) the scatter of a * c_k * grad_out[s] into the table-gradient rows gt.
  auto process = [&](int64_t s, int64_t j, scalar_t* gt) {
    int64_t rows[K];
    scalar_t w[K], frac[DIM], dots[K];
    const scalar_t* g = go + s * dh;
    const int64_t sj = s * J + j;
    bool finite;
    const scalar_t a = in.at(s, j, rows, w, frac, finite);
    scalar_t gwj = finite ? scalar_t(0) : std::numeric_limits<scalar_t>::quiet_NaN();
    for (int k = 0; k < K; ++k) {
      dots[k] = 0;
      if (rows[k] < 0) continue;
      if (need_dots) {
        const scalar_t* t = tab + rows[k] * dh;
        scalar_t acc = 0;
        for (int64_t e = 0; e < (DH > 0 ? DH : dh); ++e) acc += t[e] * g[e];
        dots[k] = acc;
        gwj += w[k] * acc;
      }
      if (gt != nullptr) {
        const scalar_t c = a * w[k];
        scalar_t* t = gt + rows[k] * dh;
        for (int64_t e = 0; e < (DH > 0 ? DH : dh); ++e) t[e] += c * g[e];
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
  int parts = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(n_threads, S / 256)));
  scalar_t* g_table_ptr = need_table ? g_table.data_ptr<scalar_t>() : nullptr;
  if (need_table && parts > 1 && L.n_heads >= parts) {
    // Table gradient without copies or atomics: every row written for a sample of head h is
    // r * n_heads + h (voxel or background row), so thread t takes the (s, j) of heads h with
    // h % parts == t and no two threads ever write the same row.
    std::vector<std::thread> threads;
    auto by_head = [&](int t) {
      for (int64_t s = 0; s < S; ++s) {
        if (L.hs1 == 0 && L.head[s * L.hs0] % parts != t) continue;  // one head per sample
        for (int64_t j = 0; j < J; ++j)
          if (L.head[s * L.hs0 + j * L.hs1] % parts == t) process(s, j, g_table_ptr);
      }
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
    for (int64_t s = s0; s < s1; ++s)
      for (int64_t j = 0; j < J; ++j) process(s, j, gt);
  });
  for (auto& t : partial) g_table.add_(t);
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

#define SPARSE_SAMPLE_FORWARD(D, DH) \
  forward_impl<scalar_t, D, DH>(table, positions, weights, ids, corner_rows, L, out, static_cast<int>(n_threads))
#define SPARSE_SAMPLE_BACKWARD(D, DH)                                                                         \
  backward_impl<scalar_t, D, DH>(table, positions, weights, ids, corner_rows, L, grad_out, g_table, g_pos, g_w, \
                                 need_table, need_pos, need_w, static_cast<int>(n_threads), max_table_copies)

at::Tensor sample_forward(const at::Tensor& table, const at::Tensor& positions, const at::Tensor& weights,
                          const at::Tensor& ids, const at::Tensor& corner_rows, const at::Tensor& batch,
                          const at::Tensor& level, const at::Tensor& head, const at::Tensor& shapes, int64_t n_heads,
                          int64_t bg_offset, int64_t n_threads) {
  check_inputs(table, positions, weights, ids, corner_rows);
  auto out = at::empty({positions.size(0), table.size(1)}, table.options());
  const Layout L = make_layout(batch, level, head, shapes, n_heads, shapes.size(0), bg_offset);
  AT_DISPATCH_FLOATING_TYPES(table.scalar_type(), "sample_forward", [&] {
    SPARSE_SAMPLE_DISPATCH(positions.size(2), table.size(1), SPARSE_SAMPLE_FORWARD)
  });
  return out;
}

std::vector<at::Tensor> sample_backward(const at::Tensor& table, const at::Tensor& positions,
                                        const at::Tensor& weights, const at::Tensor& ids,
                                        const at::Tensor& corner_rows, const at::Tensor& batch,
                                        const at::Tensor& level, const at::Tensor& head, const at::Tensor& shapes,
                                        int64_t n_heads, int64_t bg_offset, const at::Tensor& grad_out,
                                        bool need_table, bool need_pos, bool need_w, int64_t n_threads,
                                        int64_t max_table_copies) {
  check_inputs(table, positions, weights, ids, corner_rows);
  TORCH_CHECK(grad_out.is_contiguous() && grad_out.scalar_type() == table.scalar_type(), "grad_out: contiguous, table dtype");
  auto g_table = need_table ? at::zeros_like(table) : at::Tensor();
  auto g_pos = need_pos ? at::empty_like(positions) : at::Tensor();
  auto g_w = need_w ? at::empty_like(weights) : at::Tensor();
  const Layout L = make_layout(batch, level, head, shapes, n_heads, shapes.size(0), bg_offset);
  AT_DISPATCH_FLOATING_TYPES(table.scalar_type(), "sample_backward", [&] {
    SPARSE_SAMPLE_DISPATCH(positions.size(2), table.size(1), SPARSE_SAMPLE_BACKWARD)
  });
  return {g_table, g_pos, g_w};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("simd_isa", [] { return std::string(sparse_msda_simd::kIsa); }, "the vector ISA this build targets (simd.h)");
  m.def("sample_forward", &sample_forward, "fused sparse bilinear/trilinear weighted gather (CPU)");
  m.def("sample_backward", &sample_backward, "its backward (CPU)");
}
