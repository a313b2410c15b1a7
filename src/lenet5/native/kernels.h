// What the native kernels' translation units share: the vector type for this target, the OpenMP
// loop, and the pooling window and masked partial vectors that keras-lenet's kernels both use.
// lenet5.native.build compiles each unit (build.UNITS) on its own, in parallel, and links them
// into one library; everything here is inline or in an unnamed namespace, so nothing clashes.
#pragma once
#include <algorithm>
#include <cmath>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>
#if defined(__AVX__)
#include <immintrin.h>  // Lanes_n's masked loads and stores; other targets take its plain loop
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__AVX512F__)
constexpr int V = 16, ACC = 24;
#elif defined(__AVX__)
constexpr int V = 8, ACC = 12;
#else
constexpr int V = 4, ACC = 12;
#endif
typedef float vf __attribute__((vector_size(V * sizeof(float))));
constexpr int K = 5;  // the kernel size instantiated; Python sends other sizes to PyTorch

namespace {

// at::parallel_for's contract with OpenMP: f(begin, end) over [begin, end) split into one chunk
// per thread, at most `threads` threads and none for less than `grain` items; a plain call when
// already inside a parallel region or built without OpenMP.
template <class F>
void parallel_for(int64_t begin, int64_t end, int64_t grain, int threads, const F& f) {
  if (begin >= end) return;
#ifdef _OPENMP
  const int64_t n = end - begin, most = std::min<int64_t>(threads, (n + grain - 1) / grain);
  if (most > 1 && !omp_in_parallel()) {
#pragma omp parallel num_threads(int(most))
    {
      const int64_t chunk = (n + omp_get_num_threads() - 1) / omp_get_num_threads();
      const int64_t b = begin + omp_get_thread_num() * chunk;
      if (b < end) f(b, std::min(end, b + chunk));
    }
    return;
  }
#endif
  f(begin, end);
}

using Buf = std::vector<vf>;  // std::vector<vf> is aligned for vf (C++17 aligned new)

// A bfloat16 (its bits) widened to float32: exact.
inline float widen(uint16_t h) {
  uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// y = relu(max_pool2d(x, 2, 2)) and its backward, for channels_last float32 or bfloat16 tensors
// of even height and width: keras-lenet's two pooling stages (lenet5.models.layers.conv_relu_pool).
// PyTorch makes four passes of it: max pooling with an int64 index per output, ReLU, then ReLU's
// backward and max pooling's, which first zeroes the whole input gradient and then scatters into
// it. Here the forward keeps, per output, which of the window's four inputs is the maximum
// (4 where ReLU passes no gradient), and the backward writes every input's gradient once. The
// maximum is the first of the window's largest values in ATen's scan order, a NaN taking the place
// (as ATen's kernel, `val > max || isnan(val)`), so the gradients go where PyTorch's go, bit for bit.
template <typename T> inline float value(T v);
template <> inline float value<float>(float v) { return v; }
template <> inline float value<uint16_t>(uint16_t v) { return widen(v); }

// The loops below run over one window position's channels, branch-free, in chunks of a fixed
// count (a trip count the compiler turns into whole vectors, no scalar remainder), the last chunk
// overlapping the one before where the channels are not a multiple of it: each output depends on
// its own channel only, so computing a channel twice writes the same value twice. (Written as plain
// loops over any count, only multiples of the vector width ran vectorised: 20 channels took 3.5x
// as long as 16.) The window's position (`which`) is kept in an integer as wide as T, so that
// every array has the same number of lanes per vector.
template <typename T, int L>
inline void max_window(const T* __restrict a, const T* __restrict b, const T* __restrict c, const T* __restrict d,
                       T* __restrict y, T* __restrict which, int64_t n) {
  for (int64_t ch = 0; ch < (L ? L : n); ++ch) {
    const float va = value(a[ch]), vb = value(b[ch]), vc = value(c[ch]), vd = value(d[ch]);
    const bool tb = vb > va || vb != vb;
    float m = tb ? vb : va;
    T best = tb ? b[ch] : a[ch], k = tb ? T(1) : T(0);
    const bool tc = vc > m || vc != vc;
    m = tc ? vc : m;
    best = tc ? c[ch] : best;
    k = tc ? T(2) : k;
    const bool td = vd > m || vd != vd;
    m = td ? vd : m;
    best = td ? d[ch] : best;
    k = td ? T(3) : k;
    const bool passes = !(m <= 0.0f);  // relu's backward passes a gradient where its output is > 0 (or NaN)
    y[ch] = passes || m == 0.0f ? best : T(0);  // relu(-0.0) is -0.0 in ATen: the maximum itself
    which[ch] = passes ? k : T(4);
  }
}

// A machine vector of V values of T (float: 4 bytes, bfloat16 bits: 2), loaded and stored unaligned.
template <typename T> struct Lanes { typedef T type __attribute__((vector_size(V * sizeof(T)))); };
template <typename T> inline typename Lanes<T>::type load_lanes(const T* p) {
  typename Lanes<T>::type v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
template <typename T> inline void store_lanes(T* p, typename Lanes<T>::type v) { std::memcpy(p, &v, sizeof v); }

template <typename T, int L>
inline void unpool_window(const T* __restrict g, const T* __restrict which, T* __restrict a, T* __restrict b,
                          T* __restrict c, T* __restrict d, int64_t n) {
  if constexpr (L == V) {  // a whole chunk as explicit vectors: for AVX2, GCC made the loop below branchy
    using W = typename Lanes<T>::type;  // scalar code (vucomiss, jp), 10x slower than with AVX-512
    const W gv = load_lanes(g), k = load_lanes(which), zero = W{};
    store_lanes(a, k == T(0) ? gv : zero);
    store_lanes(b, k == T(1) ? gv : zero);
    store_lanes(c, k == T(2) ? gv : zero);
    store_lanes(d, k == T(3) ? gv : zero);
    return;
  }
  for (int64_t ch = 0; ch < (L ? L : n); ++ch) {
    const T gv = g[ch], k = which[ch];
    a[ch] = k == T(0) ? gv : T(0);
    b[ch] = k == T(1) ? gv : T(0);
    c[ch] = k == T(2) ? gv : T(0);
    d[ch] = k == T(3) ? gv : T(0);
  }
}

// The first n lanes of a vector (0 < n <= V), loaded (zeros after them) and stored by masked
// instructions where the ISA has them: a vector's worth of channels is often a partial one
// (20 input and 50 output channels), and element-wise copies would be the transforms' bottleneck.
struct Lanes_n {
  int64_t n;
#if defined(__AVX512F__)
  __mmask16 mask;
  explicit Lanes_n(int64_t n_) : n(n_), mask(__mmask16((1u << n_) - 1)) {}
  vf load(const float* p) const { return n == V ? load_lanes(p) : vf(_mm512_maskz_loadu_ps(mask, p)); }
  void store(float* p, vf v) const { n == V ? store_lanes(p, v) : _mm512_mask_storeu_ps(p, mask, __m512(v)); }
#elif defined(__AVX__)
  __m256i mask;
  explicit Lanes_n(int64_t n_) : n(n_) {
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    mask = __m256i(__v8si(lane) < int(n_));
  }
  vf load(const float* p) const { return n == V ? load_lanes(p) : vf(_mm256_maskload_ps(p, mask)); }
  void store(float* p, vf v) const { n == V ? store_lanes(p, v) : _mm256_maskstore_ps(p, mask, __m256(v)); }
#else
  explicit Lanes_n(int64_t n_) : n(n_) {}
  vf load(const float* p) const {
    vf v{};
    for (int64_t i = 0; i < n; ++i) v[i] = p[i];
    return v;
  }
  void store(float* p, vf v) const {
    for (int64_t i = 0; i < n; ++i) p[i] = v[i];
  }
#endif
  static vf load_lanes(const float* p) {
    vf v;
    std::memcpy(&v, p, sizeof v);
    return v;
  }
  static void store_lanes(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
};

}  // namespace
