// DRLoc pair sampling on the CPU: position draws, pair gathers and their backward.
//
// The semantics (and the Python reference these kernels are tested against) are in
// batchkin/kernels/drloc_pairs/ (docs/kernels/drloc_pairs.md). Summary:
//
//   positions  pos[b, j, t] = min(floor(u(key, (b*m + j)*4 + t) * size_t), size_t - 1)
//              t = 0..3 -> (r_a, c_a, r_b, c_b), size = (H, W, H, W); u from rng.h.
//   gather     e_a[b, j, k] = grid[b, k, r_a, c_a]
//              e_b[b, j, k] = grid[b, off_b + k, r_b, c_b]          (k < nch)
//              "cat" variant: one [B, m, 2 * nch] output holding [e_a, e_b]
//              "sum" variant: out[b, j, k] = (e_a[b, j, k] + e_b[b, j, k]) + bias[k] (in float;
//              bias optional)
//   targets    per coordinate (row, col), d = a - b:  abs: |d|   signed: d + (size - 1)
//              normalize: divided by max(size - 1, 1)
//   scatter    the backward of gather: a zero grid (fp32 accumulator) receiving
//              grad_a at (b, k, r_a, c_a) for every j in order, then grad_b at
//              (b, off_b + k, r_b, c_b) for every j in order.
//
// The grid is read through its strides (a permuted view of [B, H*W, C] tokens is never
// copied). Every output element of the scatter is owned by one work item and its terms
// are added in a fixed order, so the result does not depend on the thread count.

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include "large_blocks.h"
#include "rng.h"

namespace {

inline int64_t draw_index(uint32_t key, uint32_t offset, int64_t size) {
  const float u = batchkin::hash_uniform(key, offset);
  const int64_t v = static_cast<int64_t>(u * static_cast<float>(size));
  return v < size - 1 ? v : size - 1;
}

inline float target_value(int64_t a, int64_t b, int64_t size, bool signed_mode, bool normalize) {
  const int64_t d = a - b;
  const int64_t t = signed_mode ? d + (size - 1) : (d < 0 ? -d : d);
  float f = static_cast<float>(t);
  if (normalize) {
    f = f / static_cast<float>(size > 1 ? size - 1 : 1);
  }
  return f;
}

void check_grid(const at::Tensor& grid, const char* name) {
  TORCH_CHECK(grid.dim() == 4, name, " must be 4-D [B, C, H, W]");
  TORCH_CHECK(grid.device().is_cpu(), name, " must be a CPU tensor");
  const auto st = grid.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16, name,
              " must be float32, float16 or bfloat16");
}

void check_pos(const at::Tensor& pos, int64_t B, int64_t H, int64_t W) {
  TORCH_CHECK(pos.dim() == 3 && pos.size(0) == B && pos.size(2) == 4, "pos must have shape [B, m, 4]");
  TORCH_CHECK(pos.scalar_type() == at::kLong, "pos must be int64");
  TORCH_CHECK(pos.device().is_cpu(), "pos must be a CPU tensor");
  const int64_t* p = pos.data_ptr<int64_t>();
  const int64_t n = pos.numel() / 4;
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(p[4 * i] >= 0 && p[4 * i] < H && p[4 * i + 2] >= 0 && p[4 * i + 2] < H,
                "pos rows must lie in [0, H)");
    TORCH_CHECK(p[4 * i + 1] >= 0 && p[4 * i + 1] < W && p[4 * i + 3] >= 0 && p[4 * i + 3] < W,
                "pos cols must lie in [0, W)");
  }
}

// Copies (or sums) the gathered channels of pair n. src_a/src_b point at channel 0 of
// the two members; sc is the channel stride of the grid.
template <typename scalar_t>
inline void gather_row(const scalar_t* src_a, const scalar_t* src_b, int64_t sc, int64_t nch, bool sum,
                       const scalar_t* bias, scalar_t* dst_a, scalar_t* dst_b) {
  using acc_t = at::opmath_type<scalar_t>;
  if (sum && bias != nullptr) {
    for (int64_t k = 0; k < nch; ++k) {
      const acc_t v = static_cast<acc_t>(src_a[k * sc]) + static_cast<acc_t>(src_b[k * sc]);
      dst_a[k] = static_cast<scalar_t>(v + static_cast<acc_t>(bias[k]));
    }
  } else if (sum && sc == 1) {  // unit stride: a loop the compiler vectorises
    for (int64_t k = 0; k < nch; ++k) {
      dst_a[k] = static_cast<scalar_t>(static_cast<acc_t>(src_a[k]) + static_cast<acc_t>(src_b[k]));
    }
  } else if (sum) {
    for (int64_t k = 0; k < nch; ++k) {
      dst_a[k] = static_cast<scalar_t>(static_cast<acc_t>(src_a[k * sc]) + static_cast<acc_t>(src_b[k * sc]));
    }
  } else if (sc == 1) {
    std::copy(src_a, src_a + nch, dst_a);
    std::copy(src_b, src_b + nch, dst_b);
  } else {
    for (int64_t k = 0; k < nch; ++k) {
      dst_a[k] = src_a[k * sc];
      dst_b[k] = src_b[k * sc];
    }
  }
}

// Shared by the gathers and the fused draw + gather. When `draw` is true the positions are
// drawn from `key` and written to pos_out (and the targets to tgt_out); otherwise they are
// read from pos_in. Pair n is written to out_a + n * ostride (and out_b + n * ostride).
template <typename scalar_t>
void gather_pairs(const at::Tensor& grid, const int64_t* pos_in, int64_t m, int64_t nch, int64_t off_b, bool sum,
                  bool draw, uint32_t key, bool signed_mode, bool normalize, int64_t* pos_out, float* tgt_out,
                  scalar_t* out_a, scalar_t* out_b, int64_t ostride, const scalar_t* bias = nullptr) {
  const int64_t B = grid.size(0), H = grid.size(2), W = grid.size(3);
  const int64_t sb = grid.stride(0), sc = grid.stride(1), sh = grid.stride(2), sw = grid.stride(3);
  const scalar_t* g = grid.const_data_ptr<scalar_t>();
  const int64_t N = B * m;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(nch, 1));
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const int64_t b = n / m;
      int64_t ra, ca, rb, cb;
      if (draw) {
        const uint32_t base = static_cast<uint32_t>(n * 4);  // counters wrap mod 2**32
        ra = draw_index(key, base + 0u, H);
        ca = draw_index(key, base + 1u, W);
        rb = draw_index(key, base + 2u, H);
        cb = draw_index(key, base + 3u, W);
        pos_out[4 * n + 0] = ra;
        pos_out[4 * n + 1] = ca;
        pos_out[4 * n + 2] = rb;
        pos_out[4 * n + 3] = cb;
        tgt_out[2 * n + 0] = target_value(ra, rb, H, signed_mode, normalize);
        tgt_out[2 * n + 1] = target_value(ca, cb, W, signed_mode, normalize);
      } else {
        ra = pos_in[4 * n + 0];
        ca = pos_in[4 * n + 1];
        rb = pos_in[4 * n + 2];
        cb = pos_in[4 * n + 3];
      }
      const scalar_t* src_a = g + b * sb + ra * sh + ca * sw;
      const scalar_t* src_b = g + b * sb + rb * sh + cb * sw + off_b * sc;
      gather_row<scalar_t>(src_a, src_b, sc, nch, sum, bias, out_a + n * ostride,
                           sum ? nullptr : out_b + n * ostride);
    }
  });
}

at::Tensor drloc_positions_cpu(int64_t B, int64_t m, int64_t H, int64_t W, int64_t key) {
  TORCH_CHECK(B >= 1 && m >= 1 && H >= 1 && W >= 1, "B, m, H and W must be >= 1");
  auto pos = at::empty({B, m, 4}, at::TensorOptions().dtype(at::kLong));
  int64_t* p = pos.data_ptr<int64_t>();
  const uint32_t k = static_cast<uint32_t>(key);
  const int64_t sizes[4] = {H, W, H, W};
  at::parallel_for(0, B * m * 4, 8192, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      p[i] = draw_index(k, static_cast<uint32_t>(i), sizes[i & 3]);
    }
  });
  return pos;
}

std::tuple<at::Tensor, at::Tensor> drloc_gather_cpu(const at::Tensor& grid, const at::Tensor& pos) {
  check_grid(grid, "grid");
  const int64_t B = grid.size(0), C = grid.size(1);
  check_pos(pos, B, grid.size(2), grid.size(3));
  const auto p = pos.contiguous();
  const int64_t m = p.size(1);
  auto e_a = at::empty({B, m, C}, grid.options());
  auto e_b = at::empty({B, m, C}, grid.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grid.scalar_type(), "drloc_gather_cpu", [&] {
    gather_pairs<scalar_t>(grid, p.data_ptr<int64_t>(), m, C, 0, false, false, 0u, false, false, nullptr,
                           nullptr, e_a.data_ptr<scalar_t>(), e_b.data_ptr<scalar_t>(), C);
  });
  return {e_a, e_b};
}

at::Tensor drloc_gather_cat_cpu(const at::Tensor& grid, const at::Tensor& pos) {
  check_grid(grid, "grid");
  const int64_t B = grid.size(0), C = grid.size(1);
  check_pos(pos, B, grid.size(2), grid.size(3));
  const auto p = pos.contiguous();
  const int64_t m = p.size(1);
  auto feats = at::empty({B, m, 2 * C}, grid.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grid.scalar_type(), "drloc_gather_cat_cpu", [&] {
    scalar_t* f = feats.data_ptr<scalar_t>();
    gather_pairs<scalar_t>(grid, p.data_ptr<int64_t>(), m, C, 0, false, false, 0u, false, false, nullptr, nullptr,
                           f, f + C, 2 * C);
  });
  return feats;
}

at::Tensor drloc_gather_sum_cpu(const at::Tensor& table, const at::Tensor& pos, int64_t split,
                                const std::optional<at::Tensor>& bias) {
  check_grid(table, "table");
  const int64_t B = table.size(0);
  TORCH_CHECK(split >= 1 && 2 * split == table.size(1), "table must have 2 * split channels");
  at::Tensor b;
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == split, "bias must have shape [split]");
    TORCH_CHECK(bias->scalar_type() == table.scalar_type() && bias->device().is_cpu(),
                "bias must be a CPU tensor of the table's dtype");
    b = bias->contiguous();
  }
  check_pos(pos, B, table.size(2), table.size(3));
  const auto p = pos.contiguous();
  const int64_t m = p.size(1);
  auto out = at::empty({B, m, split}, table.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, table.scalar_type(), "drloc_gather_sum_cpu", [&] {
    gather_pairs<scalar_t>(table, p.data_ptr<int64_t>(), m, split, split, true, false, 0u, false, false, nullptr,
                           nullptr, out.data_ptr<scalar_t>(), nullptr, split,
                           b.defined() ? b.const_data_ptr<scalar_t>() : nullptr);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> drloc_pairs_cpu(const at::Tensor& grid, int64_t m,
                                                                           int64_t key, bool signed_mode,
                                                                           bool normalize) {
  check_grid(grid, "grid");
  TORCH_CHECK(m >= 1, "m must be >= 1");
  const int64_t B = grid.size(0), C = grid.size(1);
  auto e_a = at::empty({B, m, C}, grid.options());
  auto e_b = at::empty({B, m, C}, grid.options());
  auto tgt = at::empty({B, m, 2}, grid.options().dtype(at::kFloat));
  auto pos = at::empty({B, m, 4}, grid.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grid.scalar_type(), "drloc_pairs_cpu", [&] {
    gather_pairs<scalar_t>(grid, nullptr, m, C, 0, false, true, static_cast<uint32_t>(key), signed_mode, normalize,
                           pos.data_ptr<int64_t>(), tgt.data_ptr<float>(), e_a.data_ptr<scalar_t>(),
                           e_b.data_ptr<scalar_t>(), C);
  });
  return {e_a, e_b, tgt, pos};
}

// dst[i] += src[i * stride] for i in [0, n), in float32.
template <typename scalar_t>
inline void add_row(float* dst, const scalar_t* src, int64_t stride, int64_t n) {
  if (stride == 1) {  // unit stride: a loop the compiler vectorises
    for (int64_t i = 0; i < n; ++i) dst[i] += static_cast<float>(src[i]);
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] += static_cast<float>(src[i * stride]);
  }
}

template <typename scalar_t>
void scatter_pairs(const at::Tensor& grad_a, const at::Tensor& grad_b, const int64_t* pos, int64_t W, int64_t HW,
                   int64_t channels, int64_t off_b, bool channels_last, at::Tensor& out) {
  const int64_t B = grad_a.size(0), m = grad_a.size(1), nch = grad_a.size(2);
  const scalar_t* ga = grad_a.const_data_ptr<scalar_t>();
  const scalar_t* gb = grad_b.const_data_ptr<scalar_t>();
  const int64_t a_sb = grad_a.stride(0), a_sm = grad_a.stride(1), a_sc = grad_a.stride(2);
  const int64_t b_sb = grad_b.stride(0), b_sm = grad_b.stride(1), b_sc = grad_b.stride(2);
  // out layout: channels_last -> [B, H, W, channels]; otherwise [B, channels, H, W]
  const int64_t o_b = HW * channels;
  const int64_t o_p = channels_last ? channels : 1;
  const int64_t o_c = channels_last ? 1 : HW;
  scalar_t* o = out.data_ptr<scalar_t>();
  // Work item = (batch, block of output channels); it owns those outputs.
  const int64_t cw = std::min<int64_t>(channels, 128);
  const int64_t nblk = (channels + cw - 1) / cw;
  at::parallel_for(0, B * nblk, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> acc;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / nblk;
      const int64_t c0 = (item % nblk) * cw;
      const int64_t c1 = std::min(c0 + cw, channels);
      const int64_t w = c1 - c0;
      acc.assign(static_cast<size_t>(HW * w), 0.0f);
      // member a writes channels [0, nch), member b writes [off_b, off_b + nch)
      const int64_t ka0 = std::max<int64_t>(c0, 0), ka1 = std::min<int64_t>(c1, nch);
      if (ka0 < ka1) {
        for (int64_t j = 0; j < m; ++j) {
          const int64_t* pj = pos + 4 * (b * m + j);
          float* dst = acc.data() + (pj[0] * W + pj[1]) * w + (ka0 - c0);
          add_row<scalar_t>(dst, ga + b * a_sb + j * a_sm + ka0 * a_sc, a_sc, ka1 - ka0);
        }
      }
      const int64_t kb0 = std::max<int64_t>(c0, off_b), kb1 = std::min<int64_t>(c1, off_b + nch);
      if (kb0 < kb1) {
        for (int64_t j = 0; j < m; ++j) {
          const int64_t* pj = pos + 4 * (b * m + j);
          float* dst = acc.data() + (pj[2] * W + pj[3]) * w + (kb0 - c0);
          add_row<scalar_t>(dst, gb + b * b_sb + j * b_sm + (kb0 - off_b) * b_sc, b_sc, kb1 - kb0);
        }
      }
      scalar_t* ob = o + b * o_b;
      if (channels_last) {
        for (int64_t p = 0; p < HW; ++p) {
          const float* a = acc.data() + p * w;
          scalar_t* d = ob + p * o_p + c0;
          for (int64_t k = 0; k < w; ++k) d[k] = static_cast<scalar_t>(a[k]);
        }
      } else {
        for (int64_t k = 0; k < w; ++k) {
          scalar_t* d = ob + (c0 + k) * o_c;
          for (int64_t p = 0; p < HW; ++p) d[p] = static_cast<scalar_t>(acc[p * w + k]);
        }
      }
    }
  });
}

at::Tensor drloc_scatter_cpu(const at::Tensor& grad_a, const at::Tensor& grad_b, const at::Tensor& pos,
                             int64_t channels, int64_t H, int64_t W, int64_t off_b, bool channels_last) {
  TORCH_CHECK(grad_a.dim() == 3 && grad_b.sizes() == grad_a.sizes(), "grad_a and grad_b must be [B, m, n]");
  TORCH_CHECK(grad_a.scalar_type() == grad_b.scalar_type(), "grad_a and grad_b must share a dtype");
  TORCH_CHECK(grad_a.device().is_cpu() && grad_b.device().is_cpu(), "grads must be CPU tensors");
  const int64_t B = grad_a.size(0), m = grad_a.size(1), nch = grad_a.size(2);
  TORCH_CHECK(pos.size(1) == m, "pos must have shape [B, m, 4]");
  TORCH_CHECK(nch <= channels && off_b >= 0 && off_b + nch <= channels, "channel ranges out of bounds");
  check_pos(pos, B, H, W);
  const auto p = pos.contiguous();
  auto out = channels_last ? at::empty({B, H, W, channels}, grad_a.options())
                           : at::empty({B, channels, H, W}, grad_a.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_a.scalar_type(), "drloc_scatter_cpu", [&] {
    scatter_pairs<scalar_t>(grad_a, grad_b, p.data_ptr<int64_t>(), W, H * W, channels, off_b, channels_last, out);
  });
  return out;
}


// ---------------------------------------------------------------------------------------
// First head layer over the distinct tokens ("unique" strategy)
//
//   out[b, j] = Pa[ia(b, j)] + Pb[ib(b, j)] + bias,   Pa = Xa W1a^T,  Pb = Xb W1b^T
//
// Xa holds, image by image in increasing token order (t = r * W + c), the distinct tokens
// that are the a member of some pair of the image (Xb likewise for the b members); ia / ib
// map every pair to its row. Backward: Ga = segment sum of the output gradient over ia (pairs
// in order, float32), likewise Gb; grad W1a = Ga^T Xa, grad W1b = Gb^T Xb; the grid gradient
// of token t is (Ga W1a)[row of t] + (Gb W1b)[row of t] (either term absent when t is not a
// member on that side), written once per grid element (no separate zero fill).
// ---------------------------------------------------------------------------------------

struct UniqueIndex {
  std::vector<int64_t> off_a, off_b;  // [B + 1]: first row of each image, per side
  std::vector<int64_t> inv;           // [B * m * 2]: row of the a member, row of the b member
  std::vector<int64_t> tok_a, tok_b;  // token index of every row
};

UniqueIndex build_unique(const int64_t* pos, int64_t B, int64_t m, int64_t W, int64_t HW) {
  UniqueIndex ix;
  ix.off_a.assign(B + 1, 0);
  ix.off_b.assign(B + 1, 0);
  ix.inv.resize(static_cast<size_t>(B * m * 2));
  // pass 1, per image: local row ids in increasing token order, and the counts
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> id(static_cast<size_t>(HW));
    for (int64_t b = begin; b < end; ++b) {
      for (int side = 0; side < 2; ++side) {
        std::fill(id.begin(), id.end(), -1);
        for (int64_t j = 0; j < m; ++j) {
          const int64_t* p = pos + 4 * (b * m + j) + 2 * side;
          id[p[0] * W + p[1]] = 0;
        }
        int64_t cnt = 0;
        for (int64_t t = 0; t < HW; ++t) {
          if (id[t] == 0) id[t] = ++cnt;  // 1-based while marking
        }
        for (int64_t j = 0; j < m; ++j) {
          const int64_t* p = pos + 4 * (b * m + j) + 2 * side;
          ix.inv[2 * (b * m + j) + side] = id[p[0] * W + p[1]] - 1;
        }
        (side == 0 ? ix.off_a : ix.off_b)[b + 1] = cnt;
      }
    }
  });
  for (int64_t b = 0; b < B; ++b) {
    ix.off_a[b + 1] += ix.off_a[b];
    ix.off_b[b + 1] += ix.off_b[b];
  }
  ix.tok_a.resize(static_cast<size_t>(ix.off_a[B]));
  ix.tok_b.resize(static_cast<size_t>(ix.off_b[B]));
  // pass 2: global row ids and the token of every row
  at::parallel_for(0, B, 16, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      for (int64_t j = 0; j < m; ++j) {
        const int64_t n = b * m + j;
        const int64_t* p = pos + 4 * n;
        const int64_t ra = ix.off_a[b] + ix.inv[2 * n], rb = ix.off_b[b] + ix.inv[2 * n + 1];
        ix.inv[2 * n] = ra;
        ix.inv[2 * n + 1] = rb;
        ix.tok_a[ra] = p[0] * W + p[1];
        ix.tok_b[rb] = p[2] * W + p[3];
      }
    }
  });
  return ix;
}

// The unique strategy works through consecutive images in chunks of about kChunkRows
// distinct rows (both sides together): per chunk it gathers the rows, multiplies, and writes
// that chunk's output (forward) or grid gradient (backward), so the products' operands and
// results stay in the core's cache and no full-size intermediate is ever written. Chunks
// run in parallel, each with single-threaded products; their number is a multiple of the
// thread count (equal shares). 1,024 rows measured best between 256 and 4,096 on a 2-core
// AVX2 machine (C = 192..384, hidden = 512): larger chunks fall out of the cache.
constexpr int64_t kChunkRows = 1024;

std::vector<int64_t> image_chunks(const UniqueIndex& ix, int64_t B) {
  const int64_t rows = ix.off_a[B] + ix.off_b[B];
  // a multiple of the thread count, so that every thread gets the same number of chunks
  const int64_t threads = at::get_num_threads();
  int64_t n = (rows + kChunkRows - 1) / kChunkRows;
  n = std::min<int64_t>(B, (n + threads - 1) / threads * threads);
  std::vector<int64_t> start;
  for (int64_t c = 0; c < n; ++c) start.push_back(c * B / n);
  start.push_back(B);
  return start;
}

// rows[i - off[b0], k] = float(grid[b(i), k, t(i) / W, t(i) % W]) for the rows of images
// [b0, b1) of one side.
template <typename scalar_t>
void gather_rows(const at::Tensor& grid, const std::vector<int64_t>& off, const std::vector<int64_t>& tok,
                 int64_t b0, int64_t b1, float* rows) {
  const int64_t C = grid.size(1), W = grid.size(3);
  const int64_t sb = grid.stride(0), sc = grid.stride(1), sh = grid.stride(2), sw = grid.stride(3);
  const scalar_t* g = grid.const_data_ptr<scalar_t>();
  for (int64_t b = b0; b < b1; ++b) {
    for (int64_t i = off[b]; i < off[b + 1]; ++i) {
      const int64_t t = tok[i];
      const scalar_t* src = g + b * sb + (t / W) * sh + (t % W) * sw;
      float* dst = rows + (i - off[b0]) * C;
      if (sc == 1) {
        for (int64_t k = 0; k < C; ++k) dst[k] = static_cast<float>(src[k]);
      } else {
        for (int64_t k = 0; k < C; ++k) dst[k] = static_cast<float>(src[k * sc]);
      }
    }
  }
}

void check_first_layer(const at::Tensor& grid, const at::Tensor& pos, const at::Tensor& weight) {
  check_grid(grid, "grid");
  check_pos(pos, grid.size(0), grid.size(2), grid.size(3));
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == 2 * grid.size(1), "weight must have shape [hidden, 2C]");
  TORCH_CHECK(weight.scalar_type() == grid.scalar_type() && weight.device().is_cpu(),
              "weight must be a CPU tensor of the grid's dtype");
}

// A float32 matrix over caller-owned memory (the chunks' scratch).
inline at::Tensor float_view(float* p, int64_t rows, int64_t cols) {
  return at::from_blob(p, {rows, cols}, at::TensorOptions().dtype(at::kFloat));
}

at::Tensor drloc_first_layer_unique_cpu(const at::Tensor& grid, const at::Tensor& pos, const at::Tensor& weight,
                                        const std::optional<at::Tensor>& bias) {
  check_first_layer(grid, pos, weight);
  const int64_t B = grid.size(0), C = grid.size(1), W = grid.size(3), HW = grid.size(2) * W;
  const int64_t hidden = weight.size(0);
  const auto p = pos.contiguous();
  const int64_t m = p.size(1);
  at::Tensor bf;
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == hidden, "bias must have shape [hidden]");
    TORCH_CHECK(bias->scalar_type() == grid.scalar_type() && bias->device().is_cpu(),
                "bias must be a CPU tensor of the grid's dtype");
    bf = bias->to(at::kFloat).contiguous();
  }
  const UniqueIndex ix = build_unique(p.data_ptr<int64_t>(), B, m, W, HW);
  const std::vector<int64_t> chunks = image_chunks(ix, B);
  const int64_t n_chunks = static_cast<int64_t>(chunks.size()) - 1;
  const auto wf = weight.detach().to(at::kFloat).contiguous();
  const auto wa_t = wf.narrow(1, 0, C).t(), wb_t = wf.narrow(1, C, C).t();  // [C, hidden]
  auto out = batchkin::large_empty({B, m, hidden}, grid.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grid.scalar_type(), "drloc_first_layer_unique_cpu", [&] {
    const float* bias_d = bf.defined() ? bf.const_data_ptr<float>() : nullptr;
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, n_chunks, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> xa, xb, pa, pb;
      for (int64_t c = begin; c < end; ++c) {
        const int64_t b0 = chunks[c], b1 = chunks[c + 1];
        const int64_t ra = ix.off_a[b0], na = ix.off_a[b1] - ra;
        const int64_t rb = ix.off_b[b0], nb = ix.off_b[b1] - rb;
        xa.resize(static_cast<size_t>(na * C));
        xb.resize(static_cast<size_t>(nb * C));
        pa.resize(static_cast<size_t>(na * hidden));
        pb.resize(static_cast<size_t>(nb * hidden));
        gather_rows<scalar_t>(grid, ix.off_a, ix.tok_a, b0, b1, xa.data());
        gather_rows<scalar_t>(grid, ix.off_b, ix.tok_b, b0, b1, xb.data());
        auto pa_t = float_view(pa.data(), na, hidden);
        auto pb_t = float_view(pb.data(), nb, hidden);
        at::mm_out(pa_t, float_view(xa.data(), na, C), wa_t);
        at::mm_out(pb_t, float_view(xb.data(), nb, C), wb_t);
        for (int64_t n = b0 * m; n < b1 * m; ++n) {
          const float* a = pa.data() + (ix.inv[2 * n] - ra) * hidden;
          const float* b = pb.data() + (ix.inv[2 * n + 1] - rb) * hidden;
          scalar_t* d = o + n * hidden;
          if (bias_d != nullptr) {
            for (int64_t k = 0; k < hidden; ++k) d[k] = static_cast<scalar_t>(a[k] + b[k] + bias_d[k]);
          } else {
            for (int64_t k = 0; k < hidden; ++k) d[k] = static_cast<scalar_t>(a[k] + b[k]);
          }
        }
      }
    });
  });
  return out;
}

// Backward, per chunk: Ga, Gb (segment sums of the output gradient, pairs in order), the
// chunk's rows Xa, Xb, its terms Ga^T Xa and Gb^T Xb of the weight gradient (and its bias
// gradient terms), Ga W1a and Gb W1b, and the grid gradient of its images. Each parallel
// task adds its chunks' weight/bias terms, in chunk order, into a partial sum of its own;
// the partial sums are added in task order at the end (for a fixed thread count the result
// does not depend on scheduling).
std::tuple<at::Tensor, at::Tensor, at::Tensor> drloc_first_layer_unique_backward_cpu(
    const at::Tensor& grad, const at::Tensor& grid, const at::Tensor& pos, const at::Tensor& weight, bool has_bias,
    bool channels_last) {
  check_first_layer(grid, pos, weight);
  const int64_t B = grid.size(0), C = grid.size(1), H = grid.size(2), W = grid.size(3), HW = H * W;
  const int64_t hidden = weight.size(0);
  const auto p = pos.contiguous();
  const int64_t m = p.size(1);
  TORCH_CHECK(grad.dim() == 3 && grad.size(0) == B && grad.size(1) == m && grad.size(2) == hidden,
              "grad must have shape [B, m, hidden]");
  TORCH_CHECK(grad.scalar_type() == grid.scalar_type(), "grad must have the grid's dtype");
  const auto g = grad.contiguous();
  const UniqueIndex ix = build_unique(p.data_ptr<int64_t>(), B, m, W, HW);
  const std::vector<int64_t> chunks = image_chunks(ix, B);
  const int64_t n_chunks = static_cast<int64_t>(chunks.size()) - 1;
  const auto wf = weight.detach().to(at::kFloat).contiguous();
  const auto wa = wf.narrow(1, 0, C), wb = wf.narrow(1, C, C);  // [hidden, C]
  auto grad_grid = channels_last ? batchkin::large_empty({B, H, W, C}, grid.options())
                                 : batchkin::large_empty({B, C, H, W}, grid.options());
  // partial sums: task t's weight gradient [hidden, 2C] and bias gradient [hidden], by first chunk
  std::vector<at::Tensor> partial_w(static_cast<size_t>(n_chunks));
  std::vector<at::Tensor> partial_b(static_cast<size_t>(n_chunks));
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, grid.scalar_type(), "drloc_first_layer_unique_backward_cpu", [&] {
        const scalar_t* gd = g.const_data_ptr<scalar_t>();
        scalar_t* o = grad_grid.data_ptr<scalar_t>();
        at::parallel_for(0, n_chunks, 1, [&](int64_t begin, int64_t end) {
          auto pw = at::zeros({hidden, 2 * C}, at::TensorOptions().dtype(at::kFloat));
          auto pb = at::zeros({hidden}, at::TensorOptions().dtype(at::kFloat));
          float* pb_d = pb.data_ptr<float>();
          std::vector<float> ga, gb, xa, xb, da, db;
          std::vector<int64_t> row_a(static_cast<size_t>(HW)), row_b(static_cast<size_t>(HW));
          for (int64_t c = begin; c < end; ++c) {
            const int64_t b0 = chunks[c], b1 = chunks[c + 1];
            const int64_t ra = ix.off_a[b0], na = ix.off_a[b1] - ra;
            const int64_t rb = ix.off_b[b0], nb = ix.off_b[b1] - rb;
            ga.assign(static_cast<size_t>(na * hidden), 0.0f);
            gb.assign(static_cast<size_t>(nb * hidden), 0.0f);
            for (int64_t n = b0 * m; n < b1 * m; ++n) {
              const scalar_t* src = gd + n * hidden;
              add_row<scalar_t>(ga.data() + (ix.inv[2 * n] - ra) * hidden, src, 1, hidden);
              add_row<scalar_t>(gb.data() + (ix.inv[2 * n + 1] - rb) * hidden, src, 1, hidden);
              if (has_bias) add_row<scalar_t>(pb_d, src, 1, hidden);
            }
            xa.resize(static_cast<size_t>(na * C));
            xb.resize(static_cast<size_t>(nb * C));
            gather_rows<scalar_t>(grid, ix.off_a, ix.tok_a, b0, b1, xa.data());
            gather_rows<scalar_t>(grid, ix.off_b, ix.tok_b, b0, b1, xb.data());
            const auto ga_t = float_view(ga.data(), na, hidden), gb_t = float_view(gb.data(), nb, hidden);
            auto pw_a = pw.narrow(1, 0, C), pw_b = pw.narrow(1, C, C);
            pw_a.addmm_(ga_t.t(), float_view(xa.data(), na, C));
            pw_b.addmm_(gb_t.t(), float_view(xb.data(), nb, C));
            da.resize(static_cast<size_t>(na * C));
            db.resize(static_cast<size_t>(nb * C));
            auto da_t = float_view(da.data(), na, C), db_t = float_view(db.data(), nb, C);
            at::mm_out(da_t, ga_t, wa);
            at::mm_out(db_t, gb_t, wb);
            // the grid gradient of the chunk's images, every element written once
            const int64_t os = channels_last ? 1 : HW;
            for (int64_t b = b0; b < b1; ++b) {
              std::fill(row_a.begin(), row_a.end(), -1);
              std::fill(row_b.begin(), row_b.end(), -1);
              for (int64_t i = ix.off_a[b]; i < ix.off_a[b + 1]; ++i) row_a[ix.tok_a[i]] = i - ra;
              for (int64_t i = ix.off_b[b]; i < ix.off_b[b + 1]; ++i) row_b[ix.tok_b[i]] = i - rb;
              scalar_t* ob = o + b * HW * C;
              for (int64_t t = 0; t < HW; ++t) {
                const float* sa = row_a[t] >= 0 ? da.data() + row_a[t] * C : nullptr;
                const float* sb = row_b[t] >= 0 ? db.data() + row_b[t] * C : nullptr;
                scalar_t* d = channels_last ? ob + t * C : ob + t;
                if (sa != nullptr && sb != nullptr) {
                  for (int64_t k = 0; k < C; ++k) d[k * os] = static_cast<scalar_t>(sa[k] + sb[k]);
                } else if (sa != nullptr || sb != nullptr) {
                  const float* s = sa != nullptr ? sa : sb;
                  for (int64_t k = 0; k < C; ++k) d[k * os] = static_cast<scalar_t>(s[k]);
                } else {
                  for (int64_t k = 0; k < C; ++k) d[k * os] = scalar_t(0);
                }
              }
            }
          }
          partial_w[static_cast<size_t>(begin)] = pw;
          partial_b[static_cast<size_t>(begin)] = pb;
        });
      });
  at::Tensor gw_sum, gb_sum;
  for (size_t i = 0; i < partial_w.size(); ++i) {
    if (!partial_w[i].defined()) continue;
    gw_sum = gw_sum.defined() ? gw_sum.add_(partial_w[i]) : partial_w[i];
    gb_sum = gb_sum.defined() ? gb_sum.add_(partial_b[i]) : partial_b[i];
  }
  at::Tensor grad_weight = gw_sum.to(grid.scalar_type());
  at::Tensor grad_bias = has_bias ? gb_sum.to(grid.scalar_type()) : at::zeros({hidden}, grid.options());
  return {grad_grid, grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(batchkin, m) {
  m.def("_drloc_positions_cpu(int B, int m, int H, int W, int key) -> Tensor");
  m.def("_drloc_gather_cpu(Tensor grid, Tensor pos) -> (Tensor, Tensor)");
  m.def("_drloc_gather_cat_cpu(Tensor grid, Tensor pos) -> Tensor");
  m.def("_drloc_gather_sum_cpu(Tensor table, Tensor pos, int split, Tensor? bias) -> Tensor");
  m.def(
      "_drloc_pairs_cpu(Tensor grid, int m, int key, bool signed_mode, bool normalize)"
      " -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "_drloc_scatter_cpu(Tensor grad_a, Tensor grad_b, Tensor pos, int channels, int H, int W, int off_b,"
      " bool channels_last) -> Tensor");
  m.def("_drloc_first_layer_unique_cpu(Tensor grid, Tensor pos, Tensor weight, Tensor? bias) -> Tensor");
  m.def(
      "_drloc_first_layer_unique_backward_cpu(Tensor grad, Tensor grid, Tensor pos, Tensor weight, bool has_bias,"
      " bool channels_last) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(batchkin, CPU, m) {
  m.impl("_drloc_gather_cpu", &drloc_gather_cpu);
  m.impl("_drloc_gather_cat_cpu", &drloc_gather_cat_cpu);
  m.impl("_drloc_gather_sum_cpu", &drloc_gather_sum_cpu);
  m.impl("_drloc_pairs_cpu", &drloc_pairs_cpu);
  m.impl("_drloc_scatter_cpu", &drloc_scatter_cpu);
  m.impl("_drloc_first_layer_unique_cpu", &drloc_first_layer_unique_cpu);
  m.impl("_drloc_first_layer_unique_backward_cpu", &drloc_first_layer_unique_backward_cpu);
}

// The position draw has no tensor argument to dispatch on: it always builds a CPU tensor.
TORCH_LIBRARY_IMPL(batchkin, CompositeExplicitAutograd, m) {
  m.impl("_drloc_positions_cpu", &drloc_positions_cpu);
}
