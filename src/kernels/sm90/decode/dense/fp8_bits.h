// The bit manipulations of the FP8 cache's dequantization (fp8_cache.cuh), on the host too: no
// CUDA header, the one PTX instruction (prmt) has a C++ twin, so that
// tests/cuda/check_fp8_bits.cpp checks them against the reference formulas with any C++
// compiler.
//
// An e4m3 byte b = s eeee mmm read as the bf16 bits s<<15 | eeeemmm<<4 is b's value times 2^-120,
// exactly (e4m3 subnormals land on bf16 subnormals). Two bytes become one bf16x2 word in three
// instructions (PRMT, SHF, LOP3):
//   t = prmt(a, b, sel)      byte 1 = the first value, byte 3 = the second, byte 2 = the first
//                            value's sign replicated (prmt's sign mode), byte 0 = anything;
//   (int32)t >> 4            bits 4..11 of each half now hold its byte; the sign fills bits
//                            12..15 of the low half (from byte 2) and 28..31 (arithmetic shift);
//   & 0x87F087F0             keeps sign (bit 15) and eeeemmm (bits 4..10) of each half.
// The selectors pick the pair from the first operand a (nibbles 0..3) or from the second b
// (nibbles 4..7), which is how a lane stores the second 16-byte chunk of its 16 values first
// without a branch (fp8_cache.cuh: fp8_lane).
#pragma once

#include <cstdint>

#include "kernels/params.h"  // JFM_HOST_DEVICE

namespace jax_flashmla {
namespace sm90 {

// prmt.b32 d, a, b, sel (default mode): byte i of d is byte sel_i & 7 of {b, a} (a the low word);
// if sel_i & 8, that byte's bit 7 replicated over the byte.
JFM_HOST_DEVICE inline uint32_t prmt(uint32_t a, uint32_t b, uint32_t sel) {
#if defined(__CUDA_ARCH__)
  uint32_t d;
  asm("prmt.b32 %0, %1, %2, %3;\n" : "=r"(d) : "r"(a), "r"(b), "r"(sel));
  return d;
#else
  const uint64_t src = (static_cast<uint64_t>(b) << 32) | a;
  uint32_t d = 0;
  for (int i = 0; i < 4; ++i) {
    const uint32_t s = (sel >> (4 * i)) & 0xFu;
    uint32_t byte = static_cast<uint32_t>(src >> (8 * (s & 7u))) & 0xFFu;
    if (s & 8u) byte = (byte & 0x80u) ? 0xFFu : 0u;
    d |= byte << (8 * i);
  }
  return d;
#endif
}

// Selectors of the pair of values (0, 1) and (2, 3) of operand a; + kFp8SelOther: of operand b.
constexpr uint32_t kFp8SelPair01 = 0x1800u;  // bytes [a0, a0, sign(a0), a1]
constexpr uint32_t kFp8SelPair23 = 0x3A22u;  // bytes [a2, a2, sign(a2), a3]
constexpr uint32_t kFp8SelOther = 0x4444u;

// Two e4m3 values (picked by sel from a, b) -> their bf16x2 bits times 2^-120.
JFM_HOST_DEVICE inline uint32_t e4m3x2_to_bf16x2_bits(uint32_t a, uint32_t b, uint32_t sel) {
  const uint32_t t = prmt(a, b, sel);
  return static_cast<uint32_t>(static_cast<int32_t>(t) >> 4) & 0x87F087F0u;
}

// The biased exponent field of a float32 scale (its bits), e << 23: what the factors are made
// of. The scale's sign and mantissa are ignored (the format's scales are positive powers of two).
JFM_HOST_DEVICE inline uint32_t fp8_scale_field(uint32_t scale_bits) {
  return scale_bits & 0x7F800000u;
}

// A tile's factor is 2^(e - 7) = scale * 2^120, bf16 exponent k = e + 120: one bf16 factor
// while k <= 254, i.e. e <= 134 (scale < 2^8). A field at or above this needs the wide path:
// e in 135..254 (two factors) or 255 (NaN or inf scale: a NaN tile).
constexpr uint32_t kFp8WideField = 135u << 23;

// The factor of a tile whose field is below kFp8WideField, 2^(e - 7), as a bf16 in the HIGH
// half of the word (the low half is 0): the multiply reads it as both halves (fp8_cache.cuh:
// bf16x2_mul_hi, an operand swizzle of HMUL2, no instruction).
JFM_HOST_DEVICE inline uint32_t fp8_narrow_factor(uint32_t field) { return field + (120u << 23); }

// Any field: the two bf16x2 factors whose product, applied one after the other, is scale * 2^120
// without leaving bf16's range: f1 = 2^min(k, 254 - 127), f2 = 2^(k - min(k, 254)); for e = 255
// f1 is NaN (the whole tile NaN, as dequantize_kv gives) and f2 is 1.
struct Fp8Factors {
  uint32_t f1;
  uint32_t f2;
};
JFM_HOST_DEVICE inline Fp8Factors fp8_wide_factors(uint32_t field) {
  const uint32_t e = field >> 23;
  const uint32_t k = e + 120u;
  const uint32_t e1 = k < 254u ? k : 254u;
  const uint32_t e2 = k - e1 + 127u;
  if (e == 0xFFu) return {0x7FC07FC0u, 0x3F803F80u};
  return {(e1 << 7) * 0x00010001u, (e2 << 7) * 0x00010001u};
}

}  // namespace sm90
}  // namespace jax_flashmla
