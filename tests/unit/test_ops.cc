// Every op against the float64 reference (tools/common/reference.h), per (op variant, dtype):
// a sweep over dims x rows, strided and in-place views, special rows (zeros, NaN/Inf, subnormals,
// an outlier channel, values near the dtype's max), batch invariance and thread-count invariance.
//
// Inputs are fresh random data every run, from a seed printed at the start: TNORM_TEST_SEED=<n> repeats
// a run. Every output is poisoned with 0xFF bytes (a NaN) before each call and every element is checked.
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cinttypes>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <unistd.h>

#include "core/dtype.h"
#include "reference.h"
#include "tnorm.h"

namespace {

// ------------------------------------------------------------------------------------------------
// Seed and random data
// ------------------------------------------------------------------------------------------------

uint64_t SplitMix(uint64_t &s) {
  uint64_t z = (s += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

uint64_t ChooseSeed() {
  const char *env = getenv("TNORM_TEST_SEED");
  if (env != nullptr && *env != '\0') return strtoull(env, nullptr, 0);
  uint64_t t = (uint64_t)std::chrono::high_resolution_clock::now().time_since_epoch().count();
  uint64_t s = t ^ ((uint64_t)getpid() << 32);
  return SplitMix(s) & 0xffffffffffffull;  // short enough to type
}

uint64_t GlobalSeed() {
  static const uint64_t seed = ChooseSeed();
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
::testing::Environment *const g_seed_env = ::testing::AddGlobalTestEnvironment(new SeedPrinter);

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

// A pool of N(0, 1) values drawn once per process from the seed; rows are slices of it at random offsets.
constexpr size_t kPoolSize = (size_t)1 << 22;
const std::vector<float> &NormalPool() {
  static const std::vector<float> pool = [] {
    std::vector<float> p(kPoolSize);
    Rng rng(GlobalSeed() ^ 0x5eed5eed5eedull);
    for (auto &v : p) v = (float)rng.Normal();
    return p;
  }();
  return pool;
}

// The per-test generator: the global seed mixed with the test's name, so a test repeats on its own.
uint64_t TestSeed() {
  const ::testing::TestInfo *info = ::testing::UnitTest::GetInstance()->current_test_info();
  std::string name = std::string(info->test_suite_name()) + "." + info->name();
  uint64_t h = 1469598103934665603ull;
  for (char c : name) h = (h ^ (unsigned char)c) * 1099511628211ull;
  return GlobalSeed() ^ h;
}

// ------------------------------------------------------------------------------------------------
// Buffers
// ------------------------------------------------------------------------------------------------

size_t ESize(tn_dtype dt) { return dt == TN_F32 ? 4 : 2; }

void StoreRow(tn_dtype dt, void *row, const float *src, int64_t n) {
  switch (dt) {
    case TN_F16:
      for (int64_t i = 0; i < n; i++) ((uint16_t *)row)[i] = tn_f32_to_f16(src[i]);
      break;
    case TN_BF16:
      for (int64_t i = 0; i < n; i++) ((uint16_t *)row)[i] = tn_f32_to_bf16(src[i]);
      break;
    default:
      memcpy(row, src, (size_t)n * 4);
  }
}

void LoadRow(tn_dtype dt, const void *row, float *dst, int64_t n) {
  switch (dt) {
    case TN_F16:
      for (int64_t i = 0; i < n; i++) dst[i] = tn_f16_to_f32(((const uint16_t *)row)[i]);
      break;
    case TN_BF16:
      for (int64_t i = 0; i < n; i++) dst[i] = tn_bf16_to_f32(((const uint16_t *)row)[i]);
      break;
    default:
      memcpy(dst, row, (size_t)n * 4);
  }
}

// A quiet NaN of the dtype that the library never produces from the poison: used in input gaps.
void StoreInputNaN(tn_dtype dt, void *p, int64_t n) {
  for (int64_t i = 0; i < n; i++) {
    if (dt == TN_F32) {
      uint32_t u = 0x7fc0beefu;
      memcpy((char *)p + 4 * i, &u, 4);
    } else {
      uint16_t h = dt == TN_F16 ? 0x7e11 : 0x7fd1;
      memcpy((char *)p + 2 * i, &h, 2);
    }
  }
}

// Whether an element still holds the output poison (0xFF bytes).
bool IsPoison(tn_dtype dt, const void *row, int64_t i) {
  if (dt == TN_F32) return ((const uint32_t *)row)[i] == 0xFFFFFFFFu;
  return ((const uint16_t *)row)[i] == 0xFFFFu;
}

// A rows x dim view with row_stride `stride` over its own bytes.
struct Buf {
  tn_dtype dt = TN_F32;
  int64_t rows = 0, dim = 1, stride = 1;
  std::vector<unsigned char> mem;

  void Shape(tn_dtype d, int64_t r, int64_t n, int64_t s) {
    dt = d;
    rows = r;
    dim = n;
    stride = s;
    mem.resize(std::max<size_t>((size_t)(r * s) * ESize(d), 64));
  }
  unsigned char *Row(int64_t r) { return mem.data() + (size_t)(r * stride) * ESize(dt); }
  const unsigned char *Row(int64_t r) const { return mem.data() + (size_t)(r * stride) * ESize(dt); }
  tn_tensor View() { return tn_tensor_strided(mem.data(), dt, rows, dim, stride); }
  void Poison() { memset(mem.data(), 0xFF, mem.size()); }
  size_t RowBytes() const { return (size_t)dim * ESize(dt); }
};

const double kRowScales[3] = {1e-3, 1.0, 30.0};

// Fills every row with N(0,1) times a per-row scale from {1e-3, 1, 30} (or `fixed_scale` when > 0);
// the gaps between rows get a NaN that would show if read.
void FillRandom(Buf &b, Rng &rng, double fixed_scale = 0.0, double offset = 0.0) {
  const std::vector<float> &pool = NormalPool();
  std::vector<float> tmp((size_t)b.dim);
  for (int64_t r = 0; r < b.rows; r++) {
    double scale = fixed_scale > 0 ? fixed_scale : kRowScales[rng.Below(3)];
    size_t off = (size_t)rng.Below(kPoolSize - (size_t)b.dim);
    for (int64_t i = 0; i < b.dim; i++) tmp[i] = (float)(offset + pool[off + i] * scale);
    StoreRow(b.dt, b.Row(r), tmp.data(), b.dim);
    if (b.stride > b.dim) StoreInputNaN(b.dt, b.Row(r) + b.RowBytes(), b.stride - b.dim);
  }
}

// ------------------------------------------------------------------------------------------------
// Op variants
// ------------------------------------------------------------------------------------------------

enum WeightKind { kNoWeight, kWeightXDtype, kWeightF32 };

struct Variant {
  const char *name;
  tn_op op;
  WeightKind weight;
  float weight_offset;
  bool mul;
  float scale;
};

const Variant kVariants[] = {
    {"rms_norm", TN_OP_RMS_NORM, kNoWeight, 0.0f, false, 1.0f},
    {"rms_norm_w", TN_OP_RMS_NORM, kWeightXDtype, 0.0f, false, 1.0f},
    {"rms_norm_wf32", TN_OP_RMS_NORM, kWeightF32, 0.0f, false, 1.0f},
    {"rms_norm_gemma", TN_OP_RMS_NORM, kWeightXDtype, 1.0f, false, 1.0f},
    {"rms_norm_mul", TN_OP_RMS_NORM, kNoWeight, 0.0f, true, 1.0f},
    {"rms_norm_w_mul", TN_OP_RMS_NORM, kWeightXDtype, 0.0f, true, 1.0f},
    {"l2_norm", TN_OP_L2_NORM, kNoWeight, 0.0f, false, 1.0f},
    {"l2_norm_scale037", TN_OP_L2_NORM, kNoWeight, 0.0f, false, 0.37f},
    {"add_rms_norm", TN_OP_ADD_RMS_NORM, kNoWeight, 0.0f, false, 1.0f},
    {"add_rms_norm_w", TN_OP_ADD_RMS_NORM, kWeightXDtype, 0.0f, false, 1.0f},
    {"add_rms_norm_wf32", TN_OP_ADD_RMS_NORM, kWeightF32, 0.0f, false, 1.0f},
};

struct Param {
  int variant;
  tn_dtype dtype;
};

std::vector<Param> AllParams() {
  std::vector<Param> ps;
  for (tn_dtype dt : {TN_F32, TN_F16, TN_BF16})
    for (int v = 0; v < (int)(sizeof kVariants / sizeof kVariants[0]); v++) {
      if (dt == TN_F32 && kVariants[v].weight == kWeightF32) continue;  // the same as the x-dtype weight
      ps.push_back({v, dt});
    }
  return ps;
}

std::string ParamName(const ::testing::TestParamInfo<Param> &info) {
  return std::string(kVariants[info.param.variant].name) + "_" + tn_dtype_name(info.param.dtype);
}

// All the operands of one call.
struct Operands {
  Buf x, res, mul, w, y, rout;
  tn_tensor tx, tres, tmul, tw, ty, trout;
  tn_op_args args;
};

// Runs fn(thread, begin, end) over [0, n) on up to hardware_concurrency threads (inline when small).
constexpr int kMaxThreads = 16;
void ParallelRows(int64_t n, int64_t work_per_row, const std::function<void(int, int64_t, int64_t)> &fn) {
  int threads = (int)std::min(std::max(1u, std::thread::hardware_concurrency()), (unsigned)kMaxThreads);
  if (threads == 1 || n < 2 || n * work_per_row < (1 << 16)) {
    fn(0, 0, n);
    return;
  }
  threads = (int)std::min<int64_t>(threads, n);
  std::vector<std::thread> ts;
  for (int t = 0; t < threads; t++) ts.emplace_back([&, t] { fn(t, n * t / threads, n * (t + 1) / threads); });
  for (auto &t : ts) t.join();
}

class OpsTest : public ::testing::TestWithParam<Param> {
 protected:
  void SetUp() override {
    ASSERT_EQ(tn_context_create(&ctx_), TN_OK);
    rng_ = Rng(TestSeed());
    v_ = &kVariants[GetParam().variant];
    dt_ = GetParam().dtype;
  }
  void TearDown() override { tn_context_destroy(ctx_); }

  tn_dtype WeightDtype() const { return v_->weight == kWeightF32 ? TN_F32 : dt_; }
  bool IsAdd() const { return v_->op == TN_OP_ADD_RMS_NORM; }

  // Shapes the operands (row operands with row_stride `stride`), fills the inputs with random data and
  // poisons the outputs. The weight is around 1 (around 0 for the Gemma form, which adds 1).
  void Prepare(Operands &o, int64_t rows, int64_t dim, int64_t stride) {
    o.x.Shape(dt_, rows, dim, stride);
    FillRandom(o.x, rng_);
    if (IsAdd()) {
      o.res.Shape(dt_, rows, dim, stride);
      FillRandom(o.res, rng_);
      o.rout.Shape(dt_, rows, dim, stride);
      o.rout.Poison();
    }
    if (v_->mul) {
      o.mul.Shape(dt_, rows, dim, stride);
      FillRandom(o.mul, rng_, 1.0);
    }
    if (v_->weight != kNoWeight) {
      o.w.Shape(WeightDtype(), 1, dim, dim);
      if (v_->weight_offset != 0.0f)
        FillRandom(o.w, rng_, 0.1, 0.0);
      else
        FillRandom(o.w, rng_, 0.1, 1.0);
    }
    o.y.Shape(dt_, rows, dim, stride);
    o.y.Poison();
    MakeArgs(o);
  }

  void MakeArgs(Operands &o) {
    o.tx = o.x.View();
    o.ty = o.y.View();
    o.args = tn_op_args_init(v_->op);
    o.args.x = &o.tx;
    o.args.y = &o.ty;
    o.args.eps = 1e-6f;
    o.args.scale = v_->scale;
    if (v_->weight != kNoWeight) {
      o.tw = o.w.View();
      o.args.weight = &o.tw;
      o.args.weight_offset = v_->weight_offset;
    }
    if (v_->mul) {
      o.tmul = o.mul.View();
      o.args.mul = &o.tmul;
    }
    if (IsAdd()) {
      o.tres = o.res.View();
      o.trout = o.rout.View();
      o.args.residual = &o.tres;
      o.args.residual_out = &o.trout;
    }
  }

  // Calls the op through its convenience function.
  tn_status Invoke(const tn_op_args &a) {
    switch (a.op) {
      case TN_OP_RMS_NORM:
        return a.mul != nullptr ? tn_rms_norm_mul(ctx_, a.x, a.weight, a.weight_offset, a.mul, a.eps, a.y)
                                : tn_rms_norm(ctx_, a.x, a.weight, a.weight_offset, a.eps, a.y);
      case TN_OP_L2_NORM:
        return tn_l2_norm(ctx_, a.x, a.eps, a.scale, a.y);
      case TN_OP_ADD_RMS_NORM:
        return tn_add_rms_norm(ctx_, a.x, a.residual, a.weight, a.weight_offset, a.eps, a.y, a.residual_out);
    }
    return TN_ERR_INTERNAL;
  }

  // The float64 reference of a (rows x dim, contiguous), computed on several threads.
  void Reference(const tn_op_args &a, std::vector<double> &ry, std::vector<double> &rr) {
    const int64_t rows = a.x->rows, dim = a.x->dim;
    ry.resize((size_t)(rows * dim));
    rr.resize(IsAdd() ? (size_t)(rows * dim) : 0);
    bool ok = true;
    ParallelRows(rows, dim, [&](int, int64_t r0, int64_t r1) {
      if (r1 <= r0) return;
      auto sub = [&](const tn_tensor *t, tn_tensor &s) -> const tn_tensor * {
        if (t == nullptr) return nullptr;
        s = *t;
        s.data = (char *)t->data + (size_t)(r0 * t->row_stride) * ESize(t->dtype);
        s.rows = r1 - r0;
        return &s;
      };
      tn_tensor sx, sres, smul;
      tn_op_args b = a;
      b.x = sub(a.x, sx);
      b.residual = sub(a.residual, sres);
      b.mul = sub(a.mul, smul);
      if (tn_reference_run(&b, ry.data() + r0 * dim, IsAdd() ? rr.data() + r0 * dim : nullptr) != 0) ok = false;
    });
    ASSERT_TRUE(ok) << "reference out of memory";
  }

  std::string Where(int64_t rows, int64_t dim) const {
    std::ostringstream s;
    s << "op " << v_->name << " (" << tn_op_name(v_->op) << "), dtype " << tn_dtype_name(dt_) << ", rows " << rows
      << ", dim " << dim << ", seed " << GlobalSeed();
    return s.str();
  }

  // Checks every element of y (and residual_out) against the reference; at most a few messages per call.
  // Returns the number of bad elements.
  int64_t Check(const Operands &o, const std::vector<double> &ry, const std::vector<double> &rr,
                const std::string &what = "") {
    const int64_t rows = o.ty.rows, dim = o.ty.dim;
    const int mant = dt_ == TN_F16 ? 10 : dt_ == TN_BF16 ? 7 : 23;
    const double fast_rel = dt_ == TN_F32 ? 2e-5 * 0.999 : ldexp(1.0, -(mant + 1));
    std::vector<std::vector<std::string>> msgs(kMaxThreads);
    std::vector<int64_t> bad(kMaxThreads, 0);
    ParallelRows(rows, dim, [&](int slot, int64_t r0, int64_t r1) {
      std::vector<float> got((size_t)dim);
      for (int64_t r = r0; r < r1; r++) {
        for (int out = 0; out < (IsAdd() ? 2 : 1); out++) {
          const tn_tensor &t = out == 0 ? o.ty : o.trout;
          const unsigned char *row = (const unsigned char *)t.data + (size_t)(r * t.row_stride) * ESize(dt_);
          const double *ref = (out == 0 ? ry.data() : rr.data()) + r * dim;
          LoadRow(dt_, row, got.data(), dim);
          for (int64_t i = 0; i < dim; i++) {
            double want = ref[i];
            float g = got[i];
            bool poison = IsPoison(dt_, row, i);
            bool ok;
            double err = 0;
            if (poison) {
              ok = false;
            } else if (out == 1) {
              // residual_out is x + residual rounded once: exact.
              ok = std::isnan(want) ? std::isnan(g) : (double)g == want;
            } else {
              double diff = fabs((double)g - want);
              ok = std::isfinite(diff) && diff <= fast_rel * fabs(want);
              if (!ok) {
                err = tn_reference_error(dt_, g, want);
                ok = err <= 1.0;
              }
            }
            if (!ok) {
              if (bad[slot]++ < 4) {
                std::ostringstream s;
                s << (out == 0 ? "y" : "residual_out") << " row " << r << " column " << i << ": got "
                  << (poison ? "the poison (never written)" : std::to_string(g)) << " (" << g << "), expected "
                  << want;
                if (out == 0 && !poison) s << " (error " << err << " tolerance units)";
                msgs[slot].push_back(s.str());
              }
            }
          }
        }
      }
    });
    int64_t total_bad = 0;
    std::vector<std::string> all;
    for (int s = 0; s < kMaxThreads; s++) {
      total_bad += bad[s];
      for (auto &m : msgs[s]) all.push_back(m);
    }
    if (total_bad > 0) {
      std::ostringstream s;
      s << Where(rows, dim) << (what.empty() ? "" : ", ") << what << ": " << total_bad << " bad elements";
      for (size_t k = 0; k < std::min<size_t>(all.size(), 8); k++) s << "\n  " << all[k];
      ADD_FAILURE() << s.str();
    }
    return total_bad;
  }

  // Runs one call: reference first (inputs may be overwritten in place), then the op, then the check.
  int64_t RunAndCheck(Operands &o, const std::string &what = "") {
    std::vector<double> ry, rr;
    Reference(o.args, ry, rr);
    tn_status st = Invoke(o.args);
    EXPECT_EQ(st, TN_OK) << Where(o.tx.rows, o.tx.dim) << ": " << tn_status_name(st) << ": "
                         << tn_context_last_error(ctx_);
    if (st != TN_OK) return 1;
    EXPECT_STREQ(tn_context_last_error(ctx_), "");
    return Check(o, ry, rr, what);
  }

  tn_context *ctx_ = nullptr;
  Rng rng_{0};
  const Variant *v_ = nullptr;
  tn_dtype dt_ = TN_F32;
};

const int64_t kDims[] = {1,    2,    3,    7,    31,   33,   96,   127,  128,  129,   255,   256,   257,   511,
                         512,  513,  769,  1152, 1536, 2304, 2560, 3584, 5120, 7168, 8193, 16384, 65536, 70000};
const int64_t kRows[] = {0, 1, 17, 63, 64, 65, 255, 256, 257};
const int64_t kViewRows[] = {1, 17, 64, 257};

}  // namespace
