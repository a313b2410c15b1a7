// keras-lenet's second convolution by Winograd F(2x2, 5x5), a translation unit of its own:
// lenet5.native.build compiles it beside conv_tanh_pool.cpp, in parallel.
#include "kernels.h"

namespace {

// Winograd F(2x2, 5x5) convolution, forward and backward, for channels_last float32 tensors:
// keras-lenet's second convolution (20 -> 50 channels, 5x5, "same" on 14x14), which oneDNN runs
// at 71-73% of the fp32 peak, so that no direct kernel could be much faster. Winograd computes
// each 2x2 output tile from a 6x6 input tile with 36 products per channel pair instead of 100:
//   Y = A^T [ (G g G^T) (.) (B^T d B) ] A,
// with the interpolation points 0, 1, -1, 2, -2 and infinity (B^T's entries are small integers;
// the 1/6 and 1/24 of G are the weight's, whose transform U Python computes in float64).
// The 36 products of every tile are 36 matrix products over channels. All of it runs per block
// of whole images, the block's transforms and products in buffers that stay in the core's cache:
//   forward:  x -> V [36][tiles][Cp] -> M = V U [36][tiles][Kp] -> y (+ bias)
//   backward: V again, dy -> dM (A dy A^T);  dU += V^T dM;  dV = dM U^T -> dx (B dV B^T, the
//             image's overlapping tiles added up).
// Cp and Kp are the channel counts rounded up to whole vectors (zero lanes). The products are a
// register-tiled kernel broadcasting one operand; the matrices' zeros and ones are folded away at
// compile time. (Transforming the whole batch to memory and multiplying with torch.bmm was slower
// than oneDNN: the transforms, writing 36 planes of 5-11 MB, ran at memory speed.)
namespace wino {

constexpr float BT[6][6] = {{4, 0, -5, 0, 1, 0}, {0, -4, -4, 1, 1, 0}, {0, 4, -4, -1, 1, 0},
                            {0, -2, -1, 2, 1, 0}, {0, 2, -1, -2, 1, 0}, {0, 4, 0, -5, 0, 1}};
constexpr float B[6][6] = {{4, 0, 0, 0, 0, 0}, {0, -4, 4, -2, 2, 4}, {-5, -4, -4, -1, -1, 0},
                           {0, 1, -1, 2, -2, -5}, {1, 1, 1, 1, 1, 0}, {0, 0, 0, 0, 0, 1}};  // BT transposed
constexpr float AT[2][6] = {{1, 1, 1, 1, 1, 0}, {0, 1, -1, 2, -2, 1}};
constexpr float A[6][2] = {{1, 0}, {1, 1}, {1, -1}, {1, 2}, {1, -2}, {0, 1}};  // AT transposed

// out[i * os] = sum_a M[i][a] in[a * is], for a constant matrix M: inlined and unrolled, so each
// coefficient is a constant and its zeros and +-1 cost nothing.
template <int R, int S>
__attribute__((always_inline)) inline void apply(const float (&M)[R][S], const vf* in, int is, vf* out, int os) {
#pragma GCC unroll 8
  for (int i = 0; i < R; ++i) {
    vf acc{};
#pragma GCC unroll 8
    for (int a = 0; a < S; ++a) {
      const float m = M[i][a];
      if (m == 1.0f) acc += in[a * is];
      else if (m == -1.0f) acc -= in[a * is];
      else if (m != 0.0f) acc += m * in[a * is];
    }
    out[i * os] = acc;
  }
}

struct Geometry {
  int64_t N, H, W, C, K, pad, OH, OW, TH, TW;
  int64_t Cv() const { return (C + V - 1) / V; }  // vectors per tile's channels
  int64_t Kv() const { return (K + V - 1) / V; }
  int64_t per_image() const { return TH * TW; }
};

// C[r][v] (+)= sum_i a(r, i) B[i][v] for rows [0, rows) and vectors [0, nv): a(r, i) = a[r * ars + i * ais]
// broadcast, B and C whole vectors (row strides bs and cs, in vectors). Register tiles of RxNV.
template <int R, int NV>
__attribute__((always_inline)) inline void gemm_tile(const float* __restrict a, int64_t ars, int64_t ais,
                                                     const vf* __restrict b, int64_t bs, int64_t red,
                                                     vf* __restrict c, int64_t cs, bool accumulate) {
  vf acc[R][NV];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[r][v] = accumulate ? c[r * cs + v] : vf{};
  for (int64_t i = 0; i < red; ++i) {
    vf bv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) bv[v] = b[i * bs + v];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const float av = a[r * ars + i * ais];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] += av * bv[v];
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) c[r * cs + v] = acc[r][v];
}

#if defined(__AVX512F__)
constexpr int GR = 6, GV = 4;  // 24 accumulators of 32 registers
#else
constexpr int GR = 4, GV = 3;  // 12 of 16
#endif

template <int NV>
void gemm_rows(int64_t rows, const float* a, int64_t ars, int64_t ais, const vf* b, int64_t bs, int64_t red, vf* c,
               int64_t cs, bool accumulate) {
  int64_t r = 0;
  for (; r + GR <= rows; r += GR) gemm_tile<GR, NV>(a + r * ars, ars, ais, b, bs, red, c + r * cs, cs, accumulate);
  switch (rows - r) {
#define LENET5_ROWS(n) \
  case n: if constexpr (n < GR) gemm_tile<n, NV>(a + r * ars, ars, ais, b, bs, red, c + r * cs, cs, accumulate); break;
    LENET5_ROWS(1) LENET5_ROWS(2) LENET5_ROWS(3) LENET5_ROWS(4) LENET5_ROWS(5)
#undef LENET5_ROWS
    default: break;
  }
}

void gemm(int64_t rows, int64_t nv, const float* a, int64_t ars, int64_t ais, const vf* b, int64_t bs, int64_t red,
          vf* c, int64_t cs, bool accumulate) {
  int64_t v = 0;
  for (; v + GV <= nv; v += GV) gemm_rows<GV>(rows, a, ars, ais, b + v, bs, red, c + v, cs, accumulate);
  switch (nv - v) {
    case 1: gemm_rows<1>(rows, a, ars, ais, b + v, bs, red, c + v, cs, accumulate); break;
    case 2: gemm_rows<2>(rows, a, ars, ais, b + v, bs, red, c + v, cs, accumulate); break;
    case 3: if constexpr (GV > 3) gemm_rows<3>(rows, a, ars, ais, b + v, bs, red, c + v, cs, accumulate); break;
    default: break;
  }
}

// A tile's 36 points, vector k of its channels, in a block's buffer [36][T tiles][nv vectors].
__attribute__((always_inline)) inline void get_tile(const vf* buf, int64_t T, int64_t t, int64_t nv, int64_t k,
                                                    vf (&tile)[6][6]) {
#pragma GCC unroll 36
  for (int p = 0; p < 36; ++p) tile[p / 6][p % 6] = buf[(p * T + t) * nv + k];
}
__attribute__((always_inline)) inline void put_tile(const vf (&tile)[6][6], vf* buf, int64_t T, int64_t t,
                                                    int64_t nv, int64_t k) {
#pragma GCC unroll 36
  for (int p = 0; p < 36; ++p) buf[(p * T + t) * nv + k] = tile[p / 6][p % 6];
}

// The transforms of one block's tiles: tile t = (image - n0) * per_image + ty * TW + tx; the
// buffers are [36][tiles][channel vectors].
void input_tiles(const float* x, const Geometry& g, int64_t n0, int64_t n1, vf* v) {
  const int64_t T = (n1 - n0) * g.per_image(), Cv = g.Cv();
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t ty = 0; ty < g.TH; ++ty)
      for (int64_t tx = 0; tx < g.TW; ++tx) {
        const int64_t t = (n - n0) * g.per_image() + ty * g.TW + tx;
        const float* px[6][6];  // the tile's pixels, null in the padding
#pragma GCC unroll 6
        for (int a = 0; a < 6; ++a)
#pragma GCC unroll 6
          for (int b = 0; b < 6; ++b) {
            const int64_t y = 2 * ty - g.pad + a, xx = 2 * tx - g.pad + b;
            px[a][b] = y >= 0 && y < g.H && xx >= 0 && xx < g.W ? x + ((n * g.H + y) * g.W + xx) * g.C : nullptr;
          }
        for (int64_t k = 0; k < Cv; ++k) {
          const Lanes_n lanes(std::min<int64_t>(V, g.C - k * V));
          vf d[6][6], tmp[6][6], out[6][6];
#pragma GCC unroll 6
          for (int a = 0; a < 6; ++a)
#pragma GCC unroll 6
            for (int b = 0; b < 6; ++b) d[a][b] = px[a][b] ? lanes.load(px[a][b] + k * V) : vf{};
#pragma GCC unroll 6
          for (int b = 0; b < 6; ++b) apply(BT, &d[0][b], 6, &tmp[0][b], 6);
#pragma GCC unroll 6
          for (int i = 0; i < 6; ++i) apply(BT, &tmp[i][0], 1, &out[i][0], 1);
          put_tile(out, v, T, t, Cv, k);
        }
      }
}

// Tile (ty, tx) of image n: its four outputs' channels in `base` (N, OH, OW, K), null past the edge.
template <typename P>
inline void tile_outputs(const Geometry& g, int64_t n, int64_t ty, int64_t tx, P* base, P* (&py)[2][2]) {
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 2; ++j) {
      const int64_t oy = 2 * ty + i, ox = 2 * tx + j;
      py[i][j] = oy < g.OH && ox < g.OW ? base + ((n * g.OH + oy) * g.OW + ox) * g.K : nullptr;
    }
}

// With `which`, each 2x2 tile is a window of max pooling after the ReLU (an even-sized output:
// every tile whole): y and which are pooled, as relu_max_pool_rows writes them.
void output_tiles(const vf* m, const Geometry& g, int64_t n0, int64_t n1, const float* bias, float* y,
                  float* which) {
  const int64_t T = (n1 - n0) * g.per_image(), Kv = g.Kv();
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t ty = 0; ty < g.TH; ++ty)
      for (int64_t tx = 0; tx < g.TW; ++tx) {
        const int64_t t = (n - n0) * g.per_image() + ty * g.TW + tx;
        float* py[2][2];
        tile_outputs(g, n, ty, tx, y, py);
        for (int64_t k = 0; k < Kv; ++k) {
          const Lanes_n lanes(std::min<int64_t>(V, g.K - k * V));
          vf in[6][6], tmp[2][6], out[2][2];
          get_tile(m, T, t, Kv, k, in);
#pragma GCC unroll 6
          for (int b = 0; b < 6; ++b) apply(AT, &in[0][b], 6, &tmp[0][b], 6);
#pragma GCC unroll 2
          for (int i = 0; i < 2; ++i) apply(AT, &tmp[i][0], 1, &out[i][0], 1);
          const vf bv = lanes.load(bias + k * V);
          if (which) {
            alignas(64) float win[4][V];
            for (int q = 0; q < 4; ++q) Lanes_n::store_lanes(win[q], out[q / 2][q % 2] + bv);
            const int64_t at = ((n * g.TH + ty) * g.TW + tx) * g.K + k * V;
            if (lanes.n == V) max_window<float, V>(win[0], win[1], win[2], win[3], y + at, which + at, V);
            else max_window<float, 0>(win[0], win[1], win[2], win[3], y + at, which + at, lanes.n);
            continue;
          }
#pragma GCC unroll 2
          for (int i = 0; i < 2; ++i)
#pragma GCC unroll 2
            for (int j = 0; j < 2; ++j)
              if (py[i][j]) lanes.store(py[i][j] + k * V, out[i][j] + bv);
        }
      }
}

// Also adds every output gradient into db (Kv vectors): the bias's gradient. With `which`, dy is
// the pooled output's gradient, unpooled here into each tile (as relu_max_pool_grad_rows would).
void grad_output_tiles(const float* dy, const float* which, const Geometry& g, int64_t n0, int64_t n1, vf* dm,
                       vf* db) {
  const int64_t T = (n1 - n0) * g.per_image(), Kv = g.Kv();
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t ty = 0; ty < g.TH; ++ty)
      for (int64_t tx = 0; tx < g.TW; ++tx) {
        const int64_t t = (n - n0) * g.per_image() + ty * g.TW + tx;
        const float* py[2][2];
        tile_outputs(g, n, ty, tx, dy, py);
        for (int64_t k = 0; k < Kv; ++k) {
          const Lanes_n lanes(std::min<int64_t>(V, g.K - k * V));
          vf in[2][2], tmp[6][2], out[6][6];
          if (which) {
            alignas(64) float win[4][V];
            const int64_t at = ((n * g.TH + ty) * g.TW + tx) * g.K + k * V;
            if (lanes.n == V) unpool_window<float, V>(dy + at, which + at, win[0], win[1], win[2], win[3], V);
            else unpool_window<float, 0>(dy + at, which + at, win[0], win[1], win[2], win[3], lanes.n);
            for (int q = 0; q < 4; ++q) in[q / 2][q % 2] = lanes.load(win[q]);
          } else {
#pragma GCC unroll 2
            for (int i = 0; i < 2; ++i)
#pragma GCC unroll 2
              for (int j = 0; j < 2; ++j) in[i][j] = py[i][j] ? lanes.load(py[i][j] + k * V) : vf{};
          }
          db[k] += (in[0][0] + in[0][1]) + (in[1][0] + in[1][1]);
#pragma GCC unroll 2
          for (int j = 0; j < 2; ++j) apply(A, &in[0][j], 2, &tmp[0][j], 2);
#pragma GCC unroll 6
          for (int a = 0; a < 6; ++a) apply(A, &tmp[a][0], 1, &out[a][0], 1);
          put_tile(out, dm, T, t, Kv, k);
        }
      }
}

// The block's images are whole, so their overlapping tiles are added up here, in `acc` (one
// zero-padded image of channel vectors), and nowhere else.
void grad_input_tiles(const vf* dv, const Geometry& g, int64_t n0, int64_t n1, vf* acc, float* dx) {
  const int64_t T = (n1 - n0) * g.per_image(), Cv = g.Cv(), PH = 2 * g.TH + 4, PW = 2 * g.TW + 4;
  for (int64_t n = n0; n < n1; ++n) {
    std::fill(acc, acc + PH * PW * Cv, vf{});
    for (int64_t ty = 0; ty < g.TH; ++ty)
      for (int64_t tx = 0; tx < g.TW; ++tx) {
        const int64_t t = (n - n0) * g.per_image() + ty * g.TW + tx;
        vf* at = acc + (2 * ty * PW + 2 * tx) * Cv;
        for (int64_t k = 0; k < Cv; ++k) {
          vf in[6][6], tmp[6][6], out[6][6];
          get_tile(dv, T, t, Cv, k, in);
#pragma GCC unroll 6
          for (int l = 0; l < 6; ++l) apply(B, &in[0][l], 6, &tmp[0][l], 6);
#pragma GCC unroll 6
          for (int a = 0; a < 6; ++a) apply(B, &tmp[a][0], 1, &out[a][0], 1);
#pragma GCC unroll 6
          for (int a = 0; a < 6; ++a)
#pragma GCC unroll 6
            for (int b = 0; b < 6; ++b) at[(a * PW + b) * Cv + k] += out[a][b];
        }
      }
    for (int64_t k = 0; k < Cv; ++k) {
      const Lanes_n lanes(std::min<int64_t>(V, g.C - k * V));
      for (int64_t y = 0; y < g.H; ++y)
        for (int64_t xx = 0; xx < g.W; ++xx)
          lanes.store(dx + ((n * g.H + y) * g.W + xx) * g.C + k * V, acc[((y + g.pad) * PW + xx + g.pad) * Cv + k]);
    }
  }
}

// Whole images per block, about 48 tiles (keras-lenet's 14x14: one image of 49).
int64_t images_per_block(const Geometry& g) { return std::max<int64_t>(1, 48 / g.per_image()); }

// f(part, n0, n1) over blocks of images [n0, n1), `part` the thread's index in [0, threads).
template <class F>
void blocks(const Geometry& g, int threads, const F& f) {
  const int64_t ib = images_per_block(g), nb = (g.N + ib - 1) / ib;
  const int most = int(std::max<int64_t>(1, std::min<int64_t>(threads, nb)));
  parallel_for(0, most, 1, most, [&](int64_t p0, int64_t p1) {
    for (int64_t part = p0; part < p1; ++part)
      for (int64_t blk = part * nb / most; blk < (part + 1) * nb / most; ++blk)
        f(part, blk * ib, std::min(g.N, (blk + 1) * ib));
  });
}

// u: [36][C][Kv vectors] (rows past C unused); which: see output_tiles.
void forward(const float* x, const Geometry& g, const vf* u, const float* bias, float* y, float* which,
             int threads) {
  const int64_t tiles = images_per_block(g) * g.per_image(), Cv = g.Cv(), Kv = g.Kv();
  blocks(g, threads, [&](int64_t, int64_t n0, int64_t n1) {
    thread_local Buf v, m;
    v.resize(36 * tiles * Cv);
    m.resize(36 * tiles * Kv);
    const int64_t T = (n1 - n0) * g.per_image();
    input_tiles(x, g, n0, n1, v.data());
    const float* vs = reinterpret_cast<const float*>(v.data());
    for (int p = 0; p < 36; ++p)
      gemm(T, Kv, vs + p * T * Cv * V, Cv * V, 1, u + p * g.C * Kv, Kv, g.C, m.data() + p * T * Kv, Kv, false);
    output_tiles(m.data(), g, n0, n1, bias, y, which);
  });
}

// du: [threads][36][Cv * V rows][Kv vectors] and db: [threads][Kv vectors], zeroed by the caller,
// each thread adding its blocks into its own; ut: [36][K][Cv vectors] (U transposed); dx may be null;
// which: see grad_output_tiles.
void backward(const float* x, const float* dy, const float* which, const Geometry& g, const vf* ut, float* dx,
              vf* du, vf* db, int threads) {
  const int64_t tiles = images_per_block(g) * g.per_image(), Cv = g.Cv(), Kv = g.Kv();
  blocks(g, threads, [&](int64_t part, int64_t n0, int64_t n1) {
    thread_local Buf v, dm, dv, acc;
    v.resize(36 * tiles * Cv);
    dm.resize(36 * tiles * Kv);
    const int64_t T = (n1 - n0) * g.per_image();
    input_tiles(x, g, n0, n1, v.data());
    grad_output_tiles(dy, which, g, n0, n1, dm.data(), db + part * Kv);
    const float* vs = reinterpret_cast<const float*>(v.data());
    const float* dms = reinterpret_cast<const float*>(dm.data());
    vf* dup = du + part * 36 * Cv * V * Kv;
    for (int p = 0; p < 36; ++p)  // dU[p][c] += sum_t V[p][t][c] dM[p][t]
      gemm(g.C, Kv, vs + p * T * Cv * V, 1, Cv * V, dm.data() + p * T * Kv, Kv, T, dup + p * Cv * V * Kv, Kv, true);
    if (!dx) return;
    dv.resize(36 * tiles * Cv);
    acc.resize((2 * g.TH + 4) * (2 * g.TW + 4) * Cv);
    for (int p = 0; p < 36; ++p)  // dV[p][t] = sum_k dM[p][t][k] U^T[p][k]
      gemm(T, Cv, dms + p * T * Kv * V, Kv * V, 1, ut + p * g.K * Cv, Cv, g.K, dv.data() + p * T * Cv, Cv, false);
    grad_input_tiles(dv.data(), g, n0, n1, acc.data(), dx);
  });
}

constexpr float G[6][5] = {{1 / 4.0f, 0, 0, 0, 0},
                           {-1 / 6.0f, -1 / 6.0f, -1 / 6.0f, -1 / 6.0f, -1 / 6.0f},
                           {-1 / 6.0f, 1 / 6.0f, -1 / 6.0f, 1 / 6.0f, -1 / 6.0f},
                           {1 / 24.0f, 1 / 12.0f, 1 / 6.0f, 1 / 3.0f, 2 / 3.0f},
                           {1 / 24.0f, -1 / 12.0f, 1 / 6.0f, -1 / 3.0f, 2 / 3.0f},
                           {0, 0, 0, 0, 1}};

// out[i][j] = sum_a L[i][a] sum_b in[a][b] R[j][b] (L: I x A, R: J x B), each entry nv vectors
// of output channels.
template <int I, int A_, int J, int B_, typename ML, typename MR>
void sandwich(const ML& L, const vf* in, const MR& R, int64_t nv, vf* tmp, vf* out) {
  std::fill(tmp, tmp + I * B_ * nv, vf{});  // tmp[i][b] = sum_a L[i][a] in[a][b]
  for (int i = 0; i < I; ++i)
    for (int a = 0; a < A_; ++a)
      for (int b = 0; b < B_; ++b)
        for (int64_t k = 0; k < nv; ++k) tmp[(i * B_ + b) * nv + k] += L(i, a) * in[(a * B_ + b) * nv + k];
  std::fill(out, out + I * J * nv, vf{});  // out[i][j] = sum_b tmp[i][b] R[j][b]
  for (int i = 0; i < I; ++i)
    for (int j = 0; j < J; ++j)
      for (int b = 0; b < B_; ++b)
        for (int64_t k = 0; k < nv; ++k) out[(i * J + j) * nv + k] += R(j, b) * tmp[(i * B_ + b) * nv + k];
}

// U = G g G^T for every channel pair of the weight (K, C, 5, 5), read by its strides: u [36][C][Kp]
// and ut [36][K][Cp] (zeroed by the caller). Both are written along their rows, ut from a buffer
// of every channel's transform: written a float per row, it took 60 us a call, its rows' cache
// lines fetched one float at a time.
void weight(const float* w, const int64_t* ws, int64_t K, int64_t C, float* u, int64_t Kp, float* ut, int64_t Cp,
            int threads) {
  const int64_t nv = Kp / V;
  const auto Gm = [](int i, int a) { return G[i][a]; };
  Buf all(C * 36 * nv);  // [c][p][Kp]
  const float* o = reinterpret_cast<const float*>(all.data());
  parallel_for(0, C, 4, threads, [&](int64_t c0, int64_t c1) {
    Buf gk(25 * nv), tmp(30 * nv);
    float* g = reinterpret_cast<float*>(gk.data());
    for (int64_t c = c0; c < c1; ++c) {
      for (int64_t k = 0; k < K; ++k)
        for (int a = 0; a < 25; ++a) g[a * Kp + k] = w[k * ws[0] + c * ws[1] + (a / 5) * ws[2] + (a % 5) * ws[3]];
      sandwich<6, 5, 6, 5>(Gm, gk.data(), Gm, nv, tmp.data(), all.data() + c * 36 * nv);
    }
  });
  parallel_for(0, 36, 4, threads, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      for (int64_t c = 0; c < C; ++c) std::copy_n(o + (c * 36 + p) * Kp, K, u + (p * C + c) * Kp);
      for (int64_t k = 0; k < K; ++k)
        for (int64_t c = 0; c < C; ++c) ut[(p * K + k) * Cp + c] = o[(c * 36 + p) * Kp + k];
    }
  });
}

// The weight's gradient G^T dU G, with dU the sum of the threads' parts du [parts][36][Cp][Kp],
// written by the strides gs, in the order of channels_last's memory (c innermost).
void weight_grad(const float* du, int parts, int64_t K, int64_t C, int64_t Cp, int64_t Kp, float* gw,
                 const int64_t* gs, int threads) {
  const int64_t nv = Kp / V;
  const vf* duv = reinterpret_cast<const vf*>(du);
  const auto Gt = [](int a, int i) { return G[i][a]; };
  Buf all(C * 25 * nv);  // [c][a][Kp]
  const float* o = reinterpret_cast<const float*>(all.data());
  parallel_for(0, C, 4, threads, [&](int64_t c0, int64_t c1) {
    Buf d(36 * nv), tmp(30 * nv);
    for (int64_t c = c0; c < c1; ++c) {
      std::fill(d.begin(), d.end(), vf{});
      for (int part = 0; part < parts; ++part)
        for (int p = 0; p < 36; ++p)
          for (int64_t k = 0; k < nv; ++k) d[p * nv + k] += duv[((part * 36 + p) * Cp + c) * nv + k];
      sandwich<5, 6, 5, 6>(Gt, d.data(), Gt, nv, tmp.data(), all.data() + c * 25 * nv);
    }
  });
  parallel_for(0, K, 4, threads, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k)
      for (int a = 0; a < 25; ++a)
        for (int64_t c = 0; c < C; ++c) gw[k * gs[0] + c * gs[1] + (a / 5) * gs[2] + (a % 5) * gs[3]] = o[(c * 25 + a) * Kp + k];
  });
}

}  // namespace wino

}  // namespace

extern "C" {

// Winograd F(2x2, 5x5) convolution (see namespace wino); x, y, dy, dx channels_last and dense;
// u [36][C][Kp] and ut [36][K][Cp], Cp and Kp the counts rounded up to lenet5_vector_width().
#define LENET5_WINO_GEOMETRY wino::Geometry g{N, H, W, C, K, pad, H + 2 * pad - 4, W + 2 * pad - 4, \
                                           (H + 2 * pad - 3) / 2, (W + 2 * pad - 3) / 2}
// With `which` (not null; an even-sized output), y is relu(max_pool2d(y, 2)) and which the
// maxima's positions, as lenet5_relu_max_pool_forward writes them.
void lenet5_winograd_forward(const float* x, int64_t N, int64_t H, int64_t W, int64_t C, int64_t K, int64_t pad,
                             const float* u, const float* bias, float* y, float* which, int threads) {
  LENET5_WINO_GEOMETRY;
  wino::forward(x, g, reinterpret_cast<const vf*>(u), bias, y, which, threads);
}

// du: [threads][36][Cp][Kp] and db: [threads][Kp], zeroed; dx may be null; with `which`, dy is the
// pooled output's gradient.
void lenet5_winograd_backward(const float* x, const float* dy, const float* which, int64_t N, int64_t H, int64_t W,
                              int64_t C, int64_t K, int64_t pad, const float* ut, float* dx, float* du, float* db,
                              int threads) {
  LENET5_WINO_GEOMETRY;
  wino::backward(x, dy, which, g, reinterpret_cast<const vf*>(ut), dx, reinterpret_cast<vf*>(du),
                 reinterpret_cast<vf*>(db), threads);
}

void lenet5_winograd_weight(const float* w, const int64_t* strides, int64_t K, int64_t C, float* u, int64_t Kp,
                            float* ut, int64_t Cp, int threads) {
  wino::weight(w, strides, K, C, u, Kp, ut, Cp, threads);
}

void lenet5_winograd_weight_grad(const float* du, int parts, int64_t K, int64_t C, int64_t Cp, int64_t Kp, float* gw,
                                 const int64_t* strides, int threads) {
  wino::weight_grad(du, parts, K, C, Cp, Kp, gw, strides, threads);
}
#undef LENET5_WINO_GEOMETRY

}  // extern "C"
