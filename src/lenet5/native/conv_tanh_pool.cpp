// Fused  y = avgpool2x2(tanh(conv2d(x, w, b, padding)))  forward and backward, for LeNet-5's
// small convolutions (1->6 and 6->16 channels, 5x5), where oneDNN reaches 20-45% of the
// machine's fp32 peak because a 6- or 16-channel layer fills no vector along channels.
//
// Design: vectorise ACROSS IMAGES. A block of V images (V = 16 with AVX-512, 8 with AVX2,
// 4 otherwise) is repacked as [channel][row][column][V]; every multiply-add is then one
// full vector times one broadcast weight, for any channel count and image size, with no
// border or remainder code inside the hot loops. Output tiles of NO channels x NX columns
// stay in registers (NO*NX accumulators: 24 of the 32 AVX-512 registers, 12 of 16 with AVX2).
// Batches are split into blocks over PyTorch's own thread pool: built with -fopenmp, the library
// binds to the libgomp torch has loaded (see lenet5.native.build), so no second runtime competes
// for the cores, and the caller passes torch's thread count.
// The vector code is GCC/Clang vector extensions: -march picks the width, and the same
// source builds (slower) for any target.
//
// No ATen: a plain C ABI (the `lenet5_*` functions at the end) called through ctypes by
// lenet5.native, which allocates every tensor and passes its memory. Without ATen's headers the
// build took 2 s instead of eight, which a user's first run waits for (3 s since the Winograd and
// one-channel kernels, with winograd.cpp compiled beside this unit: see lenet5.native.build).
#include "kernels.h"

namespace {

struct Shape { int64_t c, h, w; int64_t size() const { return c * h * w; } };

inline vf* at_(vf* p, const Shape& s, int64_t c, int64_t y, int64_t x) { return p + (c * s.h + y) * s.w + x; }

// NCHW images [b0, b0+V) of `src` -> [c][y+pad][x+pad][lane] of `dst` (zeroed first: border and
// missing images of the last block are 0, so they add nothing to any gradient).
void pack(const float* src, int64_t B, int64_t b0, const Shape& in, int64_t pad, vf* dst, const Shape& out) {
  std::fill(dst, dst + out.size(), vf{});
#if defined(__AVX512F__)
  // One gather per packed vector, its lanes the V images' same pixel (in.size() floats apart): image
  // by image, every float was a store to another 64-byte line of dst. LeNet-5's C1+S2 forward and
  // backward took 22% less time, C3+S4 10% (Intel Xeon, batch 256). AVX2's 8-lane gathers gained
  // nothing under the avx2 caps here, and AMD's AVX2 cores run them slowly: AVX2 keeps the loop below.
  if (in.size() * V < (int64_t(1) << 31)) {
    const __m512i index = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                             _mm512_set1_epi32(int(in.size())));
    const __mmask16 lanes = __mmask16((1u << std::min<int64_t>(V, B - b0)) - 1);  // the last block's images
    const float* s = src + b0 * in.size();
    for (int64_t c = 0; c < in.c; ++c)
      for (int64_t y = 0; y < in.h; ++y) {
        const float* row = s + (c * in.h + y) * in.w;
        vf* d = at_(dst, out, c, y + pad, pad);
        for (int64_t x = 0; x < in.w; ++x) d[x] = vf(_mm512_mask_i32gather_ps(_mm512_setzero_ps(), lanes, index, row + x, 4));
      }
    return;
  }
#endif
  float* d = reinterpret_cast<float*>(dst);
  for (int64_t l = 0; l < V && b0 + l < B; ++l) {
    const float* s = src + (b0 + l) * in.size();
    for (int64_t c = 0; c < in.c; ++c)
      for (int64_t y = 0; y < in.h; ++y)
        for (int64_t x = 0; x < in.w; ++x)
          d[((c * out.h + y + pad) * out.w + x + pad) * V + l] = s[(c * in.h + y) * in.w + x];
  }
}

// The inverse, reading rows/columns [crop, crop + out.h/w) of `src`.
void unpack(const vf* src, const Shape& in, int64_t crop, float* dst, int64_t B, int64_t b0, const Shape& out) {
  const float* s = reinterpret_cast<const float*>(src);
  for (int64_t l = 0; l < V && b0 + l < B; ++l) {
    float* d = dst + (b0 + l) * out.size();
    for (int64_t c = 0; c < out.c; ++c)
      for (int64_t y = 0; y < out.h; ++y)
        for (int64_t x = 0; x < out.w; ++x)
          d[(c * out.h + y) * out.w + x] = s[((c * in.h + y + crop) * in.w + x + crop) * V + l];
  }
}

// One register tile of a valid KxK correlation: out[o0..o0+NO)[y][x0..x0+NX) =
// sum_{i,ky,kx} w[i][ky][kx][o] * in[i][y+ky][x0+kx..]. `w` is laid out [i][ky][kx][o].
// Kernel rows [ky0, ky1) only: the others would read rows of `in` known to be zero.
template <int NO, int NX>
void conv_tile(const vf* __restrict in, const Shape& is, const float* __restrict w, int64_t co,
               vf* __restrict out, const Shape& os, int64_t o0, int64_t y, int64_t x0, int ky0, int ky1) {
  vf acc[NO][NX] = {};
  for (int64_t i = 0; i < is.c; ++i) {
    for (int ky = ky0; ky < ky1; ++ky) {
      const vf* row = in + (i * is.h + y + ky) * is.w + x0;
      const float* wr = w + ((i * K + ky) * K) * co + o0;
#pragma GCC unroll 5
      for (int kx = 0; kx < K; ++kx)
#pragma GCC unroll 8
        for (int o = 0; o < NO; ++o) {
          const float wv = wr[kx * co + o];
#pragma GCC unroll 12
          for (int t = 0; t < NX; ++t) acc[o][t] += wv * row[t + kx];
        }
    }
  }
  for (int o = 0; o < NO; ++o)
    for (int t = 0; t < NX; ++t) out[((o0 + o) * os.h + y) * os.w + x0 + t] = acc[o][t];
}

// Rows of `in` outside [r0, r1) are zero padding: skipped. That halves the multiply-adds of the
// input gradient, whose input (the output gradient padded by K-1) is half padding at C3's size.
template <int NO, int NX>
void conv_all(const vf* in, const Shape& is, int64_t r0, int64_t r1, const float* w, vf* out, const Shape& os) {
  for (int64_t o0 = 0; o0 < os.c; o0 += NO)
    for (int64_t y = 0; y < os.h; ++y) {
      const int ky0 = int(std::max<int64_t>(0, r0 - y)), ky1 = int(std::min<int64_t>(K, r1 - y));
      for (int64_t x0 = 0; x0 < os.w; x0 += NX)  // the last tile overlaps the one before: stores are idempotent
        conv_tile<NO, NX>(in, is, w, os.c, out, os, o0, y, std::min(x0, os.w - NX), ky0, ky1);
    }
}

using ConvFn = void (*)(const vf*, const Shape&, int64_t, int64_t, const float*, vf*, const Shape&);
struct Tiling { int no, nx; ConvFn fn; };
#if defined(__AVX512F__)
const Tiling TILINGS[] = {{6, 4, conv_all<6, 4>}, {4, 5, conv_all<4, 5>}, {4, 6, conv_all<4, 6>},
                          {3, 7, conv_all<3, 7>}, {2, 8, conv_all<2, 8>}, {1, 8, conv_all<1, 8>}, {1, 1, conv_all<1, 1>}};
#else
const Tiling TILINGS[] = {{6, 2, conv_all<6, 2>}, {4, 3, conv_all<4, 3>}, {3, 4, conv_all<3, 4>},
                          {2, 5, conv_all<2, 5>}, {2, 6, conv_all<2, 6>}, {1, 8, conv_all<1, 8>}, {1, 1, conv_all<1, 1>}};
#endif

// Picks the tiling with the fewest loads + multiply-adds per output (overlapping tiles count).
void conv(const vf* in, const Shape& is, int64_t r0, int64_t r1, const float* w, vf* out, const Shape& os) {
  const Tiling* best = nullptr;
  double best_cost = 1e300;
  for (const Tiling& t : TILINGS) {
    if (os.c % t.no || os.w < t.nx) continue;
    const double tiles = double(os.c / t.no) * ((os.w + t.nx - 1) / t.nx);
    const double cost = tiles * K * (t.no * t.nx + t.nx + K + t.no);  // FMAs, row loads, weight broadcasts
    if (cost < best_cost) best_cost = cost, best = &t;
  }
  best->fn(in, is, r0, r1, w, out, os);
}

// Weight gradient of one (input channel, kernel row), NO output channels at once:
// gw[o][i][ky][kx] = sum_{y,x} dz[o][y][x] * in[i][y+ky][x+kx], per lane, into `gacc`.
template <int NO>
void wgrad_rows(const vf* __restrict in, const Shape& is, const vf* __restrict dz, const Shape& ds, int64_t dpad,
                const Shape& os, int64_t o0, int64_t i, int ky, vf* __restrict gacc) {
  vf acc[NO][K] = {};
  for (int64_t y = 0; y < os.h; ++y) {
    const vf* row = in + (i * is.h + y + ky) * is.w;
    for (int64_t x = 0; x < os.w; ++x) {
      vf d[NO];
#pragma GCC unroll 8
      for (int o = 0; o < NO; ++o) d[o] = dz[((o0 + o) * ds.h + y + dpad) * ds.w + x + dpad];
#pragma GCC unroll 5
      for (int kx = 0; kx < K; ++kx)
#pragma GCC unroll 8
        for (int o = 0; o < NO; ++o) acc[o][kx] += d[o] * row[x + kx];
    }
  }
  for (int o = 0; o < NO; ++o)
    for (int kx = 0; kx < K; ++kx) gacc[(((o0 + o) * is.c + i) * K + ky) * K + kx] = acc[o][kx];
}

template <int NO>
void wgrad(const vf* in, const Shape& is, const vf* dz, const Shape& ds, int64_t dpad, const Shape& os, vf* gacc) {
  for (int64_t o0 = 0; o0 < os.c; o0 += NO)
    for (int64_t i = 0; i < is.c; ++i)
      for (int ky = 0; ky < K; ++ky) wgrad_rows<NO>(in, is, dz, ds, dpad, os, o0, i, ky, gacc);
}

void wgrad_any(const vf* in, const Shape& is, const vf* dz, const Shape& ds, int64_t dpad, const Shape& os, vf* gacc) {
  constexpr int most = ACC / K;  // 4 with AVX-512, 2 with AVX2
  if (most >= 4 && os.c % 4 == 0) return wgrad<4>(in, is, dz, ds, dpad, os, gacc);
  if (most >= 3 && os.c % 3 == 0) return wgrad<3>(in, is, dz, ds, dpad, os, gacc);
  if (os.c % 2 == 0) return wgrad<2>(in, is, dz, ds, dpad, os, gacc);
  wgrad<1>(in, is, dz, ds, dpad, os, gacc);
}

// tanh as Eigen's rational approximation (clamped at +-7.9, where tanh is 1 in fp32): a few
// ulp from std::tanh, and vectorisable where libm's tanh is not.
inline vf vtanh(vf x) {
  const vf c = vf{} + 7.90531110763549805f;
  x = x > c ? c : x;
  x = x < -c ? -c : x;
  const vf x2 = x * x;
  vf p = x2 * -2.76076847742355e-16f + 2.00018790482477e-13f;
  p = p * x2 + -8.60467152213735e-11f;
  p = p * x2 + 5.12229709037114e-08f;
  p = p * x2 + 1.48572235717979e-05f;
  p = p * x2 + 6.37261928875436e-04f;
  p = p * x2 + 4.89352455891786e-03f;
  p = p * x;
  vf q = x2 * 1.19825839466702e-06f + 1.18534705686654e-04f;
  q = q * x2 + 2.26843463243900e-03f;
  q = q * x2 + 4.89352518554385e-03f;
  return p / q;
}

// Runs work(block, scratch) for every block on PyTorch's threads. Blocks are claimed one at a time
// from a shared counter rather than split in fixed halves, so when another process takes a core
// the thread still running claims the rest instead of waiting for the descheduled one.
template <class Scratch, class Work>
void for_each_block(int64_t nblocks, int threads, const Work& work) {
  std::atomic<int64_t> next{0};
  parallel_for(0, std::min<int64_t>(nblocks, threads), 1, threads, [&](int64_t, int64_t) {
    Scratch scratch;
    for (int64_t blk; (blk = next.fetch_add(1)) < nblocks;) work(blk, scratch);
  });
}

// A weight (co, ci, K, K) in any layout: element [o][i][ky][kx] at o*st[0] + i*st[1] + ky*st[2] + kx*st[3].
struct Weight {
  const float* p; int64_t co, ci; const int64_t* st;
  float operator()(int64_t o, int64_t i, int64_t ky, int64_t kx) const {
    return p[o * st[0] + i * st[1] + ky * st[2] + kx * st[3]];
  }
};

// x (B, ci, h, w) contiguous -> out (B, co, oh/2, ow/2) and, unless xsave is null, the packed
// padded input and s = (1 - tanh^2) / 4 per block (nblocks * in.size() and nblocks * conv.size()
// vectors): all the backward pass needs.
void forward(const float* xp, int64_t B, int64_t ci, int64_t h, int64_t w, const Weight& weight,
             const float* bp, int64_t pad, float* op, float* xsave, float* ssave, int threads) {
  const int64_t nblocks = (B + V - 1) / V, co = weight.co;
  std::vector<float> wperm(ci * K * K * co);  // [i][ky][kx][o]: NO weights side by side
  for (int64_t i = 0; i < ci; ++i)
    for (int ky = 0; ky < K; ++ky)
      for (int kx = 0; kx < K; ++kx)
        for (int64_t o = 0; o < co; ++o) wperm[((i * K + ky) * K + kx) * co + o] = weight(o, i, ky, kx);
  const float* wp = wperm.data();
  const bool save = xsave != nullptr;
  const Shape is{ci, h + 2 * pad, w + 2 * pad}, os{co, is.h - K + 1, is.w - K + 1};
  const Shape ps{os.c, os.h / 2, os.w / 2}, xs{ci, h, w};
  vf* xsp = reinterpret_cast<vf*>(xsave);
  vf* ssp = reinterpret_cast<vf*>(ssave);
  struct Scratch { Buf xin, z, pooled; };
  for_each_block<Scratch>(nblocks, threads, [&](int64_t blk, Scratch& sc) {
    if (sc.z.empty()) sc.xin.resize(save ? 0 : is.size()), sc.z.resize(os.size()), sc.pooled.resize(ps.size());
    vf *xin = sc.xin.data(), *z = sc.z.data(), *pooled = sc.pooled.data();
    vf* xb = save ? xsp + blk * is.size() : xin;
    pack(xp, B, blk * V, xs, pad, xb, is);
    conv(xb, is, pad, is.h - pad, wp, z, os);
    vf* s = save ? ssp + blk * os.size() : nullptr;
    for (int64_t o = 0; o < os.c; ++o)
      for (int64_t y = 0; y < ps.h; ++y)
        for (int64_t x = 0; x < ps.w; ++x) {
          vf sum{};
          for (int dy = 0; dy < 2; ++dy)
            for (int dx = 0; dx < 2; ++dx) {
              const int64_t at = (o * os.h + 2 * y + dy) * os.w + 2 * x + dx;
              const vf t = vtanh(z[at] + bp[o]);
              sum += t;
              if (s) s[at] = (1.0f - t * t) * 0.25f;
            }
          pooled[(o * ps.h + y) * ps.w + x] = sum * 0.25f;
        }
    unpack(pooled, ps, 0, op, B, blk * V, ps);
  });
}

// gout (B, co, oh/2, ow/2) contiguous and what forward saved -> the weight gradient, written in
// the weight's own layout (gw_st, as DDP's buckets expect), the bias gradient (co floats), and
// the input gradient (B, ci, in_h, in_w) unless gip is null.
void backward(const float* gp, int64_t B, int64_t in_h, int64_t in_w, int64_t pad, const float* xsave,
              const float* ssave, const Weight& weight, float* gip, float* gwp, const int64_t* gw_st, float* gbp,
              int threads) {
  const int64_t nblocks = (B + V - 1) / V, co = weight.co, ci = weight.ci;
  std::vector<float> wflip(gip ? co * K * K * ci : 0);  // flipped, [o][ky][kx][i]
  for (int64_t o = 0; gip && o < co; ++o)
    for (int ky = 0; ky < K; ++ky)
      for (int kx = 0; kx < K; ++kx)
        for (int64_t i = 0; i < ci; ++i) wflip[((o * K + ky) * K + kx) * ci + i] = weight(o, i, K - 1 - ky, K - 1 - kx);
  const float* wtp = wflip.data();
  const bool need_input = gip != nullptr;
  const Shape is{ci, in_h + 2 * pad, in_w + 2 * pad}, os{co, is.h - K + 1, is.w - K + 1}, ps{co, os.h / 2, os.w / 2};
  // dz padded by K-1 on every side: the input gradient is then a valid correlation of it with
  // the flipped, transposed kernel, the same conv() as the forward pass.
  const int64_t dpad = need_input ? K - 1 : 0;
  const Shape ds{co, os.h + 2 * dpad, os.w + 2 * dpad}, gs{ci, in_h, in_w};
  const int64_t nw = co * ci * K * K;
  // Each block's weight and bias gradient is summed apart and the blocks added in order: the
  // result does not depend on which thread took which block (runs stay bit-reproducible).
  std::unique_ptr<float[]> partial(new float[nblocks * (nw + co)]);  // every element is written
  float* pp = partial.get();
  const vf* xsp = reinterpret_cast<const vf*>(xsave);
  const vf* ssp = reinterpret_cast<const vf*>(ssave);
  struct Scratch { Buf gpool, dz, gx, acc; };
  for_each_block<Scratch>(nblocks, threads, [&](int64_t blk, Scratch& sc) {
    if (sc.acc.empty())
      sc.gpool.resize(ps.size()), sc.dz.resize(ds.size()), sc.gx.resize(need_input ? is.size() : 0), sc.acc.resize(nw + co);
    vf *gpool = sc.gpool.data(), *dz = sc.dz.data(), *acc = sc.acc.data();
    const vf* xb = xsp + blk * is.size();
    const vf* s = ssp + blk * os.size();
    pack(gp, B, blk * V, ps, 0, gpool, ps);
    for (int64_t o = 0; o < co; ++o) {
      vf bsum{};
      for (int64_t y = 0; y < os.h; ++y)
        for (int64_t x = 0; x < os.w; ++x) {
          const vf d = gpool[(o * ps.h + y / 2) * ps.w + x / 2] * s[(o * os.h + y) * os.w + x];
          dz[(o * ds.h + y + dpad) * ds.w + x + dpad] = d;
          bsum += d;
        }
      acc[nw + o] = bsum;
    }
    wgrad_any(xb, is, dz, ds, dpad, os, acc);
    for (int64_t j = 0; j < nw + co; ++j) {
      float sum = 0;
      for (int l = 0; l < V; ++l) sum += acc[j][l];
      pp[blk * (nw + co) + j] = sum;
    }
    if (need_input) {
      conv(dz, ds, dpad, dpad + os.h, wtp, sc.gx.data(), is);
      unpack(sc.gx.data(), is, pad, gip, B, blk * V, gs);
    }
  });
  for (int64_t j = 0; j < nw + co; ++j) {
    float sum = 0;
    for (int64_t blk = 0; blk < nblocks; ++blk) sum += pp[blk * (nw + co) + j];
    if (j < nw) {
      const int64_t o = j / (ci * K * K), i = j / (K * K) % ci, ky = j / K % K, kx = j % K;
      gwp[o * gw_st[0] + i * gw_st[1] + ky * gw_st[2] + kx * gw_st[3]] = sum;
    } else {
      gbp[j - nw] = sum;
    }
  }
}

// RMSprop's update as PyTorch's (no momentum, not centred) computes it,
//   g += wd p;  s = alpha s + (1 - alpha) g^2;  p -= lr g / (sqrt(s) + eps),
// in one pass over each tensor where torch.optim.RMSprop makes five (mul, addcmul, sqrt, add,
// addcdiv), each reading and writing the whole tensor: for keras-lenet's 1.25M parameters that
// was a fifth of a training step at batch 32. The caller checks that every parameter and average
// is float32, each gradient float32 or bfloat16, and that a parameter, its gradient and its
// average share one dense layout (lenet5.native checks it), and passes each tensor in turn.
// Each line computes one or two of PyTorch's ops as ATen's vector kernels do (the FMA is theirs;
// no product feeds a sum elsewhere, so the compiler adds none): the average comes out bit for bit,
// the weight within one unit in the last place (up to 0.2% of them per step, measured).
//
// bf16 training (`copies` not empty): the forward and backward passes run on a bfloat16 copy of
// each weight, whose gradient is bfloat16. Under autocast they are made every step, the copy by
// one cast and the gradient's way back to float32 by another: for keras-lenet's dense weight the
// two took a tenth of the step. Here the gradient is read as bfloat16 (widening is exact) and the
// copy written in the same pass, rounded to nearest even as torch's cast rounds it, so the run's
// arithmetic is the same as under autocast's casts.
inline uint16_t narrow(float f) {  // c10::BFloat16's round_to_nearest_even, in a form that vectorises
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return f != f ? uint16_t(0x7fc0) : uint16_t(rounded);
}

template <typename G, bool kCopy>
void rmsprop_tensor(float* const p_, const G* const g_, float* const s_, uint16_t* const c_, int64_t n, float a,
                    float b, float e, float l, float wd, int threads) {
  parallel_for(0, n, 1 << 15, threads, [=](int64_t begin, int64_t end) {
    // restrict-qualified here, inside the body OpenMP outlines: pointers reached through the
    // closure carry no such promise, and the loop would not vectorise (3.5x slower, measured)
    float* __restrict p = p_;
    const G* __restrict g = g_;
    float* __restrict s = s_;
    uint16_t* __restrict c = c_;
    for (int64_t i = begin; i < end; ++i) {
      float gi;
      if constexpr (std::is_same_v<G, float>) gi = g[i]; else gi = widen(g[i]);
      if (wd != 0.0f) gi = std::fma(wd, p[i], gi);  // grad.add(param, alpha=wd): ATen's vector path is an FMA
      const float si = std::fma(b * gi, gi, s[i] * a);  // square_avg.mul_(alpha).addcmul_(grad, grad, 1 - alpha)
      s[i] = si;
      const float pi = p[i] + (-l * gi) / (std::sqrt(si) + e);  // param.addcdiv_(grad, sqrt(avg) + eps, value=-lr)
      p[i] = pi;
      if constexpr (kCopy) c[i] = narrow(pi);
    }
  });
}

// The pooling kernel for keras-lenet's stages: max_window and unpool_window (kernels.h) over the
// rows of channels_last tensors.
// f(L, offset, count) over chunks of V channels covering [0, C), the last one overlapping the one
// before (L = V, a compile-time trip count); with fewer than V channels, once over all of them
// (L = 0: a loop of variable length).
template <class F>
inline void by_chunks(int64_t C, F&& f) {
  if (C < V) return f(std::integral_constant<int, 0>{}, 0, C);
  for (int64_t ch = 0;; ch += V) {
    ch = std::min<int64_t>(ch, C - V);
    f(std::integral_constant<int, V>{}, ch, V);
    if (ch + V == C) break;
  }
}

template <typename T>
void relu_max_pool_rows(const T* __restrict x, T* __restrict y, T* __restrict which, int64_t C, int64_t W) {
  for (int64_t ow = 0; ow < W / 2; ++ow) {  // x: rows 2 oh and 2 oh + 1, [2][W][C]; y, which: [W / 2][C]
    const T *a = x + 2 * ow * C, *b = a + C, *c = a + W * C, *d = c + C;
    T *yo = y + ow * C, *wo = which + ow * C;
    by_chunks(C, [&](auto L, int64_t ch, int64_t n) {
      max_window<T, decltype(L)::value>(a + ch, b + ch, c + ch, d + ch, yo + ch, wo + ch, n);
    });
  }
}

template <typename T>
void relu_max_pool_grad_rows(const T* __restrict g, const T* __restrict which, T* __restrict gx, int64_t C,
                             int64_t W) {
  for (int64_t ow = 0; ow < W / 2; ++ow) {
    const T *go = g + ow * C, *wo = which + ow * C;
    T *a = gx + 2 * ow * C, *b = a + C, *c = a + W * C, *d = c + C;
    by_chunks(C, [&](auto L, int64_t ch, int64_t n) {
      unpool_window<T, decltype(L)::value>(go + ch, wo + ch, a + ch, b + ch, c + ch, d + ch, n);
    });
  }
}

// x (N, C, H, W) channels_last -> y and which (N, C, H/2, W/2) channels_last; positions 0-4 kept in
// x's own type (as float values for float32, as the bits' integer for bfloat16).
template <typename T>
void pool_forward(const T* xp, int64_t N, int64_t C, int64_t H, int64_t W, T* yp, T* wp, int threads) {
  const int64_t rows = N * (H / 2), in_row = 2 * W * C, out_row = (W / 2) * C;
  const int64_t grain = std::max<int64_t>(1, (1 << 14) / std::max<int64_t>(1, in_row));
  parallel_for(0, rows, grain, threads, [=](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) relu_max_pool_rows(xp + r * in_row, yp + r * out_row, wp + r * out_row, C, W);
  });
}

template <typename T>
void pool_backward(const T* gp, const T* wp, int64_t N, int64_t C, int64_t OH, int64_t OW, T* xp, int threads) {
  const int64_t W = 2 * OW, rows = N * OH, in_row = 2 * W * C, out_row = OW * C;
  const int64_t grain = std::max<int64_t>(1, (1 << 14) / std::max<int64_t>(1, in_row));
  parallel_for(0, rows, grain, threads, [=](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) relu_max_pool_grad_rows(gp + r * out_row, wp + r * out_row, xp + r * in_row, C, W);
  });
}

// max_pool2d(relu(conv2d(x, w, b))) for a 5x5 convolution of one input channel (keras-lenet's
// first: 1 -> 20 channels on 28x28, "same"), forward and the weight's and bias's gradients, all
// channels_last. oneDNN ran the convolution at about a third of the fp32 peak, and its 2 MB output
// (at batch 32) went to memory and back twice, forward and backward, around the pooling kernel.
// Here each image is one thread's: its convolution is computed two rows at a time into a buffer
// that the pooling kernel above (relu_max_pool_rows) reads while it is in L1, and its backward
// unpools the gradient into an image-sized buffer (in L2) that the weight's gradient reads.
// The convolution: each output pixel's channels are whole vectors (the last one partial), a row of
// PX pixels' accumulators in registers, every tap one broadcast of the input pixel times KV weight
// vectors, read from a zero-padded copy of the image (no border tests).
namespace single {

#if defined(__AVX512F__)
constexpr int ACCS = 24;
#else
constexpr int ACCS = 12;
#endif

struct Geometry {
  int64_t N, H, W, K, pad, OH, OW;  // OH, OW: the convolution's, even
  int64_t PH() const { return OH + 4; }
  int64_t PW() const { return OW + 4 + 8; }  // room for a last group of pixels past the edge
};

// image n of x (N, H, W) into pbuf (PH, PW) with `pad` zeros around it.
void pad_image(const float* x, const Geometry& g, int64_t n, float* pbuf) {
  std::fill(pbuf, pbuf + g.PH() * g.PW(), 0.0f);
  for (int64_t y = 0; y < g.H; ++y) {
    const int64_t py = y + g.pad;
    if (py < 0 || py >= g.PH()) continue;
    for (int64_t xx = 0; xx < g.W; ++xx) {
      const int64_t px = xx + g.pad;
      if (px >= 0 && px < g.OW + 4) pbuf[py * g.PW() + px] = x[(n * g.H + y) * g.W + xx];
    }
  }
}

// Output row oy of the convolution into out [OW][K]; w: [25][KV vectors] (zero lanes past K),
// bias: [KV vectors].
template <int KV>
void conv_row(const float* pbuf, const Geometry& g, int64_t oy, const vf* w, const vf* bias, const Lanes_n& last,
              float* out) {
  constexpr int PX = std::max(1, std::min(8, ACCS / KV));
  for (int64_t ox = 0; ox < g.OW; ox += PX) {
    vf acc[PX][KV];
#pragma GCC unroll 8
    for (int p = 0; p < PX; ++p)
#pragma GCC unroll 4
      for (int v = 0; v < KV; ++v) acc[p][v] = bias[v];
    for (int a = 0; a < 5; ++a) {
      const float* row = pbuf + (oy + a) * g.PW() + ox;
#pragma GCC unroll 5
      for (int b = 0; b < 5; ++b) {
        vf wv[KV];
#pragma GCC unroll 4
        for (int v = 0; v < KV; ++v) wv[v] = w[(a * 5 + b) * KV + v];
#pragma GCC unroll 8
        for (int p = 0; p < PX; ++p) {
          const float xv = row[p + b];
#pragma GCC unroll 4
          for (int v = 0; v < KV; ++v) acc[p][v] += xv * wv[v];
        }
      }
    }
    for (int p = 0; p < PX && ox + p < g.OW; ++p) {
      float* o = out + (ox + p) * g.K;
#pragma GCC unroll 4
      for (int v = 0; v < KV - 1; ++v) Lanes_n::store_lanes(o + v * V, acc[p][v]);
      last.store(o + (KV - 1) * V, acc[p][KV - 1]);
    }
  }
}

// y, which: (N, OH/2, OW/2, K), as relu_max_pool's.
template <int KV>
void forward(const float* x, const Geometry& g, const vf* w, const vf* bias, float* y, float* which, int threads) {
  const Lanes_n last(g.K - (KV - 1) * V);
  const int64_t pooled_row = (g.OW / 2) * g.K;
  parallel_for(0, g.N, 1, threads, [&](int64_t n0, int64_t n1) {
    std::vector<float> pbuf(g.PH() * g.PW()), rows(2 * g.OW * g.K + V);
    for (int64_t n = n0; n < n1; ++n) {
      pad_image(x, g, n, pbuf.data());
      for (int64_t r = 0; r < g.OH / 2; ++r) {
        conv_row<KV>(pbuf.data(), g, 2 * r, w, bias, last, rows.data());
        conv_row<KV>(pbuf.data(), g, 2 * r + 1, w, bias, last, rows.data() + g.OW * g.K);
        const int64_t at = (n * (g.OH / 2) + r) * pooled_row;
        relu_max_pool_rows<float>(rows.data(), y + at, which + at, g.K, g.OW);
      }
    }
  });
}

// The weight's and bias's gradients from the pooled output's gradient: each image's convolution
// gradient unpooled into dy [OH][OW][K], then 26 taps (the bias's input is 1 everywhere) in groups
// of TP whose accumulators stay in registers over all of the image's pixels. gw: [threads][26][KV
// vectors], zeroed by the caller, each thread adding into its own.
template <int KV>
void backward(const float* x, const float* grad, const float* which, const Geometry& g, vf* gw, int threads) {
  constexpr int TP = std::max(1, ACCS / KV);
  const Lanes_n last(g.K - (KV - 1) * V);
  const int64_t nb = std::max<int64_t>(1, std::min<int64_t>(threads, g.N)), pooled_row = (g.OW / 2) * g.K;
  parallel_for(0, nb, 1, int(nb), [&](int64_t p0, int64_t p1) {
    std::vector<float> pbuf(g.PH() * g.PW()), ones(g.PH() * g.PW(), 1.0f), dy(g.OH * g.OW * g.K + V);
    for (int64_t part = p0; part < p1; ++part) {
      vf* acc_out = gw + part * 26 * KV;
      for (int64_t n = part * g.N / nb; n < (part + 1) * g.N / nb; ++n) {
        pad_image(x, g, n, pbuf.data());
        for (int64_t r = 0; r < g.OH / 2; ++r) {
          const int64_t at = (n * (g.OH / 2) + r) * pooled_row;
          relu_max_pool_grad_rows<float>(grad + at, which + at, dy.data() + 2 * r * g.OW * g.K, g.K, g.OW);
        }
        for (int t0 = 0; t0 < 26; t0 += TP) {
          const float* base[TP];
          for (int t = 0; t < TP; ++t)
            base[t] = t0 + t < 25 ? pbuf.data() + ((t0 + t) / 5) * g.PW() + (t0 + t) % 5 : ones.data();
          vf acc[TP][KV];
#pragma GCC unroll 24
          for (int t = 0; t < TP; ++t)
#pragma GCC unroll 4
            for (int v = 0; v < KV; ++v) acc[t][v] = vf{};
          for (int64_t oy = 0; oy < g.OH; ++oy)
            for (int64_t ox = 0; ox < g.OW; ++ox) {
              const float* d = dy.data() + (oy * g.OW + ox) * g.K;
              vf dv[KV];
#pragma GCC unroll 4
              for (int v = 0; v < KV - 1; ++v) dv[v] = Lanes_n::load_lanes(d + v * V);
              dv[KV - 1] = last.load(d + (KV - 1) * V);
              const int64_t px = oy * g.PW() + ox;
#pragma GCC unroll 24
              for (int t = 0; t < TP; ++t) {
                const float xv = base[t][px];
#pragma GCC unroll 4
                for (int v = 0; v < KV; ++v) acc[t][v] += xv * dv[v];
              }
            }
          for (int t = 0; t < TP && t0 + t < 26; ++t)
            for (int v = 0; v < KV; ++v) acc_out[(t0 + t) * KV + v] += acc[t][v];
        }
      }
    }
  });
}

}  // namespace single
}  // namespace

// The C ABI lenet5.native calls; it checks shapes, types and layouts before every call.
extern "C" {

int lenet5_vector_width() { return V; }

// The threads parallel_for runs a loop of `threads` chunks on: 1 where the library was built
// without OpenMP, whatever torch's thread count (lenet5.native.build makes sure it is not).
int64_t lenet5_parallel_threads(int threads) {
  std::atomic<int64_t> chunks{0};
  parallel_for(0, threads, 1, threads, [&](int64_t, int64_t) { chunks.fetch_add(1); });
  return chunks.load();
}

// The weight (co, ci, 5, 5) in any layout, by its four strides.
void lenet5_conv_tanh_pool_forward(const float* x, int64_t B, int64_t ci, int64_t h, int64_t w, const float* weight,
                                   const int64_t* weight_strides, int64_t co, const float* bias, int64_t pad, float* out,
                                   float* xsave, float* ssave, int threads) {
  forward(x, B, ci, h, w, Weight{weight, co, ci, weight_strides}, bias, pad, out, xsave, ssave, threads);
}

// The weight gradient is written with the strides given (the weight's own, or any other).
void lenet5_conv_tanh_pool_backward(const float* gout, int64_t B, int64_t ci, int64_t in_h, int64_t in_w, int64_t co,
                                    int64_t pad, const float* xsave, const float* ssave, const float* weight,
                                    const int64_t* weight_strides, float* gin, float* gw, const int64_t* gw_strides,
                                    float* gb, int threads) {
  backward(gout, B, in_h, in_w, pad, xsave, ssave, Weight{weight, co, ci, weight_strides}, gin, gw, gw_strides, gb,
           threads);
}

// One tensor of RMSprop's step; `grad` is bfloat16 where grad_bf16, and `copy` (bfloat16, or null)
// receives the new weights.
void lenet5_rmsprop_tensor(float* param, const void* grad, int grad_bf16, float* avg, uint16_t* copy, int64_t n,
                           float alpha, float one_minus_alpha, float eps, float lr, float weight_decay, int threads) {
  if (grad_bf16) {
    const uint16_t* g = static_cast<const uint16_t*>(grad);
    copy ? rmsprop_tensor<uint16_t, true>(param, g, avg, copy, n, alpha, one_minus_alpha, eps, lr, weight_decay, threads)
         : rmsprop_tensor<uint16_t, false>(param, g, avg, copy, n, alpha, one_minus_alpha, eps, lr, weight_decay, threads);
  } else {
    const float* g = static_cast<const float*>(grad);
    copy ? rmsprop_tensor<float, true>(param, g, avg, copy, n, alpha, one_minus_alpha, eps, lr, weight_decay, threads)
         : rmsprop_tensor<float, false>(param, g, avg, copy, n, alpha, one_minus_alpha, eps, lr, weight_decay, threads);
  }
}

void lenet5_relu_max_pool_forward(const void* x, int bf16, int64_t N, int64_t C, int64_t H, int64_t W, void* y,
                                  void* which, int threads) {
  if (bf16)
    pool_forward(static_cast<const uint16_t*>(x), N, C, H, W, static_cast<uint16_t*>(y), static_cast<uint16_t*>(which),
                 threads);
  else
    pool_forward(static_cast<const float*>(x), N, C, H, W, static_cast<float*>(y), static_cast<float*>(which), threads);
}

void lenet5_relu_max_pool_backward(const void* grad, const void* which, int bf16, int64_t N, int64_t C, int64_t OH,
                                   int64_t OW, void* gx, int threads) {
  if (bf16)
    pool_backward(static_cast<const uint16_t*>(grad), static_cast<const uint16_t*>(which), N, C, OH, OW,
                  static_cast<uint16_t*>(gx), threads);
  else
    pool_backward(static_cast<const float*>(grad), static_cast<const float*>(which), N, C, OH, OW,
                  static_cast<float*>(gx), threads);
}


// max_pool2d(relu(conv2d)) of one input channel by a 5x5 weight (see namespace single); x (N, 1, H,
// W) dense; y, which and grad (N, K, OH/2, OW/2) channels_last; w [25][Kp], bias [Kp], gw
// [threads][26][Kp] (zeroed: 25 taps and the bias), Kp = K rounded up to whole vectors, at most 4.
#define LENET5_SINGLE(fn, ...)                                 \
  switch ((K + V - 1) / V) {                                   \
    case 1: single::fn<1>(__VA_ARGS__); break;                 \
    case 2: single::fn<2>(__VA_ARGS__); break;                 \
    case 3: single::fn<3>(__VA_ARGS__); break;                 \
    case 4: single::fn<4>(__VA_ARGS__); break;                 \
    default: break;                                            \
  }
void lenet5_single_conv_pool_forward(const float* x, int64_t N, int64_t H, int64_t W, int64_t K, int64_t pad,
                                     const float* w, const float* bias, float* y, float* which, int threads) {
  const single::Geometry g{N, H, W, K, pad, H + 2 * pad - 4, W + 2 * pad - 4};
  LENET5_SINGLE(forward, x, g, reinterpret_cast<const vf*>(w), reinterpret_cast<const vf*>(bias), y, which, threads)
}

void lenet5_single_conv_pool_backward(const float* x, const float* grad, const float* which, int64_t N, int64_t H,
                                      int64_t W, int64_t K, int64_t pad, float* gw, int threads) {
  const single::Geometry g{N, H, W, K, pad, H + 2 * pad - 4, W + 2 * pad - 4};
  LENET5_SINGLE(backward, x, grad, which, g, reinterpret_cast<vf*>(gw), threads)
}
#undef LENET5_SINGLE

}  // extern "C"
