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
// batch / level / head are int64 [S, J] tensors read through their strides (broadcast views welcome).
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <thread>
#include <vector>

namespace {

constexpr int kMaxDim = 3;

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

// Corners of sample (s, j): rows (-1: holds nothing), weights c_k and per-axis factors.
template <typename scalar_t>
inline int corners(const Layout& L, const scalar_t* pos, const int32_t* crow, int64_t s, int64_t j,
                   int64_t* rows, scalar_t* w, scalar_t* frac) {
  const int dim = L.dim, K = 1 << dim;
  int64_t base[kMaxDim];
  for (int d = 0; d < dim; ++d) {
    scalar_t shifted = pos[d] - scalar_t(0.5);
    scalar_t b = std::floor(shifted);
    base[d] = static_cast<int64_t>(b);
    frac[d] = shifted - b;
  }
  const int64_t h = L.head[s * L.hs0 + j * L.hs1];
  const int64_t l = L.level[s * L.ls0 + j * L.ls1];
  for (int k = 0; k < K; ++k) {
    scalar_t wk = 1;
    for (int d = 0; d < dim; ++d) {
      const int bit = (k >> (dim - 1 - d)) & 1;
      wk *= bit ? frac[d] : scalar_t(1) - frac[d];
    }
    w[k] = wk;
    const int32_t r = crow[k];
    if (r >= 0) {
      rows[k] = static_cast<int64_t>(r) * L.n_heads + h;
    } else if (L.bg_offset >= 0 && l >= 0 && l < L.n_levels) {
      bool inside = true;
      for (int d = 0; d < dim; ++d) {
        const int64_t c = base[d] + ((k >> (dim - 1 - d)) & 1);
        inside = inside && c >= 0 && c < L.shapes[l * dim + d];
      }
      const int64_t b = L.batch[s * L.bs0 + j * L.bs1];
      rows[k] = inside ? L.bg_offset + (b * L.n_levels + l) * L.n_heads + h : -1;
    } else {
      rows[k] = -1;
    }
  }
  return K;
}

template <typename scalar_t>
void forward_impl(const at::Tensor& table, const at::Tensor& positions, const at::Tensor& weights,
                  const at::Tensor& ids, const at::Tensor& corner_rows, const Layout& L, at::Tensor& out,
                  int n_threads) {
  const int64_t S = positions.size(0), J = positions.size(1), dh = table.size(1);
  const int dim = L.dim, K = 1 << dim;
  const scalar_t* tab = table.data_ptr<scalar_t>();
  const scalar_t* pos = positions.data_ptr<scalar_t>();
  const scalar_t* att = weights.data_ptr<scalar_t>();
  const int32_t* id = ids.data_ptr<int32_t>();
  const int32_t* cr = corner_rows.data_ptr<int32_t>();
  scalar_t* o = out.data_ptr<scalar_t>();
  parallel_range(S, n_threads, [&](int64_t s0, int64_t s1, int) {
    int64_t rows[1 << kMaxDim];
    scalar_t w[1 << kMaxDim], frac[kMaxDim];
    for (int64_t s = s0; s < s1; ++s) {
      scalar_t* os = o + s * dh;
      std::fill(os, os + dh, scalar_t(0));
      for (int64_t j = 0; j < J; ++j) {
        const int64_t sj = s * J + j;
        corners(L, pos + sj * dim, cr + static_cast<int64_t>(id[sj]) * K, s, j, rows, w, frac);
        const scalar_t a = att[sj];
        for (int k = 0; k < K; ++k) {
          if (rows[k] < 0) continue;
          const scalar_t c = a * w[k];
          const scalar_t* t = tab + rows[k] * dh;
          for (int64_t e = 0; e < dh; ++e) os[e] += c * t[e];
        }
      }
    }
  });
}

template <typename scalar_t>
void backward_impl(const at::Tensor& table, const at::Tensor& positions, const at::Tensor& weights,
                   const at::Tensor& ids, const at::Tensor& corner_rows, const Layout& L, const at::Tensor& grad_out,
                   at::Tensor& g_table, at::Tensor& g_pos, at::Tensor& g_w, bool need_table, bool need_pos,
                   bool need_w, int n_threads, int64_t max_table_copies) {
  const int64_t S = positions.size(0), J = positions.size(1), dh = table.size(1);
  const int dim = L.dim, K = 1 << dim;
  const scalar_t* tab = table.data_ptr<scalar_t>();
  const scalar_t* pos = positions.data_ptr<scalar_t>();
  const scalar_t* att = weights.data_ptr<scalar_t>();
  const int32_t* id = ids.data_ptr<int32_t>();
  const int32_t* cr = corner_rows.data_ptr<int32_t>();
  const scalar_t* go = grad_out.data_ptr<scalar_t>();
  scalar_t* gp = need_pos ? g_pos.data_ptr<scalar_t>() : nullptr;
  scalar_t* gw = need_w ? g_w.data_ptr<scalar_t>() : nullptr;
  scalar_t* gt = need_table ? g_table.data_ptr<scalar_t>() : nullptr;
  const bool need_dots = need_pos || need_w;
  // Table gradient: thread 0 writes g_table, thread p > 0 its own zeroed copy, summed at the end (no
  // atomics). At most max_table_copies copies: fewer threads when the table is large.
  int parts = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(n_threads, S / 256)));
  if (need_table) parts = static_cast<int>(std::min<int64_t>(parts, max_table_copies + 1));
  std::vector<at::Tensor> partial;
  if (need_table)
    for (int p = 1; p < parts; ++p) partial.push_back(at::zeros_like(g_table));
  parallel_range(S, parts, [&](int64_t s0, int64_t s1, int p) {
    scalar_t* gt = need_table ? (p == 0 ? g_table.data_ptr<scalar_t>() : partial[p - 1].data_ptr<scalar_t>()) : nullptr;
    int64_t rows[1 << kMaxDim];
    scalar_t w[1 << kMaxDim], frac[kMaxDim], dots[1 << kMaxDim];
    for (int64_t s = s0; s < s1; ++s) {
      const scalar_t* g = go + s * dh;
      for (int64_t j = 0; j < J; ++j) {
        const int64_t sj = s * J + j;
        corners(L, pos + sj * dim, cr + static_cast<int64_t>(id[sj]) * K, s, j, rows, w, frac);
        const scalar_t a = att[sj];
        scalar_t gwj = 0;
        for (int k = 0; k < K; ++k) {
          dots[k] = 0;
          if (rows[k] < 0) continue;
          if (need_dots) {
            const scalar_t* t = tab + rows[k] * dh;
            scalar_t acc = 0;
            for (int64_t e = 0; e < dh; ++e) acc += t[e] * g[e];
            dots[k] = acc;
            gwj += w[k] * acc;
          }
          if (need_table) {
            const scalar_t c = a * w[k];
            scalar_t* t = gt + rows[k] * dh;
            for (int64_t e = 0; e < dh; ++e) t[e] += c * g[e];
          }
        }
        if (need_w) gw[sj] = gwj;
        if (need_pos) {
          for (int d = 0; d < dim; ++d) {
            scalar_t acc = 0;
            for (int k = 0; k < K; ++k) {
              if (rows[k] < 0) continue;
              scalar_t dw = ((k >> (dim - 1 - d)) & 1) ? scalar_t(1) : scalar_t(-1);
              for (int e = 0; e < dim; ++e) {
                if (e == d) continue;
                dw *= ((k >> (dim - 1 - e)) & 1) ? frac[e] : scalar_t(1) - frac[e];
              }
              acc += dw * dots[k];
            }
            gp[sj * dim + d] = a * acc;
          }
        }
      }
    }
  });
  for (auto& t : partial) g_table.add_(t);
}

void check_inputs(const at::Tensor& table, const at::Tensor& positions, const at::Tensor& weights,
                  const at::Tensor& ids, const at::Tensor& corner_rows) {
  TORCH_CHECK(table.device().is_cpu() && table.is_contiguous() && table.dim() == 2, "table must be a contiguous CPU [R, Dh]");
  TORCH_CHECK(positions.scalar_type() == table.scalar_type() && positions.is_contiguous() && positions.dim() == 3,
              "positions must be contiguous [S, J, D] of the table's dtype");
  TORCH_CHECK(positions.size(2) >= 1 && positions.size(2) <= kMaxDim, "position_dim must be 1..3");
  TORCH_CHECK(weights.scalar_type() == table.scalar_type() && weights.is_contiguous(), "weights: contiguous, table dtype");
  TORCH_CHECK(ids.scalar_type() == at::kInt && ids.is_contiguous(), "ids must be contiguous int32");
  TORCH_CHECK(corner_rows.scalar_type() == at::kInt && corner_rows.is_contiguous() &&
                  corner_rows.size(1) == (1 << positions.size(2)), "corner_rows must be contiguous int32 [T, 2**D]");
}

}  // namespace

at::Tensor sample_forward(const at::Tensor& table, const at::Tensor& positions, const at::Tensor& weights,
                          const at::Tensor& ids, const at::Tensor& corner_rows, const at::Tensor& batch,
                          const at::Tensor& level, const at::Tensor& head, const at::Tensor& shapes, int64_t n_heads,
                          int64_t bg_offset, int64_t n_threads) {
  check_inputs(table, positions, weights, ids, corner_rows);
  auto out = at::empty({positions.size(0), table.size(1)}, table.options());
  const Layout L = make_layout(batch, level, head, shapes, n_heads, shapes.size(0), bg_offset);
  AT_DISPATCH_FLOATING_TYPES(table.scalar_type(), "sample_forward", [&] {
    forward_impl<scalar_t>(table, positions, weights, ids, corner_rows, L, out, static_cast<int>(n_threads));
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
    backward_impl<scalar_t>(table, positions, weights, ids, corner_rows, L, grad_out, g_table, g_pos, g_w, need_table,
                            need_pos, need_w, static_cast<int>(n_threads), max_table_copies);
  });
  return {g_table, g_pos, g_w};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("sample_forward", &sample_forward, "fused sparse bilinear/trilinear weighted gather (CPU)");
  m.def("sample_backward", &sample_backward, "its backward (CPU)");
}
