// Counter-based uniforms, bit-identical to batchkin/kernels/rng.py (see its docstring).
#pragma once
#include <cstdint>

namespace batchkin {

inline uint32_t lowbias32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
}

// float32 uniform in [0, 1) with 24 random bits: exactly the reference's value.
inline float hash_uniform(uint32_t key, uint32_t offset) {
  uint32_t h = lowbias32(offset ^ key);
  h = lowbias32(h + key);
  return static_cast<float>(h >> 8) * 5.9604644775390625e-08f;
}

}  // namespace batchkin
