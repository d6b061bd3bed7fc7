// Host check of the FP8 cache's dequantization bits (src/kernels/sm90/decode/dense/fp8_bits.h,
// as fp8_cache.cuh's dequant_quarter uses them) against the formulas of the first kernels
// (written out below), which dequantized each 16-value unit on its own:
//   pair bits  (t & 0x80008000) | ((t & 0x7F007F00) >> 4), t = the two bytes at bytes 1 and 3;
//   factors    e = the scale's exponent field, k = e + 120, e1 = min(k, 254):
//              f1 = e == 255 ? NaN (0x7FC0) : 2^(e1 - 127), f2 = e == 255 ? 1 : 2^(k - e1);
//   wide       per unit, any lane of the warp with f2 != 1: then every lane multiplies by f2.
// The new path decides "wide" once per quarter (4 units) from the exponent fields and, when
// not wide, multiplies once by a factor made without the clamp. The check runs both over every
// e4m3 byte, both lane kinds (selectors of operand a or b), and warps of scales that cover every
// exponent field (sign and mantissa bits varied), mixed so that the two "wide" rules differ, and
// compares the bf16 bits after an exact model of mul.rn.bf16x2 (round to nearest even,
// subnormals kept, overflow to inf, NaN out as a canonical NaN: both paths multiply a NaN
// operand the same way, see below).
//
// Build and run anywhere (no GPU): c++ -std=c++17 -O2 -Isrc tests/cuda/check_fp8_bits.cpp
// (tests/test_fp8_bits.py does this when a C++ compiler is on PATH).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "kernels/sm90/decode/dense/fp8_bits.h"

using namespace jax_flashmla::sm90;

// ------------------------------------------------------------------ bf16 multiply model

static double bf16_value(uint16_t h) {
  const int e = (h >> 7) & 0xFF;
  const int m = h & 0x7F;
  const double mag = e == 0 ? std::ldexp(m, -133) : std::ldexp(128 + m, e - 134);
  return (h & 0x8000) ? -mag : mag;
}

// Round a double (any exact product of two bf16) to bf16, nearest even, with subnormals.
static uint16_t bf16_round(double x) {
  const uint16_t sign = std::signbit(x) ? 0x8000 : 0;
  double a = std::fabs(x);
  if (a == 0) return sign;
  int e;
  std::frexp(a, &e);               // a = f * 2^e, f in [0.5, 1)
  int q = std::max(e - 8, -133);    // quantum: 8 significant bits, or the subnormal step
  double n = a / std::ldexp(1.0, q);  // exact (power-of-two division)
  double r = std::nearbyint(n);       // default rounding mode: nearest even
  double v = r * std::ldexp(1.0, q);
  if (v >= std::ldexp(1.0, 128)) return sign | 0x7F80;  // inf
  // encode v
  if (v < std::ldexp(1.0, -126)) return sign | static_cast<uint16_t>(std::ldexp(v, 133));
  int ev;
  double fv = std::frexp(v, &ev);  // v = fv * 2^ev, fv in [0.5, 1)
  const int biased = ev - 1 + 127;
  const int mant = static_cast<int>(std::ldexp(fv, 8)) - 128;
  return sign | static_cast<uint16_t>(biased << 7) | static_cast<uint16_t>(mant);
}

static bool bf16_nan(uint16_t h) { return (h & 0x7F80) == 0x7F80 && (h & 0x7F); }

static uint16_t bf16_mul1(uint16_t a, uint16_t b) {
  if (bf16_nan(a) || bf16_nan(b)) return 0x7FFF;  // canonical NaN (one rule for both paths)
  const bool ia = (a & 0x7FFF) == 0x7F80, ib = (b & 0x7FFF) == 0x7F80;
  const uint16_t sign = (a ^ b) & 0x8000;
  if (ia || ib) {
    if ((ia && (b & 0x7FFF) == 0) || (ib && (a & 0x7FFF) == 0)) return 0x7FFF;
    return sign | 0x7F80;
  }
  return bf16_round(bf16_value(a) * bf16_value(b));
}

static uint32_t bf16x2_mul(uint32_t a, uint32_t b) {
  return bf16_mul1(a & 0xFFFF, b & 0xFFFF) | (uint32_t(bf16_mul1(a >> 16, b >> 16)) << 16);
}

// ------------------------------------------------------------------ the first kernels' rule

struct OldFactors {
  uint32_t f1, f2;
};
static OldFactors old_factors(uint32_t scale_bits) {
  const uint32_t e = (scale_bits >> 23) & 0xFFu;
  const uint32_t k = e + 120u;
  const uint32_t e1 = std::min(k, 254u);
  const uint32_t e2 = k - e1 + 127u;
  const uint32_t f1 = e == 0xFFu ? 0x7FC07FC0u : (e1 << 7) * 0x00010001u;
  return {f1, e == 0xFFu ? 0x3F803F80u : (e2 << 7) * 0x00010001u};
}
static uint32_t old_pair_bits(uint32_t t) { return (t & 0x80008000u) | ((t & 0x7F007F00u) >> 4); }

// The 8 bf16x2 words of one unit (16 bytes w[0..3]) in column order.
static void old_unit(const uint32_t w[4], const OldFactors& f, bool wide, uint32_t out[8]) {
  for (int i = 0; i < 4; ++i) {
    // __byte_perm(w, 0, 0x1404) / 0x3424: [0, b0, 0, b1] / [0, b2, 0, b3]
    const uint32_t lo = ((w[i] & 0xFFu) << 8) | ((w[i] & 0xFF00u) << 16);
    const uint32_t hi = ((w[i] >> 8) & 0xFF00u) | (w[i] & 0xFF000000u);
    uint32_t a = bf16x2_mul(old_pair_bits(lo), f.f1), b = bf16x2_mul(old_pair_bits(hi), f.f1);
    if (wide) a = bf16x2_mul(a, f.f2), b = bf16x2_mul(b, f.f2);
    out[2 * i] = a;
    out[2 * i + 1] = b;
  }
}

// ------------------------------------------------------------------ the new path

// One lane's unit as dequant_quarter computes it, returned in column order (the lane's first
// store is columns 8..15 for an odd tile).
static void new_unit(const uint32_t w[4], int c, uint32_t field, bool wide, uint32_t out[8]) {
  const uint32_t other = (c >> 2) ? kFp8SelOther : 0u;
  const uint32_t s01 = kFp8SelPair01 + other, s23 = kFp8SelPair23 + other;
  uint32_t first[4] = {e4m3x2_to_bf16x2_bits(w[0], w[2], s01), e4m3x2_to_bf16x2_bits(w[0], w[2], s23),
                       e4m3x2_to_bf16x2_bits(w[1], w[3], s01), e4m3x2_to_bf16x2_bits(w[1], w[3], s23)};
  uint32_t second[4] = {e4m3x2_to_bf16x2_bits(w[2], w[0], s01), e4m3x2_to_bf16x2_bits(w[2], w[0], s23),
                        e4m3x2_to_bf16x2_bits(w[3], w[1], s01), e4m3x2_to_bf16x2_bits(w[3], w[1], s23)};
  for (int i = 0; i < 4; ++i) {
    if (!wide) {
      const uint32_t f = (fp8_narrow_factor(field) >> 16) * 0x00010001u;  // the .H1_H1 operand
      first[i] = bf16x2_mul(first[i], f);
      second[i] = bf16x2_mul(second[i], f);
    } else {
      const Fp8Factors f = fp8_wide_factors(field);
      first[i] = bf16x2_mul(bf16x2_mul(first[i], f.f1), f.f2);
      second[i] = bf16x2_mul(bf16x2_mul(second[i], f.f1), f.f2);
    }
  }
  const bool odd = c >> 2;
  for (int i = 0; i < 4; ++i) {
    out[i] = odd ? second[i] : first[i];
    out[4 + i] = odd ? first[i] : second[i];
  }
}

// ------------------------------------------------------------------ checks

static int failures = 0;
static void fail(const char* what, uint32_t a, uint32_t b, uint32_t c, uint32_t d) {
  if (++failures <= 20) std::printf("FAIL %s: %08x %08x -> old %08x new %08x\n", what, a, b, c, d);
}

int main() {
  // 1. The pair bits: every pair of bytes, both selector families, both operand positions.
  for (uint32_t b0 = 0; b0 < 256; ++b0) {
    for (uint32_t b1 = 0; b1 < 256; ++b1) {
      const uint32_t want = old_pair_bits((b0 << 8) | (b1 << 24));
      const uint32_t junk = (0xA5u ^ (b0 * 7u) ^ (b1 << 3)) & 0xFFu;
      const uint32_t w01 = b0 | (b1 << 8) | (junk << 16) | ((junk ^ 0x5Au) << 24);
      const uint32_t w23 = junk | ((junk ^ 0x3Cu) << 8) | (b0 << 16) | (b1 << 24);
      const uint32_t other = junk * 0x01010101u;
      const uint32_t got[4] = {e4m3x2_to_bf16x2_bits(w01, other, kFp8SelPair01),
                               e4m3x2_to_bf16x2_bits(w23, other, kFp8SelPair23),
                               e4m3x2_to_bf16x2_bits(other, w01, kFp8SelPair01 + kFp8SelOther),
                               e4m3x2_to_bf16x2_bits(other, w23, kFp8SelPair23 + kFp8SelOther)};
      for (uint32_t g : got)
        if (g != want) fail("pair bits", b0, b1, want, g);
    }
  }

  // 2. The factors, for every exponent field (sign and mantissa varied): the wide factors are
  // the old ones; the narrow factor is the old f1 (and the old f2 is 1) exactly below the
  // wide threshold.
  for (uint32_t e = 0; e < 256; ++e) {
    for (uint32_t extra : {0u, 1u, 0x400000u, 0x7FFFFFu, 0x80000000u, 0x80123456u}) {
      const uint32_t bits = (e << 23) | extra;
      const OldFactors o = old_factors(bits);
      const uint32_t field = fp8_scale_field(bits);
      if (field != e << 23) fail("field", bits, 0, e << 23, field);
      const Fp8Factors n = fp8_wide_factors(field);
      if (n.f1 != o.f1 || n.f2 != o.f2) fail("wide factors", bits, 0, o.f1, n.f1);
      const bool wide = field >= kFp8WideField;
      if (wide != (e >= 135)) fail("threshold", bits, 0, e >= 135, wide);
      const uint32_t narrow = (fp8_narrow_factor(field) >> 16) * 0x00010001u;
      if (!wide && (narrow != o.f1 || o.f2 != 0x3F803F80u)) fail("narrow factor", bits, 0, o.f1, narrow);
    }
  }

  // 3. Whole quarters of a warp: 32 lanes x 4 units, random bytes (every byte value appears
  // many times; the NaN codes 0x7F / 0xFF included), scales drawn from powers of two 2^-30 ..
  // 2^30 (the tail above 2^7 makes a tile wide), a sprinkling of NaN, +-inf, zero, subnormal
  // and non-power-of-two scales; the old rule per unit, the new per quarter.
  std::mt19937 rng(1234);
  std::vector<uint32_t> scale_pool;
  for (int p = -30; p <= 30; ++p) {
    float s = std::ldexp(1.0f, p);
    uint32_t b;
    std::memcpy(&b, &s, 4);
    scale_pool.push_back(b);
  }
  for (uint32_t special : {0x7FC00000u, 0x7F800000u, 0xFF800000u, 0x7FA00001u, 0u, 0x00000123u,
                           0x3FC00000u, 0x437F0000u, 0x43800000u, 0x7F000000u, 0x7F7FFFFFu,
                           0x80000000u, 0xC3800000u})
    scale_pool.push_back(special);
  long units = 0;
  for (int trial = 0; trial < 4000; ++trial) {
    // Mostly narrow warps; a quarter of them get some wide or special tiles.
    const int mode = trial % 4;
    uint32_t sc[32][4], w[32][4][4];
    for (int l = 0; l < 32; ++l)
      for (int k = 0; k < 4; ++k) {
        uint32_t pick = rng() % scale_pool.size();
        if (mode != 3) pick = rng() % 38;  // 2^-30 .. 2^7: no wide tile
        sc[l][k] = scale_pool[pick];
        for (int i = 0; i < 4; ++i) w[l][k][i] = rng();
      }
    // A token's 8 lanes share its scale (as in the kernels); the check does not need it, but
    // keep the data realistic for half the trials.
    if (trial & 1)
      for (int l = 0; l < 32; ++l)
        for (int k = 0; k < 4; ++k) sc[l][k] = sc[l & ~7][k];
    bool new_wide = false;
    for (int l = 0; l < 32; ++l)
      for (int k = 0; k < 4; ++k) new_wide |= fp8_scale_field(sc[l][k]) >= kFp8WideField;
    for (int k = 0; k < 4; ++k) {
      bool old_wide = false;
      for (int l = 0; l < 32; ++l) old_wide |= old_factors(sc[l][k]).f2 != 0x3F803F80u;
      for (int l = 0; l < 32; ++l) {
        uint32_t o[8], n[8];
        old_unit(w[l][k], old_factors(sc[l][k]), old_wide, o);
        new_unit(w[l][k], l & 7, fp8_scale_field(sc[l][k]), new_wide, n);
        ++units;
        for (int i = 0; i < 8; ++i)
          if (o[i] != n[i]) fail("unit", sc[l][k], w[l][k][i / 2], o[i], n[i]);
      }
    }
  }
  // 4. Every byte under every scale of the pool, in a narrow and in a wide warp.
  for (uint32_t s : scale_pool) {
    for (uint32_t b = 0; b < 256; b += 4) {
      const uint32_t w[4] = {b * 0x01010101u + 0x03020100u, (b + 1) * 0x01010101u + 0x00010203u,
                             ~(b * 0x01010101u), b * 0x01010101u ^ 0x80808080u};
      const bool new_wide_opts[2] = {fp8_scale_field(s) >= kFp8WideField, true};
      for (bool nw : new_wide_opts) {
        const bool ow = old_factors(s).f2 != 0x3F803F80u;
        for (int c = 0; c < 8; ++c) {
          uint32_t o[8], n[8];
          old_unit(w, old_factors(s), ow, o);
          new_unit(w, c, fp8_scale_field(s), nw, n);
          for (int i = 0; i < 8; ++i)
            if (o[i] != n[i]) fail("byte sweep", s, w[i / 2], o[i], n[i]);
        }
      }
    }
  }
  if (failures) {
    std::printf("check_fp8_bits: %d mismatches\n", failures);
    return 1;
  }
  std::printf("check_fp8_bits: ok (65536 byte pairs x 4 selectors, 256 exponent fields x 6, "
              "%ld warp units, %zu scales x 256 bytes x 8 lanes)\n",
              units, scale_pool.size());
  return 0;
}
