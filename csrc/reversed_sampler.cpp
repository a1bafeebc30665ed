// Reversed class sampler, CPU path (see batchkin/kernels/reversed_sampler/ for the
// definition). Draw i of an epoch uses the counter-based uniforms of rng.h at offsets
// 2*i (class) and 2*i+1 (instance):
//   class    c = min(#{j : cdf[j] <= u_class}, C - 1)         (float64 compare)
//   instance k = min(max(floor(u_inst * n_c), 0), n_c - 1)    (one float64 multiply)
//   index      = sorted_indices[offsets[c] + k]
// The class search is a binary search accelerated by a guide table: for G a power of
// two, guide[g] = #{j : cdf[j] <= g / G}. A uniform u in [g/G, (g+1)/G) has its answer
// in [guide[g], guide[g+1]], so the search runs over that short range and returns
// exactly what a full binary search (the reference's searchsorted) returns.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "rng.h"

namespace {

struct Tables {
  const int64_t* idx;
  const int64_t* off;
  const int64_t* cnt;
  const double* cdf;
  int64_t num_classes;
};

// Guide table with G + 1 entries (G a power of two); empty when the draw count is too
// small to pay for it.
struct Guide {
  std::vector<int64_t> start;
  double scale = 0.0;  // G
  int64_t last = -1;   // G - 1
};

Guide build_guide(const Tables& t, int64_t num_draws) {
  Guide g;
  int64_t size = 1;
  while (size < t.num_classes && size < (int64_t{1} << 20)) size <<= 1;
  if (num_draws < size) return g;  // too few draws: plain binary search
  g.start.resize(size + 1);
  int64_t c = 0;
  for (int64_t b = 0; b <= size; ++b) {
    const double edge = static_cast<double>(b) / static_cast<double>(size);  // exact: size is 2^k
    while (c < t.num_classes && t.cdf[c] <= edge) ++c;
    g.start[b] = c;
  }
  g.scale = static_cast<double>(size);
  g.last = size - 1;
  return g;
}

inline int64_t pick_class(const Tables& t, const Guide& g, double u) {
  const double* lo = t.cdf;
  const double* hi = t.cdf + t.num_classes;
  if (!g.start.empty() && u >= 0.0 && u < 1.0) {
    const int64_t b = std::min(static_cast<int64_t>(u * g.scale), g.last);  // u * 2^k is exact
    lo = t.cdf + g.start[b];
    hi = t.cdf + g.start[b + 1];
  }
  // first entry > u, i.e. the number of entries <= u
  const int64_t c = std::upper_bound(lo, hi, u) - t.cdf;
  return std::min(c, t.num_classes - 1);
}

inline int64_t pick_index(const Tables& t, const Guide& g, double u_class, double u_inst) {
  const int64_t c = pick_class(t, g, u_class);
  const int64_t n = t.cnt[c];
  // truncation equals floor once clamped at 0
  int64_t k = static_cast<int64_t>(u_inst * static_cast<double>(n));
  k = std::min(std::max(k, int64_t{0}), n - 1);
  return t.idx[t.off[c] + k];
}

Tables check_tables(const at::Tensor& sorted_indices, const at::Tensor& offsets, const at::Tensor& counts,
                    const at::Tensor& cdf) {
  TORCH_CHECK(sorted_indices.device().is_cpu(), "sorted_indices must be a CPU tensor");
  TORCH_CHECK(sorted_indices.scalar_type() == at::kLong && sorted_indices.dim() == 1,
              "sorted_indices must be a 1-D int64 tensor");
  TORCH_CHECK(offsets.scalar_type() == at::kLong && offsets.dim() == 1 && offsets.device().is_cpu(),
              "offsets must be a 1-D int64 CPU tensor");
  TORCH_CHECK(counts.scalar_type() == at::kLong && counts.dim() == 1 && counts.device().is_cpu(),
              "counts must be a 1-D int64 CPU tensor");
  TORCH_CHECK(cdf.scalar_type() == at::kDouble && cdf.dim() == 1 && cdf.device().is_cpu(),
              "cdf must be a 1-D float64 CPU tensor");
  TORCH_CHECK(cdf.numel() >= 1, "cdf must have at least one class");
  TORCH_CHECK(offsets.numel() == cdf.numel() && counts.numel() == cdf.numel(),
              "offsets, counts and cdf must have one entry per class");
  return Tables{sorted_indices.data_ptr<int64_t>(), offsets.data_ptr<int64_t>(), counts.data_ptr<int64_t>(),
                cdf.data_ptr<double>(), cdf.numel()};
}

constexpr int64_t kGrain = 16384;  // draws per task: small epochs stay on one thread

at::Tensor reversed_sampler_cpu(const at::Tensor& sorted_indices, const at::Tensor& offsets,
                                const at::Tensor& counts, const at::Tensor& cdf, int64_t key, int64_t start,
                                int64_t stop) {
  TORCH_CHECK(0 <= start && start <= stop, "need 0 <= start <= stop; got start=", start, ", stop=", stop);
  const at::Tensor idx = sorted_indices.contiguous();
  const at::Tensor off = offsets.contiguous();
  const at::Tensor cnt = counts.contiguous();
  const at::Tensor cdf_c = cdf.contiguous();
  const Tables t = check_tables(idx, off, cnt, cdf_c);
  const int64_t n = stop - start;
  at::Tensor out = at::empty({n}, idx.options());
  if (n == 0) return out;
  const Guide g = build_guide(t, n);
  const uint32_t k32 = static_cast<uint32_t>(key);
  int64_t* dst = out.data_ptr<int64_t>();
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      const uint32_t base = static_cast<uint32_t>(2 * (start + j));  // offsets wrap mod 2^32 like rng.py
      const double u_class = batchkin::hash_uniform(k32, base);
      const double u_inst = batchkin::hash_uniform(k32, base + 1u);
      dst[j] = pick_index(t, g, u_class, u_inst);
    }
  });
  return out;
}

at::Tensor reversed_sampler_from_uniforms_cpu(const at::Tensor& sorted_indices, const at::Tensor& offsets,
                                              const at::Tensor& counts, const at::Tensor& cdf,
                                              const at::Tensor& u_class, const at::Tensor& u_inst) {
  TORCH_CHECK(u_class.scalar_type() == at::kDouble && u_inst.scalar_type() == at::kDouble,
              "u_class and u_inst must be float64");
  TORCH_CHECK(u_class.device().is_cpu() && u_inst.device().is_cpu(), "u_class and u_inst must be CPU tensors");
  TORCH_CHECK(u_class.sizes() == u_inst.sizes(), "u_class and u_inst must have the same shape");
  const at::Tensor idx = sorted_indices.contiguous();
  const at::Tensor off = offsets.contiguous();
  const at::Tensor cnt = counts.contiguous();
  const at::Tensor cdf_c = cdf.contiguous();
  const Tables t = check_tables(idx, off, cnt, cdf_c);
  const at::Tensor uc = u_class.contiguous();
  const at::Tensor ui = u_inst.contiguous();
  at::Tensor out = at::empty(uc.sizes(), idx.options());
  const int64_t n = uc.numel();
  if (n == 0) return out;
  const Guide g = build_guide(t, n);
  const double* pc = uc.data_ptr<double>();
  const double* pi = ui.data_ptr<double>();
  int64_t* dst = out.data_ptr<int64_t>();
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) dst[j] = pick_index(t, g, pc[j], pi[j]);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(batchkin, m) {
  m.def(
      "_reversed_sampler_cpu(Tensor sorted_indices, Tensor offsets, Tensor counts, Tensor cdf, int key, "
      "int start, int stop) -> Tensor");
  m.def(
      "_reversed_sampler_from_uniforms_cpu(Tensor sorted_indices, Tensor offsets, Tensor counts, Tensor cdf, "
      "Tensor u_class, Tensor u_inst) -> Tensor");
}

TORCH_LIBRARY_IMPL(batchkin, CPU, m) {
  m.impl("_reversed_sampler_cpu", &reversed_sampler_cpu);
  m.impl("_reversed_sampler_from_uniforms_cpu", &reversed_sampler_from_uniforms_cpu);
}
