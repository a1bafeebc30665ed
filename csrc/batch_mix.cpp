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
// once when stored). uint8 results are rounded half up, floor(v + 0.5), which
// is "half away from zero" for the non-negative values mixing produces, then
// clamped to [0, 255]. The resizemix interpolation reproduces the source-index
// computation of F.interpolate(mode="bilinear", align_corners=False):
//   scale = in / out (float), src = max(scale * (dst + 0.5) - 0.5, 0),
//   lo = floor(src), hi = min(lo + 1, in - 1), weights (1 - (src - lo), src - lo),
// rows weighted outermost as in ATen's CPU kernel.
//
// The work is split with at::parallel_for over the V*B*C image planes; every
// output element is written exactly once into one freshly allocated tensor.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <vector>

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

template <>
inline uint8_t store_f<uint8_t>(float v) {
  float r = std::floor(v + 0.5f);
  r = r < 0.f ? 0.f : (r > 255.f ? 255.f : r);
  return static_cast<uint8_t>(r);
}

// One output coordinate of a linear resize: two source indices and their weights.
struct LinearTap {
  int64_t lo;
  int64_t hi;
  float w_lo;
  float w_hi;
};

// Taps for resizing an axis of length `in` to length `out` (out >= 1), exactly as
// ATen computes them for bilinear, align_corners=False, no explicit scale.
void linear_taps(int64_t in, int64_t out, std::vector<LinearTap>& taps) {
  taps.resize(static_cast<size_t>(out));
  const float scale = static_cast<float>(in) / static_cast<float>(out);
  for (int64_t d = 0; d < out; ++d) {
    float src = scale * (static_cast<float>(d) + 0.5f) - 0.5f;
    if (src < 0.f) src = 0.f;
    int64_t lo = static_cast<int64_t>(src);
    if (lo > in - 1) lo = in - 1;
    float frac = src - static_cast<float>(lo);
    frac = std::min(std::max(frac, 0.f), 1.f);
    const int64_t hi = lo + (lo < in - 1 ? 1 : 0);
    taps[static_cast<size_t>(d)] = {lo, hi, 1.f - frac, frac};
  }
}

template <typename T>
void mix_planes(const T* x, T* out, const int64_t* op, const float* lam, const int64_t* boxes,
                int64_t V, int64_t B, int64_t C, int64_t H, int64_t W) {
  const int64_t HW = H * W;
  const int64_t planes = V * B * C;
  // a few hundred thousand elements per task keeps the scheduling overhead small
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(HW, 1));
  at::parallel_for(0, planes, grain, [&](int64_t begin, int64_t end) {
    std::vector<LinearTap> ty, tx;
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t c = plane % C;
      const int64_t vb = plane / C;
      const int64_t b = vb % B;
      const int64_t v = vb / B;
      const int64_t p = B - 1 - b;
      const T* own = x + plane * HW;
      const T* prt = x + ((v * B + p) * C + c) * HW;
      T* dst = out + plane * HW;
      const int64_t code = op[b];
      if (code == kMixup) {
        const float l = lam[b];
        const float m = 1.0f - l;
        for (int64_t i = 0; i < HW; ++i) {
          dst[i] = store_f<T>(l * load_f(own[i]) + m * load_f(prt[i]));
        }
        continue;
      }
      const int64_t* box = boxes + vb * 4;
      const int64_t y0 = box[0], x0 = box[1], bh = box[2], bw = box[3];
      if (bh <= 0 || bw <= 0) {  // zero-area box: nothing is pasted
        std::memcpy(dst, own, sizeof(T) * static_cast<size_t>(HW));
        continue;
      }
      // rows above and below the box are x_i's, copied in two contiguous runs; inside
      // the box rows, only the columns left and right of the box are x_i's
      std::memcpy(dst, own, sizeof(T) * static_cast<size_t>(y0 * W));
      const int64_t y1 = y0 + bh;
      std::memcpy(dst + y1 * W, own + y1 * W, sizeof(T) * static_cast<size_t>((H - y1) * W));
      const int64_t x1 = x0 + bw;
      for (int64_t y = y0; y < y1; ++y) {
        std::memcpy(dst + y * W, own + y * W, sizeof(T) * static_cast<size_t>(x0));
        std::memcpy(dst + y * W + x1, own + y * W + x1, sizeof(T) * static_cast<size_t>(W - x1));
      }
      if (code == kCutmix) {
        for (int64_t y = y0; y < y1; ++y) {
          std::memcpy(dst + y * W + x0, prt + y * W + x0, sizeof(T) * static_cast<size_t>(bw));
        }
        continue;
      }
      // resizemix: the whole partner plane resized to (bh, bw), pasted at (y0, x0)
      linear_taps(H, bh, ty);
      linear_taps(W, bw, tx);
      for (int64_t dy = 0; dy < bh; ++dy) {
        const LinearTap& t = ty[static_cast<size_t>(dy)];
        const T* r0 = prt + t.lo * W;
        const T* r1 = prt + t.hi * W;
        T* drow = dst + (y0 + dy) * W + x0;
        for (int64_t dx = 0; dx < bw; ++dx) {
          const LinearTap& s = tx[static_cast<size_t>(dx)];
          const float top = load_f(r0[s.lo]) * s.w_lo + load_f(r0[s.hi]) * s.w_hi;
          const float bot = load_f(r1[s.lo]) * s.w_lo + load_f(r1[s.hi]) * s.w_hi;
          drow[dx] = store_f<T>(top * t.w_lo + bot * t.w_hi);
        }
      }
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

  at::Tensor out = at::empty_like(x, at::MemoryFormat::Contiguous);
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
