// Large output tensors for the CPU ops: huge-page blocks and a small cache of freed ones.
//
// large_empty(sizes, options) returns an uninitialised contiguous tensor. Below
// kLargeMinBytes it is at::empty. From kLargeMinBytes on (8 MiB: above glibc's default mmap
// threshold, where a block may be a fresh private mapping, returned to the system when freed,
// or heap memory given back and faulted in again, depending on what the process allocated
// before: a uint8 128x3x224x224 output, 19 MiB, cost from 1x to 3x its mixing in one process
// over a benchmark's rounds) it is a 2 MiB-aligned anonymous mapping advised to use
// transparent huge pages, and when the tensor is freed its block joins a cache of
// kCachedBlocks blocks that later calls of the same byte size reuse.
//
// Why: a fresh 150 MB output costs ~37,000 4 KiB page faults (longer than most kernels that
// fill it); with huge pages it costs 75 faults, but the kernel still zeroes every page, and
// a 2 MiB block that was free for a while may have been handed back to the hypervisor
// (free page reporting works on 2 MiB blocks), so faulting it in again can take most of a
// second. A reused block has none of these costs: its pages are resident. A training loop
// makes outputs of one shape step after step, and the previous step's output may still be
// alive when the next one is made, hence two blocks.
//
// Callers must write every element (the memory is not zeroed on reuse). The storage comes
// from at::from_blob: it cannot be resized in place. Each extension library that includes
// this header has its own cache.

#pragma once

#include <ATen/ATen.h>

#include <cstddef>
#include <cstdint>
#include <mutex>
#include <utility>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace batchkin {

constexpr size_t kLargeMinBytes = size_t{8} << 20;
constexpr size_t kCachedBlocks = 2;

#if defined(__linux__)
constexpr size_t kHugePage = size_t{2} << 20;

struct BlockCache {
  std::mutex mu;
  std::vector<std::pair<void*, size_t>> blocks;  // (address, mapped bytes), oldest first
};

inline BlockCache& block_cache() {
  static BlockCache* cache = new BlockCache();  // never destroyed: outputs may outlive statics
  return *cache;
}

inline void* map_block(size_t bytes) {
  {
    BlockCache& c = block_cache();
    std::lock_guard<std::mutex> lock(c.mu);
    for (size_t i = c.blocks.size(); i-- > 0;) {
      if (c.blocks[i].second == bytes) {
        void* p = c.blocks[i].first;
        c.blocks.erase(c.blocks.begin() + static_cast<std::ptrdiff_t>(i));
        return p;
      }
    }
  }
  // over-map by one huge page and trim, so that the block starts on a 2 MiB boundary
  const size_t span = bytes + kHugePage;
  void* raw = mmap(nullptr, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (raw == MAP_FAILED) return nullptr;
  const uintptr_t r = reinterpret_cast<uintptr_t>(raw);
  const uintptr_t a = (r + kHugePage - 1) & ~(uintptr_t{kHugePage} - 1);
  if (a > r) munmap(raw, a - r);
  const uintptr_t tail = r + span - (a + bytes);
  if (tail > 0) munmap(reinterpret_cast<void*>(a + bytes), tail);
#if defined(MADV_HUGEPAGE)
  (void)madvise(reinterpret_cast<void*>(a), bytes, MADV_HUGEPAGE);  // a hint only
#endif
  return reinterpret_cast<void*>(a);
}

inline void release_block(void* p, size_t bytes) {
  BlockCache& c = block_cache();
  std::pair<void*, size_t> evicted{nullptr, 0};
  {
    std::lock_guard<std::mutex> lock(c.mu);
    c.blocks.emplace_back(p, bytes);
    if (c.blocks.size() > kCachedBlocks) {
      evicted = c.blocks.front();
      c.blocks.erase(c.blocks.begin());
    }
  }
  if (evicted.first != nullptr) munmap(evicted.first, evicted.second);
}
#endif

// An uninitialised contiguous tensor of `sizes` (see the top of this file).
inline at::Tensor large_empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
#if defined(__linux__)
  int64_t numel = 1;
  for (const int64_t s : sizes) numel *= s;
  const size_t nbytes = static_cast<size_t>(numel) * at::elementSize(at::typeMetaToScalarType(options.dtype()));
  if (nbytes >= kLargeMinBytes) {
    const size_t bytes = (nbytes + kHugePage - 1) & ~(kHugePage - 1);
    void* p = map_block(bytes);
    if (p != nullptr) {
      return at::from_blob(p, sizes, [bytes](void* q) { release_block(q, bytes); }, options);
    }
  }
#endif
  return at::empty(sizes, options);
}

}  // namespace batchkin
