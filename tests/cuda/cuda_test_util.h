// Host-side helpers of the CUDA backend's tests: the seed, random rows, threads for the host work (the
// float64 reference and the element checks are the slow part of these tests), dtype bit patterns, device
// buffers and a scope that makes device 0's primary context current for direct driver calls.
#ifndef TNORM_TESTS_CUDA_TEST_UTIL_H
#define TNORM_TESTS_CUDA_TEST_UTIL_H

#include <cuda.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include "core/dtype.h"
#include "rng.h"
#include "tnorm.h"

namespace tn_cuda_test {

// ------------------------------------------------------------------------------------------------
// Seeds: one base seed per process (TNORM_TEST_SEED=<n> repeats a run), and from it one seed per case,
// so that a failing case can be reproduced alone under the same base seed.
// ------------------------------------------------------------------------------------------------

inline uint64_t MixSeed(uint64_t a, uint64_t b) {
  tn_rng r{a ^ (b * 0xff51afd7ed558ccdull)};
  tn_rng_next(&r);
  return tn_rng_next(&r);
}

inline uint64_t HashString(const std::string &s) {
  uint64_t h = 1469598103934665603ull;  // FNV-1a
  for (char c : s) h = (h ^ (unsigned char)c) * 1099511628211ull;
  return h;
}

inline uint64_t ChooseBaseSeed() {
  const char *env = getenv("TNORM_TEST_SEED");
  if (env != nullptr && *env != '\0') return strtoull(env, nullptr, 0);
  const uint64_t t = (uint64_t)std::chrono::high_resolution_clock::now().time_since_epoch().count();
  return MixSeed(t, (uint64_t)getpid()) & 0xffffffffffffull;  // short enough to type
}

inline uint64_t BaseSeed() {
  static const uint64_t seed = ChooseBaseSeed();
  return seed;
}

// The seed of one case, named by a string such as "sweep rms_norm_w bf16 4096".
inline uint64_t SeedFor(const std::string &what) { return MixSeed(BaseSeed(), HashString(what)); }

class Random {
 public:
  explicit Random(uint64_t seed) : r_{seed} {}
  uint64_t Next() { return tn_rng_next(&r_); }
  uint64_t Below(uint64_t n) { return Next() % n; }
  double Uniform() { return tn_rng_uniform(&r_); }
  double Normal() { return tn_rng_normal(&r_); }

 private:
  tn_rng r_;
};

// N(0, 1) values drawn once per process from the base seed. Rows are slices of it at random offsets times
// a random scale: drawing fresh normals for every element would cost more than the whole GPU side.
constexpr size_t kPoolSize = (size_t)1 << 20;
inline const std::vector<float> &NormalPool() {
  static const std::vector<float> pool = [] {
    std::vector<float> p(kPoolSize);
    Random rng(MixSeed(BaseSeed(), 0x5eed));
    for (auto &v : p) v = (float)rng.Normal();
    return p;
  }();
  return pool;
}

// ------------------------------------------------------------------------------------------------
// Threads for host work over rows: fn(slot, begin, end) on up to 32 threads, inline when small (starting
// threads costs more than a few hundred thousand elements of work).
// ------------------------------------------------------------------------------------------------

constexpr int kMaxSlots = 32;

inline int HostThreads() {
  static const int n = std::max(1, std::min((int)std::thread::hardware_concurrency(), kMaxSlots));
  return n;
}

inline void ParallelFor(int64_t n, int64_t cost_per_item, const std::function<void(int, int64_t, int64_t)> &fn) {
  int threads = HostThreads();
  if (threads == 1 || n < 2 || n * cost_per_item < ((int64_t)1 << 18)) {
    fn(0, 0, n);
    return;
  }
  threads = (int)std::min<int64_t>(threads, n);
  std::vector<std::thread> ts;
  for (int t = 1; t < threads; t++) ts.emplace_back(fn, t, n * t / threads, n * (t + 1) / threads);
  fn(0, 0, n / threads);
  for (auto &t : ts) t.join();
}

// ------------------------------------------------------------------------------------------------
// dtypes as bit patterns
// ------------------------------------------------------------------------------------------------

inline size_t ESize(tn_dtype dt) { return dt == TN_F32 ? 4 : 2; }

// Element i of a row, as its bits.
inline uint32_t Bits(tn_dtype dt, const uint8_t *row, int64_t i) {
  if (dt == TN_F32) {
    uint32_t u;
    memcpy(&u, row + 4 * i, 4);
    return u;
  }
  uint16_t h;
  memcpy(&h, row + 2 * i, 2);
  return h;
}

inline float BitsToFloat(tn_dtype dt, uint32_t bits) {
  switch (dt) {
    case TN_F16:
      return tn_f16_to_f32((uint16_t)bits);
    case TN_BF16:
      return tn_bf16_to_f32((uint16_t)bits);
    default:
      return tn_f32_from_bits(bits);
  }
}

inline uint32_t AbsBits(tn_dtype dt, uint32_t bits) { return dt == TN_F32 ? bits & 0x7fffffffu : bits & 0x7fffu; }
inline uint32_t InfBits(tn_dtype dt) { return dt == TN_F32 ? 0x7f800000u : dt == TN_F16 ? 0x7c00u : 0x7f80u; }
inline bool BitsIsNaN(tn_dtype dt, uint32_t bits) { return AbsBits(dt, bits) > InfBits(dt); }
inline bool BitsIsInf(tn_dtype dt, uint32_t bits) { return AbsBits(dt, bits) == InfBits(dt); }

// The output poison: every byte 0xFF (a NaN the library never produces from these tests' inputs).
inline bool BitsIsPoison(tn_dtype dt, uint32_t bits) { return bits == (dt == TN_F32 ? 0xffffffffu : 0xffffu); }

// Position on a line where adjacent representable values are 1 apart (+0 and -0 both at 0): the distance
// of two finite values in ulps.
inline int64_t OrderedBits(tn_dtype dt, uint32_t bits) {
  const uint32_t sign = dt == TN_F32 ? 0x80000000u : 0x8000u;
  const int64_t mag = (int64_t)AbsBits(dt, bits);
  return (bits & sign) ? -mag : mag;
}

// A quiet NaN of the dtype put in the gaps of input buffers, so that a kernel reading a gap shows.
inline void NaNBytes(tn_dtype dt, uint8_t out[4]) {
  const uint32_t v = dt == TN_F32 ? 0x7fc0beefu : dt == TN_F16 ? 0x7e11u : 0x7fd1u;
  for (int b = 0; b < 4; b++) out[b] = (uint8_t)(v >> (8 * b));
}

// Host bytes of 0xFF, at least n of them, to poison device memory with.
inline const uint8_t *Ones(size_t n) {
  static std::vector<uint8_t> ones;
  if (ones.size() < n) ones.assign(n, 0xff);
  return ones.data();
}

// ------------------------------------------------------------------------------------------------
// Device memory through the library (tn_malloc / tn_free on cuda:0); grows, never shrinks, so that a
// sweep reuses one allocation per operand.
// ------------------------------------------------------------------------------------------------

inline tn_device Gpu() { return tn_cuda_device(0); }

class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  DeviceBuffer(const DeviceBuffer &) = delete;
  DeviceBuffer &operator=(const DeviceBuffer &) = delete;
  ~DeviceBuffer() { Release(); }

  // At least `bytes` bytes (their content is undefined after a growth).
  tn_status Reserve(tn_context *ctx, size_t bytes) {
    if (bytes <= capacity_ && ptr_ != nullptr) return TN_OK;
    Release();
    ctx_ = ctx;
    void *p = nullptr;
    tn_status st = tn_malloc(ctx, Gpu(), std::max<size_t>(bytes, 256), &p);
    if (st != TN_OK) return st;
    ptr_ = p;
    capacity_ = std::max<size_t>(bytes, 256);
    return TN_OK;
  }
  void Release() {
    if (ptr_ != nullptr) tn_free(ctx_, Gpu(), ptr_);
    ptr_ = nullptr;
    capacity_ = 0;
  }
  uint8_t *data() const { return (uint8_t *)ptr_; }
  size_t capacity() const { return capacity_; }

 private:
  tn_context *ctx_ = nullptr;
  void *ptr_ = nullptr;
  size_t capacity_ = 0;
};

// ------------------------------------------------------------------------------------------------
// Direct driver calls (streams, graph capture) need a current context: device 0's primary context, the
// one the library uses, so that streams created here are usable by its launches.
// ------------------------------------------------------------------------------------------------

inline std::string CuError(CUresult r) {
  const char *name = nullptr;
  if (cuGetErrorName(r, &name) != CUDA_SUCCESS || name == nullptr) return "CUresult " + std::to_string((int)r);
  return name;
}

class PrimaryContextScope {
 public:
  PrimaryContextScope() {
    CUresult r = cuInit(0);
    if (r == CUDA_SUCCESS) r = cuDeviceGet(&dev_, 0);
    if (r == CUDA_SUCCESS && (r = cuDevicePrimaryCtxRetain(&ctx_, dev_)) == CUDA_SUCCESS) retained_ = true;
    if (r == CUDA_SUCCESS && (r = cuCtxPushCurrent(ctx_)) == CUDA_SUCCESS) pushed_ = true;
    status_ = r;
  }
  ~PrimaryContextScope() {
    CUcontext popped;
    if (pushed_) cuCtxPopCurrent(&popped);
    if (retained_) cuDevicePrimaryCtxRelease(dev_);
  }
  PrimaryContextScope(const PrimaryContextScope &) = delete;
  PrimaryContextScope &operator=(const PrimaryContextScope &) = delete;
  bool ok() const { return status_ == CUDA_SUCCESS; }
  CUresult status() const { return status_; }

 private:
  CUdevice dev_ = 0;
  CUcontext ctx_ = nullptr;
  bool retained_ = false, pushed_ = false;
  CUresult status_ = CUDA_SUCCESS;
};

// A test with a context on which CUDA must be usable (this binary runs only where a GPU is). A fixture
// that frees device buffers through the context releases them in its TearDown before calling this one's.
class CudaContextTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_EQ(tn_context_create(&ctx), TN_OK);
    RecordProperty("seed", std::to_string(BaseSeed()));
    const tn_status st = tn_device_available(ctx, TN_DEVICE_CUDA);
    ASSERT_EQ(st, TN_OK) << "these tests need a usable CUDA device: " << tn_status_name(st) << ": "
                         << tn_context_last_error(ctx);
  }
  void TearDown() override { tn_context_destroy(ctx); }
  tn_context *ctx = nullptr;
};

}  // namespace tn_cuda_test

#endif
