// Quantized outputs (tnorm.h, "Quantized outputs") on the CPU: rms_norm, add_rms_norm, layer_norm,
// add_layer_norm and quantize, in every format, scaling, scales layout and dtype, against a quantizer written
// here from the formats' definitions and the header's numerics contract; it shares no code with the library.
//
// The value quantized comes from the same op run without a quantized output (that op is checked against
// float64 elsewhere). With source ROUNDED, q and the scales must be this file's quantization of its y,
// byte for byte; with source F32 (f16/bf16 x) each code must be the quantization of a float64 result
// computed here, or one step from it where that result lies within its error of a rounding boundary, and
// each scale the contract's scale of an amax within that error.
// Inputs are fresh random data every run, from the seed printed at the start (TNORM_TEST_SEED=<n> repeats a
// run). Every output is poisoned before each call and every byte is checked, padding and gaps included.
#include <gtest/gtest.h>

#include <algorithm>
#include <cinttypes>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

#include "test_context.h"
#include "test_seed.h"
#include "tnorm.h"

namespace {

using tnorm_test::GlobalSeed;
using tnorm_test::Rng;

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr float kEps = 1e-6f;

// The per-test generator: the global seed mixed with the test's name, so that a test repeats on its own.
uint64_t TestSeed() {
  const ::testing::TestInfo *info = ::testing::UnitTest::GetInstance()->current_test_info();
  const std::string name = std::string(info->test_suite_name()) + "." + info->name();
  uint64_t h = 1469598103934665603ull;
  for (char c : name) h = (h ^ (unsigned char)c) * 1099511628211ull;
  return GlobalSeed() ^ h;
}

// ------------------------------------------------------------------------------------------------
// Storage dtypes, converted here (the library's own conversions are what is under test)
// ------------------------------------------------------------------------------------------------

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

// IEEE binary16, nearest even: in double, the value divided by its quantum is an integer rounded once.
uint16_t F16Bits(float f) {
  const uint16_t sign = std::signbit(f) ? 0x8000 : 0;
  if (std::isnan(f)) return sign | 0x7e00;
  const double a = std::fabs((double)f);
  if (a >= 65520.0) return sign | 0x7c00;  // 65504 plus half its quantum: rounds to infinity
  if (a < 0x1p-14) return sign | (uint16_t)std::nearbyint(a * 0x1p24);  // subnormal steps of 2^-24
  int e;
  std::frexp(a, &e);  // a in [2^(e-1), 2^e)
  e -= 1;
  double mant = std::nearbyint(std::ldexp(a, 10 - e));  // 1024 .. 2048
  if (mant == 2048.0) {
    mant = 1024.0;
    e += 1;
  }
  return sign | (uint16_t)((e + 15) << 10) | (uint16_t)(mant - 1024.0);
}

float F16Value(uint16_t h) {
  const int e = (h >> 10) & 31, m = h & 1023;
  const double v = e == 0    ? std::ldexp((double)m, -24)
                   : e == 31 ? (m != 0 ? (double)kNaN : (double)kInf)
                             : std::ldexp(1024.0 + m, e - 25);
  return (float)((h & 0x8000) ? -v : v);
}

// bfloat16: the top half of the float32, the dropped half rounded to nearest even (NaN kept quiet).
uint16_t BF16Bits(float f) {
  const uint32_t u = Bits(f);
  if (std::isnan(f)) return (uint16_t)((u >> 16) | 0x40);
  return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

float BF16Value(uint16_t h) { return FromBits((uint32_t)h << 16); }

size_t ElemSize(tn_dtype dt) { return dt == TN_F32 ? 4 : dt == TN_F16 || dt == TN_BF16 ? 2 : 1; }

float Load(tn_dtype dt, const unsigned char *row, int64_t i) {
  if (dt == TN_F32) {
    float f;
    memcpy(&f, row + 4 * i, 4);
    return f;
  }
  uint16_t h;
  memcpy(&h, row + 2 * i, 2);
  return dt == TN_F16 ? F16Value(h) : BF16Value(h);
}

void Store(tn_dtype dt, unsigned char *row, int64_t i, float v) {
  if (dt == TN_F32) {
    memcpy(row + 4 * i, &v, 4);
    return;
  }
  const uint16_t h = dt == TN_F16 ? F16Bits(v) : BF16Bits(v);
  memcpy(row + 2 * i, &h, 2);
}

float RoundTo(tn_dtype dt, float v) {
  if (dt == TN_F16) return F16Value(F16Bits(v));
  if (dt == TN_BF16) return BF16Value(BF16Bits(v));
  return v;
}

// ------------------------------------------------------------------------------------------------
// Buffers
// ------------------------------------------------------------------------------------------------

// Bytes after a buffer's last element that no call may write.
constexpr size_t kSlack = 64;

// A rows x dim view with row_stride `stride` over bytes of its own, starting `base` bytes into them (a base
// that is not a multiple of the element size makes a misaligned view).
struct Buf {
  tn_dtype dt = TN_F32;
  int64_t rows = 0, dim = 0, stride = 0;
  size_t base = 0;
  std::vector<unsigned char> mem;

  void Shape(tn_dtype d, int64_t r, int64_t n, int64_t s, size_t b = 0) {
    dt = d;
    rows = r;
    dim = n;
    stride = s;
    base = b;
    mem.assign(b + (size_t)(r * s) * ElemSize(d) + kSlack, 0);
  }
  size_t Offset(int64_t r, int64_t i) const { return base + (size_t)(r * stride + i) * ElemSize(dt); }
  unsigned char *Row(int64_t r) { return mem.data() + Offset(r, 0); }
  const unsigned char *Row(int64_t r) const { return mem.data() + Offset(r, 0); }
  tn_tensor View() const { return tn_tensor_strided(mem.data() + base, dt, rows, dim, stride); }
  void Poison(uint8_t b) {
    if (!mem.empty()) memset(mem.data(), b, mem.size());
  }
  float Get(int64_t r, int64_t i) const { return Load(dt, Row(r), i); }
  void Set(int64_t r, int64_t i, float v) { Store(dt, Row(r), i, v); }
  size_t RowBytes() const { return (size_t)dim * ElemSize(dt); }
};

// The bytes a row-shaped output must hold: ref's elements, `poison` everywhere else (gaps, slack).
std::vector<unsigned char> RowImage(const Buf &ref, uint8_t poison) {
  std::vector<unsigned char> img(ref.mem.size(), poison);
  for (int64_t r = 0; r < ref.rows; r++) memcpy(img.data() + ref.Offset(r, 0), ref.Row(r), ref.RowBytes());
  return img;
}

// got must equal want byte for byte; the first differences are named by name_of(offset).
void ExpectSameBytes(const std::vector<unsigned char> &got, const std::vector<unsigned char> &want,
                     const std::function<std::string(size_t)> &name_of, const std::string &what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  if (got.empty() || memcmp(got.data(), want.data(), got.size()) == 0) return;
  size_t bad = 0;
  std::ostringstream s;
  for (size_t i = 0; i < got.size(); i++) {
    if (got[i] == want[i]) continue;
    if (bad++ < 6)
      s << "\n  " << name_of(i) << ": got 0x" << std::hex << (int)got[i] << ", want 0x" << (int)want[i] << std::dec;
  }
  ADD_FAILURE() << what << ": " << bad << " bytes differ" << s.str();
}

std::string PlainOffset(const char *name, size_t off) { return std::string(name) + " byte " + std::to_string(off); }

// Random data: rows of N(0, 1) times a per-row scale from {1e-3, 1, 30}, slices of a pool drawn once per
// process; the gaps between rows hold NaN, which would show if read.
constexpr size_t kPoolSize = (size_t)1 << 18;
const std::vector<float> &NormalPool() {
  static const std::vector<float> pool = [] {
    std::vector<float> p(kPoolSize);
    Rng rng(GlobalSeed() ^ 0x9a7d0c5eull);
    for (auto &v : p) v = (float)rng.Normal();
    return p;
  }();
  return pool;
}

void FillRandom(Buf &b, Rng &rng, double fixed_scale = 0.0, double offset = 0.0) {
  static const double kRowScales[3] = {1e-3, 1.0, 30.0};
  const std::vector<float> &pool = NormalPool();
  for (int64_t r = 0; r < b.rows; r++) {
    const double scale = fixed_scale > 0 ? fixed_scale : kRowScales[rng.Below(3)];
    const size_t from = (size_t)rng.Below(kPoolSize - (size_t)b.dim);
    for (int64_t i = 0; i < b.dim; i++) b.Set(r, i, (float)(offset + scale * pool[from + (size_t)i]));
    for (int64_t i = b.dim; i < b.stride && r + 1 < b.rows; i++) b.Set(r, i, kNaN);
  }
}

// ------------------------------------------------------------------------------------------------
// The element formats, from their definitions
// ------------------------------------------------------------------------------------------------

// The non-negative finite values of a minifloat by code, ascending: exponent field 0 is m * 2^(1 - bias -
// man_bits), the others (1 + m / 2^man_bits) * 2^(e - bias).
std::vector<double> MinifloatValues(int man_bits, int bias, unsigned max_code) {
  std::vector<double> v;
  for (unsigned c = 0; c <= max_code; c++) {
    const unsigned e = c >> man_bits, m = c & ((1u << man_bits) - 1);
    v.push_back(e == 0 ? std::ldexp((double)m, 1 - bias - man_bits)
                       : std::ldexp(1.0 + (double)m / (double)(1u << man_bits), (int)e - bias));
  }
  return v;
}

// E4M3 (e4m3fn): 0x7f is NaN, 0x7e = 448 the largest. E5M2: 0x7c is infinity, 0x7b = 57344 the largest.
const std::vector<double> &E4M3() {
  static const std::vector<double> v = MinifloatValues(3, 7, 0x7e);
  return v;
}
const std::vector<double> &E5M2() {
  static const std::vector<double> v = MinifloatValues(2, 15, 0x7b);
  return v;
}
const std::vector<double> &E2M1() {
  static const std::vector<double> v = {0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0};
  return v;
}

// The code of the value nearest to a >= 0, ties to the even code; from the largest value on, the largest.
unsigned NearestCode(const std::vector<double> &values, double a) {
  if (a >= values.back()) return (unsigned)values.size() - 1;
  const size_t hi = (size_t)(std::upper_bound(values.begin(), values.end(), a) - values.begin()), lo = hi - 1;
  if (values[lo] == a) return (unsigned)lo;
  const double below = a - values[lo], above = values[hi] - a;
  if (below != above) return (unsigned)(below < above ? lo : hi);
  return (unsigned)(lo % 2 == 0 ? lo : hi);
}

uint8_t EncodeFp8(const std::vector<double> &values, float v) {
  const uint8_t sign = std::signbit(v) ? 0x80 : 0;
  if (std::isnan(v)) return sign | 0x7f;
  return sign | (uint8_t)NearestCode(values, std::fabs((double)v));
}

uint8_t EncodeInt8(float v) {
  if (std::isnan(v)) return 0;
  const double r = std::min(127.0, std::max(-127.0, std::nearbyint((double)v)));
  return (uint8_t)(int8_t)r;
}

uint8_t EncodeE2M1(float v) {
  if (std::isnan(v)) return 0;
  return (uint8_t)((std::signbit(v) ? 8u : 0u) | NearestCode(E2M1(), std::fabs((double)v)));
}

uint8_t Encode(tn_quant_format f, float v) {
  switch (f) {
    case TN_QUANT_FP8_E5M2:
      return EncodeFp8(E5M2(), v);
    case TN_QUANT_INT8:
      return EncodeInt8(v);
    case TN_QUANT_NVFP4:
      return EncodeE2M1(v);
    default:
      return EncodeFp8(E4M3(), v);
  }
}

double E4M3Value(uint8_t b) { return ((b & 0x80) ? -1.0 : 1.0) * E4M3()[b & 0x7f]; }

double CodeValue(tn_quant_format f, uint8_t c) {
  switch (f) {
    case TN_QUANT_FP8_E5M2:
      return ((c & 0x80) ? -1.0 : 1.0) * ((c & 0x7f) <= 0x7b ? E5M2()[c & 0x7f] : (double)kNaN);
    case TN_QUANT_INT8:
      return (double)(int8_t)c;
    case TN_QUANT_NVFP4:
      return ((c & 8) ? -1.0 : 1.0) * E2M1()[c & 7];
    default:
      return (c & 0x7f) == 0x7f ? (double)kNaN : E4M3Value(c);
  }
}

// A code's position on the number line (+0 and -0 coincide), for the one-step tolerance; NaN and
// infinity codes lie far from every other.
int Ordinal(tn_quant_format f, uint8_t c) {
  switch (f) {
    case TN_QUANT_INT8:
      return (int8_t)c;
    case TN_QUANT_NVFP4:
      return (c & 8) ? -(int)(c & 7) : (int)(c & 7);
    case TN_QUANT_FP8_E5M2:
      if ((c & 0x7f) > 0x7b) return 100000;
      return (c & 0x80) ? -(int)(c & 0x7f) : (int)(c & 0x7f);
    default:
      if ((c & 0x7f) == 0x7f) return 100000;
      return (c & 0x80) ? -(int)(c & 0x7f) : (int)(c & 0x7f);
  }
}

float QMax(tn_quant_format f) {
  switch (f) {
    case TN_QUANT_FP8_E5M2:
      return 57344.0f;
    case TN_QUANT_INT8:
      return 127.0f;
    case TN_QUANT_NVFP4:
      return 6.0f;
    default:
      return 448.0f;
  }
}

// UE8M0: 2^ceil(log2 s) within [2^-127, 2^127] (s > 0; infinity gives 2^127); the byte is the exponent + 127.
uint8_t Ue8m0Byte(float s) {
  if (!(s < kInf)) return 254;
  int e;
  const double m = std::frexp((double)s, &e);  // s = m * 2^e, m in [0.5, 1)
  int k = m == 0.5 ? e - 1 : e;
  k = std::max(-127, std::min(127, k));
  return (uint8_t)(k + 127);
}

float Ue8m0Value(uint8_t b) { return (float)std::ldexp(1.0, (int)b - 127); }

// s = amax / qmax in float32, then min(s, ub) when ub > 0, then max(s, lo).
float DynamicScale(float amax, float qmax, float ub, float lo) {
  float s = amax / qmax;
  if (ub > 0.0f) s = std::min(s, ub);
  return std::max(s, lo);
}

// The largest |v| of n values, NaN skipped.
float Amax(const float *v, int64_t n) {
  float a = 0.0f;
  for (int64_t i = 0; i < n; i++)
    if (!std::isnan(v[i])) a = std::max(a, std::fabs(v[i]));
  return a;
}

// ------------------------------------------------------------------------------------------------
// The quantized output asked for, and its reference
// ------------------------------------------------------------------------------------------------

struct Spec {
  tn_quant_format format = TN_QUANT_FP8_E4M3;
  tn_quant_scaling scaling = TN_QUANT_SCALE_TOKEN;
  int64_t group_size = 0;  // as given to the library (0: the format's own)
  int pow2 = 0;
  tn_scale_layout layout = TN_SCALES_ROW_MAJOR;
  float scale_ub = 0.0f, scale_min = 0x1p-126f;
  float scale = 1.0f;  // the static scale, or NVFP4's global one

  bool Dynamic() const { return scaling != TN_QUANT_SCALE_TENSOR; }
  bool Nvfp4() const { return format == TN_QUANT_NVFP4; }
  bool Ue8m0() const { return format == TN_QUANT_MXFP8 || pow2 != 0; }
  bool TakesScale() const { return !Dynamic() || Nvfp4(); }
  int64_t Group(int64_t dim) const {
    if (scaling != TN_QUANT_SCALE_GROUP) return dim;
    if (group_size != 0) return group_size;
    return Nvfp4() ? 16 : 32;
  }
  tn_dtype QDtype() const {
    return format == TN_QUANT_FP8_E5M2 ? TN_F8_E5M2 : format == TN_QUANT_INT8 ? TN_I8 : Nvfp4() ? TN_U8 : TN_F8_E4M3;
  }
  tn_dtype ScalesDtype() const { return Nvfp4() ? TN_F8_E4M3 : Ue8m0() ? TN_U8 : TN_F32; }
};

const char *LayoutName(tn_scale_layout l) {
  return l == TN_SCALES_ROW_MAJOR ? "row-major" : l == TN_SCALES_COLUMN_MAJOR ? "column-major" : "swizzled";
}

std::string SpecName(const Spec &s) {
  std::ostringstream o;
  o << tn_quant_format_name(s.format) << "_"
    << (s.scaling == TN_QUANT_SCALE_TENSOR  ? "tensor"
        : s.scaling == TN_QUANT_SCALE_TOKEN ? "token"
                                            : "group");
  if (s.scaling == TN_QUANT_SCALE_GROUP) o << s.Group(1 << 20);
  if (s.pow2) o << "_pow2";
  if (s.Dynamic()) o << "_" << LayoutName(s.layout);
  if (s.scale_ub != 0.0f) o << "_ub" << s.scale_ub;
  if (s.scale_min != 0x1p-126f) o << "_min" << s.scale_min;
  return o.str();
}

// q's codes (NVFP4: one 4-bit code per element, unpacked) and each group's stored scale, in logical order.
struct Quantized {
  int64_t rows = 0, dim = 0, groups = 0;
  std::vector<uint8_t> codes;    // rows x dim
  std::vector<uint32_t> stored;  // rows x groups: the f32 scale's bits, or its UE8M0 or E4M3 byte
};

// The scale each element of group g was divided by, from the stored scale (or the static one).
float Divisor(const Spec &sp, uint32_t stored) {
  if (!sp.Dynamic()) return sp.scale;
  if (sp.Nvfp4()) return (float)E4M3Value((uint8_t)stored) / sp.scale;
  if (sp.Ue8m0()) return Ue8m0Value((uint8_t)stored);
  return FromBits(stored);
}

// The header's contract applied to v (rows x dim float32 values, contiguous).
Quantized Reference(const Spec &sp, const std::vector<float> &v, int64_t rows, int64_t dim) {
  Quantized out;
  out.rows = rows;
  out.dim = dim;
  const int64_t group = sp.Group(dim);
  out.groups = sp.Dynamic() ? dim / group : 0;
  out.codes.assign((size_t)(rows * dim), 0);
  out.stored.assign((size_t)(rows * out.groups), 0);
  for (int64_t r = 0; r < rows; r++) {
    for (int64_t g = 0; g < std::max<int64_t>(out.groups, 1); g++) {
      const float *vg = v.data() + r * dim + g * group;
      uint8_t *cg = out.codes.data() + r * dim + g * group;
      float s = sp.scale;
      if (sp.Nvfp4()) {
        const float t = (Amax(vg, group) / 6.0f) * sp.scale;
        const uint8_t sb = EncodeFp8(E4M3(), t);
        out.stored[(size_t)(r * out.groups + g)] = sb;
        s = (float)E4M3Value(sb) / sp.scale;
        if (s == 0.0f) continue;  // the group's codes stay 0
      } else if (sp.Dynamic()) {
        s = DynamicScale(Amax(vg, group), QMax(sp.format), sp.scale_ub, sp.scale_min);
        uint32_t stored = Bits(s);
        if (sp.Ue8m0()) {
          stored = Ue8m0Byte(s);
          s = Ue8m0Value((uint8_t)stored);
        }
        out.stored[(size_t)(r * out.groups + g)] = stored;
      }
      for (int64_t i = 0; i < group; i++) {
        // tnorm.h: an infinity under an infinite scale gives +-largest (not inf / inf's NaN).
        const float t = std::isinf(vg[i]) && std::isinf(s) ? vg[i] : vg[i] / s;
        cg[i] = Encode(sp.format, t);
      }
    }
  }
  return out;
}

// The buffers of one call's quantized output: q, the dynamic scales in their layout, and the one-float
// static or global scale.
struct QuantBufs {
  Spec sp;
  int64_t rows = 0, dim = 0, group = 0, groups = 0, qdim = 0;
  Buf q, scales, scale;
  tn_tensor tq{}, tscales{}, tscale{};

  QuantBufs() = default;
  QuantBufs(const QuantBufs &) = delete;
  QuantBufs &operator=(const QuantBufs &) = delete;

  // padded: q rows and row-major scales rows with gaps; column-major scales always pad their rows.
  // scales_base: a byte offset of the scales' data (misaligned f32 scales).
  void Make(const Spec &s, int64_t r, int64_t d, bool padded, size_t scales_base = 0) {
    sp = s;
    rows = r;
    dim = d;
    group = s.Group(d);
    groups = s.Dynamic() ? d / group : 0;
    qdim = s.Nvfp4() ? d / 2 : d;
    q.Shape(s.QDtype(), rows, qdim, padded ? qdim + 40 : qdim);
    if (s.Dynamic()) {
      if (s.layout == TN_SCALES_ROW_MAJOR) {
        scales.Shape(s.ScalesDtype(), rows, groups, padded ? groups + 3 : groups, scales_base);
      } else if (s.layout == TN_SCALES_COLUMN_MAJOR) {
        scales.Shape(s.ScalesDtype(), groups, rows, (rows + 3) / 4 * 4 + 4, scales_base);
      } else {
        const int64_t groups4 = (groups + 3) / 4 * 4;
        scales.Shape(s.ScalesDtype(), (rows + 127) / 128 * 128, groups4, groups4, scales_base);
      }
    }
    if (s.TakesScale()) {
      scale.Shape(TN_F32, 1, 1, 1, scales_base);
      scale.Set(0, 0, s.scale);
    }
    tq = q.View();
    tscales = scales.View();
    tscale = scale.View();
  }

  tn_quant Quant(tn_quant_source source) const {
    tn_quant qa = tn_quant_init(sp.format);
    qa.scaling = sp.scaling;
    qa.group_size = sp.group_size;
    qa.source = source;
    qa.pow2_scales = sp.pow2;
    qa.layout = sp.layout;
    qa.scale_ub = sp.scale_ub;
    qa.scale_min = sp.scale_min;
    qa.q = &tq;
    qa.scale = sp.TakesScale() ? &tscale : nullptr;
    qa.scales = sp.Dynamic() ? &tscales : nullptr;
    return qa;
  }

  void Poison(uint8_t b) {
    q.Poison(b);
    scales.Poison(b);
  }

  // Where scale (r, g) lives in the scales' bytes (tnorm.h, tn_scale_layout).
  size_t ScaleOffset(int64_t r, int64_t g) const {
    if (sp.layout == TN_SCALES_ROW_MAJOR) return scales.Offset(r, g);
    if (sp.layout == TN_SCALES_COLUMN_MAJOR) return scales.Offset(g, r);
    const int64_t tiles_per_row = scales.dim / 4;  // a tile: 128 rows x 4 groups, 512 bytes
    return scales.base +
           (size_t)(((r / 128) * tiles_per_row + g / 4) * 512 + (r % 32) * 16 + ((r % 128) / 32) * 4 + g % 4);
  }

  // The bytes q and the scales must hold for `want`: its codes and scales in place, `poison` elsewhere,
  // zeros in the swizzled layout's padding.
  void Images(const Quantized &want, uint8_t poison, std::vector<unsigned char> &qi,
              std::vector<unsigned char> &si) const {
    qi.assign(q.mem.size(), poison);
    for (int64_t r = 0; r < rows; r++) {
      const uint8_t *c = want.codes.data() + r * dim;
      unsigned char *row = qi.data() + q.Offset(r, 0);
      if (sp.Nvfp4())
        for (int64_t k = 0; k < qdim; k++) row[k] = (uint8_t)(c[2 * k] | c[2 * k + 1] << 4);
      else
        memcpy(row, c, (size_t)dim);
    }
    si.assign(scales.mem.size(), poison);
    if (!sp.Dynamic()) return;
    if (sp.layout == TN_SCALES_SWIZZLED) memset(si.data() + scales.base, 0, (size_t)(scales.rows * scales.dim));
    for (int64_t r = 0; r < rows; r++)
      for (int64_t g = 0; g < groups; g++) {
        const uint32_t st = want.stored[(size_t)(r * groups + g)];
        const size_t off = ScaleOffset(r, g);
        if (ElemSize(scales.dt) == 4)
          memcpy(si.data() + off, &st, 4);
        else
          si[off] = (uint8_t)st;
      }
  }

  // The codes and scales the library wrote.
  Quantized Read() const {
    Quantized got;
    got.rows = rows;
    got.dim = dim;
    got.groups = groups;
    got.codes.assign((size_t)(rows * dim), 0);
    got.stored.assign((size_t)(rows * groups), 0);
    for (int64_t r = 0; r < rows; r++) {
      const unsigned char *row = q.Row(r);
      uint8_t *c = got.codes.data() + r * dim;
      if (sp.Nvfp4())
        for (int64_t k = 0; k < qdim; k++) c[2 * k] = row[k] & 15, c[2 * k + 1] = row[k] >> 4;
      else
        memcpy(c, row, (size_t)dim);
      for (int64_t g = 0; g < groups; g++) {
        uint32_t st = 0;
        const size_t off = ScaleOffset(r, g);
        if (ElemSize(scales.dt) == 4)
          memcpy(&st, scales.mem.data() + off, 4);
        else
          st = scales.mem[off];
        got.stored[(size_t)(r * groups + g)] = st;
      }
    }
    return got;
  }

  std::string NameQ(size_t off) const {
    const int64_t rel = (int64_t)off - (int64_t)q.base;
    const int64_t r = rel / q.stride, b = rel % q.stride;
    if (rel >= 0 && r < rows && b < qdim) return "q row " + std::to_string(r) + " byte " + std::to_string(b);
    return PlainOffset("q padding", off);
  }
  std::string NameScales(size_t off) const {
    for (int64_t r = 0; r < rows; r++)
      for (int64_t g = 0; g < groups; g++) {
        const size_t at = ScaleOffset(r, g);
        if (off >= at && off < at + ElemSize(scales.dt))
          return "scale of row " + std::to_string(r) + " group " + std::to_string(g);
      }
    return PlainOffset("scales padding", off);
  }

  // q and the scales must be exactly `want`, the rest poison (or the swizzled layout's zeros).
  void ExpectExactly(const Quantized &want, uint8_t poison, const std::string &where) const {
    std::vector<unsigned char> qi, si;
    Images(want, poison, qi, si);
    ExpectSameBytes(
        q.mem, qi, [&](size_t o) { return NameQ(o); }, where + ": q");
    ExpectSameBytes(
        scales.mem, si, [&](size_t o) { return NameScales(o); }, where + ": scales");
  }
};

// ------------------------------------------------------------------------------------------------
// The ops
// ------------------------------------------------------------------------------------------------

struct Variant {
  const char *name;
  tn_op op;
  bool weight, weight_f32;
  float weight_offset;
  bool bias, mul;
  bool residual_f32;
  tn_residual_mode mode;
  bool Adds() const { return op == TN_OP_ADD_RMS_NORM || op == TN_OP_ADD_LAYER_NORM; }
  bool Layer() const { return op == TN_OP_LAYER_NORM || op == TN_OP_ADD_LAYER_NORM; }
  bool Quantize() const { return op == TN_OP_QUANTIZE; }
};

constexpr tn_residual_mode kStored = TN_RESIDUAL_NORM_STORED, kNormF32 = TN_RESIDUAL_NORM_F32;

const Variant kVariants[] = {
    {"rms_norm", TN_OP_RMS_NORM, false, false, 0.0f, false, false, false, kStored},
    {"rms_norm_w", TN_OP_RMS_NORM, true, false, 0.0f, false, false, false, kStored},
    {"rms_norm_wf32_offset1", TN_OP_RMS_NORM, true, true, 1.0f, false, false, false, kStored},
    {"rms_norm_w_mul", TN_OP_RMS_NORM, true, false, 0.0f, false, true, false, kStored},
    {"add_rms_norm_w", TN_OP_ADD_RMS_NORM, true, false, 0.0f, false, false, false, kStored},
    {"add_rms_norm_w_norm_f32", TN_OP_ADD_RMS_NORM, true, false, 0.0f, false, false, false, kNormF32},
    {"add_rms_norm_w_res_f32", TN_OP_ADD_RMS_NORM, true, false, 0.0f, false, false, true, kStored},
    {"add_rms_norm_res_f32_norm_f32", TN_OP_ADD_RMS_NORM, false, false, 0.0f, false, false, true, kNormF32},
    {"layer_norm", TN_OP_LAYER_NORM, false, false, 0.0f, false, false, false, kStored},
    {"layer_norm_wb", TN_OP_LAYER_NORM, true, false, 0.0f, true, false, false, kStored},
    {"add_layer_norm_wb", TN_OP_ADD_LAYER_NORM, true, false, 0.0f, true, false, false, kStored},
    {"add_layer_norm_wf32_res_f32_norm_f32", TN_OP_ADD_LAYER_NORM, true, true, 0.0f, false, false, true, kNormF32},
    {"quantize", TN_OP_QUANTIZE, false, false, 0.0f, false, false, false, kStored},
};

const Variant &VariantNamed(const char *name) {
  for (const Variant &v : kVariants)
    if (strcmp(v.name, name) == 0) return v;
  return kVariants[0];
}

// An op's inputs (those its variant takes).
struct Inputs {
  tn_dtype dt = TN_F32;
  int64_t rows = 0, dim = 0;
  Buf x, residual, weight, bias, mul;
  tn_tensor tx{}, tres{}, tw{}, tb{}, tmul{};
  Inputs() = default;
  Inputs(const Inputs &) = delete;
  Inputs &operator=(const Inputs &) = delete;
  void Bind() {
    tx = x.View();
    tres = residual.View();
    tw = weight.View();
    tb = bias.View();
    tmul = mul.View();
  }
};

tn_dtype ResidualDtype(const Variant &v, tn_dtype dt) { return v.residual_f32 ? TN_F32 : dt; }

// Random inputs; x (and the residual, mul) rows `stride` apart from `base` bytes on.
void MakeInputs(const Variant &v, tn_dtype dt, int64_t rows, int64_t dim, int64_t stride, Rng &rng, Inputs &in,
                size_t base = 0) {
  in.dt = dt;
  in.rows = rows;
  in.dim = dim;
  in.x.Shape(dt, rows, dim, stride, base);
  FillRandom(in.x, rng);
  if (v.Adds()) {
    in.residual.Shape(ResidualDtype(v, dt), rows, dim, stride);
    FillRandom(in.residual, rng);
  }
  if (v.mul) {
    in.mul.Shape(dt, rows, dim, stride);
    FillRandom(in.mul, rng, 0.25, 1.0);
  }
  if (v.weight) {
    in.weight.Shape(v.weight_f32 ? TN_F32 : dt, 1, dim, dim);
    FillRandom(in.weight, rng, 0.1, v.weight_offset != 0.0f ? 0.0 : 1.0);
  }
  if (v.bias) {
    in.bias.Shape(dt, 1, dim, dim);
    FillRandom(in.bias, rng, 0.1, 0.0);
  }
  in.Bind();
}

tn_op_args OpArgs(const Variant &v, const Inputs &in, const tn_tensor *y, const tn_tensor *rout) {
  tn_op_args a = tn_op_args_init(v.op);
  a.x = &in.tx;
  a.eps = kEps;
  if (v.weight) {
    a.weight = &in.tw;
    a.weight_offset = v.weight_offset;
  }
  if (v.bias) a.bias = &in.tb;
  if (v.mul) a.mul = &in.tmul;
  if (v.Adds()) {
    a.residual = &in.tres;
    a.residual_out = rout;
    a.residual_mode = v.mode;
  }
  if (!v.Quantize()) a.y = y;
  return a;
}

// Runs the op with a quantized output (quant, or none when NULL): through its own entry point where the
// header has one, else tn_op_run.
tn_status RunOp(tn_context *ctx, const Variant &v, const Inputs &in, const tn_quant *quant, const tn_tensor *y,
                const tn_tensor *rout) {
  if (quant != nullptr) {
    if (v.Quantize()) return tn_quantize(ctx, &in.tx, quant);
    if (v.op == TN_OP_RMS_NORM && !v.mul)
      return tn_rms_norm_quant(ctx, &in.tx, v.weight ? &in.tw : nullptr, v.weight_offset, kEps, quant, y);
    if (v.op == TN_OP_ADD_RMS_NORM && v.mode == kStored && !v.mul)
      return tn_add_rms_norm_quant(ctx, &in.tx, &in.tres, v.weight ? &in.tw : nullptr, v.weight_offset, kEps, quant, y,
                                   rout);
  }
  tn_op_args a = OpArgs(v, in, y, rout);
  if (quant != nullptr) a.quant = *quant;
  return tn_op_run(ctx, &a);
}

// The error allowed a float32 op result against the float64 one, relative to each value and, for
// layer_norm, to the row's largest normalised input (the mean it subtracts): about 50 times what the CPU's
// float32 results show, and 32 times below an f16 rounding, which source F32 must not add.
constexpr double kRel = 0x1p-16;

// The op's result in float64 from its inputs as stored (s = x + residual as the contract forms it: the
// float32 sum, rounded to the residual's dtype unless normalised as float32), and per row a bound on the
// absolute error a float32 computation adds beyond a relative one (layer_norm's subtracted mean).
void ReferenceOp(const Variant &v, const Inputs &in, std::vector<double> &out, std::vector<double> &band) {
  const int64_t rows = in.rows, dim = in.dim;
  out.assign((size_t)(rows * dim), 0.0);
  band.assign((size_t)rows, 0.0);
  std::vector<double> s((size_t)dim);
  for (int64_t r = 0; r < rows; r++) {
    double *o = out.data() + r * dim;
    for (int64_t i = 0; i < dim; i++) {
      float f = in.x.Get(r, i);
      if (v.Adds()) {
        f = f + in.residual.Get(r, i);
        if (v.mode == kStored) f = RoundTo(in.residual.dt, f);
      }
      s[(size_t)i] = f;
    }
    if (v.Quantize()) {
      std::copy(s.begin(), s.end(), o);
      continue;
    }
    double wmax = 1.0;
    auto w = [&](int64_t i) { return v.weight ? (double)in.weight.Get(0, i) + (double)v.weight_offset : 1.0; };
    for (int64_t i = 0; i < dim; i++) wmax = std::max(wmax, std::fabs(w(i)));
    if (v.Layer()) {
      double mean = 0.0, var = 0.0, smax = 0.0;
      for (double e : s) mean += e;
      mean /= (double)dim;
      for (double e : s) var += (e - mean) * (e - mean), smax = std::max(smax, std::fabs(e));
      var /= (double)dim;
      const double inv = 1.0 / std::sqrt(var + (double)kEps);
      for (int64_t i = 0; i < dim; i++)
        o[i] = (s[(size_t)i] - mean) * inv * w(i) + (v.bias ? (double)in.bias.Get(0, i) : 0.0);
      band[(size_t)r] = kRel * smax * inv * wmax;
    } else {
      double ms = 0.0;
      for (double e : s) ms += e * e;
      const double inv = 1.0 / std::sqrt(ms / (double)dim + (double)kEps);
      for (int64_t i = 0; i < dim; i++) o[i] = s[(size_t)i] * inv * w(i) * (v.mul ? (double)in.mul.Get(r, i) : 1.0);
    }
  }
}

// A source-F32 result against the float64 reference: each stored scale must be the contract's scale of an
// amax within the reference's error, and each code one of those of the reference value within its error,
// divided by the scale the library stored: the reference's own code, or where the value lies that close to a
// rounding boundary, the code across it (one step). Every other byte is the poison.
void ExpectNearReference(const QuantBufs &qb, const std::vector<double> &ref, const std::vector<double> &band,
                         uint8_t poison, const std::string &where) {
  const Spec &sp = qb.sp;
  const Quantized got = qb.Read();
  const int64_t dim = qb.dim, group = qb.group;
  int64_t bad = 0;
  std::ostringstream msg;
  auto fail = [&](const std::string &m) {
    if (bad++ < 6) msg << "\n  " << m;
  };
  for (int64_t r = 0; r < qb.rows; r++) {
    for (int64_t g = 0; g < std::max<int64_t>(qb.groups, 1); g++) {
      const double *rv = ref.data() + r * dim + g * group;
      const double abs_err = band[(size_t)r];
      double alo = 0.0, ahi = 0.0;
      for (int64_t i = 0; i < group; i++) {
        const double a = std::fabs(rv[i]), e = kRel * a + abs_err;
        alo = std::max(alo, a - e);
        ahi = std::max(ahi, a + e);
      }
      const float flo = std::nextafter((float)alo, 0.0f), fhi = std::nextafter((float)ahi, kInf);
      const uint32_t st = qb.groups > 0 ? got.stored[(size_t)(r * qb.groups + g)] : 0;
      const std::string at = "row " + std::to_string(r) + " group " + std::to_string(g);
      if (sp.Dynamic()) {
        bool ok;
        std::ostringstream range;
        if (sp.Nvfp4()) {
          const uint8_t lo = EncodeFp8(E4M3(), (flo / 6.0f) * sp.scale),
                        hi = EncodeFp8(E4M3(), (fhi / 6.0f) * sp.scale);
          ok = st >= lo && st <= hi;
          range << "e4m3 byte in [" << (int)lo << ", " << (int)hi << "]";
        } else {
          const float slo = DynamicScale(flo, QMax(sp.format), sp.scale_ub, sp.scale_min),
                      shi = DynamicScale(fhi, QMax(sp.format), sp.scale_ub, sp.scale_min);
          if (sp.Ue8m0()) {
            ok = st >= Ue8m0Byte(slo) && st <= Ue8m0Byte(shi);
            range << "ue8m0 byte in [" << (int)Ue8m0Byte(slo) << ", " << (int)Ue8m0Byte(shi) << "]";
          } else {
            ok = FromBits(st) >= slo && FromBits(st) <= shi;
            range << "f32 in [" << slo << ", " << shi << "]";
          }
        }
        if (!ok) {
          std::ostringstream m;
          m << "scale of " << at << ": got 0x" << std::hex << st << std::dec << ", want " << range.str();
          fail(m.str());
          continue;
        }
      }
      const float s = Divisor(sp, st);
      for (int64_t i = 0; i < group; i++) {
        const int64_t col = g * group + i;
        const uint8_t c = got.codes[(size_t)(r * dim + col)];
        if (s == 0.0f) {  // NVFP4 with a zero scale byte
          if (c != 0) fail(at + " element " + std::to_string(col) + ": nonzero code under a zero scale");
          continue;
        }
        const double e = kRel * std::fabs(rv[i]) + abs_err;
        const uint8_t lo = Encode(sp.format, (float)(rv[i] - e) / s), hi = Encode(sp.format, (float)(rv[i] + e) / s);
        const int olo = std::min(Ordinal(sp.format, lo), Ordinal(sp.format, hi)),
                  ohi = std::max(Ordinal(sp.format, lo), Ordinal(sp.format, hi)), o = Ordinal(sp.format, c);
        if (o < olo || o > ohi) {
          std::ostringstream m;
          m << "row " << r << " element " << col << ": code 0x" << std::hex << (int)c << std::dec << " ("
            << CodeValue(sp.format, c) << "), reference " << rv[i] << " / " << s << " gives 0x" << std::hex << (int)lo
            << std::dec << " (" << CodeValue(sp.format, lo) << ")";
          fail(m.str());
        }
      }
    }
  }
  if (bad > 0) ADD_FAILURE() << where << ": " << bad << " codes or scales beyond the reference's error" << msg.str();
  qb.ExpectExactly(got, poison, where + " (padding)");  // the elements are got's own: this checks the rest
}

// ------------------------------------------------------------------------------------------------
// One op, one input set: the op without a quantized output, and what its quantized outputs must hold
// ------------------------------------------------------------------------------------------------

struct OpCase {
  tn_context *ctx = nullptr;
  const Variant *v = nullptr;
  Inputs in;
  Buf y_ref, rout_ref;        // the op's outputs without a quantized output
  std::vector<float> value;   // the value quantized with source ROUNDED (y_ref, or x for quantize)
  std::vector<double> exact;  // the float64 op result (source F32)
  std::vector<double> band;
  int64_t y_stride = 0;

  // Runs the op without a quantized output; y rows y_stride apart.
  void Prepare(tn_context *c, const Variant &variant, int64_t stride_y, bool want_exact) {
    ctx = c;
    v = &variant;
    y_stride = stride_y;
    const int64_t rows = in.rows, dim = in.dim;
    value.assign((size_t)(rows * dim), 0.0f);
    if (v->Quantize()) {
      for (int64_t r = 0; r < rows; r++)
        for (int64_t i = 0; i < dim; i++) value[(size_t)(r * dim + i)] = in.x.Get(r, i);
    } else {
      y_ref.Shape(in.dt, rows, dim, y_stride);
      y_ref.Poison(0xFF);
      if (v->Adds()) {
        rout_ref.Shape(ResidualDtype(*v, in.dt), rows, dim, dim);
        rout_ref.Poison(0xFF);
      }
      const tn_tensor ty = y_ref.View(), tr = rout_ref.View();
      const tn_status st = RunOp(ctx, *v, in, nullptr, &ty, &tr);
      ASSERT_EQ(st, TN_OK) << v->name << ": " << tn_context_last_error(ctx);
      for (int64_t r = 0; r < rows; r++)
        for (int64_t i = 0; i < dim; i++) value[(size_t)(r * dim + i)] = y_ref.Get(r, i);
    }
    if (want_exact) ReferenceOp(*v, in, exact, band);
  }

  // A static scale that saturates the largest values, and NVFP4's usual global scale (448 * 6 / amax).
  Spec WithScale(Spec sp) const {
    const float amax = Amax(value.data(), (int64_t)value.size());
    if (sp.Nvfp4())
      sp.scale = 448.0f * 6.0f / amax;
    else if (!sp.Dynamic())
      sp.scale = amax / QMax(sp.format) * 0.75f;
    return sp;
  }

  std::string Where(const Spec &sp, const char *call) const {
    std::ostringstream s;
    s << v->name << ", " << tn_dtype_name(in.dt) << ", " << in.rows << " x " << in.dim
      << (in.x.stride != in.dim ? " strided" : "") << ", " << SpecName(sp) << ", " << call << ", seed " << GlobalSeed();
    return s.str();
  }

  // One call: poisons q, the scales, y and residual_out with `poison`, runs, and checks y and residual_out
  // byte for byte against the op without a quantized output.
  bool Call(QuantBufs &qb, tn_quant_source source, bool with_y, uint8_t poison, const std::string &where) {
    Buf y, rout;
    if (!v->Quantize()) y.Shape(in.dt, in.rows, in.dim, y_stride);
    if (v->Adds()) rout.Shape(rout_ref.dt, in.rows, in.dim, in.dim);
    qb.Poison(poison);
    y.Poison(poison);
    rout.Poison(poison);
    const tn_quant quant = qb.Quant(source);
    const tn_tensor ty = y.View(), tr = rout.View();
    const tn_status st = RunOp(ctx, *v, in, &quant, with_y ? &ty : nullptr, &tr);
    EXPECT_EQ(st, TN_OK) << where << ": " << tn_status_name(st) << ": " << tn_context_last_error(ctx);
    if (st != TN_OK) return false;
    EXPECT_STREQ(tn_context_last_error(ctx), "") << where;
    if (!v->Quantize()) {
      const std::vector<unsigned char> want =
          with_y ? RowImage(y_ref, poison) : std::vector<unsigned char>(y.mem.size(), poison);
      ExpectSameBytes(
          y.mem, want, [](size_t o) { return PlainOffset("y", o); }, where + ": y");
    }
    if (v->Adds())
      ExpectSameBytes(
          rout.mem, RowImage(rout_ref, poison), [](size_t o) { return PlainOffset("residual_out", o); },
          where + ": residual_out");
    return true;
  }

  // Every source, with y and without: ROUNDED exactly the reference of y; F32 the same bytes for f32 x
  // (and quantize, whose value is x itself), else near the float64 result; y left out changes nothing.
  void CheckSpec(const Spec &asked, bool padded, size_t scales_base = 0) {
    const Spec sp = WithScale(asked);
    QuantBufs qb;
    qb.Make(sp, in.rows, in.dim, padded, scales_base);
    const Quantized want = Reference(sp, value, in.rows, in.dim);
    const bool exact_f32 = in.dt == TN_F32 || v->Quantize();
    {
      const std::string w = Where(sp, "source ROUNDED with y");
      if (Call(qb, TN_QUANT_FROM_ROUNDED, true, 0xFF, w)) qb.ExpectExactly(want, 0xFF, w);
    }
    if (!v->Quantize()) {
      const std::string w = Where(sp, "source ROUNDED, y NULL");
      if (Call(qb, TN_QUANT_FROM_ROUNDED, false, 0x5A, w)) qb.ExpectExactly(want, 0x5A, w);
    }
    Quantized f32_with_y;
    {
      const std::string w = Where(sp, "source F32 with y");
      if (Call(qb, TN_QUANT_FROM_F32, true, 0xA5, w)) {
        if (exact_f32)
          qb.ExpectExactly(want, 0xA5, w + " (as ROUNDED)");
        else
          ExpectNearReference(qb, exact, band, 0xA5, w);
        f32_with_y = qb.Read();
      }
    }
    if (!v->Quantize() && !f32_with_y.codes.empty()) {
      const std::string w = Where(sp, "source F32, y NULL");
      if (Call(qb, TN_QUANT_FROM_F32, false, 0x3C, w)) qb.ExpectExactly(f32_with_y, 0x3C, w + " (as with y)");
    }
  }
};

// Source ROUNDED with y only (for the large shapes).
void CheckRounded(OpCase &k, const Spec &asked) {
  const Spec sp = k.WithScale(asked);
  QuantBufs qb;
  qb.Make(sp, k.in.rows, k.in.dim, false);
  const std::string where = k.Where(sp, "source ROUNDED with y");
  if (k.Call(qb, TN_QUANT_FROM_ROUNDED, true, 0xFF, where))
    qb.ExpectExactly(Reference(sp, k.value, k.in.rows, k.in.dim), 0xFF, where);
}

// Every format with every scaling it takes, in every scales layout it takes.
std::vector<Spec> SweepSpecs() {
  std::vector<Spec> specs;
  for (tn_quant_format f : {TN_QUANT_FP8_E4M3, TN_QUANT_FP8_E5M2, TN_QUANT_INT8}) {
    Spec s;
    s.format = f;
    s.scaling = TN_QUANT_SCALE_TENSOR;
    specs.push_back(s);
    for (tn_scale_layout l : {TN_SCALES_ROW_MAJOR, TN_SCALES_COLUMN_MAJOR}) {
      s.layout = l;
      for (int pow2 : {0, 1}) {
        s.pow2 = pow2;
        s.scaling = TN_QUANT_SCALE_TOKEN;
        s.group_size = 0;
        specs.push_back(s);
        s.scaling = TN_QUANT_SCALE_GROUP;
        for (int64_t g : {32, 64, 128}) {
          if (pow2 && g == 64) continue;
          s.group_size = g;
          specs.push_back(s);
        }
      }
      s.pow2 = 0;
    }
  }
  for (tn_quant_format f : {TN_QUANT_MXFP8, TN_QUANT_NVFP4}) {
    Spec s;
    s.format = f;
    s.scaling = TN_QUANT_SCALE_GROUP;
    for (tn_scale_layout l : {TN_SCALES_ROW_MAJOR, TN_SCALES_COLUMN_MAJOR, TN_SCALES_SWIZZLED}) {
      s.layout = l;
      specs.push_back(s);
    }
    s.layout = TN_SCALES_ROW_MAJOR;
    s.group_size = f == TN_QUANT_MXFP8 ? 32 : 16;  // the format's own group, given explicitly
    specs.push_back(s);
    if (f == TN_QUANT_MXFP8) {
      s.pow2 = 1;  // what MXFP8 does anyway
      specs.push_back(s);
    }
  }
  return specs;
}

// ------------------------------------------------------------------------------------------------
// The sweep: every op variant x dtype x format x scaling x layout x source, contiguous and strided views
// ------------------------------------------------------------------------------------------------

struct Param {
  int variant;
  tn_dtype dtype;
};

void PrintTo(const Param &p, std::ostream *os) { *os << kVariants[p.variant].name << "_" << tn_dtype_name(p.dtype); }

std::vector<Param> SweepParams() {
  std::vector<Param> ps;
  for (tn_dtype dt : {TN_F32, TN_F16, TN_BF16})
    for (int v = 0; v < (int)(sizeof kVariants / sizeof kVariants[0]); v++) {
      if (dt == TN_F32 && (kVariants[v].residual_f32 || kVariants[v].weight_f32) && kVariants[v].weight_offset == 0.0f)
        continue;  // the same as its x-dtype form
      ps.push_back({v, dt});
    }
  return ps;
}

class QuantOps : public ::testing::TestWithParam<Param> {};

TEST_P(QuantOps, EveryFormatScalingLayoutAndSource) {
  const Variant &v = kVariants[GetParam().variant];
  const tn_dtype dt = GetParam().dtype;
  tnorm_test::Context c;
  Rng rng(TestSeed());
  const std::vector<Spec> specs = SweepSpecs();
  constexpr int64_t kRows = 7, kDim = 384;
  // Half the specs on contiguous views, half on strided ones (x, y, q and row-major scales with gaps).
  for (int padded = 0; padded < 2; padded++) {
    OpCase k;
    MakeInputs(v, dt, kRows, kDim, padded ? kDim + 24 : kDim, rng, k.in);
    k.Prepare(c.ctx, v, padded ? kDim + 8 : kDim, dt != TN_F32);
    if (HasFatalFailure()) return;
    for (size_t i = (size_t)padded; i < specs.size(); i += 2) k.CheckSpec(specs[i], padded != 0);
  }
}

INSTANTIATE_TEST_SUITE_P(QuantOpsSweep, QuantOps, ::testing::ValuesIn(SweepParams()),
                         [](const ::testing::TestParamInfo<Param> &i) {
                           return std::string(kVariants[i.param.variant].name) + "_" + tn_dtype_name(i.param.dtype);
                         });

// ------------------------------------------------------------------------------------------------
// Shapes: the model dims, one row and many rows, the swizzled layout's padding
// ------------------------------------------------------------------------------------------------

// Whether spec's groups divide dim.
bool Divides(const Spec &s, int64_t dim) { return dim % s.Group(dim) == 0; }

// Whether every byte of b is `poison`.
bool AllPoison(const Buf &b, uint8_t poison) {
  return std::all_of(b.mem.begin(), b.mem.end(), [&](unsigned char c) { return c == poison; });
}

// A dim that spec's groups do not divide: TN_ERR_SHAPE naming the dim and the group, nothing written.
void ExpectRefusedShape(tn_context *ctx, const Variant &v, const OpCase &k, QuantBufs &qb, const std::string &where) {
  Buf y, rout;
  y.Shape(k.in.dt, k.in.rows, k.in.dim, k.in.dim);
  if (v.Adds()) rout.Shape(k.rout_ref.dt, k.in.rows, k.in.dim, k.in.dim);
  qb.Poison(0xFF);
  y.Poison(0xFF);
  rout.Poison(0xFF);
  const tn_quant quant = qb.Quant(TN_QUANT_FROM_ROUNDED);
  const tn_tensor ty = y.View(), tr = rout.View();
  EXPECT_EQ(RunOp(ctx, v, k.in, &quant, &ty, &tr), TN_ERR_SHAPE) << where;
  const std::string msg = tn_context_last_error(ctx);
  EXPECT_NE(msg.find("dim " + std::to_string(k.in.dim)), std::string::npos) << where << ": " << msg;
  EXPECT_NE(msg.find(std::to_string(qb.group)), std::string::npos) << where << ": " << msg;
  EXPECT_TRUE(AllPoison(qb.q, 0xFF) && AllPoison(qb.scales, 0xFF)) << where << ": q or scales written";
  EXPECT_TRUE(AllPoison(y, 0xFF) && AllPoison(rout, 0xFF)) << where << ": y or residual_out written";
}

TEST(QuantOpsShapes, ModelDims) {
  tnorm_test::Context c;
  Rng rng(TestSeed());
  struct Op {
    const char *variant;
    tn_dtype dt;
  } ops[] = {
      {"rms_norm_w", TN_BF16}, {"add_rms_norm_w_res_f32", TN_F16}, {"layer_norm_wb", TN_F32}, {"quantize", TN_BF16}};
  for (int64_t dim : {769, 1152, 3584, 16384}) {
    for (const Op &op : ops) {
      const Variant &v = VariantNamed(op.variant);
      OpCase k;
      MakeInputs(v, op.dt, 3, dim, dim, rng, k.in);
      k.Prepare(c.ctx, v, dim, false);
      if (HasFatalFailure()) return;
      for (const Spec &asked : SweepSpecs()) {
        if (asked.layout == TN_SCALES_COLUMN_MAJOR) continue;  // the sweep covers it; here the shapes matter
        const Spec sp = k.WithScale(asked);
        QuantBufs qb;
        qb.Make(sp, 3, dim, false);
        const std::string where = k.Where(sp, "source ROUNDED with y");
        if (!Divides(sp, dim)) {
          // 769 has no group of 16, 32, 64 or 128: refused before anything is written.
          ExpectRefusedShape(c.ctx, v, k, qb, where);
          continue;
        }
        if (k.Call(qb, TN_QUANT_FROM_ROUNDED, true, 0xFF, where))
          qb.ExpectExactly(Reference(sp, k.value, 3, dim), 0xFF, where);
      }
    }
  }
}

Spec MakeSpec(tn_quant_format f, tn_quant_scaling scaling, int64_t group_size = 0, int pow2 = 0,
              tn_scale_layout layout = TN_SCALES_ROW_MAJOR) {
  Spec s;
  s.format = f;
  s.scaling = scaling;
  s.group_size = group_size;
  s.pow2 = pow2;
  s.layout = layout;
  return s;
}

// One row (every spec, every source) and 65536 rows of 64 elements (a spread of specs, many threads).
TEST(QuantOpsShapes, OneRowAndManyRows) {
  tnorm_test::Context c;
  Rng rng(TestSeed());
  const Variant &v = VariantNamed("rms_norm_w");
  constexpr int64_t kDim = 64;
  {
    OpCase k;
    MakeInputs(v, TN_BF16, 1, kDim, kDim, rng, k.in);
    k.Prepare(c.ctx, v, kDim, true);
    if (HasFatalFailure()) return;
    for (const Spec &sp : SweepSpecs())
      if (Divides(sp, kDim)) k.CheckSpec(sp, false);
  }
  const Spec many[] = {MakeSpec(TN_QUANT_FP8_E4M3, TN_QUANT_SCALE_TOKEN),
                       MakeSpec(TN_QUANT_INT8, TN_QUANT_SCALE_GROUP, 64, 0, TN_SCALES_COLUMN_MAJOR),
                       MakeSpec(TN_QUANT_MXFP8, TN_QUANT_SCALE_GROUP, 0, 0, TN_SCALES_SWIZZLED),
                       MakeSpec(TN_QUANT_NVFP4, TN_QUANT_SCALE_GROUP, 0, 0, TN_SCALES_SWIZZLED)};
  OpCase k;
  MakeInputs(v, TN_BF16, 65536, kDim, kDim, rng, k.in);
  k.Prepare(c.ctx, v, kDim, false);
  if (HasFatalFailure()) return;
  for (const Spec &sp : many) CheckRounded(k, sp);
}

// The swizzled layout over several 128-row tiles, with rows and groups that leave padding in the last tile
// (zeros), and column-major scales of those shapes.
TEST(QuantOpsShapes, SwizzledTilesAndPadding) {
  tnorm_test::Context c;
  Rng rng(TestSeed());
  constexpr int64_t kDim = 160;  // MXFP8: 5 groups (8 with padding); NVFP4: 10 (12)
  for (const char *name : {"quantize", "rms_norm_w"}) {
    const Variant &v = VariantNamed(name);
    for (int64_t rows : {130, 300}) {
      OpCase k;
      MakeInputs(v, TN_F16, rows, kDim, kDim, rng, k.in);
      k.Prepare(c.ctx, v, kDim, true);
      if (HasFatalFailure()) return;
      for (tn_quant_format f : {TN_QUANT_MXFP8, TN_QUANT_NVFP4})
        for (tn_scale_layout l : {TN_SCALES_SWIZZLED, TN_SCALES_COLUMN_MAJOR})
          k.CheckSpec(MakeSpec(f, TN_QUANT_SCALE_GROUP, 0, 0, l), rows == 300);
      k.CheckSpec(MakeSpec(TN_QUANT_FP8_E4M3, TN_QUANT_SCALE_GROUP, 32, 1, TN_SCALES_COLUMN_MAJOR), false);
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Batch invariance: a row alone gives the bytes it gets inside a batch of 300, whatever the threads
// ------------------------------------------------------------------------------------------------

// A one-row view of in's row r (the weight and bias whole).
void RowView(const Inputs &in, int64_t r, Inputs &one) {
  auto row = [r](tn_tensor t) {
    if (t.data != nullptr) t.data = (char *)t.data + (size_t)(r * t.row_stride) * ElemSize(t.dtype);
    t.rows = 1;
    return t;
  };
  one.dt = in.dt;
  one.rows = 1;
  one.dim = in.dim;
  one.tx = row(in.tx);
  one.tres = row(in.tres);
  one.tmul = row(in.tmul);
  one.tw = in.tw;
  one.tb = in.tb;
}

TEST(QuantOpsBatch, ARowAloneGivesItsBytesInABatch) {
  tnorm_test::Context c;
  Rng rng(TestSeed());
  constexpr int64_t kRows = 300, kDim = 1024;
  struct Op {
    const char *variant;
    tn_dtype dt;
  } ops[] = {{"rms_norm_w", TN_BF16},
             {"add_rms_norm_w_res_f32", TN_F16},
             {"layer_norm_wb", TN_F32},
             {"add_layer_norm_wb", TN_BF16},
             {"quantize", TN_BF16}};
  const Spec specs[] = {MakeSpec(TN_QUANT_FP8_E4M3, TN_QUANT_SCALE_TOKEN),
                        MakeSpec(TN_QUANT_FP8_E4M3, TN_QUANT_SCALE_TENSOR),
                        MakeSpec(TN_QUANT_FP8_E5M2, TN_QUANT_SCALE_GROUP, 128, 0, TN_SCALES_COLUMN_MAJOR),
                        MakeSpec(TN_QUANT_INT8, TN_QUANT_SCALE_GROUP, 64, 1),
                        MakeSpec(TN_QUANT_MXFP8, TN_QUANT_SCALE_GROUP, 0, 0, TN_SCALES_SWIZZLED),
                        MakeSpec(TN_QUANT_NVFP4, TN_QUANT_SCALE_GROUP, 0, 0, TN_SCALES_SWIZZLED),
                        MakeSpec(TN_QUANT_NVFP4, TN_QUANT_SCALE_GROUP, 0, 0, TN_SCALES_COLUMN_MAJOR)};
  const int64_t alone[] = {0, 1, 31, 32, 127, 128, 255, 299};
  for (const Op &op : ops) {
    const Variant &v = VariantNamed(op.variant);
    OpCase k;
    MakeInputs(v, op.dt, kRows, kDim, kDim, rng, k.in);
    k.Prepare(c.ctx, v, kDim, false);
    if (HasFatalFailure()) return;
    for (const Spec &asked : specs) {
      const Spec sp = k.WithScale(asked);  // one static or global scale for the batch and its rows
      for (tn_quant_source source : {TN_QUANT_FROM_ROUNDED, TN_QUANT_FROM_F32}) {
        if (source == TN_QUANT_FROM_F32 && (op.dt == TN_F32 || v.Quantize())) continue;  // the same bytes
        const std::string where = k.Where(sp, source == TN_QUANT_FROM_F32 ? "source F32" : "source ROUNDED");
        QuantBufs batch;
        batch.Make(sp, kRows, kDim, false);
        if (!k.Call(batch, source, true, 0xFF, where + ", batch")) continue;
        if (source == TN_QUANT_FROM_ROUNDED)
          batch.ExpectExactly(Reference(sp, k.value, kRows, kDim), 0xFF, where + ", batch");
        const Quantized all = batch.Read();
        // One thread: the same bytes as the pool's.
        ASSERT_EQ(tn_context_set_num_threads(c.ctx, 1), TN_OK);
        if (k.Call(batch, source, true, 0x5A, where + ", one thread"))
          batch.ExpectExactly(all, 0x5A, where + ", one thread");
        ASSERT_EQ(tn_context_set_num_threads(c.ctx, 0), TN_OK);
        for (int64_t r : alone) {
          Inputs one;
          RowView(k.in, r, one);
          QuantBufs single;
          single.Make(sp, 1, kDim, false);
          single.Poison(0xFF);
          Buf rout;
          rout.Shape(k.rout_ref.dt, 1, kDim, kDim);
          const tn_quant quant = single.Quant(source);
          const tn_tensor tr = rout.View();
          ASSERT_EQ(RunOp(c.ctx, v, one, &quant, nullptr, &tr), TN_OK) << where << ": " << tn_context_last_error(c.ctx);
          const Quantized got = single.Read();
          const std::string what = where + ", row " + std::to_string(r) + " alone";
          EXPECT_TRUE(std::equal(got.codes.begin(), got.codes.end(), all.codes.begin() + r * kDim))
              << what << ": codes";
          EXPECT_TRUE(std::equal(got.stored.begin(), got.stored.end(), all.stored.begin() + r * all.groups))
              << what << ": scales";
        }
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Special rows: zeros, NaN, infinities, huge and tiny values, negative zeros
// ------------------------------------------------------------------------------------------------

constexpr int64_t kSpecialRows = 12, kSpecialDim = 128;

// Row r of the special set (dt's range decides "huge" and "tiny").
void FillSpecialRow(Buf &x, int64_t r, Rng &rng) {
  const std::vector<float> &pool = NormalPool();
  const size_t from = (size_t)rng.Below(kPoolSize - (size_t)x.dim);
  const bool f16 = x.dt == TN_F16;
  for (int64_t i = 0; i < x.dim; i++) {
    const float n = pool[from + (size_t)i];
    float f = n;
    switch (r) {
      case 0:
        f = 0.0f;
        break;  // zeros: the scale is scale_min
      case 1:
        f = i == 5 ? kNaN : 0.0f;
        break;  // zeros and a NaN
      case 2:
        f = i == 7 ? kInf : n;
        break;  // an infinity: an infinite amax
      case 3:
        f = i == 0 ? -kInf : i == 100 ? kNaN : n;
        break;
      case 4:
        f = kNaN;
        break;
      case 5:
        f = n * 8e3f;
        break;  // beyond every format under a small static scale
      case 6:
        f = n * (f16 ? 1e-6f : 1e-40f);
        break;  // subnormal in the dtype
      case 7:
        f = n * (f16 ? 2e3f : 1e30f);
        break;  // f32 sums of squares overflow (rescaled)
      case 8:
        f = -0.0f;
        break;
      case 9:
        f = i == 3 ? 448.0f : n;
        break;  // an amax of 448 (a power-of-two scale of 1)
      case 10:
        f = i < 32 ? 0.0f : n;
        break;  // a zero group inside a row
      default:
        break;
    }
    x.Set(r, i, f);
  }
}

TEST(QuantOpsEdge, SpecialRows) {
  tnorm_test::Context c;
  Rng rng(TestSeed());
  for (tn_dtype dt : {TN_F32, TN_F16, TN_BF16}) {
    for (const char *name : {"quantize", "rms_norm_w", "layer_norm_wb", "add_rms_norm_w"}) {
      const Variant &v = VariantNamed(name);
      OpCase k;
      MakeInputs(v, dt, kSpecialRows, kSpecialDim, kSpecialDim, rng, k.in);
      for (int64_t r = 0; r < kSpecialRows; r++) FillSpecialRow(k.in.x, r, rng);
      k.Prepare(c.ctx, v, kSpecialDim, false);
      if (HasFatalFailure()) return;
      for (Spec sp : SweepSpecs()) {
        // Fixed scales: the values hold infinities, so no amax makes one.
        sp.scale = sp.Nvfp4() ? 1.0f : 1.0f / 16.0f;
        QuantBufs qb;
        qb.Make(sp, kSpecialRows, kSpecialDim, false);
        const Quantized want = Reference(sp, k.value, kSpecialRows, kSpecialDim);
        for (tn_quant_source source : {TN_QUANT_FROM_ROUNDED, TN_QUANT_FROM_F32}) {
          if (source == TN_QUANT_FROM_F32 && dt != TN_F32) continue;  // no float64 reference of NaN's sign
          const std::string where = k.Where(sp, source == TN_QUANT_FROM_F32 ? "source F32" : "source ROUNDED");
          if (k.Call(qb, source, true, 0xFF, where)) qb.ExpectExactly(want, 0xFF, where);
        }
        if (!v.Quantize() || dt != TN_F32 || sp.scaling != TN_QUANT_SCALE_TOKEN || sp.layout != TN_SCALES_ROW_MAJOR ||
            sp.format == TN_QUANT_FP8_E5M2)
          continue;
        // The contract's consequences, written out: a zero row gets scale_min and zero codes; an infinity
        // makes the row's scale infinite (every finite element then 0, the infinity +-largest), or 2^127
        // with power-of-two scales (the infinity saturates there too).
        const Quantized got = qb.Read();
        const std::string where = k.Where(sp, "contract");
        if (sp.pow2) {
          EXPECT_EQ(got.stored[0], 1u) << where << ": zero row's scale byte (2^-126)";
          EXPECT_EQ(got.stored[2], 254u) << where << ": infinite row's scale byte (2^127)";
        } else {
          EXPECT_EQ(got.stored[0], Bits(0x1p-126f)) << where << ": zero row's scale";
          EXPECT_EQ(got.stored[2], Bits(kInf)) << where << ": infinite row's scale";
        }
        for (int64_t i = 0; i < kSpecialDim; i++) {
          EXPECT_EQ(got.codes[(size_t)i], 0) << where << ": zero row, element " << i;
          const uint8_t c2 = got.codes[(size_t)(2 * kSpecialDim + i)];
          if (i != 7) {
            EXPECT_EQ(CodeValue(sp.format, c2), 0.0) << where << ": finite element " << i << " of the infinite row";
          } else {
            const uint8_t largest = sp.format == TN_QUANT_INT8 ? 0x7f : sp.format == TN_QUANT_FP8_E5M2 ? 0x7b : 0x7e;
            EXPECT_EQ(c2, largest) << where << ": +inf under " << (sp.pow2 ? "2^127" : "an infinite scale")
                                   << " saturates";
          }
        }
      }
    }
  }
}

// Values whose codes are written out here from the formats' tables, through quantize with a static scale
// of 1: ties to the even code, saturation without infinities, signed zeros, NaN, subnormals.
TEST(QuantOpsEdge, HandWrittenCodes) {
  tnorm_test::Context c;
  const float neg_nan = std::copysign(kNaN, -1.0f);
  struct Table {
    tn_quant_format format;
    std::vector<std::pair<float, uint8_t>> cases;
  } tables[] = {
      {TN_QUANT_FP8_E4M3,
       {{1.0f, 0x38},
        {1.0625f, 0x38},
        {1.1875f, 0x3a},
        {0.5f, 0x30},
        {448.0f, 0x7e},
        {464.0f, 0x7e},
        {480.0f, 0x7e},
        {1e6f, 0x7e},
        {kInf, 0x7e},
        {-kInf, 0xfe},
        {-448.0f, 0xfe},
        {0x1p-6f, 0x08},
        {0x1p-9f, 0x01},
        {0x1p-10f, 0x00},
        {3 * 0x1p-10f, 0x02},
        {-0.0f, 0x80},
        {-1e-30f, 0x80},
        {kNaN, 0x7f},
        {neg_nan, 0xff}}},
      {TN_QUANT_FP8_E5M2,
       {{1.0f, 0x3c},
        {1.125f, 0x3c},
        {1.375f, 0x3e},
        {57344.0f, 0x7b},
        {61440.0f, 0x7b},
        {1e9f, 0x7b},
        {kInf, 0x7b},
        {-kInf, 0xfb},
        {0x1p-16f, 0x01},
        {0x1p-17f, 0x00},
        {-0.0f, 0x80},
        {kNaN, 0x7f},
        {neg_nan, 0xff}}},
      {TN_QUANT_INT8,
       {{2.5f, 2},
        {3.5f, 4},
        {1.5f, 2},
        {-2.5f, 0xfe},
        {126.5f, 126},
        {127.5f, 127},
        {-128.0f, 0x81},
        {0.5f, 0},
        {-0.4f, 0},
        {-0.0f, 0},
        {kNaN, 0},
        {kInf, 127},
        {-kInf, 0x81}}},
  };
  for (const Table &t : tables) {
    const int64_t dim = (int64_t)t.cases.size();
    Spec sp = MakeSpec(t.format, TN_QUANT_SCALE_TENSOR);
    sp.scale = 1.0f;
    Buf x;
    x.Shape(TN_F32, 1, dim, dim);
    std::vector<float> values;
    for (int64_t i = 0; i < dim; i++) x.Set(0, i, t.cases[(size_t)i].first), values.push_back(t.cases[(size_t)i].first);
    QuantBufs qb;
    qb.Make(sp, 1, dim, false);
    qb.Poison(0xEE);
    const tn_tensor tx = x.View();
    const tn_quant quant = qb.Quant(TN_QUANT_FROM_ROUNDED);
    ASSERT_EQ(tn_quantize(c.ctx, &tx, &quant), TN_OK) << tn_context_last_error(c.ctx);
    const Quantized ref = Reference(sp, values, 1, dim);
    for (int64_t i = 0; i < dim; i++) {
      EXPECT_EQ((int)qb.q.mem[(size_t)i], (int)t.cases[(size_t)i].second)
          << tn_quant_format_name(t.format) << " of " << t.cases[(size_t)i].first;
      EXPECT_EQ((int)ref.codes[(size_t)i], (int)t.cases[(size_t)i].second)
          << "this file's encoder, " << tn_quant_format_name(t.format) << " of " << t.cases[(size_t)i].first;
    }
  }

  // MXFP8: a group's amax of 448 gives 2^0 (byte 127), 449 gives 2^1 (its multiple never saturates), 1 gives
  // 2^-8 (1 / 448 rounded up), zeros 2^-126 (scale_min).
  {
    constexpr int64_t dim = 128;
    Buf x;
    x.Shape(TN_F32, 1, dim, dim);
    for (int64_t i = 0; i < dim; i++) x.Set(0, i, 0.0f);
    x.Set(0, 0, 448.0f);
    x.Set(0, 32, 449.0f);
    x.Set(0, 64, 1.0f);
    x.Set(0, 65, -0.5f);
    QuantBufs qb;
    qb.Make(MakeSpec(TN_QUANT_MXFP8, TN_QUANT_SCALE_GROUP), 1, dim, false);
    qb.Poison(0xEE);
    const tn_tensor tx = x.View();
    const tn_quant quant = qb.Quant(TN_QUANT_FROM_ROUNDED);
    ASSERT_EQ(tn_quantize(c.ctx, &tx, &quant), TN_OK) << tn_context_last_error(c.ctx);
    const Quantized got = qb.Read();
    EXPECT_EQ(got.stored, (std::vector<uint32_t>{127, 128, 119, 1}));
    EXPECT_EQ(got.codes[0], 0x7e);   // 448 / 1
    EXPECT_EQ(got.codes[32], 0x76);  // 449 / 2 = 224.5: 224
    EXPECT_EQ(got.codes[64], 0x78);  // 1 / 2^-8 = 256
    EXPECT_EQ(got.codes[65], 0xf0);  // -0.5 / 2^-8 = -128
    EXPECT_EQ(got.codes[1], 0x00);
  }

  // NVFP4 with a global scale of 1: a group of amax 6 has scale byte e4m3(1) = 0x38 and s = 1, so the codes
  // are the elements' own; 6.3 / 6 = 1.05 also rounds to 1 and 6.3 saturates to 6; a group whose scale
  // byte rounds to 0 is all zero codes (no -0, no NaN sign).
  {
    const float g0[16] = {6, 0.25f, 0.75f, 1.25f, 1.75f, 2.5f, 3.5f, 5, -6, -0.0f, kNaN, 0.3f, 0, 0, 0, 0};
    const float g1[16] = {6.3f, 5.1f, 4.9f, -6.3f, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0};
    const float g2[16] = {-0.0f, kNaN, 1e-30f, -1e-30f, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0};
    constexpr int64_t dim = 48;
    Buf x;
    x.Shape(TN_F32, 1, dim, dim);
    for (int64_t i = 0; i < 16; i++) x.Set(0, i, g0[i]), x.Set(0, 16 + i, g1[i]), x.Set(0, 32 + i, g2[i]);
    Spec sp = MakeSpec(TN_QUANT_NVFP4, TN_QUANT_SCALE_GROUP);
    sp.scale = 1.0f;
    QuantBufs qb;
    qb.Make(sp, 1, dim, false);
    qb.Poison(0xEE);
    const tn_tensor tx = x.View();
    const tn_quant quant = qb.Quant(TN_QUANT_FROM_ROUNDED);
    ASSERT_EQ(tn_quantize(c.ctx, &tx, &quant), TN_OK) << tn_context_last_error(c.ctx);
    const std::vector<unsigned char> q(qb.q.mem.begin(), qb.q.mem.begin() + dim / 2);
    EXPECT_EQ(q, (std::vector<unsigned char>{0x07, 0x22, 0x44, 0x66, 0x8f, 0x10, 0x00, 0x00,  //
                                             0x77, 0xf6, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,  //
                                             0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00}));
    EXPECT_EQ(qb.Read().stored, (std::vector<uint32_t>{0x38, 0x38, 0x00}));
  }
}

// ------------------------------------------------------------------------------------------------
// The dynamic scale's bounds: scale_ub caps it (the largest values then saturate), scale_min floors it
// ------------------------------------------------------------------------------------------------

TEST(QuantOpsEdge, ScaleUpperBoundAndMinimum) {
  tnorm_test::Context c;
  Rng rng(TestSeed());
  std::vector<Spec> specs;
  auto add = [&](Spec s, float ub, float lo) {
    s.scale_ub = ub;
    if (lo > 0.0f) s.scale_min = lo;
    specs.push_back(s);
  };
  add(MakeSpec(TN_QUANT_FP8_E4M3, TN_QUANT_SCALE_TOKEN), 1e-3f, 0.0f);
  add(MakeSpec(TN_QUANT_INT8, TN_QUANT_SCALE_GROUP, 64, 0, TN_SCALES_COLUMN_MAJOR), 1e-3f, 0.0f);
  add(MakeSpec(TN_QUANT_FP8_E5M2, TN_QUANT_SCALE_TOKEN, 0, 1), 1e-5f, 0.0f);
  add(MakeSpec(TN_QUANT_FP8_E4M3, TN_QUANT_SCALE_TOKEN), 0.0f, 0.05f);
  add(MakeSpec(TN_QUANT_INT8, TN_QUANT_SCALE_TOKEN, 0, 1), 0.0f, 0.5f);
  add(MakeSpec(TN_QUANT_FP8_E4M3, TN_QUANT_SCALE_GROUP, 32, 1), 0.0f, 1e-41f);  // below 2^-127: byte 0
  add(MakeSpec(TN_QUANT_MXFP8, TN_QUANT_SCALE_GROUP), 2e-3f, 1e-4f);
  for (tn_dtype dt : {TN_F32, TN_BF16}) {
    for (const char *name : {"quantize", "rms_norm_w"}) {
      const Variant &v = VariantNamed(name);
      OpCase k;
      MakeInputs(v, dt, 6, 256, 256, rng, k.in);
      // Row 0 zeros (scale_min); row 1 large enough that every bound below caps its groups' scales; row 2
      // subnormal, so that quantize's scales fall below 2^-126 where scale_min lets them.
      for (int64_t i = 0; i < 256; i++) {
        k.in.x.Set(0, i, 0.0f);
        k.in.x.Set(1, i, 10.0f * NormalPool()[(size_t)i]);
        k.in.x.Set(2, i, 1e-39f * NormalPool()[(size_t)i + 256]);
      }
      k.Prepare(c.ctx, v, 256, dt != TN_F32);
      if (HasFatalFailure()) return;
      for (const Spec &sp : specs) {
        k.CheckSpec(sp, false);
        // The bounds, read back from source ROUNDED's bytes.
        QuantBufs qb;
        qb.Make(sp, 6, 256, false);
        const std::string where = k.Where(sp, "bounds");
        if (!k.Call(qb, TN_QUANT_FROM_ROUNDED, true, 0xFF, where)) continue;
        const Quantized got = qb.Read();
        int64_t capped = 0, saturated = 0;
        for (int64_t r = 0; r < 6; r++)
          for (int64_t g = 0; g < qb.groups; g++) {
            const float s = Divisor(sp, got.stored[(size_t)(r * qb.groups + g)]);
            const float amax = Amax(k.value.data() + r * 256 + g * qb.group, qb.group);
            const float raw = amax / QMax(sp.format);
            float want = raw;
            if (sp.scale_ub > 0.0f && raw > sp.scale_ub) want = sp.scale_ub;
            if (want < sp.scale_min) want = sp.scale_min;
            if (sp.Ue8m0()) want = Ue8m0Value(Ue8m0Byte(want));
            EXPECT_EQ(s, want) << where << ": row " << r << " group " << g << " (amax " << amax << ")";
            if (sp.scale_ub > 0.0f && raw > sp.scale_ub) {
              capped++;
              for (int64_t i = 0; i < qb.group; i++) {
                const uint8_t code = got.codes[(size_t)(r * 256 + g * qb.group + i)];
                saturated += std::fabs(CodeValue(sp.format, code)) == (double)QMax(sp.format);
              }
            }
          }
        if (sp.scale_ub > 0.0f) {
          EXPECT_GE(capped, qb.groups) << where << ": row 1's scales are all capped";
          EXPECT_GT(saturated, 0) << where << ": a scale capped below amax / qmax saturates the largest values";
        }
        if (sp.scale_min == 1e-41f) {
          EXPECT_EQ(got.stored[0], 0u) << where << ": zero group's byte (2^-127)";
        }
      }
    }
  }
}

// A static scale far below the values' range: every code at the format's largest, with its sign.
TEST(QuantOpsEdge, StaticScaleSaturates) {
  tnorm_test::Context c;
  Rng rng(TestSeed());
  const Variant &v = VariantNamed("quantize");
  OpCase k;
  MakeInputs(v, TN_F32, 4, 256, 256, rng, k.in);
  for (int64_t r = 0; r < 4; r++)
    for (int64_t i = 0; i < 256; i++) k.in.x.Set(r, i, (i % 2 ? -1.0f : 1.0f) * (1.0f + (float)rng.Uniform()));
  k.Prepare(c.ctx, v, 256, false);
  for (tn_quant_format f : {TN_QUANT_FP8_E4M3, TN_QUANT_FP8_E5M2, TN_QUANT_INT8}) {
    Spec sp = MakeSpec(f, TN_QUANT_SCALE_TENSOR);
    sp.scale = 1e-6f;  // |v| / s >= 1e6: beyond 448, 57344 and 127
    QuantBufs qb;
    qb.Make(sp, 4, 256, false);
    const std::string where = k.Where(sp, "static 1e-6");
    if (!k.Call(qb, TN_QUANT_FROM_ROUNDED, true, 0xFF, where)) continue;
    qb.ExpectExactly(Reference(sp, k.value, 4, 256), 0xFF, where);
    const Quantized got = qb.Read();
    for (int64_t i = 0; i < 4 * 256; i++)
      ASSERT_EQ(CodeValue(f, got.codes[(size_t)i]), (i % 2 ? -1.0 : 1.0) * QMax(f)) << where << ": element " << i;
  }
}

// Misaligned operands (f16 x at an odd address, f32 scales and static scale off their alignment) are
// copied aside and back: the same bytes, and column-major padding still untouched.
TEST(QuantOpsEdge, MisalignedOperands) {
  tnorm_test::Context c;
  Rng rng(TestSeed());
  for (const char *name : {"rms_norm_w", "quantize"}) {
    const Variant &v = VariantNamed(name);
    OpCase k;
    MakeInputs(v, TN_F16, 5, 256, 264, rng, k.in, 1);
    k.Prepare(c.ctx, v, 256, true);
    if (HasFatalFailure()) return;
    for (const Spec &sp :
         {MakeSpec(TN_QUANT_FP8_E4M3, TN_QUANT_SCALE_TOKEN),
          MakeSpec(TN_QUANT_FP8_E4M3, TN_QUANT_SCALE_TOKEN, 0, 0, TN_SCALES_COLUMN_MAJOR),
          MakeSpec(TN_QUANT_INT8, TN_QUANT_SCALE_GROUP, 64, 0, TN_SCALES_COLUMN_MAJOR),
          MakeSpec(TN_QUANT_FP8_E5M2, TN_QUANT_SCALE_TENSOR), MakeSpec(TN_QUANT_NVFP4, TN_QUANT_SCALE_GROUP),
          MakeSpec(TN_QUANT_NVFP4, TN_QUANT_SCALE_GROUP, 0, 0, TN_SCALES_SWIZZLED),
          MakeSpec(TN_QUANT_MXFP8, TN_QUANT_SCALE_GROUP, 0, 0, TN_SCALES_SWIZZLED)})
      for (size_t base : {1, 2}) k.CheckSpec(sp, true, base);
  }
}

// y may be x itself, and residual_out the residual (the residual stream updated in place): q and the
// scales are those of the separate call, x then holds y and the residual the sum.
TEST(QuantOpsEdge, InPlace) {
  tnorm_test::Context c;
  Rng rng(TestSeed());
  constexpr int64_t kRows = 9, kDim = 256;
  const Spec specs[] = {MakeSpec(TN_QUANT_FP8_E4M3, TN_QUANT_SCALE_TOKEN),
                        MakeSpec(TN_QUANT_INT8, TN_QUANT_SCALE_GROUP, 64, 0, TN_SCALES_COLUMN_MAJOR),
                        MakeSpec(TN_QUANT_NVFP4, TN_QUANT_SCALE_GROUP, 0, 0, TN_SCALES_SWIZZLED),
                        MakeSpec(TN_QUANT_FP8_E5M2, TN_QUANT_SCALE_TENSOR)};
  for (tn_dtype dt : {TN_F32, TN_BF16}) {
    for (const char *name :
         {"rms_norm_w", "add_rms_norm_w", "add_rms_norm_w_res_f32", "layer_norm_wb", "add_layer_norm_wb"}) {
      const Variant &v = VariantNamed(name);
      OpCase k;
      MakeInputs(v, dt, kRows, kDim, kDim, rng, k.in);
      k.Prepare(c.ctx, v, kDim, false);
      if (HasFatalFailure()) return;
      for (const Spec &asked : specs) {
        const Spec sp = k.WithScale(asked);
        for (tn_quant_source source : {TN_QUANT_FROM_ROUNDED, TN_QUANT_FROM_F32}) {
          const std::string where = k.Where(sp, source == TN_QUANT_FROM_F32 ? "source F32" : "source ROUNDED");
          QuantBufs qb;
          qb.Make(sp, kRows, kDim, false);
          if (!k.Call(qb, source, true, 0xFF, where)) continue;
          const Quantized separate = qb.Read();
          Inputs io;  // copies of the inputs, overwritten by the call
          io.dt = dt;
          io.rows = kRows;
          io.dim = kDim;
          io.x = k.in.x;
          io.residual = k.in.residual;
          io.weight = k.in.weight;
          io.bias = k.in.bias;
          io.Bind();
          qb.Poison(0x77);
          const tn_quant quant = qb.Quant(source);
          ASSERT_EQ(RunOp(c.ctx, v, io, &quant, &io.tx, &io.tres), TN_OK)
              << where << ": " << tn_context_last_error(c.ctx);
          qb.ExpectExactly(separate, 0x77, where + ", in place");
          ExpectSameBytes(
              io.x.mem, RowImage(k.y_ref, 0), [](size_t o) { return PlainOffset("x (as y)", o); },
              where + ", in place: y");
          if (v.Adds())
            ExpectSameBytes(
                io.residual.mem, RowImage(k.rout_ref, 0), [](size_t o) { return PlainOffset("residual", o); },
                where + ", in place: residual_out");
        }
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Graphs: add -> norm with a quantized output is fused into add_rms_norm (add_layer_norm) and gives the
// bytes of the two calls
// ------------------------------------------------------------------------------------------------

TEST(QuantOpsGraph, AddThenNormWithQuantGivesTheUnfusedBytes) {
  tnorm_test::Context c;
  Rng rng(TestSeed());
  constexpr int64_t kRows = 6, kDim = 256;
  std::vector<Spec> specs = {MakeSpec(TN_QUANT_FP8_E4M3, TN_QUANT_SCALE_TOKEN),
                             MakeSpec(TN_QUANT_INT8, TN_QUANT_SCALE_GROUP, 64, 0, TN_SCALES_COLUMN_MAJOR),
                             MakeSpec(TN_QUANT_MXFP8, TN_QUANT_SCALE_GROUP, 0, 0, TN_SCALES_SWIZZLED),
                             MakeSpec(TN_QUANT_NVFP4, TN_QUANT_SCALE_GROUP),
                             MakeSpec(TN_QUANT_FP8_E5M2, TN_QUANT_SCALE_TENSOR)};
  specs[3].scale = 448.0f * 6.0f / 4.0f;
  specs[4].scale = 0.01f;
  for (tn_dtype dt : {TN_F32, TN_F16, TN_BF16}) {
    for (bool layer : {false, true}) {
      const Variant &v = VariantNamed(layer ? "layer_norm_wb" : "rms_norm_w");
      Inputs in;  // x and the residual are the add's operands; weight and bias the norm's
      MakeInputs(VariantNamed(layer ? "add_layer_norm_wb" : "add_rms_norm_w"), dt, kRows, kDim, kDim, rng, in);
      for (const Spec &sp : specs) {
        for (bool with_y : {true, false}) {
          const std::string where = std::string(v.name) + ", " + tn_dtype_name(dt) + ", " + SpecName(sp) +
                                    (with_y ? ", y" : ", y NULL") + ", seed " + std::to_string(GlobalSeed());
          Buf sum, y;
          sum.Shape(dt, kRows, kDim, kDim);
          y.Shape(dt, kRows, kDim, kDim);
          QuantBufs qb;
          qb.Make(sp, kRows, kDim, false);
          const tn_tensor tsum = sum.View(), ty = y.View();
          const tn_quant quant = qb.Quant(TN_QUANT_FROM_ROUNDED);
          auto calls = [&]() {
            tn_status st = tn_add(c.ctx, &in.tx, &in.tres, &tsum);
            if (st != TN_OK) return st;
            if (!layer) return tn_rms_norm_quant(c.ctx, &tsum, &in.tw, 0.0f, kEps, &quant, with_y ? &ty : nullptr);
            tn_op_args a = tn_op_args_init(TN_OP_LAYER_NORM);
            a.x = &tsum;
            a.weight = &in.tw;
            a.bias = &in.tb;
            a.eps = kEps;
            a.y = with_y ? &ty : nullptr;
            a.quant = quant;
            return tn_op_run(c.ctx, &a);
          };
          auto poison = [&]() {
            sum.Poison(0xFF);
            y.Poison(0xFF);
            qb.Poison(0xFF);
          };
          poison();
          ASSERT_EQ(calls(), TN_OK) << where << ": " << tn_context_last_error(c.ctx);
          const std::vector<unsigned char> want_sum = sum.mem, want_y = y.mem, want_q = qb.q.mem,
                                           want_s = qb.scales.mem;
          poison();
          ASSERT_EQ(tn_graph_begin(c.ctx), TN_OK);
          const tn_status recorded = calls();
          tn_graph *g = nullptr;
          ASSERT_EQ(tn_graph_end(c.ctx, &g), TN_OK) << tn_context_last_error(c.ctx);
          ASSERT_EQ(recorded, TN_OK) << where << ": " << tn_context_last_error(c.ctx);
          tn_graph_info info;
          ASSERT_EQ(tn_graph_get_info(g, &info), TN_OK);
          EXPECT_EQ(info.fused_add_rms_norm, 1) << where << ": " << tn_graph_fusions(g);
          EXPECT_EQ(info.ops, 1) << where;
          EXPECT_TRUE(AllPoison(qb.q, 0xFF) && AllPoison(sum, 0xFF)) << where << ": recording ran an op";
          EXPECT_EQ(tn_graph_launch(c.ctx, g), TN_OK) << where << ": " << tn_context_last_error(c.ctx);
          EXPECT_TRUE(sum.mem == want_sum) << where << ": the sum";
          EXPECT_TRUE(y.mem == want_y) << where << ": y";
          EXPECT_TRUE(qb.q.mem == want_q) << where << ": q";
          EXPECT_TRUE(qb.scales.mem == want_s) << where << ": scales";
          if (sp.TakesScale()) {
            // The static (or global) scale is read at each launch: a new value gives the unfused calls' bytes
            // with it.
            qb.scale.Set(0, 0, sp.scale * 1.75f);
            poison();
            ASSERT_EQ(calls(), TN_OK) << where << ": " << tn_context_last_error(c.ctx);
            const std::vector<unsigned char> new_q = qb.q.mem, new_s = qb.scales.mem;
            EXPECT_FALSE(new_q == want_q) << where << ": the new scale changes nothing";
            poison();
            EXPECT_EQ(tn_graph_launch(c.ctx, g), TN_OK) << where << ": " << tn_context_last_error(c.ctx);
            EXPECT_TRUE(qb.q.mem == new_q) << where << ": q with a new scale";
            EXPECT_TRUE(qb.scales.mem == new_s) << where << ": scales with a new scale";
          }
          tn_graph_destroy(g);
        }
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Refused arguments: the status, a message naming the offending field, and not one byte written
// ------------------------------------------------------------------------------------------------

// Whether msg contains key; a key "a|b" accepts either alternative.
bool Contains(const std::string &msg, const std::string &key) {
  size_t start = 0;
  for (;;) {
    const size_t bar = key.find('|', start);
    if (msg.find(key.substr(start, bar == std::string::npos ? std::string::npos : bar - start)) != std::string::npos)
      return true;
    if (bar == std::string::npos) return false;
    start = bar + 1;
  }
}

// Every operand lives in one of two arenas: the inputs' (which must not change) and the outputs' (poisoned
// before each call, which must stay poisoned). The base arguments are accepted; each case changes one thing.
class QuantOpsArgs : public ::testing::Test {
 protected:
  static constexpr int64_t R = 4, D = 128;
  // Byte offsets in the arenas.
  static constexpr size_t kX = 0, kRes = 4096, kW = 8192, kScale = 8704, kScale2 = 8720, kScaleF16 = 8736,
                          kPositions = 8800;
  static constexpr size_t kY = 0, kRout = 4096, kQ = 8192, kScales = 12288, kSpare = 16384;

  void SetUp() override {
    ASSERT_EQ(tn_context_create(&ctx), TN_OK);
    Reset();
  }
  // The arenas and views as the base arguments have them (each case changes them, then resets).
  void Reset() {
    in.assign(1 << 14, 0);
    out.assign(1 << 16, 0xFF);
    for (int64_t i = 0; i < R * D; i++) {
      SetIn(kX + 4 * (size_t)i, 0.25f * (float)(i % 7) - 0.5f);
      SetIn(kRes + 4 * (size_t)i, 0.125f * (float)(i % 5));
    }
    for (int64_t i = 0; i < D; i++) SetIn(kW + 4 * (size_t)i, 1.0f + 0.01f * (float)i);
    SetIn(kScale, 0.05f);
    SetIn(kScale2, 0.05f);
    SetIn(kScale2 + 4, 0.05f);
    const int32_t positions[R] = {0, 1, 2, 3};
    memcpy(in.data() + kPositions, positions, sizeof positions);
    tx = In(kX, TN_F32, R, D);
    tres = In(kRes, TN_F32, R, D);
    tw = In(kW, TN_F32, 1, D);
    tscale = In(kScale, TN_F32, 1, 1);
    ty = Out(kY, TN_F32, R, D);
    trout = Out(kRout, TN_F32, R, D);
    tq = Out(kQ, TN_F8_E4M3, R, D);
    tscales = Out(kScales, TN_F32, R, 1);
  }
  void TearDown() override { tn_context_destroy(ctx); }

  void SetIn(size_t off, float v) { memcpy(in.data() + off, &v, 4); }
  tn_tensor In(size_t off, tn_dtype dt, int64_t rows, int64_t dim) {
    return tn_tensor_2d(in.data() + off, dt, rows, dim);
  }
  tn_tensor Out(size_t off, tn_dtype dt, int64_t rows, int64_t dim, int64_t stride = 0) {
    return tn_tensor_strided(out.data() + off, dt, rows, dim, stride > 0 ? stride : dim);
  }

  static bool Norm(tn_op op) { return op != TN_OP_QUANTIZE; }
  static bool Adds(tn_op op) { return op == TN_OP_ADD_RMS_NORM || op == TN_OP_ADD_LAYER_NORM; }

  // op with an E4M3 per-token output (q and f32 scales in the outputs' arena).
  tn_op_args Base(tn_op op = TN_OP_RMS_NORM) {
    tq = Out(kQ, TN_F8_E4M3, R, D);
    tscales = Out(kScales, TN_F32, R, 1);
    tscale = In(kScale, TN_F32, 1, 1);
    tn_op_args a = tn_op_args_init(op);
    a.x = &tx;
    if (Norm(op)) {
      a.y = &ty;
      a.weight = &tw;
    }
    if (Adds(op)) {
      a.residual = &tres;
      a.residual_out = &trout;
    }
    a.quant = tn_quant_init(TN_QUANT_FP8_E4M3);
    a.quant.q = &tq;
    a.quant.scales = &tscales;
    return a;
  }
  // The same with a static scale.
  tn_op_args Static(tn_op op = TN_OP_RMS_NORM, tn_quant_format f = TN_QUANT_FP8_E4M3) {
    tn_op_args a = Base(op);
    a.quant.format = f;
    a.quant.scaling = TN_QUANT_SCALE_TENSOR;
    a.quant.scale = &tscale;
    a.quant.scales = nullptr;
    tq.dtype = f == TN_QUANT_INT8 ? TN_I8 : f == TN_QUANT_FP8_E5M2 ? TN_F8_E5M2 : TN_F8_E4M3;
    return a;
  }
  // The same with NVFP4 (packed q, e4m3 scales per 16 elements in `layout`, the global scale).
  tn_op_args Nvfp4(tn_op op = TN_OP_RMS_NORM, tn_scale_layout layout = TN_SCALES_ROW_MAJOR) {
    tn_op_args a = Base(op);
    a.quant = tn_quant_init(TN_QUANT_NVFP4);
    a.quant.layout = layout;
    tq = Out(kQ, TN_U8, R, D / 2);
    tscales = layout == TN_SCALES_SWIZZLED ? Out(kScales, TN_F8_E4M3, 128, 8) : Out(kScales, TN_F8_E4M3, R, D / 16);
    a.quant.q = &tq;
    a.quant.scale = &tscale;
    a.quant.scales = &tscales;
    return a;
  }

  // Poisons the outputs' arena, calls, and checks the status, the message's keys, and that neither arena
  // changed.
  void ExpectRefused(const std::function<tn_status()> &call, tn_status want, const std::vector<std::string> &keys,
                     const std::string &what) {
    std::fill(out.begin(), out.end(), 0xFF);
    const std::vector<unsigned char> in_before = in;
    const tn_status st = call();
    const std::string msg = tn_context_last_error(ctx);
    EXPECT_EQ(st, want) << what << ": got " << tn_status_name(st) << ", want " << tn_status_name(want)
                        << "; message: " << msg;
    EXPECT_FALSE(msg.empty()) << what << ": no message";
    for (const std::string &k : keys)
      EXPECT_TRUE(Contains(msg, k)) << what << ": message \"" << msg << "\" lacks \"" << k << "\"";
    EXPECT_TRUE(std::all_of(out.begin(), out.end(), [](unsigned char b) { return b == 0xFF; }))
        << what << ": an output was written on error";
    EXPECT_TRUE(in == in_before) << what << ": an input changed";
  }

  // The descriptor: tn_op_validate (unless the check needs the scale's value, read only at run time) and
  // tn_op_run refuse alike.
  void ExpectArgsRefused(const tn_op_args &a, tn_status want, const std::vector<std::string> &keys,
                         const std::string &what, bool validates = true) {
    std::string validate_msg;
    if (validates) {
      ExpectRefused([&] { return tn_op_validate(ctx, &a); }, want, keys, what + " (tn_op_validate)");
      validate_msg = tn_context_last_error(ctx);
    }
    ExpectRefused([&] { return tn_op_run(ctx, &a); }, want, keys, what + " (tn_op_run)");
    if (validates) {
      EXPECT_EQ(validate_msg, std::string(tn_context_last_error(ctx))) << what;
    }
  }

  tn_context *ctx = nullptr;
  std::vector<unsigned char> in, out;
  tn_tensor tx{}, tres{}, tw{}, tscale{}, ty{}, trout{}, tq{}, tscales{};
};

const tn_op kQuantOps[] = {TN_OP_RMS_NORM, TN_OP_ADD_RMS_NORM, TN_OP_LAYER_NORM, TN_OP_ADD_LAYER_NORM, TN_OP_QUANTIZE};

TEST_F(QuantOpsArgs, BaseArgumentsAreAccepted) {
  for (tn_op op : kQuantOps) {
    tn_op_args a = Base(op);
    EXPECT_EQ(tn_op_run(ctx, &a), TN_OK) << tn_op_name(op) << ": " << tn_context_last_error(ctx);
    a = Static(op);
    EXPECT_EQ(tn_op_run(ctx, &a), TN_OK) << tn_op_name(op) << ": " << tn_context_last_error(ctx);
    for (tn_scale_layout l : {TN_SCALES_ROW_MAJOR, TN_SCALES_SWIZZLED}) {
      a = Nvfp4(op, l);
      EXPECT_EQ(tn_op_run(ctx, &a), TN_OK) << tn_op_name(op) << ": " << tn_context_last_error(ctx);
    }
    Reset();
  }
}

// rows == 0 is a no-op with a quantized output too: the swizzled scales' padding is not cleared.
TEST_F(QuantOpsArgs, ZeroRowsWriteNothing) {
  for (tn_op op : kQuantOps) {
    tn_op_args a = Nvfp4(op, TN_SCALES_SWIZZLED);
    tx.rows = tres.rows = ty.rows = trout.rows = tq.rows = 0;
    tscales = Out(kScales, TN_F8_E4M3, 0, 8);
    std::fill(out.begin(), out.end(), 0xFF);
    EXPECT_EQ(tn_op_run(ctx, &a), TN_OK) << tn_op_name(op) << ": " << tn_context_last_error(ctx);
    EXPECT_TRUE(std::all_of(out.begin(), out.end(), [](unsigned char b) { return b == 0xFF; })) << tn_op_name(op);
    Reset();
  }
}

TEST_F(QuantOpsArgs, StaticScaleMustBeFiniteAndPositive) {
  for (float bad : {0.0f, -0.0f, -1.0f, kInf, -kInf, kNaN}) {
    SetIn(kScale, bad);
    const std::string value = "quant.scale " + std::to_string(bad);
    for (tn_op op : kQuantOps) {
      const std::vector<std::string> keys = {std::string(tn_op_name(op)) + ": quant.scale is", "finite and > 0"};
      ExpectArgsRefused(Static(op), TN_ERR_VALUE, keys, value + ", " + tn_op_name(op), false);
      ExpectArgsRefused(Static(op, TN_QUANT_INT8), TN_ERR_VALUE, keys, value + ", int8, " + tn_op_name(op), false);
      ExpectArgsRefused(Nvfp4(op), TN_ERR_VALUE, keys, value + ", nvfp4, " + tn_op_name(op), false);
      ExpectArgsRefused(Nvfp4(op, TN_SCALES_SWIZZLED), TN_ERR_VALUE, keys,
                        value + ", nvfp4 swizzled, " + tn_op_name(op), false);
    }
    // The entry points of their own.
    const tn_op_args s = Static();
    ExpectRefused([&] { return tn_quantize(ctx, &tx, &s.quant); }, TN_ERR_VALUE, {"quant.scale"},
                  value + ", tn_quantize");
    ExpectRefused([&] { return tn_rms_norm_quant(ctx, &tx, &tw, 0.0f, kEps, &s.quant, &ty); }, TN_ERR_VALUE,
                  {"quant.scale"}, value + ", tn_rms_norm_quant");
    ExpectRefused([&] { return tn_add_rms_norm_quant(ctx, &tx, &tres, &tw, 0.0f, kEps, &s.quant, &ty, &trout); },
                  TN_ERR_VALUE, {"quant.scale"}, value + ", tn_add_rms_norm_quant");
  }
}

TEST_F(QuantOpsArgs, GroupMustDivideDim) {
  struct Bad {
    tn_quant_format format;
    int64_t group_size, dim, rows;
    const char *group;
  } cases[] = {{TN_QUANT_FP8_E4M3, 64, 96, R, "group of 64"},  {TN_QUANT_INT8, 128, 96, R, "group of 128"},
               {TN_QUANT_FP8_E5M2, 32, 769, 2, "group of 32"}, {TN_QUANT_MXFP8, 0, 48, R, "group of 32"},
               {TN_QUANT_NVFP4, 0, 24, R, "group of 16"},      {TN_QUANT_NVFP4, 0, 769, 2, "group of 16"}};
  for (const Bad &c : cases) {
    for (tn_op op : kQuantOps) {
      tn_op_args a = c.format == TN_QUANT_NVFP4 ? Nvfp4(op) : Base(op);
      a.quant.format = c.format;
      a.quant.scaling = TN_QUANT_SCALE_GROUP;
      a.quant.group_size = c.group_size;
      tx = In(kX, TN_F32, c.rows, c.dim);
      tres = In(kRes, TN_F32, c.rows, c.dim);
      tw = In(kW, TN_F32, 1, c.dim);
      ty = Out(kY, TN_F32, c.rows, c.dim);
      trout = Out(kRout, TN_F32, c.rows, c.dim);
      const bool nv = c.format == TN_QUANT_NVFP4;
      tq = Out(kQ,
               nv                              ? TN_U8
               : c.format == TN_QUANT_INT8     ? TN_I8
               : c.format == TN_QUANT_FP8_E5M2 ? TN_F8_E5M2
                                               : TN_F8_E4M3,
               c.rows, nv ? c.dim / 2 : c.dim);
      tscales = Out(kScales, nv ? TN_F8_E4M3 : c.format == TN_QUANT_MXFP8 ? TN_U8 : TN_F32, c.rows, 1);
      ExpectArgsRefused(
          a, TN_ERR_SHAPE, {"dim " + std::to_string(c.dim), c.group},
          std::string(tn_quant_format_name(c.format)) + " dim " + std::to_string(c.dim) + ", " + tn_op_name(op));
      Reset();
    }
  }
}

TEST_F(QuantOpsArgs, ScalesOfTheWrongShapeDtypeOrLayout) {
  struct Bad {
    const char *what;
    tn_status status;
    std::vector<std::string> keys;
    std::function<void(tn_op_args &)> change;
  };
  const std::vector<Bad> cases = {
      {"token scales 4 x 2",
       TN_ERR_SHAPE,
       {"quant.scales is 4 x 2", "must be 4 x 1"},
       [&](tn_op_args &) { tscales = Out(kScales, TN_F32, R, 2); }},
      {"token scales 3 x 1",
       TN_ERR_SHAPE,
       {"quant.scales is 3 x 1", "must be 4 x 1"},
       [&](tn_op_args &) { tscales = Out(kScales, TN_F32, 3, 1); }},
      {"group-32 scales 4 x 3",
       TN_ERR_SHAPE,
       {"quant.scales", "must be 4 x 4"},
       [&](tn_op_args &a) {
         a.quant.scaling = TN_QUANT_SCALE_GROUP, a.quant.group_size = 32;
         tscales = Out(kScales, TN_F32, R, 3);
       }},
      {"column-major scales given row-major",
       TN_ERR_SHAPE,
       {"quant.scales is 4 x 2", "must be 2 x 4", "column-major"},
       [&](tn_op_args &a) {
         a.quant.scaling = TN_QUANT_SCALE_GROUP, a.quant.group_size = 64, a.quant.layout = TN_SCALES_COLUMN_MAJOR;
         tscales = Out(kScales, TN_F32, R, 2);
       }},
      {"column-major scales short of rows",
       TN_ERR_SHAPE,
       {"quant.scales is 1 x 3", "must be 1 x 4"},
       [&](tn_op_args &a) {
         a.quant.layout = TN_SCALES_COLUMN_MAJOR;
         tscales = Out(kScales, TN_F32, 1, 3, 8);
       }},
      {"swizzled mxfp8 scales not rounded up",
       TN_ERR_SHAPE,
       {"quant.scales is 4 x 4", "must be 128 x 4", "swizzled"},
       [&](tn_op_args &a) {
         a.quant = tn_quant_init(TN_QUANT_MXFP8), a.quant.layout = TN_SCALES_SWIZZLED, a.quant.q = &tq;
         tscales = Out(kScales, TN_U8, R, 4);
         a.quant.scales = &tscales;
       }},
      {"swizzled scales with a row stride",
       TN_ERR_SHAPE,
       {"quant.scales", "contiguous", "row_stride is 8"},
       [&](tn_op_args &a) {
         a.quant = tn_quant_init(TN_QUANT_MXFP8), a.quant.layout = TN_SCALES_SWIZZLED, a.quant.q = &tq;
         tscales = Out(kScales, TN_U8, 128, 4, 8);
         a.quant.scales = &tscales;
       }},
      {"swizzled nvfp4 scales of 4 groups",
       TN_ERR_SHAPE,
       {"quant.scales is 128 x 4", "must be 128 x 8"},
       [&](tn_op_args &a) {
         a = Nvfp4(a.op, TN_SCALES_SWIZZLED);
         tscales = Out(kScales, TN_F8_E4M3, 128, 4);
       }},
      {"f32 scales given as u8",
       TN_ERR_DTYPE,
       {"quant.scales is u8", "f32"},
       [&](tn_op_args &) { tscales.dtype = TN_U8; }},
      {"f32 scales given as f16",
       TN_ERR_DTYPE,
       {"quant.scales is f16", "f32"},
       [&](tn_op_args &) { tscales.dtype = TN_F16; }},
      {"pow2 scales given as f32",
       TN_ERR_DTYPE,
       {"quant.scales is f32", "u8"},
       [&](tn_op_args &a) { a.quant.pow2_scales = 1; }},
      {"mxfp8 scales given as f32",
       TN_ERR_DTYPE,
       {"quant.scales is f32", "u8"},
       [&](tn_op_args &a) {
         a.quant.format = TN_QUANT_MXFP8, a.quant.scaling = TN_QUANT_SCALE_GROUP;
         tscales = Out(kScales, TN_F32, R, 4);
       }},
      {"nvfp4 scales given as u8",
       TN_ERR_DTYPE,
       {"quant.scales is u8", "f8_e4m3"},
       [&](tn_op_args &a) {
         a = Nvfp4(a.op);
         tscales.dtype = TN_U8;
       }},
  };
  for (const Bad &c : cases)
    for (tn_op op : kQuantOps) {
      tn_op_args a = Base(op);
      c.change(a);
      ExpectArgsRefused(a, c.status, c.keys, std::string(c.what) + ", " + tn_op_name(op));
      Reset();
    }
}

TEST_F(QuantOpsArgs, QOfTheWrongShapeOrDtype) {
  struct Bad {
    const char *what;
    tn_status status;
    std::vector<std::string> keys;
    std::function<void(tn_op_args &)> change;
  };
  const std::vector<Bad> cases = {
      {"e4m3 q as i8", TN_ERR_DTYPE, {"quant.q is i8", "f8_e4m3"}, [&](tn_op_args &) { tq.dtype = TN_I8; }},
      {"e4m3 q as f32", TN_ERR_DTYPE, {"quant.q is f32", "f8_e4m3"}, [&](tn_op_args &) { tq = Out(kQ, TN_F32, R, D); }},
      {"int8 q as e4m3",
       TN_ERR_DTYPE,
       {"quant.q is f8_e4m3", "i8"},
       [&](tn_op_args &a) { a.quant.format = TN_QUANT_INT8; }},
      {"e5m2 q as e4m3",
       TN_ERR_DTYPE,
       {"quant.q is f8_e4m3", "f8_e5m2"},
       [&](tn_op_args &a) { a.quant.format = TN_QUANT_FP8_E5M2; }},
      {"mxfp8 q as u8",
       TN_ERR_DTYPE,
       {"quant.q is u8", "f8_e4m3"},
       [&](tn_op_args &a) {
         a.quant.format = TN_QUANT_MXFP8, a.quant.scaling = TN_QUANT_SCALE_GROUP;
         tq.dtype = TN_U8;
         tscales = Out(kScales, TN_U8, R, 4);
       }},
      {"nvfp4 q as e4m3",
       TN_ERR_DTYPE,
       {"quant.q is f8_e4m3", "u8"},
       [&](tn_op_args &a) {
         a = Nvfp4(a.op);
         tq.dtype = TN_F8_E4M3;
       }},
      {"q of 3 rows",
       TN_ERR_SHAPE,
       {"quant.q is 3 x 128", "must be 4 x 128"},
       [&](tn_op_args &) { tq = Out(kQ, TN_F8_E4M3, 3, D); }},
      {"q of 64 columns",
       TN_ERR_SHAPE,
       {"quant.q is 4 x 64", "must be 4 x 128"},
       [&](tn_op_args &) { tq = Out(kQ, TN_F8_E4M3, R, 64); }},
      {"nvfp4 q unpacked",
       TN_ERR_SHAPE,
       {"quant.q is 4 x 128", "must be 4 x 64", "two elements a byte"},
       [&](tn_op_args &a) {
         a = Nvfp4(a.op);
         tq = Out(kQ, TN_U8, R, D);
       }},
      {"q NULL", TN_ERR_NULL, {"quant.q is required"}, [&](tn_op_args &a) { a.quant.q = nullptr; }},
  };
  for (const Bad &c : cases)
    for (tn_op op : kQuantOps) {
      tn_op_args a = Base(op);
      c.change(a);
      ExpectArgsRefused(a, c.status, c.keys, std::string(c.what) + ", " + tn_op_name(op));
      Reset();
    }
}

TEST_F(QuantOpsArgs, ScaleTensorAndScalesPresence) {
  struct Bad {
    const char *what;
    tn_status status;
    std::vector<std::string> keys;
    std::function<tn_op_args(tn_op)> make;
  };
  const std::vector<Bad> cases = {
      {"static without quant.scale",
       TN_ERR_NULL,
       {"quant.scale is required"},
       [&](tn_op op) {
         tn_op_args a = Static(op);
         a.quant.scale = nullptr;
         return a;
       }},
      {"nvfp4 without its global scale",
       TN_ERR_NULL,
       {"quant.scale is required", "global"},
       [&](tn_op op) {
         tn_op_args a = Nvfp4(op);
         a.quant.scale = nullptr;
         return a;
       }},
      {"static scale as f16",
       TN_ERR_DTYPE,
       {"quant.scale is f16", "f32"},
       [&](tn_op op) {
         tn_op_args a = Static(op);
         tscale = In(kScaleF16, TN_F16, 1, 1);
         return a;
       }},
      {"static scale of two floats",
       TN_ERR_SHAPE,
       {"quant.scale is 1 x 2", "1 x 1"},
       [&](tn_op op) {
         tn_op_args a = Static(op);
         tscale = In(kScale2, TN_F32, 1, 2);
         return a;
       }},
      {"dynamic scales with quant.scale",
       TN_ERR_OPERAND,
       {"quant.scale given"},
       [&](tn_op op) {
         tn_op_args a = Base(op);
         a.quant.scale = &tscale;
         return a;
       }},
      {"dynamic without quant.scales",
       TN_ERR_NULL,
       {"quant.scales is required"},
       [&](tn_op op) {
         tn_op_args a = Base(op);
         a.quant.scales = nullptr;
         return a;
       }},
      {"static with quant.scales",
       TN_ERR_OPERAND,
       {"quant.scales given"},
       [&](tn_op op) {
         tn_op_args a = Static(op);
         a.quant.scales = &tscales;
         return a;
       }},
  };
  for (const Bad &c : cases)
    for (tn_op op : kQuantOps) {
      ExpectArgsRefused(c.make(op), c.status, c.keys, std::string(c.what) + ", " + tn_op_name(op));
      Reset();
    }
}

TEST_F(QuantOpsArgs, FieldValues) {
  struct Bad {
    const char *what;
    std::vector<std::string> keys;
    std::function<void(tn_op_args &)> change;
  };
  const std::vector<Bad> cases = {
      {"format 99", {"quant format 99"}, [](tn_op_args &a) { a.quant.format = (tn_quant_format)99; }},
      {"scaling 7", {"quant scaling 7"}, [](tn_op_args &a) { a.quant.scaling = (tn_quant_scaling)7; }},
      {"source 4", {"quant source 4"}, [](tn_op_args &a) { a.quant.source = (tn_quant_source)4; }},
      {"pow2_scales 2", {"pow2_scales is 2"}, [](tn_op_args &a) { a.quant.pow2_scales = 2; }},
      {"layout 9", {"scales layout 9"}, [](tn_op_args &a) { a.quant.layout = (tn_scale_layout)9; }},
      {"fp8 group 16",
       {"group_size is 16"},
       [](tn_op_args &a) { a.quant.scaling = TN_QUANT_SCALE_GROUP, a.quant.group_size = 16; }},
      {"fp8 group 256",
       {"group_size is 256"},
       [](tn_op_args &a) { a.quant.scaling = TN_QUANT_SCALE_GROUP, a.quant.group_size = 256; }},
      {"fp8 group 0",
       {"group_size is 0"},
       [](tn_op_args &a) { a.quant.scaling = TN_QUANT_SCALE_GROUP, a.quant.group_size = 0; }},
      {"token with a group size", {"group_size is 64", "per-token"}, [](tn_op_args &a) { a.quant.group_size = 64; }},
      {"mxfp8 group 64",
       {"group_size is 64", "mxfp8"},
       [](tn_op_args &a) {
         a.quant.format = TN_QUANT_MXFP8, a.quant.scaling = TN_QUANT_SCALE_GROUP, a.quant.group_size = 64;
       }},
      {"mxfp8 per token", {"mxfp8", "TN_QUANT_SCALE_GROUP"}, [](tn_op_args &a) { a.quant.format = TN_QUANT_MXFP8; }},
      {"pow2 with a static scale",
       {"pow2_scales"},
       [&](tn_op_args &a) {
         a.quant.scaling = TN_QUANT_SCALE_TENSOR, a.quant.scale = &tscale, a.quant.scales = nullptr,
         a.quant.pow2_scales = 1;
       }},
      {"swizzled fp8", {"swizzled"}, [](tn_op_args &a) { a.quant.layout = TN_SCALES_SWIZZLED; }},
      {"static with a column-major layout",
       {"layout"},
       [&](tn_op_args &a) {
         a.quant.scaling = TN_QUANT_SCALE_TENSOR, a.quant.scale = &tscale, a.quant.scales = nullptr;
         a.quant.layout = TN_SCALES_COLUMN_MAJOR;
       }},
      {"scale_ub -1", {"quant.scale_ub is -1"}, [](tn_op_args &a) { a.quant.scale_ub = -1.0f; }},
      {"scale_ub inf", {"quant.scale_ub is inf"}, [](tn_op_args &a) { a.quant.scale_ub = kInf; }},
      {"scale_ub nan",
       {"quant.scale_ub is nan|quant.scale_ub is -nan"},
       [](tn_op_args &a) { a.quant.scale_ub = kNaN; }},
      {"scale_min 0", {"quant.scale_min is 0"}, [](tn_op_args &a) { a.quant.scale_min = 0.0f; }},
      {"scale_min -1", {"quant.scale_min is -1"}, [](tn_op_args &a) { a.quant.scale_min = -1.0f; }},
      {"scale_min inf", {"quant.scale_min is inf"}, [](tn_op_args &a) { a.quant.scale_min = kInf; }},
      {"scale_min nan",
       {"quant.scale_min is nan|quant.scale_min is -nan"},
       [](tn_op_args &a) { a.quant.scale_min = kNaN; }},
      {"scale_ub below scale_min",
       {"quant.scale_ub 1e-06 is below quant.scale_min 0.001"},
       [](tn_op_args &a) { a.quant.scale_ub = 1e-6f, a.quant.scale_min = 1e-3f; }},
  };
  for (const Bad &c : cases)
    for (tn_op op : kQuantOps) {
      tn_op_args a = Base(op);
      c.change(a);
      ExpectArgsRefused(a, TN_ERR_VALUE, c.keys, std::string(c.what) + ", " + tn_op_name(op));
      Reset();
    }
  // NVFP4 takes neither power-of-two scales nor another group.
  for (tn_op op : kQuantOps) {
    tn_op_args a = Nvfp4(op);
    a.quant.pow2_scales = 1;
    ExpectArgsRefused(a, TN_ERR_VALUE, {"pow2_scales"}, std::string("nvfp4 pow2, ") + tn_op_name(op));
    a = Nvfp4(op);
    a.quant.group_size = 32;
    ExpectArgsRefused(a, TN_ERR_VALUE, {"group_size is 32", "nvfp4"}, std::string("nvfp4 group 32, ") + tn_op_name(op));
    a = Nvfp4(op);
    a.quant.scaling = TN_QUANT_SCALE_TENSOR;
    ExpectArgsRefused(a, TN_ERR_VALUE, {"nvfp4", "TN_QUANT_SCALE_GROUP"},
                      std::string("nvfp4 static, ") + tn_op_name(op));
    Reset();
  }
}

TEST_F(QuantOpsArgs, YIsRequiredWithoutAQuantizedOutput) {
  for (tn_op op : {TN_OP_RMS_NORM, TN_OP_ADD_RMS_NORM, TN_OP_LAYER_NORM, TN_OP_ADD_LAYER_NORM}) {
    tn_op_args a = Base(op);
    a.quant = tn_quant_init(TN_QUANT_NONE);
    a.y = nullptr;
    ExpectArgsRefused(a, TN_ERR_NULL, {std::string(tn_op_name(op)) + ": y is required"}, tn_op_name(op));
    // With a quantized output, y may be left out.
    a = Base(op);
    a.y = nullptr;
    EXPECT_EQ(tn_op_validate(ctx, &a), TN_OK) << tn_op_name(op) << ": " << tn_context_last_error(ctx);
  }
  ExpectRefused([&] { return tn_rms_norm(ctx, &tx, &tw, 0.0f, kEps, nullptr); }, TN_ERR_NULL, {"y"}, "tn_rms_norm");
  // The quantize op has no y at all.
  tn_op_args a = Base(TN_OP_QUANTIZE);
  a.y = &ty;
  ExpectArgsRefused(a, TN_ERR_OPERAND, {"quantize: takes no y"}, "quantize with y");
}

TEST_F(QuantOpsArgs, OpsThatTakeNoQuantizedOutput) {
  for (tn_op op : {TN_OP_L2_NORM, TN_OP_ADD, TN_OP_MUL, TN_OP_SCALE}) {
    tn_op_args a = tn_op_args_init(op);
    a.x = &tx;
    a.y = &ty;
    if (op == TN_OP_ADD) a.residual = &tres;
    if (op == TN_OP_MUL) a.mul = &tres;
    a.quant = Base().quant;
    // Its tensors are operands the op does not take; the format alone is a quantized output it does not give.
    ExpectArgsRefused(a, TN_ERR_OPERAND, {std::string(tn_op_name(op)) + ": takes no quant.q"}, tn_op_name(op));
    a.quant.q = a.quant.scales = nullptr;
    ExpectArgsRefused(a, TN_ERR_VALUE, {"takes no quantized output"}, std::string(tn_op_name(op)) + ", format only");
  }
  // A rope (rms_norm's) and a quantized output.
  tn_op_args a = Base(TN_OP_RMS_NORM);
  a.rope.style = TN_ROPE_NEOX;
  a.rope.positions = in.data() + kPositions;
  a.rope.theta = 10000.0f;
  ExpectArgsRefused(a, TN_ERR_VALUE, {"quantized output cannot follow a rope"}, "rms_norm with a rope");
  // A 3-D view: 2 heads of 64.
  a = Base(TN_OP_RMS_NORM);
  tx = tn_tensor_heads(in.data() + kX, TN_F32, R, 2, 64, D, 64);
  ty = tn_tensor_heads(out.data() + kY, TN_F32, R, 2, 64, D, 64);
  tw = In(kW, TN_F32, 1, 64);
  ExpectArgsRefused(a, TN_ERR_SHAPE, {"2-D views", "2 heads"}, "rms_norm on heads");
  Reset();
  // Quant tensors without a format; quantize without a format.
  a = Base(TN_OP_RMS_NORM);
  a.quant.format = TN_QUANT_NONE;
  ExpectArgsRefused(a, TN_ERR_OPERAND, {"quant tensors given with format TN_QUANT_NONE"}, "format NONE with tensors");
  a = Base(TN_OP_QUANTIZE);
  a.quant.format = TN_QUANT_NONE;
  ExpectArgsRefused(a, TN_ERR_VALUE, {"quantize: quant.format is TN_QUANT_NONE"}, "quantize without a format");
  a.quant = tn_quant_init(TN_QUANT_NONE);
  ExpectArgsRefused(a, TN_ERR_NULL, {"quantize: quant.q is required"}, "quantize without a quantized output");
}

TEST_F(QuantOpsArgs, EntryPointsWithoutQuant) {
  ExpectRefused([&] { return tn_quantize(ctx, &tx, nullptr); }, TN_ERR_NULL, {"tn_quantize: quant is NULL"},
                "tn_quantize");
  ExpectRefused([&] { return tn_rms_norm_quant(ctx, &tx, &tw, 0.0f, kEps, nullptr, &ty); }, TN_ERR_NULL,
                {"tn_rms_norm_quant: quant is NULL"}, "tn_rms_norm_quant");
  ExpectRefused([&] { return tn_add_rms_norm_quant(ctx, &tx, &tres, &tw, 0.0f, kEps, nullptr, &ty, &trout); },
                TN_ERR_NULL, {"tn_add_rms_norm_quant: quant is NULL"}, "tn_add_rms_norm_quant");
}

TEST_F(QuantOpsArgs, Overlaps) {
  struct Bad {
    const char *what;
    std::vector<std::string> keys;
    std::function<tn_op_args(tn_op)> make;
  };
  const std::vector<Bad> cases = {
      {"q over y",
       {"quant.q overlaps y|y overlaps quant.q|quant.q overlaps quant.scales"},
       [&](tn_op op) {
         tn_op_args a = Base(op);
         tq = Out(kY, TN_F8_E4M3, R, D);
         if (op == TN_OP_QUANTIZE) tq = Out(kScales, TN_F8_E4M3, R, D);  // quantize has no y: over its scales
         return a;
       }},
      {"scales over q",
       {"quant.q overlaps quant.scales|quant.scales overlaps quant.q"},
       [&](tn_op op) {
         tn_op_args a = Base(op);
         tscales = Out(kQ + 64, TN_F32, R, 1);
         return a;
       }},
      {"q over x",
       {"quant.q overlaps x"},
       [&](tn_op op) {
         tn_op_args a = Base(op);
         tq = tn_tensor_2d(in.data() + kX, TN_F8_E4M3, R, D);
         return a;
       }},
      {"nvfp4 scales over the global scale",
       {"quant.scales overlaps quant.scale"},
       [&](tn_op op) {
         tn_op_args a = Nvfp4(op);
         tscales = tn_tensor_2d(in.data() + kScale, TN_F8_E4M3, R, D / 16);
         return a;
       }},
  };
  for (const Bad &c : cases)
    for (tn_op op : kQuantOps) {
      ExpectArgsRefused(c.make(op), TN_ERR_OVERLAP, c.keys, std::string(c.what) + ", " + tn_op_name(op));
      Reset();
    }
  // add_rms_norm: q over residual_out.
  tn_op_args a = Base(TN_OP_ADD_RMS_NORM);
  tq = Out(kRout + 100, TN_F8_E4M3, R, D);
  ExpectArgsRefused(a, TN_ERR_OVERLAP, {"residual_out overlaps quant.q|quant.q overlaps residual_out"},
                    "q over residual_out");
}

}  // namespace
