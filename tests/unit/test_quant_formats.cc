// The quantized formats' element conversions of src/core/quant.h against a reference written here from
// the formats' definitions: every code decoded by its formula, and every float32 encoded as the nearest
// code (ties to the even code), saturating at the largest finite value. Every code, every midpoint
// between neighbouring codes and the floats on either side of it, and a stride over all 2^32 patterns.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "core/quant.h"

namespace {

struct Format {
  const char *name;
  int exp_bits, man_bits, bias;
  bool has_inf;  // E5M2: exponent all ones with mantissa 0 is infinity; E4M3: only S.1111.111 is NaN
  uint8_t (*encode)(float);
  float (*decode)(uint8_t);
};

const Format kE4M3 = {"e4m3", 4, 3, 7, false, tn_f32_to_e4m3, tn_e4m3_to_f32};
const Format kE5M2 = {"e5m2", 5, 2, 15, true, tn_f32_to_e5m2, tn_e5m2_to_f32};

// The value of a code with the sign bit clear, from the definition; NaN for the NaN codes.
double Value(const Format &f, unsigned code) {
  const unsigned e = code >> f.man_bits, m = code & ((1u << f.man_bits) - 1);
  const unsigned e_max = (1u << f.exp_bits) - 1;
  if (f.has_inf && e == e_max) return m == 0 ? INFINITY : NAN;
  if (!f.has_inf && e == e_max && m == (1u << f.man_bits) - 1) return NAN;
  if (e == 0) return std::ldexp((double)m, 1 - f.bias - f.man_bits);
  return std::ldexp(1.0 + (double)m / (1 << f.man_bits), (int)e - f.bias);
}

// The largest finite code with the sign bit clear.
unsigned MaxCode(const Format &f) {
  unsigned c = 0x7f;
  while (!std::isfinite(Value(f, c))) c--;
  return c;
}

uint8_t Expected(const Format &f, float v) {
  const uint8_t sign = std::signbit(v) ? 0x80 : 0;
  if (std::isnan(v)) return sign | 0x7f;
  const unsigned max = MaxCode(f);
  const double a = std::fabs((double)v);
  if (a >= Value(f, max)) return sign | (uint8_t)max;
  unsigned lo = 0;  // the largest code not above a
  while (lo + 1 <= max && Value(f, lo + 1) <= a) lo++;
  if (Value(f, lo) == a) return sign | (uint8_t)lo;
  const double below = a - Value(f, lo), above = Value(f, lo + 1) - a;
  const unsigned code = below < above ? lo : above < below ? lo + 1 : (lo % 2 == 0 ? lo : lo + 1);
  return sign | (uint8_t)code;
}

void ExpectEncodes(const Format &f, float v) {
  const uint8_t got = f.encode(v), want = Expected(f, v);
  ASSERT_EQ((unsigned)got, (unsigned)want) << f.name << " of " << v << " (bits 0x" << std::hex << tn_f32_bits(v) << ")";
}

class QuantFormat : public ::testing::TestWithParam<const Format *> {};

TEST_P(QuantFormat, EveryCodeDecodesToItsValue) {
  const Format &f = *GetParam();
  for (unsigned b = 0; b < 256; b++) {
    const double want = (b & 0x80 ? -1 : 1) * Value(f, b & 0x7f);
    const float got = f.decode((uint8_t)b);
    if (std::isnan(want)) {
      EXPECT_TRUE(std::isnan(got)) << f.name << " code " << b;
    } else {
      EXPECT_EQ((double)got, want) << f.name << " code " << b;
      EXPECT_EQ(std::signbit(got), (b & 0x80) != 0) << f.name << " code " << b;
    }
  }
  EXPECT_EQ(Value(f, MaxCode(f)), f.exp_bits == 4 ? 448.0 : 57344.0);
}

TEST_P(QuantFormat, EveryFiniteCodeRoundTrips) {
  const Format &f = *GetParam();
  for (unsigned b = 0; b < 256; b++) {
    const float v = f.decode((uint8_t)b);
    if (std::isfinite(v)) EXPECT_EQ((unsigned)f.encode(v), b) << f.name << " code " << b;
  }
}

// Midpoints decide ties; the floats beside them must go to the nearer code.
TEST_P(QuantFormat, MidpointsAndTheirNeighbours) {
  const Format &f = *GetParam();
  const unsigned max = MaxCode(f);
  for (unsigned c = 0; c <= max; c++) {
    const double lo = Value(f, c), hi = c < max ? Value(f, c + 1) : 2 * Value(f, max) - Value(f, max - 1);
    for (double at : {lo, (lo + hi) / 2}) {
      const float m = (float)at;
      for (float v : {m, std::nextafter(m, 0.0f), std::nextafter(m, INFINITY)})
        for (float s : {v, -v}) ExpectEncodes(f, s);
    }
  }
}

TEST_P(QuantFormat, SpecialValues) {
  const Format &f = *GetParam();
  const uint8_t max = (uint8_t)MaxCode(f);
  EXPECT_EQ(f.encode(INFINITY), max);
  EXPECT_EQ(f.encode(-INFINITY), 0x80 | max);
  EXPECT_EQ(f.encode(3.0e38f), max);
  EXPECT_EQ(f.encode(NAN) & 0x7f, 0x7f);
  EXPECT_EQ(f.encode(-NAN), 0xff);
  EXPECT_EQ(f.encode(0.0f), 0x00);
  EXPECT_EQ(f.encode(-0.0f), 0x80);
  EXPECT_EQ(f.encode(1e-30f), 0x00);
  EXPECT_EQ(f.encode(-1e-30f), 0x80);
}

TEST_P(QuantFormat, StrideOverEveryFloat) {
  const Format &f = *GetParam();
  for (uint64_t u = 0; u < (1ull << 32); u += 4093) ExpectEncodes(f, tn_f32_from_bits((uint32_t)u));
}

INSTANTIATE_TEST_SUITE_P(Formats, QuantFormat, ::testing::Values(&kE4M3, &kE5M2),
                         [](const ::testing::TestParamInfo<const Format *> &i) { return std::string(i.param->name); });

TEST(QuantInt8, RoundsToEvenAndSaturates) {
  struct Case {
    float v;
    int want;
  } cases[] = {{0.0f, 0},     {-0.0f, 0},    {0.5f, 0},     {1.5f, 2},      {2.5f, 2},     {-2.5f, -2},
               {126.5f, 126}, {127.4f, 127}, {127.5f, 127}, {1e9f, 127},    {-1e9f, -127}, {-127.5f, -127},
               {-128.0f, -127}, {INFINITY, 127}, {-INFINITY, -127}, {NAN, 0}, {0.49999997f, 0}, {-0.5f, 0}};
  for (const Case &c : cases) EXPECT_EQ((int)tn_f32_to_int8(c.v), c.want) << c.v;
  // Every float in a stride: the nearest integer (ties to even), clamped.
  for (uint64_t u = 0; u < (1ull << 32); u += 65537) {
    const float v = tn_f32_from_bits((uint32_t)u);
    if (std::isnan(v)) continue;
    double r = std::nearbyint((double)v);
    r = r > 127 ? 127 : r < -127 ? -127 : r;
    ASSERT_EQ((int)tn_f32_to_int8(v), (int)r) << v;
  }
}

}  // namespace
