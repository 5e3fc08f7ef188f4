// The unit tests' seed and random generator, shared by every test file of a binary: one seed per run,
// printed once at the start; TNORM_TEST_SEED=<n> repeats a run.
#ifndef TNORM_TESTS_TEST_SEED_H
#define TNORM_TESTS_TEST_SEED_H

#include <gtest/gtest.h>
#include <unistd.h>

#include <chrono>
#include <cinttypes>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>

namespace tnorm_test {

inline uint64_t SplitMix(uint64_t &s) {
  uint64_t z = (s += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

// TNORM_TEST_SEED when set, else fresh (the clock and the process id); 48 bits, short enough to type.
inline uint64_t GlobalSeed() {
  static const uint64_t seed = [] {
    const char *env = getenv("TNORM_TEST_SEED");
    if (env != nullptr && *env != '\0') return (uint64_t)strtoull(env, nullptr, 0);
    uint64_t s = (uint64_t)std::chrono::high_resolution_clock::now().time_since_epoch().count() ^
                 ((uint64_t)getpid() << 32);
    return (uint64_t)(SplitMix(s) & 0xffffffffffffull);
  }();
  return seed;
}

class SeedPrinter : public ::testing::Environment {
 public:
  void SetUp() override {
    printf("tnorm test seed: %" PRIu64 " (TNORM_TEST_SEED=%" PRIu64 " repeats this run)\n", GlobalSeed(),
           GlobalSeed());
    fflush(stdout);
  }
};
// Registered once per binary, whatever the number of files that include this header.
inline ::testing::Environment *const seed_printer = ::testing::AddGlobalTestEnvironment(new SeedPrinter);

// xoshiro256** seeded through splitmix64.
class Rng {
 public:
  explicit Rng(uint64_t seed) {
    for (auto &w : s_) w = SplitMix(seed);
  }
  uint64_t Next() {
    uint64_t r = Rotl(s_[1] * 5, 7) * 9, t = s_[1] << 17;
    s_[2] ^= s_[0];
    s_[3] ^= s_[1];
    s_[1] ^= s_[2];
    s_[0] ^= s_[3];
    s_[2] ^= t;
    s_[3] = Rotl(s_[3], 45);
    return r;
  }
  double Uniform() { return ((double)(Next() >> 11) + 0.5) * 0x1p-53; }  // (0, 1)
  uint64_t Below(uint64_t n) { return Next() % n; }
  double Normal() { return sqrt(-2.0 * log(Uniform())) * cos(6.283185307179586 * Uniform()); }

 private:
  static uint64_t Rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }
  uint64_t s_[4];
};

}  // namespace tnorm_test

#endif
