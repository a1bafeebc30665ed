// In-batch mixing for SDMP on CPU tensors: mixup, cutmix and resizemix with the
// flip partner (sample i mixes with sample B-1-i), one operator / lambda per
// sample, one box per (view, sample).
//
//   x      [B, C, H, W] or [V, B, C, H, W]   float32 / float16 / bfloat16 / uint8
//   op     [B]        int64   0 = mixup, 1 = cutmix, 2 = resizemix
//   lam    [B]        float32 mixing weight of sample i itself (mixup)
//   boxes  [V, B, 4]  int64   (y0, x0, h, w), fully inside the image
//
// returns (mixed, same shape and dtype as x; lam_eff [V, B] float32).
//
// Arithmetic is done in float32 (values are upcast after loading and rounded
// once when stored), one rounding per operation (built with -ffp-contract=off: no
// fused multiply-adds), exactly as the PyTorch reference computes, so the results are
// bit-identical to it. uint8 results are rounded half up, floor(v + 0.5), then
// clamped to [0, 255]. The resizemix interpolation is the formula of
// F.interpolate(mode="bilinear", align_corners=False):
//   scale = in / out (float), src = max(scale * (dst + 0.5) - 0.5, 0),
//   lo = floor(src), hi = min(lo + 1, in - 1), weights (1 - (src - lo), src - lo),
// each source row resized horizontally, then the two rows blended (ATen's order).
//
// The work is split with at::parallel_for over the V*B*C image planes; every
// output element is written exactly once into one new, uninitialised tensor. On Linux
// outputs of 32 MiB and more are huge-page blocks, and freed ones are cached for reuse
// (large_blocks.h).

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <utility>
#include <tuple>
#include <type_traits>
#include <vector>

#include "large_blocks.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kMixup = 0;
constexpr int64_t kCutmix = 1;
constexpr int64_t kResizemix = 2;

template <typename T>
inline float load_f(T v) {
  return static_cast<float>(v);
}

template <typename T>
inline T store_f(float v) {
  return static_cast<T>(v);
}

// floor(v + 0.5) clamped to [0, 255]. After the clamp the value is non-negative, so the
// truncating conversion is the floor; written this way the loops vectorise (no libm call).
template <>
inline uint8_t store_f<uint8_t>(float v) {
  float r = v + 0.5f;
  r = r < 0.f ? 0.f : r;
  r = r > 255.f ? 255.f : r;
  return static_cast<uint8_t>(static_cast<int32_t>(r));
}

// Source taps of a linear resize of an axis of length `in` to length `out` (out >= 1),
// exactly as ATen computes them for bilinear, align_corners=False, no explicit scale:
// output d reads lo[d] and hi[d] with weights w_lo[d] and w_hi[d].
struct Taps {
  std::vector<int32_t> lo, hi;
  std::vector<float> w_lo, w_hi;

  void build(int64_t in, int64_t out) {
    const size_t n = static_cast<size_t>(out);
    lo.resize(n);
    hi.resize(n);
    w_lo.resize(n);
    w_hi.resize(n);
    const float scale = static_cast<float>(in) / static_cast<float>(out);
    for (int64_t d = 0; d < out; ++d) {
      float src = scale * (static_cast<float>(d) + 0.5f) - 0.5f;
      if (src < 0.f) src = 0.f;
      int64_t l = static_cast<int64_t>(src);
      if (l > in - 1) l = in - 1;
      float frac = src - static_cast<float>(l);
      frac = std::min(std::max(frac, 0.f), 1.f);
      const size_t k = static_cast<size_t>(d);
      lo[k] = static_cast<int32_t>(l);
      hi[k] = static_cast<int32_t>(l + (l < in - 1 ? 1 : 0));
      w_lo[k] = 1.f - frac;
      w_hi[k] = frac;
    }
  }
};

// Per-thread scratch of the resizemix path: the taps of the current (view, sample) and
// the partner rows resized horizontally (each source row is resized once per plane and
// reused by the output rows that read it).
struct ResizeScratch {
  int64_t vb = -1;
  Taps ty, tx;
  std::vector<float> row_a, row_b;
  int64_t src_a = -1, src_b = -1;
};

template <typename T>
inline void resize_row(const T* __restrict src, const Taps& tx, int64_t bw, float* __restrict dst) {
  const int32_t* lo = tx.lo.data();
  const int32_t* hi = tx.hi.data();
  const float* wl = tx.w_lo.data();
  const float* wh = tx.w_hi.data();
  for (int64_t d = 0; d < bw; ++d) {
    dst[d] = load_f(src[lo[d]]) * wl[d] + load_f(src[hi[d]]) * wh[d];
  }
}

// The partner row `src_row`, resized horizontally, from the two-row cache.
template <typename T>
inline const float* cached_row(ResizeScratch& s, const T* prt, int64_t W, int64_t src_row, int64_t bw,
                               int64_t keep_row) {
  if (s.src_a == src_row) return s.row_a.data();
  if (s.src_b == src_row) return s.row_b.data();
  // overwrite the slot that does not hold `keep_row` (the other row of this output row)
  if (s.src_a == keep_row && keep_row >= 0) {
    resize_row(prt + src_row * W, s.tx, bw, s.row_b.data());
    s.src_b = src_row;
    return s.row_b.data();
  }
  resize_row(prt + src_row * W, s.tx, bw, s.row_a.data());
  s.src_a = src_row;
  return s.row_a.data();
}

// dst = l * own + m * prt, elementwise. The same loop is also compiled for AVX2 and
// picked at run time where the CPU has it (the extension is built for baseline x86-64):
// the same float32 operations in the same order (no FMA contraction), so the same results,
// but the upcasts, above all float16's, and uint8's rounding vectorise far better.
#if defined(__GNUC__)
#define BK_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define BK_ALWAYS_INLINE inline
#endif

template <typename T>
BK_ALWAYS_INLINE void mixup_loop(const T* __restrict own, const T* __restrict prt,
                                                      T* __restrict dst, int64_t n, float l, float m) {
  for (int64_t i = 0; i < n; ++i) {
    dst[i] = store_f<T>(l * load_f(own[i]) + m * load_f(prt[i]));
  }
}

#if defined(__x86_64__) && defined(__GNUC__)
template <typename T>
__attribute__((target("avx2"))) void mixup_loop_avx2(const T* __restrict own, const T* __restrict prt,
                                                      T* __restrict dst, int64_t n, float l, float m) {
  mixup_loop<T>(own, prt, dst, n, l, m);
}

inline bool cpu_has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2");
  return has;
}

// float16's scalar conversions branch, so that loop does not vectorise: with F16C the
// conversions are single instructions, exact both ways (round to nearest even, as c10's).
// c10 stores every NaN as the quiet NaN 0x7E00 with its sign; F16C keeps the payload's
// top bits, so NaN lanes are rewritten to match.
__attribute__((target("avx2,f16c"))) void mixup_half_f16c(const c10::Half* own, const c10::Half* prt,
                                                           c10::Half* dst, int64_t n, float l, float m) {
  const __m256 vl = _mm256_set1_ps(l);
  const __m256 vm = _mm256_set1_ps(m);
  const __m128i abs_mask = _mm_set1_epi16(0x7FFF);
  const __m128i inf = _mm_set1_epi16(0x7C00);
  const __m128i sign_mask = _mm_set1_epi16(static_cast<short>(0x8000));
  const __m128i qnan = _mm_set1_epi16(0x7E00);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 a = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(own + i)));
    const __m256 b = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(prt + i)));
    const __m256 r = _mm256_add_ps(_mm256_mul_ps(vl, a), _mm256_mul_ps(vm, b));
    __m128i h = _mm256_cvtps_ph(r, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m128i is_nan = _mm_cmpgt_epi16(_mm_and_si128(h, abs_mask), inf);
    const __m128i canon = _mm_or_si128(_mm_and_si128(h, sign_mask), qnan);
    h = _mm_or_si128(_mm_andnot_si128(is_nan, h), _mm_and_si128(is_nan, canon));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), h);
  }
  mixup_loop<c10::Half>(own + i, prt + i, dst + i, n - i, l, m);
}

inline bool cpu_has_f16c() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
  return has;
}
#endif

template <typename T>
void mixup_span(const T* __restrict own, const T* __restrict prt, T* __restrict dst, int64_t n, float l, float m) {
#if defined(__x86_64__) && defined(__GNUC__)
  if constexpr (std::is_same_v<T, c10::Half>) {
    if (cpu_has_f16c()) {
      mixup_half_f16c(own, prt, dst, n, l, m);
      return;
    }
  }
  if (cpu_has_avx2()) {
    mixup_loop_avx2<T>(own, prt, dst, n, l, m);
    return;
  }
#endif
  mixup_loop<T>(own, prt, dst, n, l, m);
}

template <typename T>
void mix_plane(const T* __restrict own, const T* __restrict prt, T* __restrict dst, int64_t code, float l,
               const int64_t* box, int64_t H, int64_t W, int64_t vb, ResizeScratch& s) {
  const int64_t HW = H * W;
  if (code == kMixup) {
    mixup_span<T>(own, prt, dst, HW, l, 1.0f - l);
    return;
  }
  const int64_t y0 = box[0], x0 = box[1], bh = box[2], bw = box[3];
  if (bh <= 0 || bw <= 0) {  // zero-area box: nothing is pasted
    std::memcpy(dst, own, sizeof(T) * static_cast<size_t>(HW));
    return;
  }
  // every output element is written once, in address order: rows above the box, then
  // each box row (x_i's left part, the pasted part, x_i's right part), then rows below
  const int64_t y1 = y0 + bh;
  const int64_t x1 = x0 + bw;
  std::memcpy(dst, own, sizeof(T) * static_cast<size_t>(y0 * W));
  if (code == kResizemix) {
    if (s.vb != vb) {  // the taps depend on the (view, sample) only: shared by its channels
      s.ty.build(H, bh);
      s.tx.build(W, bw);
      s.row_a.resize(static_cast<size_t>(bw));
      s.row_b.resize(static_cast<size_t>(bw));
      s.vb = vb;
    }
    s.src_a = s.src_b = -1;  // a new plane: the cached rows belong to another partner plane
  }
  for (int64_t y = y0; y < y1; ++y) {
    T* drow = dst + y * W;
    const T* orow = own + y * W;
    std::memcpy(drow, orow, sizeof(T) * static_cast<size_t>(x0));
    if (code == kCutmix) {
      std::memcpy(drow + x0, prt + y * W + x0, sizeof(T) * static_cast<size_t>(bw));
    } else {
      // ATen's order: each source row resized horizontally, then the two rows blended
      const size_t dy = static_cast<size_t>(y - y0);
      const int64_t r0 = s.ty.lo[dy], r1 = s.ty.hi[dy];
      const float* top = cached_row(s, prt, W, r0, bw, -1);
      const float* bot = cached_row(s, prt, W, r1, bw, r0);
      const float wt = s.ty.w_lo[dy], wb = s.ty.w_hi[dy];
      T* out = drow + x0;
      for (int64_t d = 0; d < bw; ++d) {
        out[d] = store_f<T>(top[d] * wt + bot[d] * wb);
      }
    }
    std::memcpy(drow + x1, orow + x1, sizeof(T) * static_cast<size_t>(W - x1));
  }
  std::memcpy(dst + y1 * W, own + y1 * W, sizeof(T) * static_cast<size_t>((H - y1) * W));
}

template <typename T>
void mix_planes(const T* x, T* out, const int64_t* op, const float* lam, const int64_t* boxes, int64_t V,
                int64_t B, int64_t C, int64_t H, int64_t W) {
  const int64_t HW = H * W;
  const int64_t planes = V * B * C;
  // tasks of at least ~32k elements keep the scheduling overhead small; the planes of
  // a task are contiguous in memory, so each thread first-touches its own output pages
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(HW, 1));
  at::parallel_for(0, planes, grain, [&](int64_t begin, int64_t end) {
    ResizeScratch scratch;
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t c = plane % C;
      const int64_t vb = plane / C;
      const int64_t b = vb % B;
      const int64_t v = vb / B;
      const int64_t p = B - 1 - b;
      mix_plane<T>(x + plane * HW, x + ((v * B + p) * C + c) * HW, out + plane * HW, op[b], lam[b],
                   boxes + vb * 4, H, W, vb, scratch);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> batch_mix_cpu(const at::Tensor& x_in, const at::Tensor& op_in,
                                                 const at::Tensor& lam_in, const at::Tensor& boxes_in) {
  TORCH_CHECK(x_in.device().is_cpu(), "_batch_mix_cpu: x must be a CPU tensor");
  TORCH_CHECK(x_in.dim() == 4 || x_in.dim() == 5, "_batch_mix_cpu: x must be [B,C,H,W] or [V,B,C,H,W]");
  const bool views = x_in.dim() == 5;
  const int64_t V = views ? x_in.size(0) : 1;
  const int64_t B = x_in.size(views ? 1 : 0);
  const int64_t C = x_in.size(views ? 2 : 1);
  const int64_t H = x_in.size(views ? 3 : 2);
  const int64_t W = x_in.size(views ? 4 : 3);
  TORCH_CHECK(op_in.scalar_type() == at::kLong && op_in.dim() == 1 && op_in.size(0) == B,
              "_batch_mix_cpu: op must be int64 [B]");
  TORCH_CHECK(lam_in.scalar_type() == at::kFloat && lam_in.dim() == 1 && lam_in.size(0) == B,
              "_batch_mix_cpu: lam must be float32 [B]");
  TORCH_CHECK(boxes_in.scalar_type() == at::kLong && boxes_in.dim() == 3 && boxes_in.size(0) == V &&
                  boxes_in.size(1) == B && boxes_in.size(2) == 4,
              "_batch_mix_cpu: boxes must be int64 [V,B,4]");
  const at::Tensor x = x_in.contiguous();
  const at::Tensor op = op_in.contiguous();
  const at::Tensor lam = lam_in.contiguous();
  const at::Tensor boxes = boxes_in.contiguous();

  const int64_t* op_p = op.data_ptr<int64_t>();
  const float* lam_p = lam.data_ptr<float>();
  const int64_t* box_p = boxes.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(op_p[b] >= kMixup && op_p[b] <= kResizemix, "_batch_mix_cpu: unknown operator code ", op_p[b]);
  }
  for (int64_t i = 0; i < V * B; ++i) {
    const int64_t* box = box_p + i * 4;
    TORCH_CHECK(box[0] >= 0 && box[1] >= 0 && box[2] >= 0 && box[3] >= 0 && box[0] + box[2] <= H &&
                    box[1] + box[3] <= W,
                "_batch_mix_cpu: box ", i, " is not inside the image");
  }

  // contiguous and uninitialised: the mixing loop writes every element, and a fresh block's
  // pages are first touched there, in parallel, each thread faulting in the planes it writes
  at::Tensor out = batchkin::large_empty(x.sizes(), x.options());
  at::Tensor lam_eff = at::empty({V, B}, x.options().dtype(at::kFloat));
  float* le = lam_eff.data_ptr<float>();
  const double hw = static_cast<double>(H * W);
  for (int64_t v = 0; v < V; ++v) {
    for (int64_t b = 0; b < B; ++b) {
      const int64_t i = v * B + b;
      if (op_p[b] == kMixup) {
        le[i] = lam_p[b];
      } else {
        const int64_t area = box_p[i * 4 + 2] * box_p[i * 4 + 3];
        le[i] = static_cast<float>(static_cast<double>(H * W - area) / hw);
      }
    }
  }
  if (x.numel() == 0) return {out, lam_eff};

  AT_DISPATCH_FLOATING_TYPES_AND3(at::kHalf, at::kBFloat16, at::kByte, x.scalar_type(), "_batch_mix_cpu", [&] {
    mix_planes<scalar_t>(x.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), op_p, lam_p, box_p, V, B, C, H, W);
  });
  return {out, lam_eff};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(batchkin, m) {
  m.def("_batch_mix_cpu(Tensor x, Tensor op, Tensor lam, Tensor boxes) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(batchkin, CPU, m) {
  m.impl("_batch_mix_cpu", &batch_mix_cpu);
}
