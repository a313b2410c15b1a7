// One pass of per-pattern SDLM training of lenet5-1998 (LeCun et al. 1998): for every pattern,
// forward through C1..F6 and the RBF output, the loss of eq. 9, backward, and the update
// p -= step * grad with fixed per-parameter steps, all in this one C++ loop.
//
// Why: at one pattern per update PyTorch spends ~2 ms per pattern on per-op overhead for
// ~1 MFLOP of arithmetic. Here a pattern is ~47 us of one core (AVX-512).
//
// The math is lenet5/models/lenet5_1998.py's, in fp32, op for op; only the order of the sums
// inside a convolution and the tanh approximation (a few ulp) differ, so parameters agree with
// the PyTorch path to fp32 rounding (tests/test_perpattern.py).
//
// Layout: feature maps are channel-major rows padded to a multiple of 16 floats, so every
// convolution is "row of 16 outputs += weight * row of 16 inputs" on a `v16`: one AVX-512
// register, two AVX2 ones or four SSE ones (GCC vector extensions of the machine's width; a
// 64-byte vector type on a narrower machine would live in memory). Padding lanes hold finite
// garbage in the forward maps and exact zeros in the gradient maps, where they would enter a sum.
//
// No ATen: a plain C ABI called through ctypes, so the build takes about a second.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <utility>

namespace {

#if defined(__AVX512F__)
constexpr int V = 16;
#elif defined(__AVX__)
constexpr int V = 8;
#else
constexpr int V = 4;
#endif
constexpr int R = 16 / V;  // machine vectors per v16
typedef float vn __attribute__((vector_size(V * sizeof(float))));
typedef int32_t vni __attribute__((vector_size(V * sizeof(float))));

// Accumulators a loop keeps in registers: about 12 of the machine's 32 (AVX-512) or 16 vectors.
constexpr int ACC = 12 / R;

template <int... I>
constexpr vni lanes(std::integer_sequence<int, I...>) { return vni{I...}; }
constexpr vni LANE = lanes(std::make_integer_sequence<int, V>{});  // 0, 1, ..., V-1

// 16 floats as R machine vectors, with the arithmetic the kernel uses.
struct v16 {
  vn r[R];
};
#define V16_OPERATOR(op)                                                                                   \
  inline v16 operator op(v16 a, const v16& b) { for (int k = 0; k < R; ++k) a.r[k] = a.r[k] op b.r[k]; return a; } \
  inline v16 operator op(v16 a, float b) { for (int k = 0; k < R; ++k) a.r[k] = a.r[k] op b; return a; }         \
  inline v16 operator op(float a, v16 b) { for (int k = 0; k < R; ++k) b.r[k] = a op b.r[k]; return b; }         \
  inline v16& operator op##=(v16& a, const v16& b) { for (int k = 0; k < R; ++k) a.r[k] = a.r[k] op b.r[k]; return a; }
V16_OPERATOR(+)
V16_OPERATOR(-)
V16_OPERATOR(*)
V16_OPERATOR(/)
#undef V16_OPERATOR

inline v16 load(const float* p) {
  v16 v;
  for (int k = 0; k < R; ++k) std::memcpy(&v.r[k], p + k * V, sizeof(vn));
  return v;
}
inline void store(float* p, const v16& v) {
  for (int k = 0; k < R; ++k) std::memcpy(p + k * V, &v.r[k], sizeof(vn));
}
inline v16 splat(float x) { v16 v; for (int k = 0; k < R; ++k) v.r[k] = vn{} + x; return v; }
inline v16 clamp(v16 x, float c) {
  for (int k = 0; k < R; ++k) x.r[k] = x.r[k] > c ? c : (x.r[k] < -c ? -c : x.r[k]);
  return x;
}
// Lanes n..15 set to 0.
inline v16 first(v16 x, int n) {
  for (int k = 0; k < R; ++k) x.r[k] = LANE + k * V < n ? x.r[k] : vn{};
  return x;
}

inline float hsum(const v16& x) {
  vn v = x.r[0];
  for (int k = 1; k < R; ++k) v += x.r[k];
  for (int half = V / 2; half > 0; half /= 2) v += __builtin_shuffle(v, LANE ^ half);
  return v[0];
}

// The even and the odd floats of the 32 in (a, b): 16 of each.
inline void deinterleave(const v16& a, const v16& b, v16& even, v16& odd) {
  vn q[2 * R];
  for (int k = 0; k < R; ++k) q[k] = a.r[k], q[R + k] = b.r[k];
  for (int k = 0; k < R; ++k) {
    even.r[k] = __builtin_shuffle(q[2 * k], q[2 * k + 1], LANE * 2);
    odd.r[k] = __builtin_shuffle(q[2 * k], q[2 * k + 1], LANE * 2 + 1);
  }
}

// Each of the 16 floats of x twice: 32 floats as (lo, hi).
inline void duplicate(const v16& x, v16& lo, v16& hi) {
  vn out[2 * R];
  for (int m = 0; m < 2 * R; ++m) out[m] = __builtin_shuffle(x.r[m / 2], LANE / 2 + (m % 2) * (V / 2));
  for (int k = 0; k < R; ++k) lo.r[k] = out[k], hi.r[k] = out[R + k];
}

// tanh as Eigen's rational approximation (as conv_tanh_pool.cpp): a few ulp from std::tanh.
inline v16 vtanh(v16 x) {
  x = clamp(x, 7.90531110763549805f);
  const v16 x2 = x * x;
  v16 p = x2 * -2.76076847742355e-16f + 2.00018790482477e-13f;
  p = p * x2 + -8.60467152213735e-11f;
  p = p * x2 + 5.12229709037114e-08f;
  p = p * x2 + 1.48572235717979e-05f;
  p = p * x2 + 6.37261928875436e-04f;
  p = p * x2 + 4.89352455891786e-03f;
  p = p * x;
  v16 q = x2 * 1.19825839466702e-06f + 1.18534705686654e-04f;
  q = q * x2 + 2.26843463243900e-03f;
  q = q * x2 + 4.89352518554385e-03f;
  return p / q;
}

// Appendix A: f(a) = A tanh(S a); the maps keep t = tanh(S a), the state is A t and
// f'(a) = A S (1 - t^2).
constexpr float A = 1.7159f, S = float(2.0 / 3.0);
inline v16 squash_grad(v16 g_state, v16 t) { return g_state * A * S * (1.0f - t * t); }

// Sizes of lenet5-1998 (checked against the model by the Python side).
constexpr int IN = 32, K = 5, C1 = 6, H1 = 28, H2 = 14, C3 = 16, H3 = 10, H4 = 5, C5 = 120, F6 = 84, OUT = 10;
constexpr int N4 = C3 * H4 * H4;  // 400 inputs of each C5 unit
constexpr int MAX_PAIRS = C1 * C3;

// The parameters in the order of LeNet5_1998.parameters(), each a contiguous tensor of its shape;
// C3's weight is (pairs, 5, 5), pair k connecting S2 map pair_in[k] to C3 map pair_out[k].
enum { W1, B1, W2, B2, W3, B3, W4, B4, W5, B5, W6, B6, NPARAMS };

struct Maps {
  alignas(64) float in[IN][48];            // the 32x32 input; columns 32-47 only feed padding lanes
  alignas(64) float t1[C1][H1][32];        // tanh of C1, 28 valid columns
  alignas(64) float ga1[C1][H1][32];       // dE/da of C1, padding lanes 0
  alignas(64) float sum2[C1][H2][16];      // S2's 2x2 block sums
  alignas(64) float t2[C1][H2][16];
  alignas(64) float x2[C1][H2][32];        // S2 states, columns 14-31 zero (C3 reads up to 19)
  alignas(64) float gx2[C1][H2][16];       // dE/dx of S2, lanes 14-15 zero
  alignas(64) float t3[C3][H3][16];
  alignas(64) float gp3[C3][H3 + 2 * (K - 1)][32];  // dE/da of C3 inside a 4-wide border of zeros
  alignas(64) float sum4[N4], t4[N4], x4[N4], gx4[N4];
  alignas(64) float t5[128], x5[128], gx5[128];  // 120 used, the rest stays 0
  alignas(64) float t6[96], x6[96], ga6[96];    // 84 used
};

struct Net {
  float* p[NPARAMS];
  const float* step[NPARAMS];
  const float* prototypes;  // (10, 84), fixed
  int pairs;
  int pair_out[MAX_PAIRS], pair_in[MAX_PAIRS];
  float j;
};

void forward(const Net& net, const float* image, Maps& m) {
  // Section II.A: 28x28 in [0, 1] centred in 32x32, x * 1.275 - 0.1 (the border is 0 -> -0.1).
  const float scale = float(1.175 - -0.1), shift = -0.1f;
  for (int y = 0; y < IN; ++y)
    for (int x = 0; x < IN; ++x) {
      const bool inside = y >= 2 && y < 30 && x >= 2 && x < 30;
      m.in[y][x] = (inside ? image[(y - 2) * 28 + x - 2] : 0.0f) * scale + shift;
    }

  // C1: 32 lanes per row (2 v16), OB maps at once so each input row is loaded once per OB maps.
  constexpr int OB = ACC / 2 >= C1 ? C1 : ACC / 2 >= 3 ? 3 : 1;
  const float *w1 = net.p[W1], *b1 = net.p[B1];
  for (int o0 = 0; o0 < C1; o0 += OB)
    for (int y = 0; y < H1; ++y) {
      v16 acc[OB][2];
      for (int o = 0; o < OB; ++o) acc[o][0] = acc[o][1] = splat(b1[o0 + o]);
      for (int ky = 0; ky < K; ++ky)
        for (int kx = 0; kx < K; ++kx) {
          const v16 lo = load(&m.in[y + ky][kx]), hi = load(&m.in[y + ky][kx + 16]);
          for (int o = 0; o < OB; ++o) {
            const float w = w1[(o0 + o) * K * K + ky * K + kx];
            acc[o][0] += w * lo;
            acc[o][1] += w * hi;
          }
        }
      for (int o = 0; o < OB; ++o) {
        store(&m.t1[o0 + o][y][0], vtanh(acc[o][0] * S));
        store(&m.t1[o0 + o][y][16], vtanh(acc[o][1] * S));
      }
    }

  // S2: the sum of each 2x2 block of states, times a coefficient, plus a bias, per map.
  for (int c = 0; c < C1; ++c)
    for (int y = 0; y < H2; ++y) {
      v16 e0, o0, e1, o1;
      deinterleave(A * load(&m.t1[c][2 * y][0]), A * load(&m.t1[c][2 * y][16]), e0, o0);
      deinterleave(A * load(&m.t1[c][2 * y + 1][0]), A * load(&m.t1[c][2 * y + 1][16]), e1, o1);
      const v16 sum = first(((e0 + o0) + e1) + o1, H2);
      const v16 t = vtanh((sum * net.p[W2][c] + net.p[B2][c]) * S);
      store(&m.sum2[c][y][0], sum);
      store(&m.t2[c][y][0], t);
      store(&m.x2[c][y][0], first(A * t, H2));
    }

  // C3: each map o sums the 5x5 correlations of the S2 maps of its row of Table I; YB rows at once.
  constexpr int YB = ACC >= H3 ? H3 : ACC >= 5 ? 5 : 2;
  const float *w3 = net.p[W3], *b3 = net.p[B3];
  for (int o = 0; o < C3; ++o)
    for (int y0 = 0; y0 < H3; y0 += YB) {
      v16 acc[YB];
      for (int y = 0; y < YB; ++y) acc[y] = splat(b3[o]);
      for (int k = 0; k < net.pairs; ++k) {
        if (net.pair_out[k] != o) continue;
        const int i = net.pair_in[k];
        for (int ky = 0; ky < K; ++ky)
          for (int kx = 0; kx < K; ++kx) {
            const float w = w3[k * K * K + ky * K + kx];
            for (int y = 0; y < YB; ++y) acc[y] += w * load(&m.x2[i][y0 + y + ky][kx]);
          }
      }
      for (int y = 0; y < YB; ++y) store(&m.t3[o][y0 + y][0], vtanh(acc[y] * S));
    }

  // S4, laid out as C5's input: map-major 5x5 (the flattening of (16, 5, 5)).
  for (int c = 0; c < C3; ++c)
    for (int y = 0; y < H4; ++y)
      for (int x = 0; x < H4; ++x) {
        const float* r0 = &m.t3[c][2 * y][2 * x];
        const float* r1 = &m.t3[c][2 * y + 1][2 * x];
        m.sum4[(c * H4 + y) * H4 + x] = A * r0[0] + A * r0[1] + A * r1[0] + A * r1[1];
      }
  for (int c = 0; c < C3; ++c)
    for (int q = 0; q < H4 * H4; ++q) m.t4[c * 25 + q] = m.sum4[c * 25 + q] * net.p[W4][c] + net.p[B4][c];
  for (int q = 0; q < N4; q += 16) {
    const v16 t = vtanh(load(&m.t4[q]) * S);
    store(&m.t4[q], t);
    store(&m.x4[q], A * t);
  }

  // C5 and F6: dot products (C5 sees the whole 16x5x5 S4 output).
  const float *w5 = net.p[W5], *b5 = net.p[B5];
  for (int o = 0; o < C5; ++o) {
    v16 acc{};
    for (int q = 0; q < N4; q += 16) acc += load(&w5[o * N4 + q]) * load(&m.x4[q]);
    m.t5[o] = hsum(acc) + b5[o];
  }
  for (int o = 0; o < 128; o += 16) {
    const v16 t = first(vtanh(load(&m.t5[o]) * S), C5 - o);
    store(&m.t5[o], t);
    store(&m.x5[o], A * t);
  }
  const float *w6 = net.p[W6], *b6 = net.p[B6];
  for (int k = 0; k < F6; ++k) {
    v16 acc{};
    int q = 0;
    for (; q + 16 <= C5; q += 16) acc += load(&w6[k * C5 + q]) * load(&m.x5[q]);
    float tail = 0;
    for (; q < C5; ++q) tail += w6[k * C5 + q] * m.x5[q];
    m.t6[k] = hsum(acc) + tail + b6[k];
  }
  for (int k = 0; k < 96; k += 16) {
    const v16 t = first(vtanh(load(&m.t6[k]) * S), F6 - k);
    store(&m.t6[k], t);
    store(&m.x6[k], A * t);
  }
}

// p -= step * grad, the SDLM update of one parameter.
inline void update(float& p, float step, float grad) { p -= step * grad; }

// Loss of eq. 9 and its gradient back to F6's states (into m.ga6 as dE/dx for now); returns the
// loss and sets `correct`.
float output_layer(const Net& net, int label, Maps& m, bool& correct) {
  float y[OUT];
  for (int i = 0; i < OUT; ++i) {  // eq. 7: Euclidean RBF units
    float d2 = 0;
    for (int k = 0; k < F6; ++k) {
      const float d = m.x6[k] - net.prototypes[i * F6 + k];
      d2 += d * d;
    }
    y[i] = d2;
  }
  int best = 0;
  for (int i = 1; i < OUT; ++i)
    if (y[i] < y[best]) best = i;  // the smallest penalty wins; ties to the first, as argmax
  correct = best == label;
  // Eq. 9: E = y_label + log(e^-j + sum_i e^-y_i), with logsumexp's shift by the largest term.
  float top = -net.j;
  for (int i = 0; i < OUT; ++i) top = std::fmax(top, -y[i]);
  float z = std::exp(-net.j - top);
  for (int i = 0; i < OUT; ++i) z += std::exp(-y[i] - top);
  const float lse = std::log(z) + top;
  float gy[OUT];
  for (int i = 0; i < OUT; ++i) gy[i] = (i == label ? 1.0f : 0.0f) - std::exp(-y[i] - lse);
  for (int k = 0; k < F6; ++k) {
    float g = 0;
    for (int i = 0; i < OUT; ++i) g += gy[i] * (2.0f * (m.x6[k] - net.prototypes[i * F6 + k]));
    m.ga6[k] = g;
  }
  return y[label] + lse;
}

// Backward and update, layer by layer from the top: each layer's input gradient is taken with
// its weights before their update, as autograd's backward precedes optimizer.step().
void backward_update(const Net& net, Maps& m) {
  for (int k = 0; k < F6; ++k) m.ga6[k] *= A * S * (1.0f - m.t6[k] * m.t6[k]);

  // F6
  {
    float* __restrict w = net.p[W6];
    const float* __restrict s = net.step[W6];
    std::memset(m.gx5, 0, sizeof m.gx5);
    for (int k = 0; k < F6; ++k) {
      const float g = m.ga6[k];
      update(net.p[B6][k], net.step[B6][k], g);
      float* __restrict wr = w + k * C5;
      const float* __restrict sr = s + k * C5;
      for (int q = 0; q < C5; ++q) {
        m.gx5[q] += wr[q] * g;
        wr[q] -= sr[q] * (g * m.x5[q]);
      }
    }
  }
  // C5, 16 inputs at a time down all 120 units: the input gradient stays in a register.
  {
    float g5[C5];
    for (int o = 0; o < C5; ++o) {
      g5[o] = m.gx5[o] * A * S * (1.0f - m.t5[o] * m.t5[o]);
      update(net.p[B5][o], net.step[B5][o], g5[o]);
    }
    for (int q = 0; q < N4; q += 16) {
      const v16 x = load(&m.x4[q]);
      v16 gx{};
      for (int o = 0; o < C5; ++o) {
        float* wr = net.p[W5] + o * N4 + q;
        const v16 w = load(wr);
        gx += w * g5[o];
        store(wr, w - load(net.step[W5] + o * N4 + q) * (g5[o] * x));
      }
      store(&m.gx4[q], gx);
    }
  }
  // S4: each gradient spreads to its 2x2 block of C3 states, times the coefficient.
  std::memset(m.gp3, 0, sizeof m.gp3);
  for (int c = 0; c < C3; ++c) {
    const float w = net.p[W4][c];
    float gw = 0, gb = 0;
    for (int y = 0; y < H4; ++y)
      for (int x = 0; x < H4; ++x) {
        const int q = (c * H4 + y) * H4 + x;
        const float g = m.gx4[q] * A * S * (1.0f - m.t4[q] * m.t4[q]);
        gw += g * m.sum4[q];
        gb += g;
        const float gs = g * w;
        for (int dy = 0; dy < 2; ++dy)
          for (int dx = 0; dx < 2; ++dx) {
            const float t = m.t3[c][2 * y + dy][2 * x + dx];
            m.gp3[c][K - 1 + 2 * y + dy][K - 1 + 2 * x + dx] = gs * A * S * (1.0f - t * t);
          }
      }
    update(net.p[W4][c], net.step[W4][c], gw);
    update(net.p[B4][c], net.step[B4][c], gb);
  }

  // C3, input gradient: a full correlation of dE/da with the flipped kernels of each pair, YB
  // rows at once. Rows of gp3 outside [K-1, K-1+H3) are the zero border: skipped.
  constexpr int YB = ACC >= H2 ? H2 : ACC >= 7 ? 7 : 2;
  const float* w3 = net.p[W3];
  for (int i = 0; i < C1; ++i)
#pragma GCC unroll 7
    for (int y0 = 0; y0 < H2; y0 += YB) {
      v16 acc[YB] = {};
      for (int k = 0; k < net.pairs; ++k) {
        if (net.pair_in[k] != i) continue;
        const int o = net.pair_out[k];
#pragma GCC unroll 5
        for (int ky = 0; ky < K; ++ky)
          for (int kx = 0; kx < K; ++kx) {
            const float w = w3[k * K * K + (K - 1 - ky) * K + (K - 1 - kx)];
#pragma GCC unroll 14
            for (int y = 0; y < YB; ++y) {
              const int row = y0 + y + ky;
              if (row >= K - 1 && row < K - 1 + H3) acc[y] += w * load(&m.gp3[o][row][kx]);
            }
          }
      }
      for (int y = 0; y < YB; ++y) store(&m.gx2[i][y0 + y][0], acc[y]);  // lanes 14, 15 read only zeros
    }
  // C3, weights and biases.
  for (int o = 0; o < C3; ++o) {
    v16 gb{};
    for (int y = 0; y < H3; ++y) gb += load(&m.gp3[o][y + K - 1][K - 1]);  // lanes 10-15 are 0
    update(net.p[B3][o], net.step[B3][o], hsum(gb));
  }
  for (int k = 0; k < net.pairs; ++k) {
    const int o = net.pair_out[k], i = net.pair_in[k];
    float* w = net.p[W3] + k * K * K;
    const float* s = net.step[W3] + k * K * K;
    for (int ky = 0; ky < K; ++ky) {
      v16 acc[K] = {};
      for (int y = 0; y < H3; ++y) {
        const v16 g = load(&m.gp3[o][y + K - 1][K - 1]);
        for (int kx = 0; kx < K; ++kx) acc[kx] += g * load(&m.x2[i][y + ky][kx]);
      }
      for (int kx = 0; kx < K; ++kx) update(w[ky * K + kx], s[ky * K + kx], hsum(acc[kx]));
    }
  }

  // S2: each gradient spreads to its 2x2 block of C1 states.
  for (int c = 0; c < C1; ++c) {
    const float w = net.p[W2][c];
    v16 gw{}, gb{};
    for (int y = 0; y < H2; ++y) {
      const v16 t = load(&m.t2[c][y][0]);
      const v16 g = squash_grad(load(&m.gx2[c][y][0]), t);  // lanes 14, 15: 0
      gw += g * load(&m.sum2[c][y][0]);
      gb += g;
      const v16 gs = g * w;
      v16 up0, up1;
      duplicate(gs, up0, up1);
      for (int dy = 0; dy < 2; ++dy) {
        const int r = 2 * y + dy;
        store(&m.ga1[c][r][0], squash_grad(up0, load(&m.t1[c][r][0])));
        store(&m.ga1[c][r][16], squash_grad(up1, load(&m.t1[c][r][16])));
      }
    }
    update(net.p[W2][c], net.step[W2][c], hsum(gw));
    update(net.p[B2][c], net.step[B2][c], hsum(gb));
  }

  // C1, weights and biases (no input gradient needed).
  for (int o = 0; o < C1; ++o) {
    v16 gb{};
    for (int y = 0; y < H1; ++y) gb += load(&m.ga1[o][y][0]) + load(&m.ga1[o][y][16]);
    for (int ky = 0; ky < K; ++ky) {
      v16 acc[K] = {};
      for (int y = 0; y < H1; ++y) {
        const v16 g0 = load(&m.ga1[o][y][0]), g1 = load(&m.ga1[o][y][16]);
        for (int kx = 0; kx < K; ++kx)
          acc[kx] += g0 * load(&m.in[y + ky][kx]) + g1 * load(&m.in[y + ky][kx + 16]);
      }
      for (int kx = 0; kx < K; ++kx)
        update(net.p[W1][o * K * K + ky * K + kx], net.step[W1][o * K * K + ky * K + kx], hsum(acc[kx]));
    }
    update(net.p[B1][o], net.step[B1][o], hsum(gb));
  }
}

}  // namespace

extern "C" {

// Version of this interface; the Python side refuses a library that reports another.
int64_t lenet5_sdlm_pass_abi() { return 1; }

// Trains on images[0..n) (each 28x28 floats in [0, 1]) with labels[0..n), in that order, one
// update per pattern. params/steps: the 12 parameters and their step sizes (see the enum above);
// pairs: C3's (output map, input map) per kernel. Writes each pattern's loss and whether it was
// classified correctly (before its update). Returns 0, or -1 for an invalid argument.
int64_t lenet5_sdlm_pass(const float* images, const int64_t* labels, int64_t n, float* const* params,
                         const float* const* steps, const float* prototypes, const int32_t* pair_out,
                         const int32_t* pair_in, int64_t pairs, float j, float* losses, uint8_t* correct) {
  if (pairs <= 0 || pairs > MAX_PAIRS || n < 0) return -1;
  Net net;
  for (int k = 0; k < NPARAMS; ++k) net.p[k] = params[k], net.step[k] = steps[k];
  net.prototypes = prototypes;
  net.pairs = int(pairs);
  net.j = j;
  for (int k = 0; k < pairs; ++k) {
    if (pair_out[k] < 0 || pair_out[k] >= C3 || pair_in[k] < 0 || pair_in[k] >= C1) return -1;
    net.pair_out[k] = pair_out[k], net.pair_in[k] = pair_in[k];
  }
  for (int64_t s = 0; s < n; ++s)
    if (labels[s] < 0 || labels[s] >= OUT) return -1;
  std::unique_ptr<Maps> maps(new Maps());  // zeroed: the padding of every map starts at 0
  for (int64_t s = 0; s < n; ++s) {
    bool ok = false;
    forward(net, images + s * 28 * 28, *maps);
    losses[s] = output_layer(net, int(labels[s]), *maps, ok);
    correct[s] = ok;
    backward_update(net, *maps);
  }
  return 0;
}

}  // extern "C"
