// The ops and modes real models need, on the CPU, against the float64 reference (tools/common/reference.h)
// and against values derived by hand from the spec: 3-D [rows, heads, dim] views (Q and K inside a packed
// QKV buffer), TN_CASTING_LLAMA, the f32 residual stream and its residual modes, l2_norm's max(norm, eps),
// layer_norm and add_layer_norm, and the rope fused after rms_norm.
//
// Inputs are fresh random data every run, from a seed printed at the start: TNORM_TEST_SEED=<n> repeats a
// run. Outputs are poisoned with 0xFF bytes before each call; every element is checked written, and every
// byte of an output buffer outside the view (gaps, other heads, the V part of QKV) checked untouched.
//
// Tolerance. Against the reference each element must be within tn_reference_error_slack <= 1: one ulp of
// the dtype (f16/bf16) or 2e-5 relative (f32), as for every op, plus the reference's slack. The slack is 0
// for the EXACT rms_norm and l2_norm forms (3-D views, residual modes and l2 modes included), so those keep
// the existing tolerance. It is not 0 in two honest cases: (1) a float32 difference of nearly equal terms
// (layer_norm's x - mean and + bias, the rope's a cos - b sin) keeps a few float32 ulps of its terms, which
// no evaluation in float32 avoids; (2) under LLAMA the normalised value is rounded to the dtype before the
// weight multiplies it: where its exact value lies within the float32 evaluation's error bound of a
// rounding boundary, the library may round to the other neighbour, and the weight carries that ulp into the
// result, which can then be one ulp further than a single rounding (the "1 ulp more" of double rounding).
// Demanding 1 ulp there would fail a correct library; demanding 2 ulps everywhere would hide a missing
// rounding. So the slack allows the extra ulp only where the reference finds the boundary within reach,
// and the roundings themselves are checked bit for bit by the relational tests below (LLAMA output ==
// the EXACT unweighted output times the weight, rounded; the rope from the rms_norm output; hand-derived
// cases where one and two roundings differ).
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
#include <vector>

#include <unistd.h>

#include "core/dtype.h"
#include "reference.h"
#include "test_seed.h"
#include "tnorm.h"

namespace {

// ------------------------------------------------------------------------------------------------
// Seed and random data (tests/common/test_seed.h)
// ------------------------------------------------------------------------------------------------

using tnorm_test::GlobalSeed;
using tnorm_test::Rng;

// The per-test generator: the global seed mixed with the test's name, so a test repeats on its own.
Rng TestRng() {
  const ::testing::TestInfo *info = ::testing::UnitTest::GetInstance()->current_test_info();
  std::string name = std::string(info->test_suite_name()) + "." + info->name();
  uint64_t h = 1469598103934665603ull;
  for (char c : name) h = (h ^ (unsigned char)c) * 1099511628211ull;
  return Rng(GlobalSeed() ^ h);
}

// ------------------------------------------------------------------------------------------------
// Buffers and views
// ------------------------------------------------------------------------------------------------

size_t ESize(tn_dtype dt) { return dt == TN_F32 ? 4 : 2; }
int64_t Heads(const tn_tensor &t) { return t.heads > 1 ? t.heads : 1; }

// Raw bytes of one dtype, poisoned (0xFF) when made; views are taken over them.
struct Mem {
  tn_dtype dt = TN_F32;
  std::vector<unsigned char> bytes;

  Mem() = default;
  Mem(tn_dtype d, int64_t elems) { Make(d, elems); }
  void Make(tn_dtype d, int64_t elems) {
    dt = d;
    bytes.assign((size_t)std::max<int64_t>(elems, 1) * ESize(d), 0xFF);
  }
  void Poison() { memset(bytes.data(), 0xFF, bytes.size()); }
  void *At(int64_t elem) { return bytes.data() + (size_t)elem * ESize(dt); }
  // rows x dim with row_stride, starting at element `offset`.
  tn_tensor View(int64_t rows, int64_t dim, int64_t row_stride, int64_t offset = 0) {
    return tn_tensor_strided(At(offset), dt, rows, dim, row_stride);
  }
  tn_tensor HeadView(int64_t rows, int64_t heads, int64_t dim, int64_t row_stride, int64_t head_stride,
                     int64_t offset = 0) {
    return tn_tensor_heads(At(offset), dt, rows, heads, dim, row_stride, head_stride);
  }
  // A [rows, heads, dim] view with `head_gap` elements after each head and `row_gap` after each row, over
  // a buffer made to fit it.
  tn_tensor MakeHeads(tn_dtype d, int64_t rows, int64_t heads, int64_t dim, int64_t head_gap, int64_t row_gap) {
    const int64_t hs = dim + head_gap, rs = heads * hs + row_gap;
    Make(d, rows * rs);
    return heads > 1 ? HeadView(rows, heads, dim, rs, hs) : View(rows, dim, rs);
  }
};

// The byte offsets (relative to base) of every element of view t.
template <typename Fn>
void ForEachElement(const tn_tensor &t, Fn fn) {
  for (int64_t r = 0; r < t.rows; r++)
    for (int64_t h = 0; h < Heads(t); h++)
      for (int64_t i = 0; i < t.dim; i++) fn(r, h, i, r * t.row_stride + (t.heads > 1 ? h * t.head_stride : 0) + i);
}

// Fills every element of t with offset + scale * N(0, 1), the scale drawn per row from `row_scales` when
// given.
void Fill(const tn_tensor &t, Rng &rng, double scale = 1.0, double offset = 0.0,
          const std::vector<double> &row_scales = {}) {
  int64_t last_row = -1;
  double s = scale;
  ForEachElement(t, [&](int64_t r, int64_t h, int64_t i, int64_t) {
    if (r != last_row && !row_scales.empty()) s = row_scales[rng.Below(row_scales.size())];
    last_row = r;
    tn_reference_store_head(&t, r, h, i, (float)(offset + s * rng.Normal()));
  });
}

const std::vector<double> kRowScales = {1e-3, 1.0, 30.0};

float Get(const tn_tensor &t, int64_t r, int64_t h, int64_t i) { return tn_reference_load_head(&t, r, h, i); }
void Set(const tn_tensor &t, int64_t r, int64_t h, int64_t i, float v) { tn_reference_store_head(&t, r, h, i, v); }

bool IsPoison(const tn_tensor &t, int64_t r, int64_t h, int64_t i) {
  const char *p = (const char *)t.data +
                  (size_t)(r * t.row_stride + (t.heads > 1 ? h * t.head_stride : 0) + i) * ESize(t.dtype);
  if (t.dtype == TN_F32) {
    uint32_t u;
    memcpy(&u, p, 4);
    return u == 0xFFFFFFFFu;
  }
  uint16_t u;
  memcpy(&u, p, 2);
  return u == 0xFFFF;
}

// Bytes of t's elements, one per byte of mem (1 = inside the view).
std::vector<char> Covered(const Mem &mem, const std::vector<tn_tensor> &views) {
  std::vector<char> in(mem.bytes.size(), 0);
  for (const tn_tensor &t : views) {
    const size_t es = ESize(t.dtype);
    const size_t base = (size_t)((const unsigned char *)t.data - mem.bytes.data());
    ForEachElement(t, [&](int64_t, int64_t, int64_t, int64_t e) {
      for (size_t k = 0; k < es; k++) in[base + (size_t)e * es + k] = 1;
    });
  }
  return in;
}

// Every byte of mem outside `views` is as in `before`. Returns false (with a failure) otherwise.
bool OnlyViewsChanged(const Mem &mem, const std::vector<unsigned char> &before, const std::vector<tn_tensor> &views,
                      const std::string &what) {
  const std::vector<char> in = Covered(mem, views);
  for (size_t k = 0; k < mem.bytes.size(); k++)
    if (!in[k] && mem.bytes[k] != before[k]) {
      ADD_FAILURE() << what << ": byte " << k << " outside the output view was written";
      return false;
    }
  return true;
}

// ------------------------------------------------------------------------------------------------
// Against the reference
// ------------------------------------------------------------------------------------------------

struct Ref {
  std::vector<double> y, rout, slack;
};

Ref Reference(const tn_op_args &a) {
  Ref ref;
  const int64_t n = a.x->rows * Heads(*a.x) * a.x->dim;
  ref.y.assign((size_t)std::max<int64_t>(n, 1), 0.0);
  ref.slack.assign(ref.y.size(), 0.0);
  ref.rout.assign((size_t)std::max<int64_t>(a.x->rows * a.x->dim, 1), 0.0);
  EXPECT_EQ(tn_reference_run_slack(&a, ref.y.data(), ref.rout.data(), ref.slack.data()), 0);
  return ref;
}

std::string Describe(const tn_op_args &a) {
  std::ostringstream s;
  s << tn_op_name(a.op) << " x " << tn_dtype_name(a.x->dtype) << " [" << a.x->rows << ", " << Heads(*a.x) << ", "
    << a.x->dim << "]";
  if (a.weight) s << ", weight " << tn_dtype_name(a.weight->dtype) << " offset " << a.weight_offset;
  if (a.bias) s << ", bias " << tn_dtype_name(a.bias->dtype);
  if (a.mul) s << ", mul";
  if (a.residual) s << ", residual " << tn_dtype_name(a.residual->dtype);
  if (a.casting == TN_CASTING_LLAMA) s << ", casting LLAMA";
  if (a.residual_mode == TN_RESIDUAL_NORM_F32) s << ", residual mode NORM_F32";
  if (a.l2_mode == TN_L2_MAX_NORM_EPS) s << ", l2 MAX_NORM_EPS";
  if (a.op == TN_OP_L2_NORM) s << ", scale " << a.scale;
  if (a.rope.style != TN_ROPE_NONE)
    s << ", rope " << (a.rope.style == TN_ROPE_NEOX ? "NEOX" : "GPTJ") << " rotary_dim " << a.rope.rotary_dim
      << (a.rope.cos_sin ? (std::string(" table ") + tn_dtype_name(a.rope.cos_sin->dtype)) : std::string(" theta"))
      << (a.rope.positions_i64 ? " int64" : " int32");
  s << ", eps " << a.eps << ", seed " << GlobalSeed();
  return s.str();
}

// Checks y (every element written, within tolerance) and residual_out (exactly the reference's rounded sum)
// of a finished call. Returns the number of bad elements (a few reported).
int64_t CheckOutputs(const tn_op_args &a, const Ref &ref, const std::string &what = "") {
  int64_t bad = 0;
  std::ostringstream msgs;
  auto report = [&](const std::string &m) {
    if (bad++ < 5) msgs << "\n  " << m;
  };
  const tn_tensor &y = *a.y;
  const int64_t heads = Heads(*a.x), dim = a.x->dim;
  ForEachElement(y, [&](int64_t r, int64_t h, int64_t i, int64_t) {
    const size_t k = (size_t)((r * heads + h) * dim + i);
    if (IsPoison(y, r, h, i)) {
      report("y row " + std::to_string(r) + " head " + std::to_string(h) + " col " + std::to_string(i) +
             ": never written");
      return;
    }
    const float got = Get(y, r, h, i);
    const double err = tn_reference_error_slack(y.dtype, got, ref.y[k], ref.slack[k]);
    if (!(err <= 1.0)) {
      std::ostringstream s;
      s.precision(10);
      s << "y row " << r << " head " << h << " col " << i << ": got " << got << ", expected " << ref.y[k]
        << " (slack " << ref.slack[k] << ", error " << err << " tolerance units)";
      report(s.str());
    }
  });
  if (a.residual_out != nullptr) {
    const tn_tensor &ro = *a.residual_out;
    ForEachElement(ro, [&](int64_t r, int64_t, int64_t i, int64_t) {
      const double want = ref.rout[(size_t)(r * dim + i)];
      const float got = Get(ro, r, 0, i);
      const bool ok = !IsPoison(ro, r, 0, i) && (std::isnan(want) ? std::isnan(got) : (double)got == want);
      if (!ok) {
        std::ostringstream s;
        s.precision(10);
        s << "residual_out row " << r << " col " << i << ": got " << got << ", expected " << want;
        report(s.str());
      }
    });
  }
  if (bad > 0) ADD_FAILURE() << Describe(a) << (what.empty() ? "" : ", ") << what << ": " << bad << " bad elements"
                             << msgs.str();
  return bad;
}

// Runs a on ctx: the reference first (outputs may be inputs), then the op, then every check.
int64_t RunChecked(tn_context *ctx, const tn_op_args &a, const std::string &what = "") {
  const Ref ref = Reference(a);
  const tn_status st = tn_op_run(ctx, &a);
  EXPECT_EQ(st, TN_OK) << Describe(a) << ": " << tn_context_last_error(ctx);
  if (st != TN_OK) return 1;
  EXPECT_STREQ(tn_context_last_error(ctx), "");
  return CheckOutputs(a, ref, what);
}

// A context with the baseline kernels (TNORM_CPU_ISA=generic while it is created).
tn_context *GenericContext() {
  const char *old = getenv("TNORM_CPU_ISA");
  const std::string saved = old != nullptr ? old : "";
  setenv("TNORM_CPU_ISA", "generic", 1);
  tn_context *ctx = nullptr;
  EXPECT_EQ(tn_context_create(&ctx), TN_OK);
  if (old != nullptr)
    setenv("TNORM_CPU_ISA", saved.c_str(), 1);
  else
    unsetenv("TNORM_CPU_ISA");
  return ctx;
}

// The bytes of every element of view t, in order (for byte comparisons of two runs).
std::vector<unsigned char> ViewBytes(const tn_tensor &t) {
  std::vector<unsigned char> out;
  const size_t es = ESize(t.dtype);
  ForEachElement(t, [&](int64_t, int64_t, int64_t, int64_t e) {
    const unsigned char *p = (const unsigned char *)t.data + (size_t)e * es;
    out.insert(out.end(), p, p + es);
  });
  return out;
}

// Rounded to the dtype and back (the spec's round()).
float Round(tn_dtype dt, float v) { return tn_round_to(dt, v); }

// ------------------------------------------------------------------------------------------------
// The suite: per (x dtype, weight dtype). Each test loops over the shapes and modes it covers.
// ------------------------------------------------------------------------------------------------

struct Param {
  tn_dtype dt;
  tn_dtype wdt;
};

void PrintTo(const Param &p, std::ostream *os) { *os << tn_dtype_name(p.dt) << "_w_" << tn_dtype_name(p.wdt); }

std::string ParamName(const ::testing::TestParamInfo<Param> &info) {
  return std::string(tn_dtype_name(info.param.dt)) + "_w_" + tn_dtype_name(info.param.wdt);
}

const Param kParams[] = {{TN_F32, TN_F32}, {TN_F16, TN_F16}, {TN_F16, TN_F32}, {TN_BF16, TN_BF16}, {TN_BF16, TN_F32}};

class ModelOps : public ::testing::TestWithParam<Param> {
 protected:
  void SetUp() override {
    ASSERT_EQ(tn_context_create(&ctx_), TN_OK);
    dt_ = GetParam().dt;
    wdt_ = GetParam().wdt;
  }
  void TearDown() override { tn_context_destroy(ctx_); }

  // A weight of dim elements around `center` (1, or 0 for the Gemma form that adds 1), in the weight dtype.
  tn_tensor Weight(Mem &m, int64_t dim, double center = 1.0, double spread = 0.1) {
    m.Make(wdt_, dim);
    tn_tensor t = m.View(1, dim, dim);
    Fill(t, rng_, spread, center);
    return t;
  }

  tn_context *ctx_ = nullptr;
  tn_dtype dt_ = TN_F32, wdt_ = TN_F32;
  Rng rng_ = TestRng();
};

// ------------------------------------------------------------------------------------------------
// 3-D views: rms_norm (with weight, Gemma's offset, a multiplicand) and l2_norm (both conventions) on
// [rows, heads, dim] views with gaps after each head and each row; y with other strides, and in place.
// ------------------------------------------------------------------------------------------------

struct HeadShape {
  int64_t rows, heads, dim, head_gap, row_gap;
};
const HeadShape kHeadShapes[] = {{1, 2, 64, 0, 0}, {5, 8, 128, 3, 7}, {33, 4, 7, 1, 2}, {3, 3, 1, 2, 0},
                                 {300, 8, 128, 0, 0}, {17, 2, 640, 16, 1}};

TEST_P(ModelOps, HeadViews) {
  enum Form { kRms, kRmsW, kRmsGemma, kRmsWMul, kL2, kL2Max };
  for (const HeadShape &sh : kHeadShapes)
    for (Form form : {kRms, kRmsW, kRmsGemma, kRmsWMul, kL2, kL2Max})
      for (tn_casting casting : {TN_CASTING_EXACT, TN_CASTING_LLAMA})
        for (int in_place : {0, 1}) {
          Mem xm, ym, mm, wm;
          tn_tensor x = xm.MakeHeads(dt_, sh.rows, sh.heads, sh.dim, sh.head_gap, sh.row_gap);
          Fill(x, rng_, 1.0, 0.0, kRowScales);
          // y: its own gaps (other strides than x's), or x itself.
          tn_tensor y = in_place ? x : ym.MakeHeads(dt_, sh.rows, sh.heads, sh.dim, sh.head_gap + 2, sh.row_gap + 1);
          tn_op_args a = tn_op_args_init(form >= kL2 ? TN_OP_L2_NORM : TN_OP_RMS_NORM);
          a.x = &x;
          a.y = &y;
          a.casting = casting;
          tn_tensor w, m;
          if (form == kRmsW || form == kRmsWMul) w = Weight(wm, sh.dim);
          if (form == kRmsGemma) w = Weight(wm, sh.dim, 0.0, 0.5);
          if (form == kRmsW || form == kRmsWMul || form == kRmsGemma) {
            a.weight = &w;
            a.weight_offset = form == kRmsGemma ? 1.0f : 0.0f;
          }
          if (form == kRmsWMul) {
            m = mm.MakeHeads(dt_, sh.rows, sh.heads, sh.dim, sh.head_gap + 1, 3);
            Fill(m, rng_, 1.0);
            a.mul = &m;
          }
          if (form >= kL2) {
            a.scale = 0.37f;
            if (form == kL2Max) a.l2_mode = TN_L2_MAX_NORM_EPS;
          }
          const std::vector<unsigned char> x0 = xm.bytes, y0 = ym.bytes, m0 = mm.bytes;
          const std::string what = in_place ? "in place" : "separate y";
          if (RunChecked(ctx_, a, what) > 0) return;
          if (in_place) {
            OnlyViewsChanged(xm, x0, {x}, Describe(a) + ", in place: x's gaps");
          } else {
            EXPECT_TRUE(xm.bytes == x0) << Describe(a) << ": x changed";
            OnlyViewsChanged(ym, y0, {y}, Describe(a) + ": y's gaps");
          }
          EXPECT_TRUE(mm.bytes == m0) << Describe(a) << ": mul changed";
        }
}

// Each head of a 3-D call gives the bytes of the same vector normalised alone as a 2-D row.
TEST_P(ModelOps, HeadsEqualRowsAlone) {
  const int64_t rows = 9, heads = 6, dim = 96;
  for (tn_op op : {TN_OP_RMS_NORM, TN_OP_L2_NORM})
    for (tn_casting casting : {TN_CASTING_EXACT, TN_CASTING_LLAMA}) {
      Mem xm, ym, wm;
      tn_tensor x = xm.MakeHeads(dt_, rows, heads, dim, 5, 3), y = ym.MakeHeads(dt_, rows, heads, dim, 0, 0);
      Fill(x, rng_, 1.0, 0.0, kRowScales);
      tn_tensor w = Weight(wm, dim);
      tn_op_args a = tn_op_args_init(op);
      a.x = &x;
      a.y = &y;
      a.casting = casting;
      if (op == TN_OP_RMS_NORM) a.weight = &w;
      ASSERT_EQ(tn_op_run(ctx_, &a), TN_OK) << tn_context_last_error(ctx_);
      for (int64_t r = 0; r < rows; r++)
        for (int64_t h = 0; h < heads; h++) {
          Mem xr(dt_, dim), yr(dt_, dim);
          tn_tensor tx = xr.View(1, dim, dim), ty = yr.View(1, dim, dim);
          for (int64_t i = 0; i < dim; i++) Set(tx, 0, 0, i, Get(x, r, h, i));
          tn_op_args b = a;
          b.x = &tx;
          b.y = &ty;
          ASSERT_EQ(tn_op_run(ctx_, &b), TN_OK) << tn_context_last_error(ctx_);
          for (int64_t i = 0; i < dim; i++) {
            const float got = Get(y, r, h, i), want = Get(ty, 0, 0, i);
            ASSERT_EQ(memcmp(&got, &want, 4), 0) << Describe(a) << ": row " << r << " head " << h << " col " << i;
          }
        }
    }
}

// ------------------------------------------------------------------------------------------------
// A packed QKV buffer of a real config (32 query heads, 8 KV heads, head_dim 128): Q and K normalised in
// place with their own weights (Qwen3's q_norm / k_norm), and with the rope after them; V untouched.
// ------------------------------------------------------------------------------------------------

TEST_P(ModelOps, PackedQkv) {
  const int64_t hq = 32, hkv = 8, hd = 128, qkv = (hq + 2 * hkv) * hd;
  for (int64_t tokens : {(int64_t)1, (int64_t)19, (int64_t)64})
    for (tn_casting casting : {TN_CASTING_EXACT, TN_CASTING_LLAMA})
      for (int rope : {0, 1}) {
        SCOPED_TRACE("tokens " + std::to_string(tokens) + (rope ? ", rope NEOX theta 1e6" : ""));
        Mem buf(dt_, tokens * qkv), wqm, wkm;
        tn_tensor all = buf.View(tokens, qkv, qkv);
        Fill(all, rng_, 1.0, 0.0, kRowScales);
        tn_tensor q = buf.HeadView(tokens, hq, hd, qkv, hd, 0);
        tn_tensor k = buf.HeadView(tokens, hkv, hd, qkv, hd, hq * hd);
        tn_tensor v = buf.HeadView(tokens, hkv, hd, qkv, hd, (hq + hkv) * hd);
        tn_tensor wq = Weight(wqm, hd), wk = Weight(wkm, hd, 1.0, 0.3);
        std::vector<int32_t> pos((size_t)tokens);
        for (int64_t t = 0; t < tokens; t++) pos[(size_t)t] = (int32_t)(1000 + 7 * t);
        const std::vector<unsigned char> v0 = ViewBytes(v), before = buf.bytes;
        for (int which = 0; which < 2; which++) {
          tn_tensor *t = which == 0 ? &q : &k;
          tn_op_args a = tn_op_args_init(TN_OP_RMS_NORM);
          a.x = t;
          a.y = t;
          a.weight = which == 0 ? &wq : &wk;
          a.casting = casting;
          if (rope) {
            a.rope.style = TN_ROPE_NEOX;
            a.rope.positions = pos.data();
            a.rope.theta = 1e6f;
          }
          if (RunChecked(ctx_, a, which == 0 ? "Q in place" : "K in place") > 0) return;
        }
        EXPECT_TRUE(ViewBytes(v) == v0) << "the V part changed";
        OnlyViewsChanged(buf, before, {q, k}, "QKV outside Q and K");
      }
}

// ------------------------------------------------------------------------------------------------
// TN_CASTING_LLAMA: every norm against the reference, and bit for bit against the spec's roundings
// derived from the library's own EXACT output (which is round(x * inv) when there is no weight: the
// normalised value LLAMA rounds first).
// ------------------------------------------------------------------------------------------------

TEST_P(ModelOps, LlamaCasting) {
  enum Form { kRmsW, kRmsWMul, kRmsGemma, kL2, kAddRmsW, kLayerWB, kAddLayerWB };
  for (int64_t dim : {(int64_t)8, (int64_t)33, (int64_t)128, (int64_t)4096})
    for (Form form : {kRmsW, kRmsWMul, kRmsGemma, kL2, kAddRmsW, kLayerWB, kAddLayerWB}) {
      const int64_t rows = 24;
      const tn_op op = form == kL2 ? TN_OP_L2_NORM
                       : form == kAddRmsW ? TN_OP_ADD_RMS_NORM
                       : form == kLayerWB ? TN_OP_LAYER_NORM
                       : form == kAddLayerWB ? TN_OP_ADD_LAYER_NORM
                                             : TN_OP_RMS_NORM;
      const bool add = op == TN_OP_ADD_RMS_NORM || op == TN_OP_ADD_LAYER_NORM;
      const bool layer = op == TN_OP_LAYER_NORM || op == TN_OP_ADD_LAYER_NORM;
      Mem xm(dt_, rows * dim), rm(dt_, rows * dim), mm(dt_, rows * dim), wm, bm;
      tn_tensor x = xm.View(rows, dim, dim), res = rm.View(rows, dim, dim), m = mm.View(rows, dim, dim);
      Fill(x, rng_, 1.0, layer ? 0.5 : 0.0, kRowScales);
      Fill(res, rng_, 1.0);
      Fill(m, rng_, 1.0);
      tn_tensor w = form == kRmsGemma ? Weight(wm, dim, 0.0, 0.5) : Weight(wm, dim, 1.0, 0.3), b;
      if (layer) {
        bm.Make(wdt_, dim);
        b = bm.View(1, dim, dim);
        Fill(b, rng_, 0.5);
      }
      Mem ym(dt_, rows * dim), rom(dt_, rows * dim), y2m(dt_, rows * dim), ro2m(dt_, rows * dim);
      tn_tensor y = ym.View(rows, dim, dim), ro = rom.View(rows, dim, dim);
      tn_op_args a = tn_op_args_init(op);
      a.x = &x;
      a.y = &y;
      a.casting = TN_CASTING_LLAMA;
      if (op != TN_OP_L2_NORM) {
        a.weight = &w;
        a.weight_offset = form == kRmsGemma ? 1.0f : 0.0f;
      } else {
        a.scale = 0.37f;
      }
      if (form == kRmsWMul) a.mul = &m;
      if (layer) a.bias = &b;
      if (add) {
        a.residual = &res;
        a.residual_out = &ro;
      }
      if (RunChecked(ctx_, a) > 0) return;
      if (dt_ == TN_F32) {
        // Rounding to f32 is the identity: LLAMA is EXACT, bit for bit.
        tn_tensor y2 = y2m.View(rows, dim, dim), ro2 = ro2m.View(rows, dim, dim);
        tn_op_args e = a;
        e.casting = TN_CASTING_EXACT;
        e.y = &y2;
        if (add) e.residual_out = &ro2;
        ASSERT_EQ(tn_op_run(ctx_, &e), TN_OK) << tn_context_last_error(ctx_);
        EXPECT_TRUE(ym.bytes == y2m.bytes) << Describe(a) << ": f32 LLAMA differs from EXACT";
        continue;
      }
      // n = round(x * inv): the EXACT op with no weight, bias, multiplicand or scale.
      tn_tensor n = y2m.View(rows, dim, dim), ro2 = ro2m.View(rows, dim, dim);
      tn_op_args e = tn_op_args_init(op);
      e.x = &x;
      e.y = &n;
      if (add) {
        e.residual = &res;
        e.residual_out = &ro2;
      }
      ASSERT_EQ(tn_op_run(ctx_, &e), TN_OK) << tn_context_last_error(ctx_);
      int64_t bad = 0;
      for (int64_t r = 0; r < rows && bad < 3; r++)
        for (int64_t i = 0; i < dim && bad < 3; i++) {
          const float nv = Get(n, r, 0, i);
          float want;
          if (op == TN_OP_L2_NORM) {
            want = Round(dt_, nv * a.scale);
          } else {
            const float wv = Get(w, 0, 0, i) + a.weight_offset;  // the weight plus offset, in float32
            float t = nv * wv;
            if (a.mul) t *= Get(m, r, 0, i);
            if (layer) t += Get(b, 0, 0, i);
            want = Round(dt_, t);
          }
          const float got = Get(y, r, 0, i);
          if (memcmp(&got, &want, 4) != 0 && !(std::isnan(got) && std::isnan(want))) {
            ADD_FAILURE() << Describe(a) << ": row " << r << " col " << i << ": got " << got
                          << ", the spec's roundings give " << want << " (n = " << nv << ")";
            bad++;
          }
        }
      if (add) EXPECT_TRUE(rom.bytes == ro2m.bytes) << Describe(a) << ": residual_out depends on the casting";
    }
}

// ------------------------------------------------------------------------------------------------
// The f32 residual stream (residual and residual_out f32 beside f16/bf16 x) and the residual modes.
// ------------------------------------------------------------------------------------------------

TEST_P(ModelOps, ResidualStream) {
  const std::vector<tn_dtype> rdts = dt_ == TN_F32 ? std::vector<tn_dtype>{TN_F32} : std::vector<tn_dtype>{dt_, TN_F32};
  for (tn_op op : {TN_OP_ADD_RMS_NORM, TN_OP_ADD_LAYER_NORM})
    for (tn_dtype rdt : rdts)
      for (tn_residual_mode mode : {TN_RESIDUAL_NORM_STORED, TN_RESIDUAL_NORM_F32})
        for (tn_casting casting : {TN_CASTING_EXACT, TN_CASTING_LLAMA})
          for (int64_t dim : {(int64_t)1, (int64_t)31, (int64_t)512, (int64_t)2048})
            for (int in_place : {0, 1}) {
              const int64_t rows = 40, stride = dim + 3;
              Mem xm(dt_, rows * stride), rm(rdt, rows * stride), ym(dt_, rows * stride), rom(rdt, rows * stride),
                  wm, bm;
              tn_tensor x = xm.View(rows, dim, stride), res = rm.View(rows, dim, stride);
              Fill(x, rng_, 1.0, 0.0, kRowScales);
              Fill(res, rng_, 3.0);
              tn_tensor y = in_place ? x : ym.View(rows, dim, stride);
              tn_tensor ro = in_place ? res : rom.View(rows, dim, stride);
              tn_tensor w = Weight(wm, dim), b;
              tn_op_args a = tn_op_args_init(op);
              a.x = &x;
              a.residual = &res;
              a.y = &y;
              a.residual_out = &ro;
              a.weight = &w;
              a.residual_mode = mode;
              a.casting = casting;
              if (op == TN_OP_ADD_LAYER_NORM) {
                bm.Make(wdt_, dim);
                b = bm.View(1, dim, dim);
                Fill(b, rng_, 0.2);
                a.bias = &b;
              }
              const std::vector<unsigned char> x0 = xm.bytes, r0 = rm.bytes;
              if (RunChecked(ctx_, a, in_place ? "in place" : "") > 0) return;
              if (in_place) {
                OnlyViewsChanged(xm, x0, {x}, Describe(a) + ": x's gaps");
                OnlyViewsChanged(rm, r0, {res}, Describe(a) + ": residual's gaps");
              } else {
                OnlyViewsChanged(ym, std::vector<unsigned char>(ym.bytes.size(), 0xFF), {y}, Describe(a) + ": y gaps");
                OnlyViewsChanged(rom, std::vector<unsigned char>(rom.bytes.size(), 0xFF), {ro},
                                 Describe(a) + ": residual_out gaps");
                EXPECT_TRUE(xm.bytes == x0);
                EXPECT_TRUE(rm.bytes == r0);
              }
              // residual_out is float(x) + float(residual), rounded once to the residual's dtype, whatever the mode.
              if (!in_place)
                for (int64_t r = 0; r < rows; r++)
                  for (int64_t i = 0; i < dim; i++) {
                    const float want = Round(rdt, Get(x, r, 0, i) + Get(res, r, 0, i)), got = Get(ro, r, 0, i);
                    ASSERT_EQ(memcmp(&got, &want, 4), 0) << Describe(a) << ": residual_out row " << r << " col " << i;
                  }
            }
}

// With an x-dtype residual, NORM_STORED and NORM_F32 normalise different sums: on random rows some outputs
// differ, and each mode matches its own reference (checked above); with an f32 residual they are the same.
TEST_P(ModelOps, ResidualModesDiffer) {
  const int64_t rows = 64, dim = 256;
  for (tn_op op : {TN_OP_ADD_RMS_NORM, TN_OP_ADD_LAYER_NORM})
    for (tn_dtype rdt : {dt_, TN_F32}) {
      Mem xm(dt_, rows * dim), rm(rdt, rows * dim), y1(dt_, rows * dim), y2(dt_, rows * dim), r1(rdt, rows * dim),
          r2(rdt, rows * dim);
      tn_tensor x = xm.View(rows, dim, dim), res = rm.View(rows, dim, dim);
      Fill(x, rng_, 1.0);
      Fill(res, rng_, 1.0);
      tn_tensor ty1 = y1.View(rows, dim, dim), ty2 = y2.View(rows, dim, dim), tr1 = r1.View(rows, dim, dim),
                tr2 = r2.View(rows, dim, dim);
      tn_op_args a = tn_op_args_init(op);
      a.x = &x;
      a.residual = &res;
      a.y = &ty1;
      a.residual_out = &tr1;
      ASSERT_EQ(tn_op_run(ctx_, &a), TN_OK) << tn_context_last_error(ctx_);
      a.residual_mode = TN_RESIDUAL_NORM_F32;
      a.y = &ty2;
      a.residual_out = &tr2;
      ASSERT_EQ(tn_op_run(ctx_, &a), TN_OK) << tn_context_last_error(ctx_);
      EXPECT_TRUE(r1.bytes == r2.bytes) << "residual_out depends on the residual mode";
      if (rdt == TN_F32 || dt_ == TN_F32)
        EXPECT_TRUE(y1.bytes == y2.bytes) << Describe(a) << ": with a float32 sum the two modes are the same";
      else
        EXPECT_TRUE(y1.bytes != y2.bytes) << Describe(a) << ": the two modes gave the same bytes on random rows";
    }
}

// ------------------------------------------------------------------------------------------------
// l2_norm with TN_L2_MAX_NORM_EPS: random rows, rows whose norm is below eps, huge and tiny rows.
// ------------------------------------------------------------------------------------------------

TEST_P(ModelOps, L2MaxNormEps) {
  const int64_t rows = 7;
  for (int64_t dim : {(int64_t)1, (int64_t)3, (int64_t)64, (int64_t)1000}) {
    Mem xm(dt_, rows * dim), ym(dt_, rows * dim);
    tn_tensor x = xm.View(rows, dim, dim), y = ym.View(rows, dim, dim);
    tn_op_args a = tn_op_args_init(TN_OP_L2_NORM);
    a.x = &x;
    a.y = &y;
    a.l2_mode = TN_L2_MAX_NORM_EPS;
    a.eps = 1e-6f;
    for (float scale : {1.0f, -2.5f})
      for (tn_casting casting : {TN_CASTING_EXACT, TN_CASTING_LLAMA}) {
        a.scale = scale;
        a.casting = casting;
        Fill(x, rng_, 1.0, 0.0, kRowScales);
        // Row 2: norm about a tenth of eps; row 4: just below eps; row 6: zeros.
        const double tenth = 0.1e-6 / sqrt((double)dim);
        for (int64_t i = 0; i < dim; i++) {
          Set(x, 2, 0, i, (float)(tenth * rng_.Normal()));
          Set(x, 4, 0, i, (float)(0.5e-6 / sqrt((double)dim) * (i % 2 ? 1 : -1)));
          Set(x, 6, 0, i, 0.0f);
        }
        ym.Poison();
        if (RunChecked(ctx_, a) > 0) return;
        // Below eps the denominator is eps itself: y = x * (1 / eps) * scale, bit for bit (EXACT).
        if (casting == TN_CASTING_EXACT)
          for (int64_t i = 0; i < dim; i++) {
            const float want = Round(dt_, (Get(x, 2, 0, i) * (1.0f / a.eps)) * scale), got = Get(y, 2, 0, i);
            ASSERT_EQ(memcmp(&got, &want, 4), 0) << "row below eps, col " << i;
            ASSERT_EQ(Get(y, 6, 0, i), 0.0f) << "zero row, col " << i;
          }
      }
    // Huge rows (the sum of squares overflows float32) and tiny rows with eps 0 (it vanishes): rescaled.
    a.scale = 1.0f;
    a.casting = TN_CASTING_EXACT;
    for (int huge : {1, 0}) {
      const double mag = huge ? (dt_ == TN_F16 ? 1e4 : 1e30) : (dt_ == TN_F16 ? 1e-7 : 1e-30);
      Fill(x, rng_, mag);
      a.eps = huge ? 1e-6f : 0.0f;
      ym.Poison();
      if (RunChecked(ctx_, a, huge ? "huge rows" : "tiny rows, eps 0") > 0) return;
    }
    a.eps = 1e-6f;
  }
}

// ------------------------------------------------------------------------------------------------
// layer_norm and add_layer_norm: every weight and bias combination, strided views, in place.
// ------------------------------------------------------------------------------------------------

TEST_P(ModelOps, LayerNorm) {
  for (tn_op op : {TN_OP_LAYER_NORM, TN_OP_ADD_LAYER_NORM})
    for (int64_t dim : {(int64_t)1, (int64_t)2, (int64_t)7, (int64_t)16, (int64_t)17, (int64_t)64, (int64_t)127,
                        (int64_t)768, (int64_t)1024, (int64_t)5120})
      for (int wb = 0; wb < 4; wb++)
        for (int layout = 0; layout < 3; layout++) {  // contiguous, strided, in place
          const bool add = op == TN_OP_ADD_LAYER_NORM, has_w = wb & 1, has_b = wb & 2;
          const int64_t rows = dim >= 1024 ? 20 : 67, stride = layout == 1 ? dim + 5 : dim;
          Mem xm(dt_, rows * stride), rm(dt_, rows * stride), ym(dt_, rows * stride), rom(dt_, rows * stride), wm, bm;
          tn_tensor x = xm.View(rows, dim, stride), res = rm.View(rows, dim, stride);
          Fill(x, rng_, 1.0, 0.3, kRowScales);
          Fill(res, rng_, 1.0);
          tn_tensor y = layout == 2 ? x : ym.View(rows, dim, stride);
          tn_tensor ro = layout == 2 ? res : rom.View(rows, dim, stride);
          tn_tensor w = Weight(wm, dim), b;
          bm.Make(wdt_, dim);
          b = bm.View(1, dim, dim);
          Fill(b, rng_, 0.5);
          tn_op_args a = tn_op_args_init(op);
          a.x = &x;
          a.y = &y;
          a.eps = 1e-5f;
          if (has_w) a.weight = &w;
          if (has_b) a.bias = &b;
          if (add) {
            a.residual = &res;
            a.residual_out = &ro;
          }
          const std::vector<unsigned char> x0 = xm.bytes;
          if (RunChecked(ctx_, a, layout == 0 ? "contiguous" : layout == 1 ? "row_stride dim + 5" : "in place") > 0)
            return;
          if (layout == 1) {
            EXPECT_TRUE(xm.bytes == x0) << Describe(a) << ": x changed";
            OnlyViewsChanged(ym, std::vector<unsigned char>(ym.bytes.size(), 0xFF), {y}, Describe(a) + ": y gaps");
            if (add)
              OnlyViewsChanged(rom, std::vector<unsigned char>(rom.bytes.size(), 0xFF), {ro},
                               Describe(a) + ": residual_out gaps");
          }
        }
}

// The public entry points tn_layer_norm and tn_add_layer_norm give the descriptor's bytes.
TEST_P(ModelOps, LayerNormEntryPoints) {
  const int64_t rows = 5, dim = 300;
  Mem xm(dt_, rows * dim), rm(dt_, rows * dim), y1(dt_, rows * dim), y2(dt_, rows * dim), r1(dt_, rows * dim),
      r2(dt_, rows * dim), wm, bm;
  tn_tensor x = xm.View(rows, dim, dim), res = rm.View(rows, dim, dim);
  Fill(x, rng_);
  Fill(res, rng_);
  tn_tensor w = Weight(wm, dim), b = Weight(bm, dim, 0.0, 1.0);
  tn_tensor ty1 = y1.View(rows, dim, dim), ty2 = y2.View(rows, dim, dim), tr1 = r1.View(rows, dim, dim),
            tr2 = r2.View(rows, dim, dim);
  ASSERT_EQ(tn_layer_norm(ctx_, &x, &w, &b, 1e-5f, &ty1), TN_OK) << tn_context_last_error(ctx_);
  tn_op_args a = tn_op_args_init(TN_OP_LAYER_NORM);
  a.x = &x;
  a.weight = &w;
  a.bias = &b;
  a.eps = 1e-5f;
  a.y = &ty2;
  ASSERT_EQ(tn_op_run(ctx_, &a), TN_OK);
  EXPECT_TRUE(y1.bytes == y2.bytes);
  CheckOutputs(a, Reference(a));
  ASSERT_EQ(tn_add_layer_norm(ctx_, &x, &res, &w, &b, 1e-5f, &ty1, &tr1), TN_OK) << tn_context_last_error(ctx_);
  a.op = TN_OP_ADD_LAYER_NORM;
  a.residual = &res;
  a.residual_out = &tr2;
  ASSERT_EQ(tn_op_run(ctx_, &a), TN_OK);
  EXPECT_TRUE(y1.bytes == y2.bytes);
  EXPECT_TRUE(r1.bytes == r2.bytes);
}

// Special rows, each in the middle of a batch of 5: the other rows keep the bytes of a clean batch.
TEST_P(ModelOps, LayerNormSpecialRows) {
  const int64_t rows = 5, mid = 2;
  for (tn_op op : {TN_OP_LAYER_NORM, TN_OP_ADD_LAYER_NORM})
    for (int64_t dim : {(int64_t)1, (int64_t)7, (int64_t)128, (int64_t)4096}) {
      const bool add = op == TN_OP_ADD_LAYER_NORM;
      Mem xm(dt_, rows * dim), rm(dt_, rows * dim), ym(dt_, rows * dim), rom(dt_, rows * dim), wm, bm;
      tn_tensor x = xm.View(rows, dim, dim), res = rm.View(rows, dim, dim), y = ym.View(rows, dim, dim),
                ro = rom.View(rows, dim, dim);
      tn_tensor w = Weight(wm, dim), b = Weight(bm, dim, 0.0, 0.5);
      tn_op_args a = tn_op_args_init(op);
      a.x = &x;
      a.y = &y;
      a.weight = &w;
      a.bias = &b;
      a.eps = 1e-5f;
      if (add) {
        a.residual = &res;
        a.residual_out = &ro;
      }
      Fill(x, rng_, 1.0, 0.2);
      Fill(res, rng_, 0.5);
      if (add) memset(rm.bytes.data(), 0, rm.bytes.size());  // s = x exactly: the special rows are x's
      const std::vector<unsigned char> x0 = xm.bytes;
      ASSERT_EQ(RunChecked(ctx_, a, "clean batch"), 0);
      const std::vector<unsigned char> clean = ym.bytes;
      const size_t row_bytes = (size_t)dim * ESize(dt_);
      auto others_unchanged = [&](const std::string &what) {
        for (int64_t r = 0; r < rows; r++)
          if (r != mid)
            EXPECT_EQ(memcmp(ym.bytes.data() + r * row_bytes, clean.data() + r * row_bytes, row_bytes), 0)
                << Describe(a) << ", " << what << ": row " << r << " changed";
      };
      auto rerun = [&](const std::string &what, const std::function<void()> &change, float eps) {
        xm.bytes = x0;
        change();
        a.eps = eps;
        ym.Poison();
        rom.Poison();
        RunChecked(ctx_, a, what);
        if (eps == 1e-5f) others_unchanged(what);
        a.eps = 1e-5f;
      };
      // A constant row: var = 0, so y = b exactly (eps > 0); with eps = 0 it is 0 * Inf: NaN, as the reference.
      for (float c : {0.0f, 3.0f, -1.5e4f}) {
        rerun("constant row " + std::to_string(c),
              [&] {
                for (int64_t i = 0; i < dim; i++) Set(x, mid, 0, i, c);
              },
              1e-5f);
        for (int64_t i = 0; i < dim; i++) {
          const float got = Get(y, mid, 0, i), want = Round(dt_, Get(b, 0, 0, i));
          ASSERT_EQ(got, want) << "constant row: y must be the bias, col " << i;
        }
      }
      rerun(
          "constant row, eps 0",
          [&] {
            for (int64_t i = 0; i < dim; i++) Set(x, mid, 0, i, 2.0f);
          },
          0.0f);
      if (dim > 1) {
        // Huge rows (sum and sum of squares beyond float32 for f32/bf16; x^2 beyond f16 for f16) and tiny
        // rows with eps = 0 (the variance vanishes in float32): rescaled, right.
        const double huge = dt_ == TN_F16 ? 1e4 : 1e36, tiny = dt_ == TN_F16 ? 1e-6 : 1e-30;
        rerun(
            "huge row",
            [&] {
              for (int64_t i = 0; i < dim; i++) Set(x, mid, 0, i, (float)(huge * (0.5 + rng_.Uniform())));
            },
            1e-5f);
        for (int64_t i = 0; i < dim; i++) ASSERT_TRUE(std::isfinite(Get(y, mid, 0, i))) << "huge row, col " << i;
        rerun(
            "huge row with mixed signs",
            [&] {
              for (int64_t i = 0; i < dim; i++) Set(x, mid, 0, i, (float)(huge * rng_.Normal()));
            },
            1e-5f);
        rerun(
            "tiny row, eps 0",
            [&] {
              for (int64_t i = 0; i < dim; i++) Set(x, mid, 0, i, (float)(tiny * (1.0 + rng_.Normal())));
            },
            0.0f);
      }
      // NaN or Inf in a row: that row is NaN, no other row changes.
      for (float bad : {NAN, INFINITY, -INFINITY}) {
        rerun(std::string("non-finite ") + std::to_string(bad), [&] { Set(x, mid, 0, dim / 2, bad); }, 1e-5f);
        for (int64_t i = 0; i < dim; i++) ASSERT_TRUE(std::isnan(Get(y, mid, 0, i))) << "col " << i;
      }
    }
}

// ------------------------------------------------------------------------------------------------
// The rope after rms_norm: both styles, full and partial rotary_dim, cos/sin from an f32 table, a table in
// x's dtype, or theta; int32 and int64 positions; both castings; 3-D views and 2-D rows.
// ------------------------------------------------------------------------------------------------

enum TableKind { kTableF32, kTableXDtype, kTheta };
const int64_t kTableRows = 300;

// cos and sin of the spec's theta formula, as the table would hold them (rotary_dim / 2 of each).
void ThetaCosSin(float theta, int64_t rot, int64_t pos, float *cs) {
  const int64_t half = rot / 2;
  for (int64_t i = 0; i < half; i++) {
    const float inv_freq = (float)(1.0 / pow((double)theta, (double)(2 * i) / (double)rot));
    const float angle = (float)pos * inv_freq;
    cs[i] = (float)cos((double)angle);
    cs[half + i] = (float)sin((double)angle);
  }
}

struct RopeCase {
  tn_rope_style style;
  int64_t dim, rot;  // rot 0: dim
  TableKind table;
  int i64;
  tn_casting casting;
};

class RopeTest : public ModelOps {
 protected:
  // Builds x (3-D unless heads == 1), y (separate, own strides), positions and the table for c.
  void Build(const RopeCase &c, int64_t rows, int64_t heads, bool in_place) {
    x_ = xm_.MakeHeads(dt_, rows, heads, c.dim, 3, 5);
    Fill(x_, rng_, 1.0, 0.0, kRowScales);
    y_ = in_place ? x_ : ym_.MakeHeads(dt_, rows, heads, c.dim, 1, 2);
    w_ = Weight(wm_, c.dim);
    const int64_t rot = c.rot != 0 ? c.rot : c.dim, table_rows = kTableRows;
    pos32_.resize((size_t)rows);
    pos64_.resize((size_t)rows);
    for (int64_t r = 0; r < rows; r++) {
      pos64_[(size_t)r] = (int64_t)rng_.Below((uint64_t)table_rows);
      pos32_[(size_t)r] = (int32_t)pos64_[(size_t)r];
    }
    if (rows > 2) pos64_[1] = pos32_[1] = (int32_t)(table_rows - 1);  // the table's last row
    if (c.table != kTheta) {
      tm_.Make(c.table == kTableF32 ? TN_F32 : dt_, table_rows * (rot + 2));
      table_ = tm_.View(table_rows, rot, rot + 2);  // a strided table
      std::vector<float> cs((size_t)rot);
      for (int64_t p = 0; p < table_rows; p++) {
        ThetaCosSin(theta_, rot, p, cs.data());
        for (int64_t i = 0; i < rot; i++) Set(table_, p, 0, i, cs[(size_t)i]);
      }
    }
    a_ = tn_op_args_init(TN_OP_RMS_NORM);
    a_.x = &x_;
    a_.y = &y_;
    a_.weight = &w_;
    a_.casting = c.casting;
    a_.rope.style = c.style;
    a_.rope.rotary_dim = c.rot;
    a_.rope.positions_i64 = c.i64;
    a_.rope.positions = c.i64 ? (const void *)pos64_.data() : (const void *)pos32_.data();
    a_.rope.theta = theta_;
    a_.rope.cos_sin = c.table != kTheta ? &table_ : nullptr;
  }

  // cos and sin of row r, as the op reads them.
  void CosSinOf(int64_t r, int64_t rot, float *cs) {
    const int64_t pos = a_.rope.positions_i64 ? pos64_[(size_t)r] : pos32_[(size_t)r];
    if (a_.rope.cos_sin == nullptr) {
      ThetaCosSin(theta_, rot, pos, cs);
      return;
    }
    for (int64_t i = 0; i < rot; i++) cs[i] = Get(table_, pos, 0, i);
  }

  Mem xm_, ym_, wm_, tm_;
  tn_tensor x_, y_, w_, table_;
  std::vector<int32_t> pos32_;
  std::vector<int64_t> pos64_;
  float theta_ = 10000.0f;
  tn_op_args a_;
};

std::vector<RopeCase> RopeCases() {
  std::vector<RopeCase> cs;
  for (tn_rope_style style : {TN_ROPE_NEOX, TN_ROPE_GPTJ})
    for (int64_t dim : {(int64_t)128, (int64_t)64, (int64_t)6, (int64_t)512})
      for (int partial : {0, 1})
        for (TableKind table : {kTableF32, kTableXDtype, kTheta})
          for (tn_casting casting : {TN_CASTING_EXACT, TN_CASTING_LLAMA}) {
            const int64_t rot = !partial ? 0 : dim == 128 ? 64 : dim == 6 ? 2 : dim / 4;
            cs.push_back({style, dim, rot, table, (int)(cs.size() % 2), casting});
          }
  return cs;
}

TEST_P(RopeTest, AgainstReference) {
  for (const RopeCase &c : RopeCases())
    for (int in_place : {0, 1}) {
      const int64_t heads = c.dim == 512 ? 2 : 4;
      Build(c, 11, heads, in_place);
      const std::vector<unsigned char> x0 = xm_.bytes, y0 = ym_.bytes;
      if (RunChecked(ctx_, a_, in_place ? "in place" : "") > 0) return;
      if (in_place)
        OnlyViewsChanged(xm_, x0, {x_}, Describe(a_) + ": x's gaps");
      else
        OnlyViewsChanged(ym_, y0, {y_}, Describe(a_) + ": y's gaps");
    }
}

// Bit for bit from the library's own rms_norm output A (the normalised, weighted head: unrounded in f32,
// rounded to the dtype under LLAMA), through the spec's rotation: EXACT f32 a' = a c - b s in float32;
// LLAMA f16/bf16 a' = round(round(a c) + round(-b s)). Elements from rotary_dim on are A itself.
TEST_P(RopeTest, RotationOfTheNormBitForBit) {
  for (const RopeCase &c : RopeCases()) {
    if (c.casting == TN_CASTING_EXACT && dt_ != TN_F32) continue;  // the unrounded A is not observable
    const int64_t rows = 6, heads = 3;
    Build(c, rows, heads, false);
    ASSERT_EQ(tn_op_run(ctx_, &a_), TN_OK) << tn_context_last_error(ctx_);
    Mem am;
    tn_tensor A = am.MakeHeads(dt_, rows, heads, c.dim, 0, 0);
    tn_op_args p = a_;
    p.rope.style = TN_ROPE_NONE;
    p.rope.cos_sin = nullptr;
    p.y = &A;
    ASSERT_EQ(tn_op_run(ctx_, &p), TN_OK) << tn_context_last_error(ctx_);
    const int64_t rot = c.rot != 0 ? c.rot : c.dim, half = rot / 2;
    std::vector<float> cs((size_t)rot);
    for (int64_t r = 0; r < rows; r++) {
      CosSinOf(r, rot, cs.data());
      for (int64_t h = 0; h < heads; h++) {
        std::vector<float> want((size_t)c.dim);
        for (int64_t i = 0; i < c.dim; i++) want[(size_t)i] = Get(A, r, h, i);
        for (int64_t i = 0; i < half; i++) {
          const int64_t ia = c.style == TN_ROPE_GPTJ ? 2 * i : i, ib = c.style == TN_ROPE_GPTJ ? 2 * i + 1 : i + half;
          const float va = Get(A, r, h, ia), vb = Get(A, r, h, ib), co = cs[(size_t)i], si = cs[(size_t)(half + i)];
          if (dt_ == TN_F32) {
            want[(size_t)ia] = va * co - vb * si;
            want[(size_t)ib] = vb * co + va * si;
          } else {
            want[(size_t)ia] = Round(dt_, Round(dt_, va * co) + Round(dt_, (-vb) * si));
            want[(size_t)ib] = Round(dt_, Round(dt_, vb * co) + Round(dt_, va * si));
          }
        }
        for (int64_t i = 0; i < c.dim; i++) {
          const float got = Get(y_, r, h, i), w = want[(size_t)i];
          ASSERT_EQ(memcmp(&got, &w, 4), 0) << Describe(a_) << ": row " << r << " head " << h << " col " << i
                                            << ": got " << got << ", want " << w;
        }
      }
    }
  }
}

// Computed from theta, the angles are those of a table built with the spec's formula: the same bytes. The
// two position widths give the same bytes. A 2-D view rotates its rows (one position each).
TEST_P(RopeTest, ThetaTablePositionsAndRows) {
  for (tn_rope_style style : {TN_ROPE_NEOX, TN_ROPE_GPTJ})
    for (tn_casting casting : {TN_CASTING_EXACT, TN_CASTING_LLAMA}) {
      const RopeCase c{style, 128, 0, kTableF32, 0, casting};
      Build(c, 9, 8, false);
      ASSERT_EQ(tn_op_run(ctx_, &a_), TN_OK) << tn_context_last_error(ctx_);
      const std::vector<unsigned char> with_table = ViewBytes(y_);
      a_.rope.cos_sin = nullptr;
      ym_.Poison();
      ASSERT_EQ(tn_op_run(ctx_, &a_), TN_OK) << tn_context_last_error(ctx_);
      EXPECT_TRUE(ViewBytes(y_) == with_table) << Describe(a_) << ": theta and its table differ";
      a_.rope.positions_i64 = 1;
      a_.rope.positions = pos64_.data();
      ym_.Poison();
      ASSERT_EQ(tn_op_run(ctx_, &a_), TN_OK) << tn_context_last_error(ctx_);
      EXPECT_TRUE(ViewBytes(y_) == with_table) << Describe(a_) << ": int64 positions differ from int32";
      if (casting == TN_CASTING_EXACT) {  // the entry point's casting
        ym_.Poison();
        ASSERT_EQ(tn_rms_norm_rope(ctx_, &x_, &w_, 0.0f, a_.eps, &a_.rope, &y_), TN_OK) << tn_context_last_error(ctx_);
        EXPECT_TRUE(ViewBytes(y_) == with_table) << "tn_rms_norm_rope differs";
      }
      // Head h of row r as row r * heads + h of a 2-D view, with positions repeated per head.
      const int64_t rows = x_.rows, heads = x_.heads, dim = x_.dim;
      Mem x2m(dt_, rows * heads * dim), y2m(dt_, rows * heads * dim);
      tn_tensor x2 = x2m.View(rows * heads, dim, dim), y2 = y2m.View(rows * heads, dim, dim);
      std::vector<int32_t> pos2((size_t)(rows * heads));
      for (int64_t r = 0; r < rows; r++)
        for (int64_t h = 0; h < heads; h++) {
          pos2[(size_t)(r * heads + h)] = pos32_[(size_t)r];
          for (int64_t i = 0; i < dim; i++) Set(x2, r * heads + h, 0, i, Get(x_, r, h, i));
        }
      tn_op_args b = a_;
      b.x = &x2;
      b.y = &y2;
      b.rope.positions_i64 = 0;
      b.rope.positions = pos2.data();
      ASSERT_EQ(tn_op_run(ctx_, &b), TN_OK) << tn_context_last_error(ctx_);
      EXPECT_TRUE(y2m.bytes == with_table) << Describe(a_) << ": a 2-D view of the heads differs";
    }
}

// Elements from rotary_dim on are the plain rms_norm's, bit for bit.
TEST_P(RopeTest, PartialRotaryPassesThrough) {
  for (tn_casting casting : {TN_CASTING_EXACT, TN_CASTING_LLAMA})
    for (tn_rope_style style : {TN_ROPE_NEOX, TN_ROPE_GPTJ}) {
      const RopeCase c{style, 128, 64, kTheta, 1, casting};
      Build(c, 13, 4, false);
      ASSERT_EQ(tn_op_run(ctx_, &a_), TN_OK) << tn_context_last_error(ctx_);
      Mem pm;
      tn_tensor plain = pm.MakeHeads(dt_, 13, 4, 128, 0, 0);
      tn_op_args p = a_;
      p.rope.style = TN_ROPE_NONE;
      p.y = &plain;
      ASSERT_EQ(tn_op_run(ctx_, &p), TN_OK);
      for (int64_t r = 0; r < 13; r++)
        for (int64_t h = 0; h < 4; h++)
          for (int64_t i = 64; i < 128; i++) {
            const float got = Get(y_, r, h, i), want = Get(plain, r, h, i);
            ASSERT_EQ(memcmp(&got, &want, 4), 0) << Describe(a_) << ": row " << r << " head " << h << " col " << i;
          }
    }
}

// A table position outside [0, rows): TN_ERR_VALUE naming the row and the position; nothing written, even
// where other rows' positions are fine (all are checked before any row runs). In place, x is unchanged.
TEST_P(RopeTest, PositionOutsideTheTable) {
  for (int i64 : {0, 1})
    for (int64_t bad : {kTableRows, (int64_t)-1, (int64_t)1 << 40})
      for (int in_place : {0, 1}) {
        if (!i64 && bad > INT32_MAX) continue;
        const RopeCase c{TN_ROPE_NEOX, 64, 0, kTableF32, i64, TN_CASTING_EXACT};
        Build(c, 200, 8, in_place);
        pos32_[150] = (int32_t)bad;
        pos64_[150] = bad;
        const std::vector<unsigned char> x0 = xm_.bytes, y0 = ym_.bytes;
        EXPECT_EQ(tn_op_validate(ctx_, &a_), TN_OK) << "the host cannot know positions at validation";
        EXPECT_EQ(tn_op_run(ctx_, &a_), TN_ERR_VALUE);
        const std::string msg = tn_context_last_error(ctx_);
        EXPECT_NE(msg.find("row 150"), std::string::npos) << msg;
        EXPECT_NE(msg.find("position " + std::to_string(bad)), std::string::npos) << msg;
        EXPECT_EQ(msg.find('\n'), std::string::npos) << "one line: " << msg;
        EXPECT_TRUE(xm_.bytes == x0) << "x written on error";
        EXPECT_TRUE(ym_.bytes == y0) << "y written on error";
        // Theta needs no table: any position is an angle.
        a_.rope.cos_sin = nullptr;
        EXPECT_EQ(tn_op_run(ctx_, &a_), TN_OK) << tn_context_last_error(ctx_);
      }
}

// ------------------------------------------------------------------------------------------------
// Batch invariance (a row gives the same bytes alone and anywhere in batches of 7, 64 and 300, with 1 to
// 3 threads) and the baseline kernels (TNORM_CPU_ISA=generic) giving the same bytes as this CPU's.
// ------------------------------------------------------------------------------------------------

struct InvarianceCase {
  const char *name;
  std::function<void(tn_op_args &, int64_t rows)> setup;  // sets a (op, views over the buffers) for rows
};

class Invariance : public ModelOps {
 protected:
  // Buffers for up to 300 rows of `heads` x dim; the views of a call cover the first rows.
  void Make(tn_op op, int64_t heads, int64_t dim, tn_dtype rdt, bool bias, bool rope, tn_casting casting) {
    const int64_t n = 300;
    heads_ = heads;
    dim_ = dim;
    xm_.Make(dt_, n * heads * dim);
    rm_.Make(rdt, n * dim);
    ym_.Make(dt_, n * heads * dim);
    rom_.Make(rdt, n * dim);
    x_ = Views(xm_, n);
    Fill(x_, rng_, 1.0, 0.2, kRowScales);
    res_ = rm_.View(n, dim, dim);
    Fill(res_, rng_);
    w_ = Weight(wm_, dim);
    bm_.Make(wdt_, dim);
    b_ = bm_.View(1, dim, dim);
    Fill(b_, rng_, 0.3);
    pos_.resize(n);
    for (auto &p : pos_) p = (int32_t)rng_.Below(100000);
    a_ = tn_op_args_init(op);
    a_.weight = &w_;
    a_.casting = casting;
    if (bias) a_.bias = &b_;
    if (op == TN_OP_ADD_RMS_NORM || op == TN_OP_ADD_LAYER_NORM) {
      a_.residual = &res_;
      a_.residual_out = &rout_;
      a_.residual_mode = TN_RESIDUAL_NORM_F32;
    }
    if (rope) {
      a_.rope.style = TN_ROPE_NEOX;
      a_.rope.theta = 1e6f;
    }
  }
  tn_tensor Views(Mem &m, int64_t rows, int64_t first = 0) {
    return heads_ > 1 ? m.HeadView(rows, heads_, dim_, heads_ * dim_, dim_, first * heads_ * dim_)
                      : m.View(rows, dim_, dim_, first * dim_);
  }
  // Runs rows [first, first + rows) as one call; returns y's and residual_out's bytes of those rows.
  std::vector<unsigned char> Run(tn_context *ctx, int64_t first, int64_t rows) {
    tn_tensor x = Views(xm_, rows, first), y = Views(ym_, rows, first);
    tn_tensor res = rm_.View(rows, dim_, dim_, first * dim_), ro = rom_.View(rows, dim_, dim_, first * dim_);
    tn_op_args a = a_;
    a.x = &x;
    a.y = &y;
    if (a.residual) {
      a.residual = &res;
      a.residual_out = &ro;
    }
    a.rope.positions = pos_.data() + first;
    EXPECT_EQ(tn_op_run(ctx, &a), TN_OK) << tn_context_last_error(ctx);
    std::vector<unsigned char> out = ViewBytes(y);
    if (a.residual_out) {
      const std::vector<unsigned char> r = ViewBytes(ro);
      out.insert(out.end(), r.begin(), r.end());
    }
    return out;
  }
  void Check(const std::string &what) {
    SCOPED_TRACE(what);
    // Each of the first 300 rows alone.
    std::vector<std::vector<unsigned char>> alone(300);
    for (int64_t r = 0; r < 300; r++) alone[(size_t)r] = Run(ctx_, r, 1);
    for (int64_t batch : {(int64_t)7, (int64_t)64, (int64_t)300})
      for (int threads : {1, 2, 3}) {
        ASSERT_EQ(tn_context_set_num_threads(ctx_, threads), TN_OK);
        for (int64_t first : {(int64_t)0, (300 - batch) / 2}) {
          const std::vector<unsigned char> got = Run(ctx_, first, batch);
          const size_t ybytes = (size_t)(heads_ * dim_) * ESize(dt_);
          const size_t rbytes = a_.residual ? (size_t)dim_ * ESize(rm_.dt) : 0;
          for (int64_t r = 0; r < batch; r++) {
            const std::vector<unsigned char> &want = alone[(size_t)(first + r)];
            ASSERT_EQ(memcmp(got.data() + (size_t)r * ybytes, want.data(), ybytes), 0)
                << "y of row " << first + r << " in a batch of " << batch << " with " << threads << " threads";
            if (rbytes)
              ASSERT_EQ(memcmp(got.data() + (size_t)batch * ybytes + (size_t)r * rbytes, want.data() + ybytes, rbytes),
                        0)
                  << "residual_out of row " << first + r << " in a batch of " << batch;
          }
        }
      }
    ASSERT_EQ(tn_context_set_num_threads(ctx_, 0), TN_OK);
    // The baseline kernels: the same bytes.
    const std::vector<unsigned char> mine = Run(ctx_, 0, 300);
    tn_context *generic = GenericContext();
    EXPECT_TRUE(Run(generic, 0, 300) == mine) << "the baseline (generic) kernels differ";
    tn_context_destroy(generic);
  }

  Mem xm_, rm_, ym_, rom_, wm_, bm_;
  tn_tensor x_, res_, rout_, w_, b_;
  std::vector<int32_t> pos_;
  int64_t heads_ = 1, dim_ = 1;
  tn_op_args a_;
};

TEST_P(Invariance, LayerNorm) {
  for (int64_t dim : {(int64_t)33, (int64_t)768}) {
    Make(TN_OP_LAYER_NORM, 1, dim, dt_, true, false, TN_CASTING_EXACT);
    Check("layer_norm dim " + std::to_string(dim));
    Make(TN_OP_ADD_LAYER_NORM, 1, dim, TN_F32, true, false, TN_CASTING_LLAMA);
    Check("add_layer_norm f32 residual, LLAMA, dim " + std::to_string(dim));
  }
}

TEST_P(Invariance, RopeAndHeads) {
  Make(TN_OP_RMS_NORM, 8, 128, dt_, false, true, TN_CASTING_EXACT);
  Check("rms_norm rope, 8 heads of 128");
  Make(TN_OP_RMS_NORM, 4, 64, dt_, false, true, TN_CASTING_LLAMA);
  Check("rms_norm rope LLAMA, 4 heads of 64");
  Make(TN_OP_L2_NORM, 4, 100, dt_, false, false, TN_CASTING_EXACT);
  a_.weight = nullptr;
  a_.l2_mode = TN_L2_MAX_NORM_EPS;
  Check("l2_norm MAX_NORM_EPS, 4 heads of 100");
  Make(TN_OP_ADD_RMS_NORM, 1, 1000, TN_F32, false, false, TN_CASTING_LLAMA);
  Check("add_rms_norm f32 residual, LLAMA");
}

// Large calls (outputs of 16 MiB and more take the streamed-store path): every thread count and the baseline
// kernels give the same bytes, and the result matches the reference.
TEST_P(Invariance, LargeCalls) {
  struct Big {
    tn_op op;
    int64_t rows, heads, dim;
    bool rope;
  };
  const int64_t k = dt_ == TN_F32 ? 1 : 2;  // half the bytes per element: twice the rows for the same size
  for (Big big : {Big{TN_OP_LAYER_NORM, 1100 * k, 1, 4096, false}, Big{TN_OP_RMS_NORM, 2100 * k, 16, 128, true}}) {
    Mem xm(dt_, big.rows * big.heads * big.dim), ym(dt_, big.rows * big.heads * big.dim), wm, bm;
    heads_ = big.heads;
    dim_ = big.dim;
    tn_tensor x = Views(xm, big.rows), y = Views(ym, big.rows);
    Fill(x, rng_, 1.0, 0.1);
    tn_tensor w = Weight(wm, big.dim), b = Weight(bm, big.dim, 0.0, 0.5);
    std::vector<int32_t> pos((size_t)big.rows);
    for (auto &p : pos) p = (int32_t)rng_.Below(8192);
    tn_op_args a = tn_op_args_init(big.op);
    a.x = &x;
    a.y = &y;
    a.weight = &w;
    a.casting = TN_CASTING_LLAMA;
    if (big.op == TN_OP_LAYER_NORM) a.bias = &b;
    if (big.rope) {
      a.rope.style = TN_ROPE_GPTJ;
      a.rope.positions = pos.data();
      a.rope.theta = 10000.0f;
    }
    ASSERT_EQ(tn_op_run(ctx_, &a), TN_OK) << tn_context_last_error(ctx_);
    // Against the reference: the first, a middle and the last 40 rows (a row's result depends on it alone).
    for (int64_t from : {(int64_t)0, big.rows / 2, big.rows - 40}) {
      tn_tensor xs = Views(xm, 40, from), ys = Views(ym, 40, from);
      tn_op_args s = a;
      s.x = &xs;
      s.y = &ys;
      s.rope.positions = pos.data() + from;
      ASSERT_EQ(CheckOutputs(s, Reference(s), "large call, rows from " + std::to_string(from)), 0);
    }
    const std::vector<unsigned char> first = ym.bytes;
    for (int threads : {1, 3}) {
      ASSERT_EQ(tn_context_set_num_threads(ctx_, threads), TN_OK);
      ym.Poison();
      ASSERT_EQ(tn_op_run(ctx_, &a), TN_OK);
      EXPECT_TRUE(ym.bytes == first) << Describe(a) << ": " << threads << " threads";
    }
    ASSERT_EQ(tn_context_set_num_threads(ctx_, 0), TN_OK);
    tn_context *generic = GenericContext();
    ym.Poison();
    ASSERT_EQ(tn_op_run(generic, &a), TN_OK);
    EXPECT_TRUE(ym.bytes == first) << Describe(a) << ": the baseline kernels differ";
    tn_context_destroy(generic);
  }
}

INSTANTIATE_TEST_SUITE_P(Models, ModelOps, ::testing::ValuesIn(kParams), ParamName);
INSTANTIATE_TEST_SUITE_P(Models, RopeTest, ::testing::ValuesIn(kParams), ParamName);
INSTANTIATE_TEST_SUITE_P(Models, Invariance, ::testing::ValuesIn(kParams), ParamName);

// ------------------------------------------------------------------------------------------------
// Hand-derived values: the library against the spec's formula evaluated here in float32, on rows short
// enough (dim <= 16) that the 16-lane reduction is one element per lane and its tree is written out below.
// ------------------------------------------------------------------------------------------------

// The library's sum of squares for dim <= 16: lane k holds x_k^2, the lanes are summed as a binary tree.
float TreeSumSquares(const std::vector<float> &v) {
  float acc[16] = {0};
  for (size_t k = 0; k < v.size(); k++) acc[k] = v[k] * v[k];
  for (int width = 8; width > 0; width /= 2)
    for (int k = 0; k < width; k++) acc[k] += acc[k + width];
  return acc[0];
}

float RmsInv(const std::vector<float> &v, float eps) {
  return 1.0f / sqrtf(TreeSumSquares(v) / (float)v.size() + eps);
}

// Runs rms_norm of one row (x's dtype dt, weight f32) with the casting; returns y as floats.
std::vector<float> RmsRow(tn_dtype dt, const std::vector<float> &xs, const std::vector<float> &ws, float eps,
                          tn_casting casting) {
  const int64_t dim = (int64_t)xs.size();
  Mem xm(dt, dim), ym(dt, dim), wm(TN_F32, dim);
  tn_tensor x = xm.View(1, dim, dim), y = ym.View(1, dim, dim), w = wm.View(1, dim, dim);
  for (int64_t i = 0; i < dim; i++) {
    Set(x, 0, 0, i, xs[(size_t)i]);
    Set(w, 0, 0, i, ws[(size_t)i]);
  }
  tn_context *ctx;
  EXPECT_EQ(tn_context_create(&ctx), TN_OK);
  tn_op_args a = tn_op_args_init(TN_OP_RMS_NORM);
  a.x = &x;
  a.y = &y;
  a.weight = &w;
  a.eps = eps;
  a.casting = casting;
  EXPECT_EQ(tn_op_run(ctx, &a), TN_OK) << tn_context_last_error(ctx);
  tn_context_destroy(ctx);
  std::vector<float> out((size_t)dim);
  for (int64_t i = 0; i < dim; i++) out[(size_t)i] = Get(y, 0, 0, i);
  return out;
}

// A row and a weight where one rounding (EXACT) and two (LLAMA: n rounded to the dtype, then n * w rounded)
// give different values: x = (3, 4), eps 0, so inv = 1 / sqrt(12.5) and n = (3 inv, 4 inv); the weight is
// searched among f32 values near 1 for one that separates the two. Each mode must give its own value.
TEST(ModelHand, LlamaDoubleRoundingDiffers) {
  for (tn_dtype dt : {TN_BF16, TN_F16}) {
    const std::vector<float> xs = {3.0f, 4.0f};
    const float inv = RmsInv(xs, 0.0f);
    ASSERT_EQ(inv, 1.0f / sqrtf(12.5f));
    const float n0 = 3.0f * inv, n0_rounded = Round(dt, n0);
    ASSERT_NE(n0, n0_rounded) << "n must not be exact in the dtype";
    float w = 0;
    for (int k = 1; k < 20000 && w == 0; k++) {
      const float cand = 1.0f + (float)k * 0x1p-14f;
      if (Round(dt, n0 * cand) != Round(dt, n0_rounded * cand)) w = cand;
    }
    ASSERT_NE(w, 0.0f) << "no separating weight found";
    const float want_exact = Round(dt, n0 * w), want_llama = Round(dt, n0_rounded * w);
    ASSERT_NE(want_exact, want_llama);
    const std::vector<float> ws = {w, 1.0f};
    const std::vector<float> exact = RmsRow(dt, xs, ws, 0.0f, TN_CASTING_EXACT);
    const std::vector<float> llama = RmsRow(dt, xs, ws, 0.0f, TN_CASTING_LLAMA);
    EXPECT_EQ(exact[0], want_exact) << tn_dtype_name(dt) << " EXACT, w = " << w;
    EXPECT_EQ(llama[0], want_llama) << tn_dtype_name(dt) << " LLAMA, w = " << w;
    EXPECT_EQ(exact[1], Round(dt, 4.0f * inv)) << tn_dtype_name(dt);
    EXPECT_EQ(llama[1], Round(dt, 4.0f * inv)) << tn_dtype_name(dt) << ": with w = 1 the roundings agree";
    // And the reference, which models the two roundings, agrees with both within its tolerance.
    Mem xm(dt, 2), ym(dt, 2), wm(TN_F32, 2);
    tn_tensor x = xm.View(1, 2, 2), y = ym.View(1, 2, 2), tw = wm.View(1, 2, 2);
    for (int i = 0; i < 2; i++) {
      Set(x, 0, 0, i, xs[(size_t)i]);
      Set(tw, 0, 0, i, ws[(size_t)i]);
    }
    tn_op_args a = tn_op_args_init(TN_OP_RMS_NORM);
    a.x = &x;
    a.y = &y;
    a.weight = &tw;
    a.eps = 0.0f;
    for (tn_casting casting : {TN_CASTING_EXACT, TN_CASTING_LLAMA}) {
      a.casting = casting;
      const Ref ref = Reference(a);
      const float got = casting == TN_CASTING_EXACT ? want_exact : want_llama;
      EXPECT_LE(tn_reference_error_slack(dt, got, ref.y[0], ref.slack[0]), 1.0) << "reference, casting " << casting;
    }
  }
}

// The residual modes on a hand-made f16 row where they differ: x = (1.5, 1.5), residual (d, -d) with
// d = 2^-11 - 2^-20, below half an ulp of 1.5 (2^-11): the stored sum is (1.5, 1.5), which normalises to
// (1, 1); the float32 sum (1.5 + d, 1.5 - d) normalises to about (1 + d / 1.5, 1 - d / 1.5), and below 1 the
// f16 spacing halves, so the second is 1 - 2^-11 (a third of an ulp from the midpoint, not a close call).
TEST(ModelHand, ResidualModes) {
  const tn_dtype dt = TN_F16;
  const float d = 0x1p-11f - 0x1p-20f;
  const std::vector<float> xs = {1.5f, 1.5f}, rs = {d, -d};
  const int64_t dim = 2;
  Mem xm(dt, dim), rm(dt, dim), ym(dt, dim), rom(dt, dim);
  tn_tensor x = xm.View(1, dim, dim), res = rm.View(1, dim, dim), y = ym.View(1, dim, dim), ro = rom.View(1, dim, dim);
  for (int64_t i = 0; i < dim; i++) {
    Set(x, 0, 0, i, xs[(size_t)i]);
    Set(res, 0, 0, i, rs[(size_t)i]);
    ASSERT_EQ(Get(res, 0, 0, i), rs[(size_t)i]) << "the residual must be exact in f16";
  }
  tn_context *ctx;
  ASSERT_EQ(tn_context_create(&ctx), TN_OK);
  tn_op_args a = tn_op_args_init(TN_OP_ADD_RMS_NORM);
  a.x = &x;
  a.residual = &res;
  a.y = &y;
  a.residual_out = &ro;
  a.eps = 1e-6f;
  std::vector<float> sums(dim);
  for (int64_t i = 0; i < dim; i++) sums[(size_t)i] = xs[(size_t)i] + rs[(size_t)i];
  std::vector<float> stored(dim);
  for (int64_t i = 0; i < dim; i++) stored[(size_t)i] = Round(dt, sums[(size_t)i]);
  const float inv_stored = RmsInv(stored, a.eps), inv_f32 = RmsInv(sums, a.eps);
  std::vector<float> want_stored(dim), want_f32(dim);
  for (int64_t i = 0; i < dim; i++) {
    want_stored[(size_t)i] = Round(dt, stored[(size_t)i] * inv_stored);
    want_f32[(size_t)i] = Round(dt, sums[(size_t)i] * inv_f32);
  }
  ASSERT_EQ(stored, std::vector<float>({1.5f, 1.5f}));
  ASSERT_EQ(want_stored, std::vector<float>({1.0f, 1.0f}));
  ASSERT_EQ(want_f32, std::vector<float>({1.0f, 1.0f - 0x1p-11f}));
  for (tn_residual_mode mode : {TN_RESIDUAL_NORM_STORED, TN_RESIDUAL_NORM_F32}) {
    a.residual_mode = mode;
    ym.Poison();
    rom.Poison();
    ASSERT_EQ(tn_op_run(ctx, &a), TN_OK) << tn_context_last_error(ctx);
    for (int64_t i = 0; i < dim; i++) {
      EXPECT_EQ(Get(ro, 0, 0, i), stored[(size_t)i]) << "residual_out col " << i;
      EXPECT_EQ(Get(y, 0, 0, i), (mode == TN_RESIDUAL_NORM_STORED ? want_stored : want_f32)[(size_t)i])
          << "mode " << mode << " col " << i;
    }
  }
  tn_context_destroy(ctx);
}

// l2_norm's two conventions on (3e-7, 4e-7) with eps 1e-6: the norm 5e-7 is below eps, so MAX_NORM_EPS
// divides by eps (y = x * 1e6), and RSQRT_EPS by sqrt(2.5e-13 + 1e-6).
TEST(ModelHand, L2Conventions) {
  const std::vector<float> xs = {3e-7f, 4e-7f};
  Mem xm(TN_F32, 2), ym(TN_F32, 2);
  tn_tensor x = xm.View(1, 2, 2), y = ym.View(1, 2, 2);
  Set(x, 0, 0, 0, xs[0]);
  Set(x, 0, 0, 1, xs[1]);
  tn_context *ctx;
  ASSERT_EQ(tn_context_create(&ctx), TN_OK);
  tn_op_args a = tn_op_args_init(TN_OP_L2_NORM);
  a.x = &x;
  a.y = &y;
  a.eps = 1e-6f;
  const float sum = TreeSumSquares(xs);
  a.l2_mode = TN_L2_MAX_NORM_EPS;
  ASSERT_EQ(tn_op_run(ctx, &a), TN_OK);
  ASSERT_LT(sqrtf(sum), a.eps);
  EXPECT_EQ(Get(y, 0, 0, 0), xs[0] * (1.0f / a.eps));
  EXPECT_EQ(Get(y, 0, 0, 1), xs[1] * (1.0f / a.eps));
  a.l2_mode = TN_L2_RSQRT_EPS;
  ASSERT_EQ(tn_op_run(ctx, &a), TN_OK);
  EXPECT_EQ(Get(y, 0, 0, 0), xs[0] * (1.0f / sqrtf(sum + a.eps)));
  // Above eps MAX_NORM_EPS is x / ||x||: (3, 4) -> (0.6, 0.8) up to float32's roundings.
  Set(x, 0, 0, 0, 3.0f);
  Set(x, 0, 0, 1, 4.0f);
  a.l2_mode = TN_L2_MAX_NORM_EPS;
  ASSERT_EQ(tn_op_run(ctx, &a), TN_OK);
  EXPECT_EQ(Get(y, 0, 0, 0), 3.0f * (1.0f / 5.0f));
  EXPECT_EQ(Get(y, 0, 0, 1), 4.0f * (1.0f / 5.0f));
  tn_context_destroy(ctx);
}

// layer_norm of (1, 2, 3, 4) with eps 0: mean 2.5, variance 1.25, so y = (x - 2.5) / sqrt(1.25), then w and b.
TEST(ModelHand, LayerNormSmallRow) {
  const int64_t dim = 4;
  Mem xm(TN_F32, dim), ym(TN_F32, dim), wm(TN_F32, dim), bm(TN_F32, dim);
  tn_tensor x = xm.View(1, dim, dim), y = ym.View(1, dim, dim), w = wm.View(1, dim, dim), b = bm.View(1, dim, dim);
  for (int64_t i = 0; i < dim; i++) {
    Set(x, 0, 0, i, (float)(i + 1));
    Set(w, 0, 0, i, 2.0f);
    Set(b, 0, 0, i, -0.5f);
  }
  tn_context *ctx;
  ASSERT_EQ(tn_context_create(&ctx), TN_OK);
  ASSERT_EQ(tn_layer_norm(ctx, &x, &w, &b, 0.0f, &y), TN_OK) << tn_context_last_error(ctx);
  const float inv = 1.0f / sqrtf(5.0f / 4.0f);
  for (int64_t i = 0; i < dim; i++) EXPECT_EQ(Get(y, 0, 0, i), (((float)(i + 1) - 2.5f) * inv) * 2.0f - 0.5f) << i;
  // Without weight and bias, and with a constant row and eps > 0: zeros.
  for (int64_t i = 0; i < dim; i++) Set(x, 0, 0, i, 7.0f);
  ASSERT_EQ(tn_layer_norm(ctx, &x, nullptr, nullptr, 1e-5f, &y), TN_OK);
  for (int64_t i = 0; i < dim; i++) EXPECT_EQ(Get(y, 0, 0, i), 0.0f) << i;
  tn_context_destroy(ctx);
}

// The rope on one f32 head of 4 (NEOX, position 3, theta 100, no weight): pairs (0, 2) and (1, 3) with
// inv_freq (1, 1/10), so angles (3, 0.3), computed here from the spec's formula.
TEST(ModelHand, RopeSmallHead) {
  const int64_t dim = 4;
  Mem xm(TN_F32, dim), ym(TN_F32, dim);
  tn_tensor x = xm.View(1, dim, dim), y = ym.View(1, dim, dim);
  const std::vector<float> xs = {1.0f, -2.0f, 0.5f, 3.0f};
  for (int64_t i = 0; i < dim; i++) Set(x, 0, 0, i, xs[(size_t)i]);
  const int32_t pos = 3;
  tn_rope rope = {};
  rope.style = TN_ROPE_NEOX;
  rope.positions = &pos;
  rope.theta = 100.0f;
  tn_context *ctx;
  ASSERT_EQ(tn_context_create(&ctx), TN_OK);
  ASSERT_EQ(tn_rms_norm_rope(ctx, &x, nullptr, 0.0f, 1e-6f, &rope, &y), TN_OK) << tn_context_last_error(ctx);
  const float inv = RmsInv(xs, 1e-6f);
  float n[4];
  for (int i = 0; i < 4; i++) n[i] = xs[(size_t)i] * inv;
  const float f1 = (float)(1.0 / pow(100.0, 2.0 / 4.0));
  ASSERT_EQ(f1, 0.1f);
  const float c0 = (float)cos(3.0), s0 = (float)sin(3.0), c1 = (float)cos((double)(3.0f * f1)),
              s1 = (float)sin((double)(3.0f * f1));
  EXPECT_EQ(Get(y, 0, 0, 0), n[0] * c0 - n[2] * s0);
  EXPECT_EQ(Get(y, 0, 0, 2), n[2] * c0 + n[0] * s0);
  EXPECT_EQ(Get(y, 0, 0, 1), n[1] * c1 - n[3] * s1);
  EXPECT_EQ(Get(y, 0, 0, 3), n[3] * c1 + n[1] * s1);
  // GPTJ pairs (0, 1) and (2, 3) instead.
  rope.style = TN_ROPE_GPTJ;
  ASSERT_EQ(tn_rms_norm_rope(ctx, &x, nullptr, 0.0f, 1e-6f, &rope, &y), TN_OK);
  EXPECT_EQ(Get(y, 0, 0, 0), n[0] * c0 - n[1] * s0);
  EXPECT_EQ(Get(y, 0, 0, 1), n[1] * c0 + n[0] * s0);
  EXPECT_EQ(Get(y, 0, 0, 2), n[2] * c1 - n[3] * s1);
  EXPECT_EQ(Get(y, 0, 0, 3), n[3] * c1 + n[2] * s1);
  // rope == NULL and style NONE: plain rms_norm.
  ASSERT_EQ(tn_rms_norm_rope(ctx, &x, nullptr, 0.0f, 1e-6f, nullptr, &y), TN_OK);
  for (int i = 0; i < 4; i++) EXPECT_EQ(Get(y, 0, 0, i), n[i]);
  tn_context_destroy(ctx);
}

// ------------------------------------------------------------------------------------------------
// Graphs: a fused pair gives the bytes of the two ops run in turn, under LLAMA too (rms_norm -> mul, whose
// fused op rounds n, then n * w, before the multiplicand) and for add -> layer_norm.
// ------------------------------------------------------------------------------------------------

TEST(ModelGraph, FusedPairsUnderLlama) {
  Rng rng = TestRng();
  const int64_t rows = 33, dim = 200;
  for (tn_dtype dt : {TN_F32, TN_F16, TN_BF16})
    for (int pair = 0; pair < 2; pair++) {
      Mem xm(dt, rows * dim), bm(dt, rows * dim), tm(dt, rows * dim), ym(dt, rows * dim), wm(dt, dim);
      Mem biasm(TN_F32, dim);
      tn_tensor x = xm.View(rows, dim, dim), b = bm.View(rows, dim, dim), t = tm.View(rows, dim, dim),
                y = ym.View(rows, dim, dim), w = wm.View(1, dim, dim), bias = biasm.View(1, dim, dim);
      Fill(x, rng);
      Fill(b, rng);
      Fill(w, rng, 0.2, 1.0);
      Fill(bias, rng, 0.5);
      tn_context *ctx;
      ASSERT_EQ(tn_context_create(&ctx), TN_OK);
      auto record = [&](void) {
        tn_op_args first = tn_op_args_init(pair == 0 ? TN_OP_RMS_NORM : TN_OP_ADD);
        first.x = &x;
        first.y = &t;
        if (pair == 0) {
          first.weight = &w;
          first.casting = TN_CASTING_LLAMA;
        } else {
          first.residual = &b;
        }
        tn_op_args second = tn_op_args_init(pair == 0 ? TN_OP_MUL : TN_OP_LAYER_NORM);
        second.x = &t;
        second.y = &y;
        if (pair == 0) {
          second.mul = &b;
        } else {
          second.weight = &w;
          second.bias = &bias;
          second.casting = TN_CASTING_LLAMA;
        }
        EXPECT_EQ(tn_op_run(ctx, &first), TN_OK) << tn_context_last_error(ctx);
        EXPECT_EQ(tn_op_run(ctx, &second), TN_OK) << tn_context_last_error(ctx);
      };
      record();  // run directly
      const std::vector<unsigned char> direct = ym.bytes;
      ym.Poison();
      tm.Poison();
      ASSERT_EQ(tn_graph_begin(ctx), TN_OK);
      record();
      tn_graph *g = nullptr;
      ASSERT_EQ(tn_graph_end(ctx, &g), TN_OK);
      tn_graph_info info;
      ASSERT_EQ(tn_graph_get_info(g, &info), TN_OK);
      EXPECT_EQ(info.ops, 1) << tn_graph_fusions(g);
      ASSERT_EQ(tn_graph_launch(ctx, g), TN_OK) << tn_context_last_error(ctx);
      EXPECT_TRUE(ym.bytes == direct) << tn_dtype_name(dt) << ": " << tn_graph_fusions(g) << " changed the bytes";
      tn_graph_destroy(g);
      tn_context_destroy(ctx);
    }
}

}  // namespace
