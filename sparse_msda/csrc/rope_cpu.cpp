// Rotary position encoding (RoPE) on the CPU: the rotation of functional/rope.py and its backward,
// one pass over the rows (no [N, H', d/2] angle, cos or sin tensors).
//
// Row n of x [N, H, d] (pairs split half: (x[j], x[j + d/2])) is rotated by the angles
//     theta[a] = sum_k freqs[a, k] * u[n, k],   a = (h', j) over the A = H' * d/2 pairs, k < P = D + 1,
// with h' = h when freqs has H rows, 0 when it has one (shared by the heads). As in the PyTorch path
// (functional/rope.py: float64 angles, reduced, then the trigonometry in x's dtype), the angle and
// its reduction run in double: theta = q * pi/2 + r with q = round(theta * 2/pi) and
// r = (theta - q * pio2_hi) - q * pio2_lo, |r| <= pi/4. sin(r) and cos(r) are then Taylor
// polynomials in x's dtype (float: up to r^9 / r^10, truncation error < 3e-9, below float32
// round-off; double: up to r^19 / r^20, truncation error < 1e-21) and the quadrant q mod 4 selects
// and signs them. The PyTorch path reduces to [0, 2 pi) instead; both are within float round-off of
// the exact rotation (tests/test_rope.py compares them).
//
// Backward (gy: the output's gradient, y: the saved output):
//     dx = R(-theta) gy,   dtheta[a] = sum over the heads h of a: y1 gy2 - y2 gy1,
//     du[n, k] = sum_a dtheta[a] freqs[a, k],   dfreqs[a, k] = sum_n dtheta[a] u[n, k]   (double).
// dfreqs is summed per block of rows into its own partial (the blocks depend on N only), then the
// partials in block order: the result does not depend on the thread count.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "simd.h"

namespace {

constexpr double kTwoOverPi = 0.636619772367581343076;
constexpr double kPio2Hi = 1.57079632679489655800e+00;  // the double nearest pi/2
constexpr double kPio2Lo = 6.12323399573676588614e-17;  // pi/2 - kPio2Hi
// 1.5 * 2^52: adding and subtracting it rounds a double of magnitude < 2^51 to the nearest integer
// (round-half-even) with plain arithmetic, which vectorises (no library call)
constexpr double kRoundMagic = 6755399441055744.0;

// Taylor coefficients (-1)^i / (2i + 1)! of sin and (-1)^i / (2i)! of cos, highest degree first.
template <typename T>
struct Poly;
template <>
struct Poly<float> {
  static constexpr int kSin = 5;  // r, r^3, ..., r^9
  static constexpr int kCos = 6;  // 1, r^2, ..., r^10
};
template <>
struct Poly<double> {
  static constexpr int kSin = 10;  // r, ..., r^19
  static constexpr int kCos = 11;  // 1, ..., r^20
};

template <typename T>
struct Coefficients {
  T sin_c[Poly<T>::kSin];
  T cos_c[Poly<T>::kCos];
  Coefficients() {
    double f = 1.0;  // (2i + 1)! and (2i)!, built up in double
    double c[2 * Poly<T>::kCos + 2];
    c[0] = 1.0;
    for (int i = 1; i < 2 * Poly<T>::kCos + 2; ++i) {
      f *= i;
      c[i] = 1.0 / f;
    }
    for (int i = 0; i < Poly<T>::kSin; ++i) sin_c[Poly<T>::kSin - 1 - i] = static_cast<T>((i % 2 ? -1.0 : 1.0) * c[2 * i + 1]);
    for (int i = 0; i < Poly<T>::kCos; ++i) cos_c[Poly<T>::kCos - 1 - i] = static_cast<T>((i % 2 ? -1.0 : 1.0) * c[2 * i]);
  }
};

template <typename T>
const Coefficients<T>& coefficients() {
  static const Coefficients<T> c;
  return c;
}

// Per-thread scratch of one row: reduced angles, quadrants, cos, sin, and dtheta.
template <typename T>
struct Scratch {
  std::vector<double> theta;
  std::vector<T> r, cs, sn, dth;
  std::vector<int32_t> quad;
  explicit Scratch(int64_t A) : theta(A), r(A), cs(A), sn(A), dth(A), quad(A) {}
};

// cos/sin of the angles of row u (ft: the frequencies transposed, [P][A]) into s.cs, s.sn.
template <typename T>
inline void row_cos_sin(const double* __restrict ft, const double* __restrict u, int64_t A, int64_t P, Scratch<T>& s) {
  double* __restrict theta = s.theta.data();
  T* __restrict r = s.r.data();
  int32_t* __restrict quad = s.quad.data();
  T* __restrict cs = s.cs.data();
  T* __restrict sn = s.sn.data();
  {
    const double u0 = u[0];
    for (int64_t a = 0; a < A; ++a) theta[a] = ft[a] * u0;
  }
  for (int64_t k = 1; k < P; ++k) {
    const double uk = u[k];
    const double* __restrict fk = ft + k * A;
    for (int64_t a = 0; a < A; ++a) theta[a] += fk[a] * uk;
  }
  for (int64_t a = 0; a < A; ++a) {
    const double t = theta[a];
    const double q = (t * kTwoOverPi + kRoundMagic) - kRoundMagic;
    r[a] = static_cast<T>((t - q * kPio2Hi) - q * kPio2Lo);
    quad[a] = static_cast<int32_t>(q);
  }
  const Coefficients<T>& c = coefficients<T>();
  for (int64_t a = 0; a < A; ++a) {
    const T x = r[a], x2 = x * x;
    T ps = c.sin_c[0];
    for (int i = 1; i < Poly<T>::kSin; ++i) ps = ps * x2 + c.sin_c[i];
    ps *= x;
    T pc = c.cos_c[0];
    for (int i = 1; i < Poly<T>::kCos; ++i) pc = pc * x2 + c.cos_c[i];
    const int32_t q = quad[a];
    const bool swap = q & 1;
    const T s0 = swap ? pc : ps, c0 = swap ? ps : pc;
    sn[a] = (q & 2) ? -s0 : s0;
    cs[a] = ((q + 1) & 2) ? -c0 : c0;
  }
}

// (o1, o2) = (a1 c - s2 a2 s, s1 a1 s + a2 c) over j < half with s2 = -s1 = sign (sign = 1: the
// rotation R(theta); -1: R(-theta)). Each vector of a1 and a2 is loaded before the outputs are
// stored, so o1 == a1 and o2 == a2 (in place) is allowed (no __restrict on them).
template <typename T>
inline void rotate_row(const T* a1, const T* a2, T* o1, T* o2, const T* __restrict cs, const T* __restrict sn,
                       int64_t half, T sign) {
  using V = sparse_msda_simd::Vec<T>;
  int64_t j = 0;
  const typename V::type sg = V::broadcast(sign);
  for (; j + V::N <= half; j += V::N) {
    const typename V::type x1 = V::load(a1 + j), x2 = V::load(a2 + j), c = V::load(cs + j), s = V::load(sn + j) * sg;
    V::store(o1 + j, x1 * c - x2 * s);
    V::store(o2 + j, x1 * s + x2 * c);
  }
  for (; j < half; ++j) {
    const T x1 = a1[j], x2 = a2[j], c = cs[j], s = sn[j] * sign;
    o1[j] = x1 * c - x2 * s;
    o2[j] = x1 * s + x2 * c;
  }
}

// ft [P][A] (double) of freqs [A, P]
std::vector<double> transpose_freqs(const torch::Tensor& freqs, int64_t A, int64_t P) {
  const double* f = freqs.data_ptr<double>();
  std::vector<double> ft(P * A);
  for (int64_t a = 0; a < A; ++a)
    for (int64_t k = 0; k < P; ++k) ft[k * A + a] = f[a * P + k];
  return ft;
}

void check_inputs(const torch::Tensor& x, const torch::Tensor& u, const torch::Tensor& freqs) {
  TORCH_CHECK(x.dim() == 3 && x.is_contiguous() && x.device().is_cpu(), "rope: x must be a contiguous CPU [N, H, d] tensor");
  TORCH_CHECK(x.scalar_type() == torch::kFloat || x.scalar_type() == torch::kDouble, "rope: x must be float32 or float64");
  TORCH_CHECK(x.size(2) % 2 == 0, "rope: head_dim must be even");
  TORCH_CHECK(u.dim() == 2 && u.size(0) == x.size(0) && u.scalar_type() == torch::kDouble && u.is_contiguous(),
              "rope: positions must be contiguous float64 [N, P]");
  TORCH_CHECK(freqs.dim() == 3 && freqs.scalar_type() == torch::kDouble && freqs.is_contiguous(),
              "rope: freqs must be contiguous float64 [H', d/2, P]");
  TORCH_CHECK((freqs.size(0) == 1 || freqs.size(0) == x.size(1)) && freqs.size(1) == x.size(2) / 2 && freqs.size(2) == u.size(1),
              "rope: freqs must be [H or 1, d/2, P]");
}

// y = R(theta) x; in place (y is x) with inplace.
torch::Tensor rope_forward(const torch::Tensor& x, const torch::Tensor& u, const torch::Tensor& freqs, bool inplace) {
  check_inputs(x, u, freqs);
  const int64_t N = x.size(0), H = x.size(1), d = x.size(2), half = d / 2, Hf = freqs.size(0), P = u.size(1);
  const int64_t A = Hf * half;
  auto y = inplace ? x : torch::empty_like(x);
  const std::vector<double> ft = transpose_freqs(freqs, A, P);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rope_forward", [&] {
    using T = scalar_t;
    const T* xp = x.data_ptr<T>();
    T* yp = y.data_ptr<T>();
    const double* up = u.data_ptr<double>();
    at::parallel_for(0, N, 256, [&](int64_t n0, int64_t n1) {
      Scratch<T> s(A);
      for (int64_t n = n0; n < n1; ++n) {
        row_cos_sin<T>(ft.data(), up + n * P, A, P, s);
        for (int64_t h = 0; h < H; ++h) {
          const int64_t a0 = Hf == 1 ? 0 : h * half, o = (n * H + h) * d;
          rotate_row<T>(xp + o, xp + o + half, yp + o, yp + o + half, s.cs.data() + a0, s.sn.data() + a0, half, T(1));
        }
      }
    });
  });
  return y;
}

// Returns (dx or empty, du [N, P] double or empty, dfreqs [H', d/2, P] double or empty). With
// dx_into_gy, dx is written over gy (each row's dtheta is taken from gy before).
std::vector<torch::Tensor> rope_backward(const torch::Tensor& gy, const torch::Tensor& y, const torch::Tensor& u,
                                         const torch::Tensor& freqs, bool need_x, bool need_u, bool need_freqs,
                                         bool dx_into_gy) {
  check_inputs(y, u, freqs);
  TORCH_CHECK(gy.sizes() == y.sizes() && gy.scalar_type() == y.scalar_type() && gy.is_contiguous(),
              "rope: gy must be contiguous, shaped and typed as y");
  const int64_t N = y.size(0), H = y.size(1), d = y.size(2), half = d / 2, Hf = freqs.size(0), P = u.size(1);
  const int64_t A = Hf * half;
  const auto f64 = torch::TensorOptions().dtype(torch::kDouble);
  torch::Tensor dx = need_x ? (dx_into_gy ? gy : torch::empty_like(y)) : torch::Tensor();
  torch::Tensor du = need_u ? torch::empty({N, P}, f64) : torch::Tensor();
  torch::Tensor dfreqs = need_freqs ? torch::zeros({Hf, half, P}, f64) : torch::Tensor();
  if (N == 0 || !(need_x || need_u || need_freqs)) return {dx, du, dfreqs};
  const std::vector<double> ft = transpose_freqs(freqs, A, P);
  // blocks of rows, each with its own dfreqs partial; the count depends on N only (determinism)
  const int64_t block_rows = 1024;
  const int64_t n_blocks = (N + block_rows - 1) / block_rows;
  std::vector<double> partial(need_freqs ? n_blocks * A * P : 0, 0.0);
  const bool need_theta = need_u || need_freqs;
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "rope_backward", [&] {
    using T = scalar_t;
    const T* gp = gy.data_ptr<T>();
    const T* yp = y.data_ptr<T>();
    const double* up = u.data_ptr<double>();
    T* dxp = need_x ? dx.data_ptr<T>() : nullptr;
    double* dup = need_u ? du.data_ptr<double>() : nullptr;
    at::parallel_for(0, n_blocks, 1, [&](int64_t b0, int64_t b1) {
      Scratch<T> s(A);
      std::vector<double> dth(A);
      for (int64_t b = b0; b < b1; ++b) {
        double* __restrict part = need_freqs ? partial.data() + b * A * P : nullptr;
        const int64_t n_end = std::min(N, (b + 1) * block_rows);
        for (int64_t n = b * block_rows; n < n_end; ++n) {
          const double* un = up + n * P;
          if (need_theta) {  // before dx, which may overwrite gy
            T* __restrict dt = s.dth.data();
            for (int64_t h = 0; h < H; ++h) {
              const T* __restrict g1 = gp + (n * H + h) * d;
              const T* __restrict g2 = g1 + half;
              const T* __restrict y1 = yp + (n * H + h) * d;
              const T* __restrict y2 = y1 + half;
              T* __restrict o = dt + (Hf == 1 ? 0 : h * half);
              if (Hf == 1 && h > 0) {
                for (int64_t j = 0; j < half; ++j) o[j] += y1[j] * g2[j] - y2[j] * g1[j];
              } else {
                for (int64_t j = 0; j < half; ++j) o[j] = y1[j] * g2[j] - y2[j] * g1[j];
              }
            }
          }
          if (need_x) {
            row_cos_sin<T>(ft.data(), un, A, P, s);
            for (int64_t h = 0; h < H; ++h) {
              const int64_t a0 = Hf == 1 ? 0 : h * half, o = (n * H + h) * d;
              rotate_row<T>(gp + o, gp + o + half, dxp + o, dxp + o + half, s.cs.data() + a0, s.sn.data() + a0, half, T(-1));
            }
          }
          if (!need_theta) continue;
          const T* __restrict dt = s.dth.data();
          double* __restrict dd = dth.data();
          for (int64_t a = 0; a < A; ++a) dd[a] = static_cast<double>(dt[a]);
          if (need_u) {
            for (int64_t k = 0; k < P; ++k) {
              const double* __restrict fk = ft.data() + k * A;
              double acc = 0.0;
              for (int64_t a = 0; a < A; ++a) acc += dd[a] * fk[a];
              dup[n * P + k] = acc;
            }
          }
          if (need_freqs) {
            for (int64_t k = 0; k < P; ++k) {  // partial kept transposed, [P][A]
              const double uk = un[k];
              double* __restrict pk = part + k * A;
              for (int64_t a = 0; a < A; ++a) pk[a] += dd[a] * uk;
            }
          }
        }
      }
    });
  });
  if (need_freqs) {
    double* df = dfreqs.data_ptr<double>();
    for (int64_t b = 0; b < n_blocks; ++b) {
      const double* part = partial.data() + b * A * P;
      for (int64_t k = 0; k < P; ++k)
        for (int64_t a = 0; a < A; ++a) df[a * P + k] += part[k * A + a];
    }
  }
  return {dx, du, dfreqs};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("simd_isa", [] { return std::string(sparse_msda_simd::kIsa); }, "the vector ISA this build targets (simd.h)");
  m.def("rope_forward", &rope_forward, "rotary position encoding of x [N, H, d] at positions [N, P], in place with inplace (CPU)");
  m.def("rope_backward", &rope_backward, "its backward: (dx, dpositions, dfreqs), dx over gy with dx_into_gy (CPU)");
}
