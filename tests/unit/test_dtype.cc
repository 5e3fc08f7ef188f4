// The f16 / bf16 <-> f32 conversions of src/core/dtype.h, exhaustively where the domain is 16 bits and
// on edge cases plus a few million f32 patterns where it is 32 bits. Two independent oracles: the
// compiler's _Float16 (libgcc soft-float, round to nearest even) and a decode / nearest-value search
// written here in double.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>

#include "core/dtype.h"

namespace {

uint32_t Bits(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  return u;
}
float FromBits(uint32_t u) {
  float f;
  memcpy(&f, &u, 4);
  return f;
}

bool IsNaN16(uint16_t h) { return (h & 0x7fffu) > 0x7c00u; }
bool IsNaNBF16(uint16_t h) { return (h & 0x7fffu) > 0x7f80u; }
bool IsNaN32(uint32_t u) { return (u & 0x7fffffffu) > 0x7f800000u; }

// The compiler's conversions.
float CompilerF16ToF32(uint16_t h) {
  _Float16 v;
  memcpy(&v, &h, 2);
  return (float)v;
}
uint16_t CompilerF32ToF16(float f) {
  volatile float vf = f;  // no constant folding
  _Float16 v = (_Float16)vf;
  uint16_t h;
  memcpy(&h, &v, 2);
  return h;
}

// An independent decode of an f16 bit pattern: sign * mantissa * 2^exponent, in double.
double DecodeF16(uint16_t h) {
  int sign = h >> 15, e = (h >> 10) & 31, m = h & 1023;
  double v;
  if (e == 0)
    v = ldexp((double)m, -24);
  else if (e == 31)
    v = m == 0 ? INFINITY : NAN;
  else
    v = ldexp((double)(1024 + m), e - 25);
  return sign ? -v : v;
}

// An independent decode of a bf16 bit pattern.
double DecodeBF16(uint16_t h) {
  int sign = h >> 15, e = (h >> 7) & 255, m = h & 127;
  double v;
  if (e == 0)
    v = ldexp((double)m, -133);
  else if (e == 255)
    v = m == 0 ? INFINITY : NAN;
  else
    v = ldexp((double)(128 + m), e - 134);
  return sign ? -v : v;
}

// f32 -> bf16 computed in double: the nearer of the two neighbouring bf16 values, ties to the even one;
// beyond the largest finite value's rounding midpoint, Inf. NaN inputs are handled by the caller.
uint16_t ReferenceF32ToBF16(float f) {
  uint32_t u = Bits(f);
  uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
  double d = fabs((double)f);
  if (std::isinf(d)) return sign | 0x7f80u;
  uint16_t lo = (uint16_t)((u & 0x7fffffffu) >> 16);  // truncated magnitude: the neighbour at or below
  uint16_t hi = (uint16_t)(lo + 1);                    // the neighbour above (0x7f80 = Inf after the max)
  double dlo = DecodeBF16(lo);
  double dhi = hi == 0x7f80u ? ldexp(1.0, 128) : DecodeBF16(hi);  // Inf counts as 2^128 for rounding
  if (d == dlo) return sign | lo;
  double below = d - dlo, above = dhi - d;
  uint16_t r;
  if (below < above)
    r = lo;
  else if (above < below)
    r = hi;
  else
    r = (lo & 1u) ? hi : lo;
  return sign | r;
}

// f32 -> f16 computed in double, the same way (used for the edge-case table's self-check).
uint16_t ReferenceF32ToF16(float f) {
  uint16_t sign = std::signbit(f) ? 0x8000u : 0u;
  double d = fabs((double)f);
  if (std::isinf(d)) return sign | 0x7c00u;
  // Find the largest f16 magnitude <= d by bisection over the ordered magnitudes 0 .. 0x7c00.
  uint16_t lo = 0, hi = 0x7c00;
  while (hi - lo > 1) {
    uint16_t mid = (uint16_t)((lo + hi) / 2);
    if (DecodeF16(mid) <= d)
      lo = mid;
    else
      hi = mid;
  }
  if (DecodeF16(hi) <= d) lo = hi;  // only for d >= 2^16: Inf
  if (lo == 0x7c00u) return sign | 0x7c00u;
  uint16_t up = (uint16_t)(lo + 1);
  double dlo = DecodeF16(lo), dup = up == 0x7c00u ? 65536.0 : DecodeF16(up);
  if (d == dlo) return sign | lo;
  double below = d - dlo, above = dup - d;
  uint16_t r = below < above ? lo : above < below ? up : ((lo & 1u) ? up : lo);
  return sign | r;
}

// ------------------------------------------------------------------------------------------------
// f16 -> f32, all 65536 patterns
// ------------------------------------------------------------------------------------------------

TEST(DtypeF16, ToF32AllPatterns) {
  int failures = 0;
  for (uint32_t p = 0; p < 65536; p++) {
    uint16_t h = (uint16_t)p;
    float got = tn_f16_to_f32(h);
    float compiler = CompilerF16ToF32(h);
    double formula = DecodeF16(h);
    if (IsNaN16(h)) {
      uint32_t g = Bits(got);
      bool ok = IsNaN32(g) && std::isnan(compiler) && (g >> 31) == (uint32_t)(h >> 15) &&
                ((g >> 13) & 0x1ffu) == (h & 0x1ffu);  // sign and payload below the quiet bit kept
      if (!ok && failures++ < 10)
        ADD_FAILURE() << "f16 NaN 0x" << std::hex << p << " -> 0x" << g << " (want a NaN, same sign and payload)";
      continue;
    }
    bool ok = Bits(got) == Bits(compiler) && (double)got == formula && std::signbit(got) == std::signbit(formula);
    if (!ok && failures++ < 10)
      ADD_FAILURE() << "f16 0x" << std::hex << p << std::dec << " -> " << got << " (0x" << std::hex << Bits(got)
                    << "), compiler 0x" << Bits(compiler) << std::dec << ", formula " << formula;
  }
  EXPECT_EQ(failures, 0);
}

TEST(DtypeF16, RoundTripAllPatterns) {
  int failures = 0;
  for (uint32_t p = 0; p < 65536; p++) {
    uint16_t h = (uint16_t)p;
    uint16_t back = tn_f32_to_f16(tn_f16_to_f32(h));
    bool ok = IsNaN16(h) ? (IsNaN16(back) && (back & 0x8000u) == (h & 0x8000u) && (back & 0x0200u)) : back == h;
    if (!ok && failures++ < 10)
      ADD_FAILURE() << "f16 0x" << std::hex << p << " -> f32 -> f16 gives 0x" << back;
  }
  EXPECT_EQ(failures, 0);
}

// ------------------------------------------------------------------------------------------------
// bf16 -> f32, all 65536 patterns
// ------------------------------------------------------------------------------------------------

TEST(DtypeBF16, ToF32AllPatterns) {
  int failures = 0;
  for (uint32_t p = 0; p < 65536; p++) {
    uint16_t h = (uint16_t)p;
    float got = tn_bf16_to_f32(h);
    bool ok = Bits(got) == (p << 16);
    if (!IsNaNBF16(h)) ok = ok && ((double)got == DecodeBF16(h));
    if (!ok && failures++ < 10)
      ADD_FAILURE() << "bf16 0x" << std::hex << p << " -> 0x" << Bits(got) << ", want 0x" << (p << 16);
  }
  EXPECT_EQ(failures, 0);
}

TEST(DtypeBF16, RoundTripAllPatterns) {
  int failures = 0;
  for (uint32_t p = 0; p < 65536; p++) {
    uint16_t h = (uint16_t)p;
    uint16_t back = tn_f32_to_bf16(tn_bf16_to_f32(h));
    bool ok = IsNaNBF16(h) ? (IsNaNBF16(back) && (back & 0x8000u) == (h & 0x8000u) && (back & 0x0040u)) : back == h;
    if (!ok && failures++ < 10)
      ADD_FAILURE() << "bf16 0x" << std::hex << p << " -> f32 -> bf16 gives 0x" << back;
  }
  EXPECT_EQ(failures, 0);
}

// ------------------------------------------------------------------------------------------------
// f32 -> f16 edge cases
// ------------------------------------------------------------------------------------------------

struct Edge {
  const char *what;
  float in;
  uint16_t want;
};

float Next(float f, float toward) { return std::nextafter(f, toward); }

TEST(DtypeF16, FromF32EdgeCases) {
  const float t24 = ldexpf(1.0f, -24), t25 = ldexpf(1.0f, -25), t14 = ldexpf(1.0f, -14);
  const Edge cases[] = {
      {"+0", 0.0f, 0x0000},
      {"-0", -0.0f, 0x8000},
      {"1", 1.0f, 0x3c00},
      {"-2", -2.0f, 0xc000},
      // Ties to even, both directions (1 + 2^-11 is the midpoint of 1 and 1 + 2^-10).
      {"tie down to even", 1.0f + ldexpf(1, -11), 0x3c00},
      {"tie up to even", 1.0f + 3 * ldexpf(1, -11), 0x3c02},
      {"-tie down to even", -(1.0f + ldexpf(1, -11)), 0xbc00},
      {"-tie up to even", -(1.0f + 3 * ldexpf(1, -11)), 0xbc02},
      {"just above midpoint", Next(1.0f + ldexpf(1, -11), 2.0f), 0x3c01},
      {"just below midpoint", Next(1.0f + ldexpf(1, -11), 0.0f), 0x3c00},
      {"just below odd-even midpoint", Next(1.0f + 3 * ldexpf(1, -11), 0.0f), 0x3c01},
      {"just above odd-even midpoint", Next(1.0f + 3 * ldexpf(1, -11), 2.0f), 0x3c02},
      {"tie at binade top to 2048", 2047.5f, 0x6800},
      {"2046.5 tie to 2046", 2046.5f, 0x67fe},
      // Largest finite and overflow.
      {"largest finite 65504", 65504.0f, 0x7bff},
      {"-65504", -65504.0f, 0xfbff},
      {"65519.996 (below overflow midpoint)", Next(65520.0f, 0.0f), 0x7bff},
      {"65520 rounds to Inf", 65520.0f, 0x7c00},
      {"-65520 rounds to -Inf", -65520.0f, 0xfc00},
      {"65536", 65536.0f, 0x7c00},
      {"1e10", 1e10f, 0x7c00},
      {"FLT_MAX", 3.4028234663852886e38f, 0x7c00},
      {"-FLT_MAX", -3.4028234663852886e38f, 0xfc00},
      {"Inf", INFINITY, 0x7c00},
      {"-Inf", -INFINITY, 0xfc00},
      // f32 subnormals all round to (signed) zero.
      {"smallest f32 subnormal", FromBits(0x00000001), 0x0000},
      {"largest f32 subnormal", FromBits(0x007fffff), 0x0000},
      {"-smallest f32 subnormal", FromBits(0x80000001), 0x8000},
      {"smallest f32 normal", FromBits(0x00800000), 0x0000},
      // f16 subnormal boundaries.
      {"2^-24 smallest subnormal", t24, 0x0001},
      {"-2^-24", -t24, 0x8001},
      {"2^-25 tie to even 0", t25, 0x0000},
      {"-2^-25 tie to -0", -t25, 0x8000},
      {"just above 2^-25", Next(t25, 1.0f), 0x0001},
      {"just below 2^-25", Next(t25, 0.0f), 0x0000},
      {"3*2^-25 tie to 2*2^-24", 3 * t25, 0x0002},
      {"5*2^-25 tie to 2*2^-24", 5 * t25, 0x0002},
      {"7*2^-25 tie to 4*2^-24", 7 * t25, 0x0004},
      {"just below 3*2^-25", Next(3 * t25, 0.0f), 0x0001},
      {"largest subnormal 1023*2^-24", 1023 * t24, 0x03ff},
      {"smallest normal 2^-14", t14, 0x0400},
      {"-smallest normal", -t14, 0x8400},
      {"1023.5*2^-24 rounds into normal", 1023.5f * t24, 0x0400},
      {"just below 1023.5*2^-24", Next(1023.5f * t24, 0.0f), 0x03ff},
      {"just below 2^-14", Next(t14, 0.0f), 0x0400},
      {"1022.5*2^-24 tie to 1022", 1022.5f * t24, 0x03fe},
      {"2^-14 + half ulp tie to 2^-14", t14 + ldexpf(1, -25), 0x0400},
      {"2^-14 + 1.5 ulp tie to 2^-14 + 2 ulp", t14 + 3 * ldexpf(1, -25), 0x0402},
  };
  for (const Edge &c : cases) {
    uint16_t got = tn_f32_to_f16(c.in);
    EXPECT_EQ(got, c.want) << c.what << ": f32 " << c.in << " (0x" << std::hex << Bits(c.in) << ") -> 0x" << got
                           << ", want 0x" << c.want;
    // The table itself agrees with both oracles.
    EXPECT_EQ(CompilerF32ToF16(c.in), c.want) << "compiler disagrees with the table on " << c.what;
    EXPECT_EQ(ReferenceF32ToF16(c.in), c.want) << "double reference disagrees with the table on " << c.what;
  }
}

TEST(DtypeF16, FromF32NaN) {
  const uint32_t nans[] = {0x7fc00000u, 0xffc00000u, 0x7fc12345u, 0x7fffffffu, 0xffffffffu,
                           0x7f800001u, 0xff800001u, 0x7fa00000u, 0x7f802000u, 0x7f801fffu};
  for (uint32_t u : nans) {
    uint16_t got = tn_f32_to_f16(FromBits(u));
    EXPECT_TRUE(IsNaN16(got)) << "f32 NaN 0x" << std::hex << u << " -> 0x" << got << " is not a NaN";
    EXPECT_EQ(got & 0x8000u, (u >> 16) & 0x8000u) << "sign lost for 0x" << std::hex << u;
    EXPECT_TRUE(got & 0x0200u) << "f32 NaN 0x" << std::hex << u << " -> 0x" << got << " is not quiet";
  }
}

// ------------------------------------------------------------------------------------------------
// f32 -> bf16 edge cases
// ------------------------------------------------------------------------------------------------

TEST(DtypeBF16, FromF32EdgeCases) {
  struct E {
    const char *what;
    uint32_t in;
    uint16_t want;
  };
  const E cases[] = {
      {"+0", 0x00000000u, 0x0000},
      {"-0", 0x80000000u, 0x8000},
      {"1", 0x3f800000u, 0x3f80},
      {"tie down to even (1 + 2^-8)", 0x3f808000u, 0x3f80},
      {"tie up to even (1 + 3*2^-8)", 0x3f818000u, 0x3f82},
      {"-tie down", 0xbf808000u, 0xbf80},
      {"-tie up", 0xbf818000u, 0xbf82},
      {"just above midpoint", 0x3f808001u, 0x3f81},
      {"just below midpoint", 0x3f807fffu, 0x3f80},
      {"just below odd-even midpoint", 0x3f817fffu, 0x3f81},
      {"just above odd-even midpoint", 0x3f818001u, 0x3f82},
      {"carry into exponent", 0x3fffc000u, 0x4000},
      {"largest finite", 0x7f7f0000u, 0x7f7f},
      {"below the overflow midpoint", 0x7f7f7fffu, 0x7f7f},
      {"overflow midpoint rounds to Inf", 0x7f7f8000u, 0x7f80},
      {"FLT_MAX 0x7f7fffff rounds to Inf", 0x7f7fffffu, 0x7f80},
      {"-FLT_MAX rounds to -Inf", 0xff7fffffu, 0xff80},
      {"Inf", 0x7f800000u, 0x7f80},
      {"-Inf", 0xff800000u, 0xff80},
      {"smallest f32 subnormal", 0x00000001u, 0x0000},
      {"-smallest f32 subnormal", 0x80000001u, 0x8000},
      {"subnormal tie to even 0", 0x00008000u, 0x0000},
      {"subnormal just above tie", 0x00008001u, 0x0001},
      {"subnormal tie to even 2", 0x00018000u, 0x0002},
      {"largest f32 subnormal rounds into normal", 0x007fffffu, 0x0080},
      {"smallest normal", 0x00800000u, 0x0080},
  };
  for (const E &c : cases) {
    uint16_t got = tn_f32_to_bf16(FromBits(c.in));
    EXPECT_EQ(got, c.want) << c.what << ": f32 0x" << std::hex << c.in << " -> 0x" << got << ", want 0x" << c.want;
    EXPECT_EQ(ReferenceF32ToBF16(FromBits(c.in)), c.want) << "double reference disagrees with the table on "
                                                          << c.what;
  }
}

TEST(DtypeBF16, FromF32NaN) {
  // Patterns a plain rounding add would turn into Inf (0x7f800001) or carry into the sign (0x7fffffff,
  // 0xffffffff): they must stay NaN, keep their sign and come out quiet.
  const uint32_t nans[] = {0x7fc00000u, 0xffc00000u, 0x7fc12345u, 0x7fffffffu, 0xffffffffu,
                           0x7f800001u, 0xff800001u, 0x7fa00000u, 0x7f808000u, 0x7f80ffffu};
  for (uint32_t u : nans) {
    uint16_t got = tn_f32_to_bf16(FromBits(u));
    EXPECT_TRUE(IsNaNBF16(got)) << "f32 NaN 0x" << std::hex << u << " -> 0x" << got << " is not a NaN";
    EXPECT_EQ(got & 0x8000u, (u >> 16) & 0x8000u) << "sign lost for 0x" << std::hex << u;
    EXPECT_TRUE(got & 0x0040u) << "f32 NaN 0x" << std::hex << u << " -> 0x" << got << " is not quiet";
  }
}

// ------------------------------------------------------------------------------------------------
// f32 -> f16 / bf16 over millions of f32 patterns
// ------------------------------------------------------------------------------------------------

// The f32 patterns to sweep: every `stride`-th of the 2^32 patterns, plus every pattern within +-2 of
// each rounding midpoint between consecutive finite values of the 16-bit type (both signs), including
// the overflow midpoint above the largest finite value.
std::vector<uint32_t> SweepPatterns(uint32_t stride, bool f16) {
  std::vector<uint32_t> v;
  v.reserve(((uint64_t)1 << 32) / stride + 700000);
  for (uint64_t u = 0; u < ((uint64_t)1 << 32); u += stride) v.push_back((uint32_t)u);
  const uint32_t last_finite = f16 ? 0x7bffu : 0x7f7fu;
  for (uint32_t h = 0; h <= last_finite; h++) {
    double a = f16 ? DecodeF16((uint16_t)h) : DecodeBF16((uint16_t)h);
    double b = f16 ? (h == last_finite ? 65536.0 : DecodeF16((uint16_t)(h + 1)))
                   : (h == last_finite ? ldexp(1.0, 128) : DecodeBF16((uint16_t)(h + 1)));
    double mid = (a + b) / 2;  // exact in double
    uint32_t m = Bits((float)mid);
    if ((double)FromBits(m) != mid) {  // every such midpoint is exact in f32
      ADD_FAILURE() << "midpoint not exact in f32 after 0x" << std::hex << h;
      continue;
    }
    for (int d = -2; d <= 2; d++) {
      int64_t p = (int64_t)m + d;
      if (p < 0 || p >= 0x7f800000) continue;
      v.push_back((uint32_t)p);
      v.push_back((uint32_t)p | 0x80000000u);
    }
  }
  return v;
}

TEST(DtypeF16, FromF32SweepVsCompiler) {
  std::vector<uint32_t> patterns = SweepPatterns(1201, true);  // ~3.6M strided + ~0.3M near midpoints
  ASSERT_GT(patterns.size(), 3000000u);
  int failures = 0;
  for (uint32_t u : patterns) {
    float f = FromBits(u);
    uint16_t got = tn_f32_to_f16(f);
    uint16_t want = CompilerF32ToF16(f);
    bool ok;
    if (IsNaN32(u))
      ok = IsNaN16(got) && (got & 0x8000u) == ((u >> 16) & 0x8000u) && (got & 0x0200u);
    else
      ok = got == want;
    if (!ok && failures++ < 10)
      ADD_FAILURE() << "f32 0x" << std::hex << u << " (" << std::dec << f << ") -> f16 0x" << std::hex << got
                    << ", compiler 0x" << want;
  }
  EXPECT_EQ(failures, 0) << "of " << patterns.size() << " patterns";
}

TEST(DtypeBF16, FromF32SweepVsDoubleReference) {
  std::vector<uint32_t> patterns = SweepPatterns(1201, false);
  ASSERT_GT(patterns.size(), 3000000u);
  int failures = 0;
  for (uint32_t u : patterns) {
    float f = FromBits(u);
    uint16_t got = tn_f32_to_bf16(f);
    bool ok;
    uint16_t want = 0;
    if (IsNaN32(u)) {
      ok = IsNaNBF16(got) && (got & 0x8000u) == ((u >> 16) & 0x8000u) && (got & 0x0040u);
    } else {
      want = ReferenceF32ToBF16(f);
      ok = got == want;
    }
    if (!ok && failures++ < 10)
      ADD_FAILURE() << "f32 0x" << std::hex << u << " (" << std::dec << f << ") -> bf16 0x" << std::hex << got
                    << ", reference 0x" << want;
  }
  EXPECT_EQ(failures, 0) << "of " << patterns.size() << " patterns";
}

// The helpers the kernels use on top of the conversions.
TEST(Dtype, LoadStoreRoundTo) {
  uint16_t h[3] = {0x3c00, 0xc000, 0x7c00};
  EXPECT_EQ(tn_load(TN_F16, h, 0), 1.0f);
  EXPECT_EQ(tn_load(TN_F16, h, 1), -2.0f);
  EXPECT_TRUE(std::isinf(tn_load(TN_F16, h, 2)));
  uint16_t b[2] = {0x3f80, 0x4049};
  EXPECT_EQ(tn_load(TN_BF16, b, 0), 1.0f);
  EXPECT_EQ(tn_load(TN_BF16, b, 1), FromBits(0x40490000u));
  float f[2] = {1.5f, -0.25f};
  EXPECT_EQ(tn_load(TN_F32, f, 1), -0.25f);
  uint16_t out16[2] = {0, 0};
  tn_store(TN_F16, out16, 1, 65520.0f);
  EXPECT_EQ(out16[1], 0x7c00);
  tn_store(TN_BF16, out16, 0, 1.0f + ldexpf(1, -8));
  EXPECT_EQ(out16[0], 0x3f80);
  float out32[1];
  tn_store(TN_F32, out32, 0, 0.1f);
  EXPECT_EQ(out32[0], 0.1f);
  EXPECT_EQ(tn_round_to(TN_F16, 1.0f + ldexpf(1, -11)), 1.0f);
  EXPECT_EQ(tn_round_to(TN_BF16, 1.0f + 3 * ldexpf(1, -8)), 1.0f + ldexpf(1, -6));
  EXPECT_EQ(tn_round_to(TN_F32, 0.1f), 0.1f);
  EXPECT_TRUE(tn_dtype_valid(TN_F32) && tn_dtype_valid(TN_F16) && tn_dtype_valid(TN_BF16));
  EXPECT_FALSE(tn_dtype_valid((tn_dtype)3));
  EXPECT_FALSE(tn_dtype_valid((tn_dtype)-1));
}

}  // namespace

// tools/common/reference.c has its own f16 and bf16 formats, written from their definitions so that it
// shares no code with what it checks: the two independently written sets must agree on every 16-bit
// pattern, and on rounding a stride over every float32 pattern plus every f16/bf16 midpoint and its
// neighbours (NaN: both NaN).
#include "reference.h"

namespace {

void ExpectSameEncoding(float v) {
  const uint16_t lib16 = tn_f32_to_f16(v), ref16 = tn_reference_f16_bits(v);
  const uint16_t libb = tn_f32_to_bf16(v), refb = tn_reference_bf16_bits(v);
  if (std::isnan(v)) {
    ASSERT_TRUE(IsNaN16(lib16) && IsNaN16(ref16)) << std::hex << Bits(v);
    ASSERT_TRUE(IsNaNBF16(libb) && IsNaNBF16(refb)) << std::hex << Bits(v);
    return;
  }
  ASSERT_EQ(lib16, ref16) << "f16 of 0x" << std::hex << Bits(v);
  ASSERT_EQ(libb, refb) << "bf16 of 0x" << std::hex << Bits(v);
}

}  // namespace

TEST(ReferenceFormats, DecodeEveryPatternAsTheLibrary) {
  for (uint32_t h = 0; h <= 0xffff; h++) {
    const float lib16 = tn_f16_to_f32((uint16_t)h), ref16 = tn_reference_f16_value((uint16_t)h);
    const float libb = tn_bf16_to_f32((uint16_t)h), refb = tn_reference_bf16_value((uint16_t)h);
    if (IsNaN16((uint16_t)h)) EXPECT_TRUE(std::isnan(lib16) && std::isnan(ref16)) << std::hex << h;
    else ASSERT_EQ(Bits(lib16), Bits(ref16)) << "f16 0x" << std::hex << h;
    if (IsNaNBF16((uint16_t)h)) EXPECT_TRUE(std::isnan(libb) && std::isnan(refb)) << std::hex << h;
    else ASSERT_EQ(Bits(libb), Bits(refb)) << "bf16 0x" << std::hex << h;
  }
}

TEST(ReferenceFormats, EncodeAsTheLibrary) {
  for (uint64_t u = 0; u <= 0xffffffffull; u += 997) ExpectSameEncoding(FromBits((uint32_t)u));
  for (uint32_t h = 0; h < 0x7fff; h++) {  // each positive pattern's midpoint to the next, and its neighbours
    for (int sign = 0; sign < 2; sign++) {
      const double a16 = tn_f16_to_f32((uint16_t)h), b16 = tn_f16_to_f32((uint16_t)(h + 1));
      const double ab = tn_bf16_to_f32((uint16_t)h), bb = tn_bf16_to_f32((uint16_t)(h + 1));
      for (double mid : {(a16 + b16) / 2, (ab + bb) / 2}) {
        if (!std::isfinite(mid)) continue;
        const float m = (float)(sign ? -mid : mid);
        ExpectSameEncoding(m);
        ExpectSameEncoding(std::nextafter(m, INFINITY));
        ExpectSameEncoding(std::nextafter(m, -INFINITY));
      }
    }
  }
}
