// The CPU kernels' bulk conversions (src/cpu/convert_block.h) against the scalar conversions of
// core/dtype.h, bit for bit. This file is compiled twice: for the baseline and for x86-64-v3, where the
// bulk conversions are AVX2/F16C intrinsics; the v3 build skips itself on a CPU without those.
#include <gtest/gtest.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

extern "C" {
#include "cpu/convert_block.h"
}

namespace {

bool cpu_runs_this_build() {
#ifdef TN_CONVERT_AVX2
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c") && __builtin_cpu_supports("fma");
#else
  return true;
#endif
}

#ifdef TN_CONVERT_AVX2
const char *kBuild = "x86-64-v3 (AVX2/F16C)";
#else
const char *kBuild = "baseline";
#endif

uint32_t bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

float from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

class ConvertBlock : public ::testing::TestWithParam<tn_dtype> {
 protected:
  void SetUp() override {
    if (!cpu_runs_this_build()) GTEST_SKIP() << "this CPU cannot run the " << kBuild << " build";
  }
};

TEST_P(ConvertBlock, EveryHalfPatternToF32) {
  const tn_dtype dtype = GetParam();
  std::vector<uint16_t> src(65536 + 7);  // + 7: a tail that is not a multiple of the vector width
  for (size_t i = 0; i < src.size(); i++) src[i] = static_cast<uint16_t>(i * 40503u);
  for (uint32_t i = 0; i < 65536; i++) src[i] = static_cast<uint16_t>(i);
  std::vector<float> got(src.size(), from_bits(0xdeadbeefu));
  tn_half_to_f32_block(dtype, src.data(), got.data(), static_cast<int64_t>(src.size()));
  for (size_t i = 0; i < src.size(); i++) {
    float want = dtype == TN_F16 ? tn_f16_to_f32(src[i]) : tn_bf16_to_f32(src[i]);
    ASSERT_EQ(bits(got[i]), bits(want)) << kBuild << " " << tn_dtype_name(dtype) << " pattern 0x" << std::hex << src[i];
  }
}

TEST_P(ConvertBlock, F32ToHalfMatchesScalarRounding) {
  const tn_dtype dtype = GetParam();
  std::vector<float> src;
  // Every half value, the midpoints to its neighbours, and +-1 f32 ulp around each midpoint: every
  // rounding decision (ties to even, carries into the exponent, overflow to Inf, subnormals).
  for (uint32_t h = 0; h < 65536; h++) {
    float v = dtype == TN_F16 ? tn_f16_to_f32(static_cast<uint16_t>(h)) : tn_bf16_to_f32(static_cast<uint16_t>(h));
    uint32_t u = bits(v);
    uint32_t step = dtype == TN_F16 ? (1u << 12) : (1u << 15);  // half an ulp for normals
    for (int64_t d : {0LL, -1LL, 1LL}) {
      src.push_back(from_bits(static_cast<uint32_t>(u + step + d)));
      src.push_back(from_bits(static_cast<uint32_t>(u + d)));
    }
  }
  // NaN payloads, infinities, signed zeros, f32 subnormals, and random bit patterns.
  for (uint32_t u : {0x7f800001u, 0x7fbfffffu, 0x7fc00000u, 0x7fffffffu, 0xff800001u, 0xffffffffu, 0x7f800000u,
                     0xff800000u, 0x00000000u, 0x80000000u, 0x00000001u, 0x807fffffu, 0x477ff000u, 0x477fefffu,
                     0x7f7fffffu, 0x7f7f8000u, 0x7f7f7fffu, 0x33000000u, 0x33000001u, 0x387fc000u})
    src.push_back(from_bits(u));
  uint64_t seed = std::random_device{}();
  std::printf("random f32 patterns from seed %llu\n", static_cast<unsigned long long>(seed));
  std::mt19937_64 rng(seed);
  for (int i = 0; i < (1 << 20); i++) src.push_back(from_bits(static_cast<uint32_t>(rng())));

  std::vector<uint16_t> got(src.size(), 0xabcd);
  tn_f32_to_half_block(dtype, src.data(), got.data(), static_cast<int64_t>(src.size()));
  for (size_t i = 0; i < src.size(); i++) {
    uint16_t want = dtype == TN_F16 ? tn_f32_to_f16(src[i]) : tn_f32_to_bf16(src[i]);
    ASSERT_EQ(got[i], want) << kBuild << " " << tn_dtype_name(dtype) << " from f32 0x" << std::hex << bits(src[i]);
  }
}

INSTANTIATE_TEST_SUITE_P(Dtypes, ConvertBlock, ::testing::Values(TN_F16, TN_BF16),
                         [](const ::testing::TestParamInfo<tn_dtype> &info) {
                           return std::string(tn_dtype_name(info.param));
                         });

}  // namespace
