// Every bad-input path of the public API: the status, a message naming what is wrong (with its numbers),
// and not one byte written to any buffer (outputs are poisoned beforehand and compared afterwards).
// Also the few accepted corner cases next to them (in place, interleaved views, rows == 0, f32 weight).
#include <gtest/gtest.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include <unistd.h>

#include "reference.h"
#include "tnorm.h"

namespace {

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr float kInf = std::numeric_limits<float>::infinity();

// A region of memory whose bytes must not change (inputs) or that is poisoned and must stay so (outputs).
struct Region {
  void *p;
  size_t n;
};

// Whether msg contains key; a key "a|b" accepts either alternative.
bool Contains(const std::string &msg, const std::string &key) {
  size_t start = 0;
  for (;;) {
    size_t bar = key.find('|', start);
    std::string alt = key.substr(start, bar == std::string::npos ? std::string::npos : bar - start);
    if (msg.find(alt) != std::string::npos) return true;
    if (bar == std::string::npos) return false;
    start = bar + 1;
  }
}

std::string StatusText(tn_status s) { return std::string(tn_status_name(s)) + " (" + std::to_string((int)s) + ")"; }

class Validation : public ::testing::Test {
 protected:
  static constexpr int64_t R = 4, D = 8;

  void SetUp() override {
    ASSERT_EQ(tn_context_create(&ctx), TN_OK);
    ASSERT_NE(ctx, nullptr);
    for (auto *v : {&x, &res, &mul, &y, &rout}) v->assign(R * D, 0.0f);
    w.assign(D, 1.0f);
    for (int64_t i = 0; i < R * D; i++) {
      x[i] = 0.25f * (float)(i % 7) - 0.5f;
      res[i] = 0.125f * (float)(i % 5);
      mul[i] = 1.0f + 0.01f * (float)i;
    }
    for (int64_t i = 0; i < D; i++) w[i] = 1.0f + 0.1f * (float)i;
    tx = tn_tensor_2d(x.data(), TN_F32, R, D);
    tres = tn_tensor_2d(res.data(), TN_F32, R, D);
    tmul = tn_tensor_2d(mul.data(), TN_F32, R, D);
    ty = tn_tensor_2d(y.data(), TN_F32, R, D);
    trout = tn_tensor_2d(rout.data(), TN_F32, R, D);
    tw = tn_tensor_vector(w.data(), TN_F32, D);
  }
  void TearDown() override { tn_context_destroy(ctx); }

  tn_op_args Rms() {
    tn_op_args a = tn_op_args_init(TN_OP_RMS_NORM);
    a.x = &tx;
    a.y = &ty;
    return a;
  }
  tn_op_args L2() {
    tn_op_args a = tn_op_args_init(TN_OP_L2_NORM);
    a.x = &tx;
    a.y = &ty;
    return a;
  }
  tn_op_args Add() {
    tn_op_args a = tn_op_args_init(TN_OP_ADD_RMS_NORM);
    a.x = &tx;
    a.residual = &tres;
    a.y = &ty;
    a.residual_out = &trout;
    return a;
  }

  std::vector<Region> Outputs() { return {{y.data(), y.size() * 4}, {rout.data(), rout.size() * 4}}; }
  std::vector<Region> Inputs() {
    return {{x.data(), x.size() * 4}, {res.data(), res.size() * 4}, {mul.data(), mul.size() * 4}, {w.data(), w.size() * 4}};
  }

  // Poisons the outputs, snapshots every region, calls, and checks status, message and that nothing changed.
  void ExpectRefused(const std::function<tn_status()> &call, tn_status want, std::vector<std::string> keys,
                     std::vector<Region> extra_outputs = {}, std::vector<Region> extra_inputs = {}) {
    std::vector<Region> outs = Outputs(), ins = Inputs();
    outs.insert(outs.end(), extra_outputs.begin(), extra_outputs.end());
    ins.insert(ins.end(), extra_inputs.begin(), extra_inputs.end());
    for (auto &r : outs) memset(r.p, 0xFF, r.n);
    std::vector<std::vector<unsigned char>> snap;
    for (auto &r : outs) snap.emplace_back((unsigned char *)r.p, (unsigned char *)r.p + r.n);
    for (auto &r : ins) snap.emplace_back((unsigned char *)r.p, (unsigned char *)r.p + r.n);
    tn_status st = call();
    EXPECT_EQ(st, want) << "got " << StatusText(st) << ", want " << StatusText(want)
                        << "; message: " << tn_context_last_error(ctx);
    std::string msg = tn_context_last_error(ctx);
    EXPECT_FALSE(msg.empty()) << "no message for " << StatusText(want);
    for (auto &k : keys) EXPECT_TRUE(Contains(msg, k)) << "message \"" << msg << "\" lacks \"" << k << "\"";
    size_t j = 0;
    for (auto &r : outs) {
      EXPECT_EQ(memcmp(r.p, snap[j].data(), r.n), 0) << "output region " << j << " was written on error";
      j++;
    }
    for (auto &r : ins) {
      EXPECT_EQ(memcmp(r.p, snap[j].data(), r.n), 0) << "input region " << j - outs.size() << " changed";
      j++;
    }
  }

  // The descriptor path: tn_op_validate and tn_op_run both refuse, with the same status and message.
  void ExpectArgsRefused(const tn_op_args &a, tn_status want, std::vector<std::string> keys,
                         std::vector<Region> extra_outputs = {}, std::vector<Region> extra_inputs = {}) {
    {
      SCOPED_TRACE("tn_op_validate");
      ExpectRefused([&] { return tn_op_validate(ctx, &a); }, want, keys, extra_outputs, extra_inputs);
    }
    std::string validate_msg = tn_context_last_error(ctx);
    {
      SCOPED_TRACE("tn_op_run");
      ExpectRefused([&] { return tn_op_run(ctx, &a); }, want, keys, extra_outputs, extra_inputs);
    }
    EXPECT_EQ(validate_msg, std::string(tn_context_last_error(ctx))) << "tn_op_validate and tn_op_run disagree";
  }

  // Accepted: TN_OK from both validate and run, and an empty last error.
  void ExpectArgsAccepted(const tn_op_args &a) {
    EXPECT_EQ(tn_op_validate(ctx, &a), TN_OK) << tn_context_last_error(ctx);
    EXPECT_STREQ(tn_context_last_error(ctx), "");
    EXPECT_EQ(tn_op_run(ctx, &a), TN_OK) << tn_context_last_error(ctx);
    EXPECT_STREQ(tn_context_last_error(ctx), "");
  }

  // Checks y (and residual_out) of a successful run against the float64 reference.
  void ExpectMatchesReference(const tn_op_args &a) {
    const int64_t rows = a.x->rows, dim = a.x->dim;
    std::vector<double> ry(rows * dim), rr(rows * dim), slack(rows * dim);
    ASSERT_EQ(tn_reference_run_slack(&a, ry.data(), a.residual_out != nullptr ? rr.data() : nullptr, slack.data()), 0);
    for (int64_t r = 0; r < rows; r++)
      for (int64_t i = 0; i < dim; i++) {
        float got = tn_reference_load(a.y, r, i);
        EXPECT_LE(tn_reference_error_slack(a.y->dtype, got, ry[r * dim + i], slack[r * dim + i]), 1.0)
            << "y row " << r << " col " << i << " got " << got << " want " << ry[r * dim + i];
      }
  }

  tn_context *ctx = nullptr;
  std::vector<float> x, res, mul, y, rout, w;
  tn_tensor tx, tres, tmul, ty, trout, tw;
};

// ------------------------------------------------------------------------------------------------
// NULL pointers
// ------------------------------------------------------------------------------------------------

TEST_F(Validation, NullContext) {
  tn_op_args a = Rms();
  std::vector<Region> outs = Outputs();
  for (auto &r : outs) memset(r.p, 0xFF, r.n);
  std::vector<float> y0 = y, r0 = rout;
  EXPECT_EQ(tn_op_run(nullptr, &a), TN_ERR_NULL);
  EXPECT_EQ(tn_op_validate(nullptr, &a), TN_ERR_NULL);
  EXPECT_EQ(tn_rms_norm(nullptr, &tx, &tw, 0.0f, 1e-6f, &ty), TN_ERR_NULL);
  EXPECT_EQ(tn_rms_norm_mul(nullptr, &tx, &tw, 0.0f, &tmul, 1e-6f, &ty), TN_ERR_NULL);
  EXPECT_EQ(tn_rms_norm_mul(nullptr, &tx, &tw, 0.0f, nullptr, 1e-6f, &ty), TN_ERR_NULL);
  EXPECT_EQ(tn_l2_norm(nullptr, &tx, 1e-6f, 1.0f, &ty), TN_ERR_NULL);
  EXPECT_EQ(tn_add_rms_norm(nullptr, &tx, &tres, &tw, 0.0f, 1e-6f, &ty, &trout), TN_ERR_NULL);
  EXPECT_EQ(tn_add_rms_norm_mul(nullptr, &tx, &tres, &tw, 0.0f, nullptr, 1e-6f, &ty, &trout), TN_ERR_NULL);
  EXPECT_EQ(tn_context_set_num_threads(nullptr, 2), TN_ERR_NULL);
  EXPECT_EQ(tn_device_available(nullptr, TN_DEVICE_CPU), TN_ERR_NULL);
  EXPECT_EQ(tn_context_create(nullptr), TN_ERR_NULL);
  EXPECT_EQ(memcmp(y.data(), y0.data(), y.size() * 4), 0);
  EXPECT_EQ(memcmp(rout.data(), r0.data(), rout.size() * 4), 0);
  // With no context, the last error is still a non-empty string.
  ASSERT_NE(tn_context_last_error(nullptr), nullptr);
  EXPECT_STRNE(tn_context_last_error(nullptr), "");
  EXPECT_GE(tn_context_num_threads(nullptr), 1);
}

TEST_F(Validation, NullArgsPointer) {
  ExpectRefused([&] { return tn_op_run(ctx, nullptr); }, TN_ERR_NULL, {"args is NULL"});
  ExpectRefused([&] { return tn_op_validate(ctx, nullptr); }, TN_ERR_NULL, {"args is NULL"});
}

TEST_F(Validation, NullRequiredOperands) {
  {
    tn_op_args a = Rms();
    a.x = nullptr;
    ExpectArgsRefused(a, TN_ERR_NULL, {"rms_norm", "x is required"});
  }
  {
    tn_op_args a = Rms();
    a.y = nullptr;
    ExpectArgsRefused(a, TN_ERR_NULL, {"rms_norm", "y is required"});
  }
  {
    tn_op_args a = L2();
    a.x = nullptr;
    ExpectArgsRefused(a, TN_ERR_NULL, {"l2_norm", "x is required"});
  }
  {
    tn_op_args a = Add();
    a.residual = nullptr;
    ExpectArgsRefused(a, TN_ERR_NULL, {"add_rms_norm", "residual is required"});
  }
  {
    tn_op_args a = Add();
    a.residual_out = nullptr;
    ExpectArgsRefused(a, TN_ERR_NULL, {"add_rms_norm", "residual_out is required"});
  }
  {
    tn_op_args a = Add();
    a.y = nullptr;
    ExpectArgsRefused(a, TN_ERR_NULL, {"add_rms_norm", "y is required"});
  }
  // The convenience functions.
  ExpectRefused([&] { return tn_rms_norm(ctx, nullptr, &tw, 0.0f, 1e-6f, &ty); }, TN_ERR_NULL, {"x is required"});
  ExpectRefused([&] { return tn_rms_norm(ctx, &tx, &tw, 0.0f, 1e-6f, nullptr); }, TN_ERR_NULL, {"y is required"});
  ExpectRefused([&] { return tn_rms_norm_mul(ctx, &tx, &tw, 0.0f, nullptr, 1e-6f, &ty); }, TN_ERR_NULL,
                {"mul is required"});
  ExpectRefused([&] { return tn_add_rms_norm_mul(ctx, &tx, &tres, &tw, 0.0f, nullptr, 1e-6f, &ty, &trout); },
                TN_ERR_NULL, {"add_rms_norm", "mul is required by tn_add_rms_norm_mul"});
  ExpectRefused([&] { return tn_l2_norm(ctx, &tx, 1e-6f, 1.0f, nullptr); }, TN_ERR_NULL, {"y is required"});
  ExpectRefused([&] { return tn_add_rms_norm(ctx, &tx, nullptr, &tw, 0.0f, 1e-6f, &ty, &trout); }, TN_ERR_NULL,
                {"residual is required"});
  ExpectRefused([&] { return tn_add_rms_norm(ctx, &tx, &tres, &tw, 0.0f, 1e-6f, &ty, nullptr); }, TN_ERR_NULL,
                {"residual_out is required"});
}

TEST_F(Validation, NullDataWithRows) {
  struct Case {
    const char *name;
    tn_tensor *t;
  };
  for (auto c : {Case{"x", &tx}, Case{"y", &ty}, Case{"residual", &tres}, Case{"residual_out", &trout},
                 Case{"weight", &tw}}) {
    SCOPED_TRACE(c.name);
    tn_tensor saved = *c.t;
    c.t->data = nullptr;
    tn_op_args a = Add();
    a.weight = &tw;
    ExpectArgsRefused(a, TN_ERR_NULL, {std::string(c.name) + " data is NULL"});
    *c.t = saved;
  }
  {
    tn_op_args a = Rms();
    tmul.data = nullptr;
    a.mul = &tmul;
    ExpectArgsRefused(a, TN_ERR_NULL, {"mul data is NULL"});
  }
}

TEST_F(Validation, NullDataWithZeroRowsIsFine) {
  tn_tensor x0 = tn_tensor_2d(nullptr, TN_F32, 0, D), y0 = tn_tensor_2d(nullptr, TN_F32, 0, D);
  tn_tensor r0 = tn_tensor_2d(nullptr, TN_F32, 0, D), ro0 = tn_tensor_2d(nullptr, TN_F32, 0, D);
  tn_tensor m0 = tn_tensor_2d(nullptr, TN_F32, 0, D);
  EXPECT_EQ(tn_rms_norm(ctx, &x0, nullptr, 0.0f, 1e-6f, &y0), TN_OK) << tn_context_last_error(ctx);
  EXPECT_STREQ(tn_context_last_error(ctx), "");
  EXPECT_EQ(tn_rms_norm(ctx, &x0, &tw, 0.0f, 1e-6f, &y0), TN_OK) << tn_context_last_error(ctx);
  EXPECT_EQ(tn_rms_norm_mul(ctx, &x0, &tw, 1.0f, &m0, 1e-6f, &y0), TN_OK) << tn_context_last_error(ctx);
  EXPECT_EQ(tn_l2_norm(ctx, &x0, 1e-6f, 0.5f, &y0), TN_OK) << tn_context_last_error(ctx);
  EXPECT_EQ(tn_add_rms_norm(ctx, &x0, &r0, nullptr, 0.0f, 1e-6f, &y0, &ro0), TN_OK) << tn_context_last_error(ctx);
  EXPECT_STREQ(tn_context_last_error(ctx), "");
  // The newer ops and modes: layer_norm, add_layer_norm with an f32 residual beside bf16 x, 3-D views and a rope
  // with no positions to read.
  EXPECT_EQ(tn_layer_norm(ctx, &x0, &tw, &tw, 1e-5f, &y0), TN_OK) << tn_context_last_error(ctx);
  tn_tensor bx0 = tn_tensor_2d(nullptr, TN_BF16, 0, D), by0 = tn_tensor_2d(nullptr, TN_BF16, 0, D);
  EXPECT_EQ(tn_add_layer_norm(ctx, &bx0, &r0, nullptr, nullptr, 1e-5f, &by0, &ro0), TN_OK)
      << tn_context_last_error(ctx);
  tn_tensor hx0 = tn_tensor_heads(nullptr, TN_F32, 0, 4, D, 4 * D, D), hy0 = hx0;
  tn_rope rope = {};
  rope.style = TN_ROPE_GPTJ;
  rope.theta = 1e4f;
  EXPECT_EQ(tn_rms_norm_rope(ctx, &hx0, &tw, 0.0f, 1e-6f, &rope, &hy0), TN_OK) << tn_context_last_error(ctx);
  tn_op_args a = tn_op_args_init(TN_OP_L2_NORM);
  a.x = &hx0;
  a.y = &hy0;
  a.l2_mode = TN_L2_MAX_NORM_EPS;
  a.casting = TN_CASTING_LLAMA;
  EXPECT_EQ(tn_op_run(ctx, &a), TN_OK) << tn_context_last_error(ctx);
  EXPECT_STREQ(tn_context_last_error(ctx), "");
}

// ------------------------------------------------------------------------------------------------
// Enums out of range
// ------------------------------------------------------------------------------------------------

TEST_F(Validation, UnknownOp) {
  tn_op_args a = Rms();
  a.op = (tn_op)TN_OP_COUNT;
  ExpectArgsRefused(a, TN_ERR_VALUE, {"unknown op 9"});
  a.op = (tn_op)-1;
  ExpectArgsRefused(a, TN_ERR_VALUE, {"unknown op -1"});
}

TEST_F(Validation, UnknownDtype) {
  {
    tx.dtype = (tn_dtype)9;
    ExpectArgsRefused(Rms(), TN_ERR_DTYPE, {"rms_norm", "x", "unknown dtype 9"});
    tx.dtype = TN_F32;
  }
  {
    ty.dtype = (tn_dtype)TN_DTYPE_ALL_COUNT;
    ExpectArgsRefused(Rms(), TN_ERR_DTYPE, {"y", "unknown dtype 7"});
    ty.dtype = TN_F32;
  }
  {  // the storage dtypes of quantized outputs are no op's compute dtype
    ty.dtype = TN_F8_E4M3;
    ExpectArgsRefused(Rms(), TN_ERR_DTYPE, {"rms_norm", "y is f8_e4m3, x is f32"});
    ty.dtype = TN_F32;
    tx.dtype = TN_I8;
    ExpectArgsRefused(Rms(), TN_ERR_DTYPE, {"rms_norm", "x is i8", "f32, f16 or bf16"});
    tx.dtype = TN_F32;
  }
  {
    tw.dtype = (tn_dtype)-2;
    tn_op_args a = Rms();
    a.weight = &tw;
    ExpectArgsRefused(a, TN_ERR_DTYPE, {"weight", "unknown dtype -2"});
    tw.dtype = TN_F32;
  }
}

TEST_F(Validation, UnknownDeviceKind) {
  tx.device.kind = (tn_device_kind)5;
  ExpectArgsRefused(Rms(), TN_ERR_DEVICE, {"x", "unknown device kind 5"});
  tx.device.kind = TN_DEVICE_CPU;
  ty.device.index = -1;
  ExpectArgsRefused(Rms(), TN_ERR_DEVICE, {"y", "index -1"});
  ty.device.index = 0;
  EXPECT_EQ(tn_device_available(ctx, (tn_device_kind)5), TN_ERR_DEVICE);
  EXPECT_NE(std::string(tn_context_last_error(ctx)).find("unknown device kind 5"), std::string::npos)
      << tn_context_last_error(ctx);
}

// ------------------------------------------------------------------------------------------------
// Shapes
// ------------------------------------------------------------------------------------------------

TEST_F(Validation, NegativeRows) {
  tx.rows = -1;
  ExpectArgsRefused(Rms(), TN_ERR_SHAPE, {"x has -1 rows"});
  tx.rows = R;
  tres.rows = -3;
  ExpectArgsRefused(Add(), TN_ERR_SHAPE, {"residual has -3 rows"});
}

TEST_F(Validation, DimZeroOrNegative) {
  tx.dim = 0;
  tx.row_stride = 0;
  ty.dim = 0;
  ty.row_stride = 0;
  ExpectArgsRefused(Rms(), TN_ERR_SHAPE, {"x has dim 0"});
  ExpectArgsRefused(L2(), TN_ERR_SHAPE, {"dim 0"});
  // dim 0 is an error even with rows == 0.
  tx.rows = ty.rows = 0;
  ExpectArgsRefused(Rms(), TN_ERR_SHAPE, {"dim 0"});
  tx.rows = ty.rows = R;
  tx.dim = tx.row_stride = -8;
  ExpectArgsRefused(Rms(), TN_ERR_SHAPE, {"dim -8"});
}

TEST_F(Validation, RowStrideLessThanDim) {
  tx.row_stride = 7;
  ExpectArgsRefused(Rms(), TN_ERR_SHAPE, {"x has row_stride 7, less than its dim 8"});
  tx.row_stride = D;
  ty.row_stride = 0;
  ExpectArgsRefused(Rms(), TN_ERR_SHAPE, {"y has row_stride 0"});
}

TEST_F(Validation, WeightLengthMismatch) {
  tn_tensor w7 = tn_tensor_vector(w.data(), TN_F32, 7);
  tn_op_args a = Rms();
  a.weight = &w7;
  ExpectArgsRefused(a, TN_ERR_SHAPE, {"weight has 7 elements, dim is 8"});
  ExpectRefused([&] { return tn_rms_norm(ctx, &tx, &w7, 0.0f, 1e-6f, &ty); }, TN_ERR_SHAPE,
                {"rms_norm: weight has 7 elements, dim is 8"});
  ExpectRefused([&] { return tn_add_rms_norm(ctx, &tx, &tres, &w7, 0.0f, 1e-6f, &ty, &trout); }, TN_ERR_SHAPE,
                {"add_rms_norm: weight has 7 elements, dim is 8"});
  std::vector<float> w9(9, 1.0f);
  tn_tensor t9 = tn_tensor_vector(w9.data(), TN_F32, 9);
  a.weight = &t9;
  ExpectArgsRefused(a, TN_ERR_SHAPE, {"weight has 9 elements, dim is 8"}, {}, {{w9.data(), w9.size() * 4}});
}

TEST_F(Validation, WeightWithTwoRows) {
  std::vector<float> w2(2 * D, 1.0f);
  tn_tensor t = tn_tensor_2d(w2.data(), TN_F32, 2, D);
  tn_op_args a = Rms();
  a.weight = &t;
  ExpectArgsRefused(a, TN_ERR_SHAPE, {"weight", "2 x 8|16 elements"}, {}, {{w2.data(), w2.size() * 4}});
}

TEST_F(Validation, ShapeMismatch) {
  struct Case {
    const char *name;
    tn_tensor *t;
  };
  for (auto c : {Case{"y", &ty}, Case{"residual", &tres}, Case{"residual_out", &trout}}) {
    SCOPED_TRACE(c.name);
    c.t->rows = R - 1;
    ExpectArgsRefused(Add(), TN_ERR_SHAPE, {std::string(c.name) + " is 3 x 8, x is 4 x 8"});
    c.t->rows = R;
    c.t->dim = D - 1;
    ExpectArgsRefused(Add(), TN_ERR_SHAPE, {std::string(c.name) + " is 4 x 7, x is 4 x 8"});
    c.t->dim = D;
  }
  tmul.rows = 2;
  tn_op_args a = Rms();
  a.mul = &tmul;
  ExpectArgsRefused(a, TN_ERR_SHAPE, {"mul is 2 x 8, x is 4 x 8"});
}

// ------------------------------------------------------------------------------------------------
// Dtypes
// ------------------------------------------------------------------------------------------------

TEST_F(Validation, WeightDtype) {
  // bf16 x with an f16 weight: refused. With an f32 weight: accepted (and correct).
  std::vector<uint16_t> xb(R * D), yb(R * D, 0xFFFF), wh(D, 0x3c00 /* 1.0 in f16 */);
  for (int64_t i = 0; i < R * D; i++) xb[i] = (uint16_t)(0x3f80 + (i % 13) * 3);  // bf16 values around 1..2
  tn_tensor bx = tn_tensor_2d(xb.data(), TN_BF16, R, D), by = tn_tensor_2d(yb.data(), TN_BF16, R, D);
  tn_tensor wf16 = tn_tensor_vector(wh.data(), TN_F16, D);
  tn_op_args a = tn_op_args_init(TN_OP_RMS_NORM);
  a.x = &bx;
  a.y = &by;
  a.weight = &wf16;
  ExpectArgsRefused(a, TN_ERR_DTYPE, {"weight is f16; must be f32 or x's dtype bf16"}, {{yb.data(), yb.size() * 2}},
                    {{xb.data(), xb.size() * 2}, {wh.data(), wh.size() * 2}});
  a.op = TN_OP_ADD_RMS_NORM;
  std::vector<uint16_t> rb(R * D, 0x3f80), rob(R * D);
  tn_tensor br = tn_tensor_2d(rb.data(), TN_BF16, R, D), bro = tn_tensor_2d(rob.data(), TN_BF16, R, D);
  a.residual = &br;
  a.residual_out = &bro;
  ExpectArgsRefused(a, TN_ERR_DTYPE, {"weight is f16"}, {{yb.data(), yb.size() * 2}, {rob.data(), rob.size() * 2}},
                    {{xb.data(), xb.size() * 2}, {rb.data(), rb.size() * 2}});

  // f32 weight with bf16 x: accepted.
  tn_op_args b = tn_op_args_init(TN_OP_RMS_NORM);
  b.x = &bx;
  b.y = &by;
  b.weight = &tw;
  memset(yb.data(), 0xFF, yb.size() * 2);
  ExpectArgsAccepted(b);
  ExpectMatchesReference(b);
  // An f32 weight with f16 x: accepted too; a bf16 weight with f32 x: refused.
  std::vector<uint16_t> wbf(D, 0x3f80);
  tn_tensor wb = tn_tensor_vector(wbf.data(), TN_BF16, D);
  tn_op_args c = Rms();
  c.weight = &wb;
  ExpectArgsRefused(c, TN_ERR_DTYPE, {"weight is bf16; must be f32 or x's dtype f32"});
}

TEST_F(Validation, OperandDtypeMismatch) {
  std::vector<uint16_t> h(R * D, 0);
  tn_tensor th = tn_tensor_2d(h.data(), TN_F16, R, D);
  {
    tn_op_args a = Rms();
    a.y = &th;
    ExpectArgsRefused(a, TN_ERR_DTYPE, {"y is f16, x is f32"}, {{h.data(), h.size() * 2}});
  }
  {
    tn_op_args a = Rms();
    a.mul = &th;
    ExpectArgsRefused(a, TN_ERR_DTYPE, {"mul is f16, x is f32"}, {}, {{h.data(), h.size() * 2}});
  }
  {
    tn_op_args a = Add();
    a.residual = &th;
    ExpectArgsRefused(a, TN_ERR_DTYPE, {"residual is f16, x is f32"}, {}, {{h.data(), h.size() * 2}});
  }
  {
    tn_op_args a = Add();
    a.residual_out = &th;
    ExpectArgsRefused(a, TN_ERR_DTYPE, {"residual_out is f16, x is f32"}, {{h.data(), h.size() * 2}});
  }
  {
    tn_tensor tb = th;
    tb.dtype = TN_BF16;
    tn_op_args a = L2();
    a.x = &th;
    a.y = &tb;
    ExpectArgsRefused(a, TN_ERR_DTYPE, {"y is bf16, x is f16"}, {{h.data(), h.size() * 2}});
  }
}

// ------------------------------------------------------------------------------------------------
// Operands given to an op that takes none
// ------------------------------------------------------------------------------------------------

TEST_F(Validation, OperandNotTaken) {
  {
    tn_op_args a = L2();
    a.mul = &tmul;
    ExpectArgsRefused(a, TN_ERR_OPERAND, {"l2_norm", "takes no mul"});
  }
  {
    tn_op_args a = L2();
    a.weight = &tw;
    ExpectArgsRefused(a, TN_ERR_OPERAND, {"l2_norm", "takes no weight"});
  }
  {
    tn_op_args a = L2();
    a.residual = &tres;
    ExpectArgsRefused(a, TN_ERR_OPERAND, {"l2_norm", "takes no residual"});
  }
  {
    tn_op_args a = Rms();
    a.residual = &tres;
    ExpectArgsRefused(a, TN_ERR_OPERAND, {"rms_norm", "takes no residual"});
  }
  {
    tn_op_args a = Rms();
    a.residual_out = &trout;
    ExpectArgsRefused(a, TN_ERR_OPERAND, {"rms_norm", "takes no residual_out"});
  }
  {
    tn_op_args a = Add();
    a.mul = &tmul;
    a.op = TN_OP_L2_NORM;
    a.residual = a.residual_out = a.weight = nullptr;
    ExpectArgsRefused(a, TN_ERR_OPERAND, {"l2_norm", "takes no mul"});
  }
}

// ------------------------------------------------------------------------------------------------
// Scalars
// ------------------------------------------------------------------------------------------------

TEST_F(Validation, Eps) {
  for (float eps : {kNaN, kInf, -kInf, -1e-6f, -1.0f}) {
    SCOPED_TRACE(eps);
    for (tn_op_args a : {Rms(), L2(), Add()}) {
      a.eps = eps;
      ExpectArgsRefused(a, TN_ERR_VALUE, {tn_op_name(a.op), "eps is", "must be finite and >= 0"});
    }
  }
  ExpectRefused([&] { return tn_rms_norm(ctx, &tx, nullptr, 0.0f, -1.0f, &ty); }, TN_ERR_VALUE, {"eps is -1"});
  ExpectRefused([&] { return tn_l2_norm(ctx, &tx, kNaN, 1.0f, &ty); }, TN_ERR_VALUE, {"eps is"});
  // eps = 0 and eps = -0 are accepted.
  tn_op_args a = Rms();
  a.eps = 0.0f;
  ExpectArgsAccepted(a);
  a.eps = -0.0f;
  ExpectArgsAccepted(a);
}

TEST_F(Validation, Scale) {
  for (float s : {kNaN, kInf, -kInf}) {
    SCOPED_TRACE(s);
    tn_op_args a = L2();
    a.scale = s;
    ExpectArgsRefused(a, TN_ERR_VALUE, {"l2_norm", "scale is", "must be finite"});
    ExpectRefused([&] { return tn_l2_norm(ctx, &tx, 1e-6f, s, &ty); }, TN_ERR_VALUE, {"scale is"});
  }
  // rms_norm and add_rms_norm take no scale: it must be 1.
  for (float s : {2.0f, 0.0f, kNaN}) {
    SCOPED_TRACE(s);
    tn_op_args a = Rms();
    a.scale = s;
    ExpectArgsRefused(a, TN_ERR_VALUE, {"rms_norm", "scale is", "must be 1"});
    tn_op_args b = Add();
    b.scale = s;
    ExpectArgsRefused(b, TN_ERR_VALUE, {"add_rms_norm", "scale is", "must be 1"});
  }
  {
    tn_op_args a = Rms();
    a.scale = 2.0f;
    ExpectArgsRefused(a, TN_ERR_VALUE, {"scale is 2"});
  }
  // Any finite scale, negative and zero included, is fine for l2_norm.
  for (float s : {0.0f, -3.0f, 0.37f}) {
    tn_op_args a = L2();
    a.scale = s;
    ExpectArgsAccepted(a);
  }
}

TEST_F(Validation, WeightOffset) {
  {
    tn_op_args a = Rms();
    a.weight_offset = 1.0f;
    ExpectArgsRefused(a, TN_ERR_VALUE, {"rms_norm", "weight_offset is 1 without a weight"});
    ExpectRefused([&] { return tn_rms_norm(ctx, &tx, nullptr, 1.0f, 1e-6f, &ty); }, TN_ERR_VALUE,
                  {"weight_offset is 1 without a weight"});
  }
  {
    tn_op_args a = Add();
    a.weight_offset = -0.5f;
    ExpectArgsRefused(a, TN_ERR_VALUE, {"add_rms_norm", "weight_offset is -0.5 without a weight"});
  }
  {
    tn_op_args a = L2();
    a.weight_offset = 1.0f;
    ExpectArgsRefused(a, TN_ERR_VALUE, {"l2_norm", "weight_offset"});
  }
  for (float off : {kInf, -kInf, kNaN}) {
    SCOPED_TRACE(off);
    tn_op_args a = Rms();
    a.weight = &tw;
    a.weight_offset = off;
    ExpectArgsRefused(a, TN_ERR_VALUE, {"rms_norm", "weight_offset is", "must be finite"});
    tn_op_args b = Add();
    b.weight = &tw;
    b.weight_offset = off;
    ExpectArgsRefused(b, TN_ERR_VALUE, {"add_rms_norm", "weight_offset is", "must be finite"});
  }
  tn_op_args a = Rms();
  a.weight = &tw;
  a.weight_offset = 1.0f;
  ExpectArgsAccepted(a);
}

// ------------------------------------------------------------------------------------------------
// Overlaps
// ------------------------------------------------------------------------------------------------

TEST_F(Validation, OutputPartiallyOverlapsInput) {
  std::vector<float> buf((R + 1) * D, 0.5f);
  tn_tensor bx = tn_tensor_2d(buf.data(), TN_F32, R, D);
  tn_tensor by = tn_tensor_2d(buf.data() + 1, TN_F32, R, D);  // offset by one element
  Region all{buf.data(), buf.size() * 4};
  {
    tn_op_args a = Rms();
    a.x = &bx;
    a.y = &by;
    ExpectArgsRefused(a, TN_ERR_OVERLAP, {"rms_norm", "y overlaps x"}, {}, {all});
  }
  {
    // y one element before x.
    tn_tensor bx2 = tn_tensor_2d(buf.data() + 1, TN_F32, R, D), by2 = tn_tensor_2d(buf.data(), TN_F32, R, D);
    tn_op_args a = L2();
    a.x = &bx2;
    a.y = &by2;
    ExpectArgsRefused(a, TN_ERR_OVERLAP, {"l2_norm", "y overlaps x"}, {}, {all});
  }
  {
    // Same data pointer, different row stride: not the same view.
    tn_tensor sx = tn_tensor_strided(buf.data(), TN_F32, 2, D, D + 2), sy = tn_tensor_2d(buf.data(), TN_F32, 2, D);
    tn_op_args a = Rms();
    a.x = &sx;
    a.y = &sy;
    ExpectArgsRefused(a, TN_ERR_OVERLAP, {"y overlaps x"}, {}, {all});
  }
  {
    // y overlapping mul.
    tn_op_args a = Rms();
    a.mul = &bx;
    a.y = &by;
    ExpectArgsRefused(a, TN_ERR_OVERLAP, {"y overlaps mul"}, {}, {all});
  }
  {
    // residual_out overlapping residual by one element; and overlapping x.
    tn_op_args a = Add();
    a.residual = &bx;
    a.residual_out = &by;
    ExpectArgsRefused(a, TN_ERR_OVERLAP, {"residual_out overlaps residual"}, {}, {all});
    tn_op_args b = Add();
    b.x = &bx;
    b.residual_out = &by;
    ExpectArgsRefused(b, TN_ERR_OVERLAP, {"residual_out overlaps x"}, {}, {all});
  }
}

TEST_F(Validation, OutputOverlapsWeight) {
  // The weight is the first row of y's buffer: y = weight is never allowed, even as "the same" bytes.
  std::vector<float> buf(R * D, 1.0f);
  tn_tensor wv = tn_tensor_vector(buf.data(), TN_F32, D);
  tn_tensor by = tn_tensor_2d(buf.data(), TN_F32, R, D);
  Region all{buf.data(), buf.size() * 4};
  tn_op_args a = Rms();
  a.weight = &wv;
  a.y = &by;
  ExpectArgsRefused(a, TN_ERR_OVERLAP, {"y overlaps weight"}, {}, {all});
  // A one-row y that is exactly the weight's bytes: still refused (weight is not row-shaped).
  tn_tensor x1 = tn_tensor_2d(x.data(), TN_F32, 1, D), y1 = tn_tensor_2d(buf.data(), TN_F32, 1, D);
  tn_op_args b = Rms();
  b.x = &x1;
  b.weight = &wv;
  b.y = &y1;
  ExpectArgsRefused(b, TN_ERR_OVERLAP, {"y overlaps weight"}, {}, {all});
  tn_op_args c = Add();
  tn_tensor r1 = tn_tensor_2d(res.data(), TN_F32, 1, D), ro1 = tn_tensor_2d(rout.data(), TN_F32, 1, D);
  c.x = &x1;
  c.residual = &r1;
  c.weight = &wv;
  c.y = &ro1;
  c.residual_out = &y1;
  ExpectArgsRefused(c, TN_ERR_OVERLAP, {"residual_out overlaps weight"}, {}, {all});
}

TEST_F(Validation, OutputsOverlapEachOther) {
  tn_op_args a = Add();
  a.residual_out = &ty;  // y == residual_out
  ExpectArgsRefused(a, TN_ERR_OVERLAP, {"add_rms_norm", "overlaps", "y", "residual_out"});
  // Also when both are x itself.
  tn_op_args b = Add();
  b.y = &tx;
  b.residual_out = &tx;
  ExpectArgsRefused(b, TN_ERR_OVERLAP, {"overlaps"});
}

TEST_F(Validation, InPlaceAccepted) {
  // y exactly x.
  {
    tn_op_args a = Rms();
    a.y = &tx;
    std::vector<float> x0 = x;
    ExpectArgsAccepted(a);
    EXPECT_NE(memcmp(x.data(), x0.data(), x.size() * 4), 0) << "in-place rms_norm did not write x";
  }
  // add_rms_norm: y = x and residual_out = residual (the residual stream updated in place).
  {
    tn_op_args a = Add();
    a.weight = &tw;
    a.y = &tx;
    a.residual_out = &tres;
    ExpectArgsAccepted(a);
  }
  // rms_norm with mul: y = mul.
  {
    tn_op_args a = Rms();
    a.mul = &tmul;
    a.y = &tmul;
    ExpectArgsAccepted(a);
  }
  // Same view with rows == 1 and different row strides: still the same bytes.
  {
    tn_tensor a1 = tn_tensor_strided(x.data(), TN_F32, 1, D, D), b1 = tn_tensor_strided(x.data(), TN_F32, 1, D, 3 * D);
    tn_op_args a = Rms();
    a.x = &a1;
    a.y = &b1;
    ExpectArgsAccepted(a);
  }
}

TEST_F(Validation, InterleavedViews) {
  // A 10 x 128 buffer (one spare row for the views that wrap); x = columns [0, 64), outputs elsewhere.
  const int64_t rows = 10, pitch = 128;
  std::vector<float> buf((rows + 1) * pitch);
  auto fill = [&] {
    for (size_t i = 0; i < buf.size(); i++) buf[i] = (float)((int)(i % 17) - 8) * 0.125f + 0.01f;
  };
  fill();
  tn_tensor bx = tn_tensor_strided(buf.data(), TN_F32, rows, 64, pitch);
  Region all{buf.data(), buf.size() * 4};
  // Columns [64, 128): no shared byte; accepted, writes only those columns, matches the reference.
  {
    tn_tensor by = tn_tensor_strided(buf.data() + 64, TN_F32, rows, 64, pitch);
    for (int64_t r = 0; r < rows; r++) memset(buf.data() + r * pitch + 64, 0xFF, 64 * 4);
    std::vector<float> before = buf;
    tn_op_args a = Rms();
    a.x = &bx;
    a.y = &by;
    std::vector<float> wv(64, 1.5f);
    tn_tensor w64 = tn_tensor_vector(wv.data(), TN_F32, 64);
    a.weight = &w64;
    ExpectArgsAccepted(a);
    for (int64_t r = 0; r < rows; r++) {
      EXPECT_EQ(memcmp(buf.data() + r * pitch, before.data() + r * pitch, 64 * 4), 0) << "x changed in row " << r;
      for (int64_t i = 64; i < 128; i++) {
        uint32_t bits;
        memcpy(&bits, &buf[r * pitch + i], 4);
        EXPECT_NE(bits, 0xFFFFFFFFu) << "y not written at row " << r << " col " << i - 64;
      }
    }
    EXPECT_EQ(memcmp(buf.data() + rows * pitch, before.data() + rows * pitch, pitch * 4), 0);
    // x's columns are intact, so the reference can be computed afterwards.
    ExpectMatchesReference(a);
    // The same for add_rms_norm with x = columns [0,32), residual [32,64), y [64,96), residual_out [96,128).
    fill();
    tn_tensor ax = tn_tensor_strided(buf.data(), TN_F32, rows, 32, pitch);
    tn_tensor ar = tn_tensor_strided(buf.data() + 32, TN_F32, rows, 32, pitch);
    tn_tensor ay = tn_tensor_strided(buf.data() + 64, TN_F32, rows, 32, pitch);
    tn_tensor aro = tn_tensor_strided(buf.data() + 96, TN_F32, rows, 32, pitch);
    tn_op_args b = Add();
    b.x = &ax;
    b.residual = &ar;
    b.y = &ay;
    b.residual_out = &aro;
    ExpectArgsAccepted(b);
    ExpectMatchesReference(b);
  }
  fill();
  // Overlapping interleaved views: refused.
  for (int64_t start : {32, 63, 1, 100}) {
    SCOPED_TRACE(start);
    // start 100: rows of 64 from column 100 run into the next row's columns [0, 36).
    tn_tensor by = tn_tensor_strided(buf.data() + start, TN_F32, rows, 64, pitch);
    tn_op_args a = Rms();
    a.x = &bx;
    a.y = &by;
    ExpectArgsRefused(a, TN_ERR_OVERLAP, {"y overlaps x"}, {}, {all});
  }
  // A view that starts in x's gap overlaps when its rows run past the pitch into x's next row:
  // x = columns [0, 63), y = columns [66, 129) reaches element 0 of x's next row.
  {
    tn_tensor bx65 = tn_tensor_strided(buf.data(), TN_F32, rows, 63, pitch);
    tn_tensor by65 = tn_tensor_strided(buf.data() + 66, TN_F32, rows, 63, pitch);
    tn_op_args a = L2();
    a.x = &bx65;
    a.y = &by65;
    ExpectArgsRefused(a, TN_ERR_OVERLAP, {"y overlaps x"}, {}, {all});
  }
}

// ------------------------------------------------------------------------------------------------
// Sizes
// ------------------------------------------------------------------------------------------------

TEST_F(Validation, SizeOverflow) {
  // rows * row_stride does not fit in 64 bits.
  {
    tn_tensor bx = tn_tensor_strided(x.data(), TN_F32, INT64_MAX / 2, D, INT64_MAX / 4);
    tn_tensor by = tn_tensor_strided(y.data(), TN_F32, INT64_MAX / 2, D, INT64_MAX / 4);
    tn_op_args a = Rms();
    a.x = &bx;
    a.y = &by;
    ExpectArgsRefused(a, TN_ERR_OVERFLOW, {"rms_norm", "x", "overflows"});
  }
  // Elements fit but bytes do not.
  {
    int64_t rows = (int64_t)1 << 61;
    tn_tensor bx = tn_tensor_2d(x.data(), TN_F32, rows, 8);
    tn_tensor by = tn_tensor_2d(y.data(), TN_F32, rows, 8);
    tn_op_args a = L2();
    a.x = &bx;
    a.y = &by;
    ExpectArgsRefused(a, TN_ERR_OVERFLOW, {"l2_norm", "overflows"});
  }
  // (rows - 1) * row_stride + dim overflows.
  {
    tn_tensor bx = tn_tensor_strided(x.data(), TN_F16, 2, INT64_MAX - 1, INT64_MAX - 1);
    tn_tensor by = bx;
    by.data = y.data();
    tn_op_args a = Rms();
    a.x = &bx;
    a.y = &by;
    ExpectArgsRefused(a, TN_ERR_OVERFLOW, {"overflows"});
  }
  // The view runs past the end of the address space.
  {
    tn_tensor bx = tn_tensor_2d((void *)(UINTPTR_MAX - 64), TN_F32, R, D);
    tn_op_args a = Rms();
    a.x = &bx;
    ExpectArgsRefused(a, TN_ERR_OVERFLOW, {"x", "overflows"});
  }
  // A huge weight is refused before its element count is used.
  {
    tn_tensor bw = tn_tensor_strided(w.data(), TN_F32, INT64_MAX / 2, D, INT64_MAX / 4);
    tn_op_args a = Rms();
    a.weight = &bw;
    ExpectArgsRefused(a, TN_ERR_OVERFLOW, {"weight", "overflows"});
  }
}

// ------------------------------------------------------------------------------------------------
// Devices
// ------------------------------------------------------------------------------------------------

// Where a GPU is usable these calls would run (on host pointers): the GPU suite covers that machine.
#define SKIP_IF_CUDA_AVAILABLE()                                                              \
  do {                                                                                        \
    if (tn_device_available(ctx, TN_DEVICE_CUDA) == TN_OK) GTEST_SKIP() << "a CUDA device is usable here"; \
  } while (0)

TEST_F(Validation, CudaUnavailable) {
  SKIP_IF_CUDA_AVAILABLE();
  for (tn_tensor *t : {&tx, &ty, &tres, &trout, &tw, &tmul}) t->device.kind = TN_DEVICE_CUDA;
  // Validation alone accepts them (they are well-formed); running says the backend is not there.
  for (tn_op_args a : {Rms(), L2(), Add()}) {
    SCOPED_TRACE(tn_op_name(a.op));
    EXPECT_EQ(tn_op_validate(ctx, &a), TN_OK) << tn_context_last_error(ctx);
    ExpectRefused([&] { return tn_op_run(ctx, &a); }, TN_ERR_UNAVAILABLE, {"CUDA"});
  }
  ExpectRefused([&] { return tn_rms_norm(ctx, &tx, &tw, 1.0f, 1e-6f, &ty); }, TN_ERR_UNAVAILABLE, {"CUDA"});
  ExpectRefused([&] { return tn_rms_norm_mul(ctx, &tx, &tw, 0.0f, &tmul, 1e-6f, &ty); }, TN_ERR_UNAVAILABLE,
                {"CUDA"});
  ExpectRefused([&] { return tn_l2_norm(ctx, &tx, 1e-6f, 1.0f, &ty); }, TN_ERR_UNAVAILABLE, {"CUDA"});
  ExpectRefused([&] { return tn_add_rms_norm(ctx, &tx, &tres, &tw, 0.0f, 1e-6f, &ty, &trout); },
                TN_ERR_UNAVAILABLE, {"CUDA"});
  EXPECT_EQ(tn_device_available(ctx, TN_DEVICE_CUDA), TN_ERR_UNAVAILABLE);
  EXPECT_NE(std::string(tn_context_last_error(ctx)).find("CUDA"), std::string::npos) << tn_context_last_error(ctx);
  EXPECT_EQ(tn_device_available(ctx, TN_DEVICE_CPU), TN_OK);
  EXPECT_STREQ(tn_context_last_error(ctx), "");
}

TEST_F(Validation, MixedDevices) {
  ty.device.kind = TN_DEVICE_CUDA;
  ExpectArgsRefused(Rms(), TN_ERR_DEVICE, {"rms_norm", "y is on device 1:0, x on 0:0"});
  ty.device.kind = TN_DEVICE_CPU;
  tx.device.kind = TN_DEVICE_CUDA;
  tx.device.index = 1;
  ExpectArgsRefused(Rms(), TN_ERR_DEVICE, {"y is on device 0:0, x on 1:1"});
  tx.device.kind = TN_DEVICE_CUDA;
  tx.device.index = 0;
  ty.device.kind = TN_DEVICE_CUDA;
  ty.device.index = 0;
  tn_op_args a = Rms();
  a.weight = &tw;  // weight left on the CPU
  ExpectArgsRefused(a, TN_ERR_DEVICE, {"weight is on device 0:0, x on 1:0"});
}

// ------------------------------------------------------------------------------------------------
// rows == 0
// ------------------------------------------------------------------------------------------------

TEST_F(Validation, ZeroRowsIsNoOp) {
  for (auto *v : {&y, &rout}) memset(v->data(), 0xFF, v->size() * 4);
  std::vector<float> x0 = x, y0 = y, r0 = rout;
  tx.rows = ty.rows = tres.rows = trout.rows = tmul.rows = 0;
  tn_op_args a = Rms();
  a.weight = &tw;
  a.mul = &tmul;
  ExpectArgsAccepted(a);
  ExpectArgsAccepted(L2());
  tn_op_args b = Add();
  b.weight = &tw;
  ExpectArgsAccepted(b);
  // In place with rows == 0 too.
  tn_op_args c = Rms();
  c.y = &tx;
  ExpectArgsAccepted(c);
  EXPECT_EQ(memcmp(y.data(), y0.data(), y.size() * 4), 0);
  EXPECT_EQ(memcmp(rout.data(), r0.data(), rout.size() * 4), 0);
  EXPECT_EQ(memcmp(x.data(), x0.data(), x.size() * 4), 0);
}

TEST_F(Validation, ErrorThenSuccessClearsMessage) {
  tn_op_args a = Rms();
  a.eps = -1.0f;
  EXPECT_EQ(tn_op_run(ctx, &a), TN_ERR_VALUE);
  EXPECT_STRNE(tn_context_last_error(ctx), "");
  a.eps = 1e-6f;
  EXPECT_EQ(tn_op_run(ctx, &a), TN_OK);
  EXPECT_STREQ(tn_context_last_error(ctx), "");
}

TEST_F(Validation, ValidateWritesNothing) {
  memset(y.data(), 0xFF, y.size() * 4);
  std::vector<float> y0 = y;
  tn_op_args a = Rms();
  EXPECT_EQ(tn_op_validate(ctx, &a), TN_OK);
  EXPECT_STREQ(tn_context_last_error(ctx), "");
  EXPECT_EQ(memcmp(y.data(), y0.data(), y.size() * 4), 0);
  EXPECT_EQ(tn_op_run(ctx, &a), TN_OK);
  EXPECT_NE(memcmp(y.data(), y0.data(), y.size() * 4), 0);
}

// ------------------------------------------------------------------------------------------------
// Names, sizes, context
// ------------------------------------------------------------------------------------------------

TEST(Names, Statuses) {
  struct S {
    tn_status s;
    const char *name;
    const char *text;
  };
  const S table[] = {
#define TN_TEST_ROW_(name, value, text) {name, #name, text},
      TN_STATUS_TABLE(TN_TEST_ROW_)
#undef TN_TEST_ROW_
  };
  ASSERT_EQ(sizeof table / sizeof table[0], 14u);
  std::vector<std::string> names, texts;
  for (const S &e : table) {
    SCOPED_TRACE(e.name);
    ASSERT_NE(tn_status_name(e.s), nullptr);
    ASSERT_NE(tn_status_string(e.s), nullptr);
    EXPECT_STREQ(tn_status_name(e.s), e.name);
    EXPECT_STREQ(tn_status_string(e.s), e.text);
    EXPECT_STRNE(tn_status_string(e.s), "");
    names.push_back(tn_status_name(e.s));
    texts.push_back(tn_status_string(e.s));
  }
  for (size_t i = 0; i < names.size(); i++)
    for (size_t j = i + 1; j < names.size(); j++) {
      EXPECT_NE(names[i], names[j]);
      EXPECT_NE(texts[i], texts[j]);
    }
  EXPECT_STREQ(tn_status_name(TN_OK), "TN_OK");
  EXPECT_STREQ(tn_status_string(TN_OK), "success");
  EXPECT_STREQ(tn_status_name(TN_ERR_SHAPE), "TN_ERR_SHAPE");
  EXPECT_STREQ(tn_status_string(TN_ERR_SHAPE), "shapes or strides do not agree");
  EXPECT_EQ((int)TN_ERR_INTERNAL, 12);
  EXPECT_EQ((int)TN_ERR_BUSY, 13);
  for (int v : {14, 99, -1, INT_MAX}) {
    SCOPED_TRACE(v);
    ASSERT_NE(tn_status_name((tn_status)v), nullptr);
    ASSERT_NE(tn_status_string((tn_status)v), nullptr);
    EXPECT_STREQ(tn_status_name((tn_status)v), "TN_UNKNOWN_STATUS");
    EXPECT_STRNE(tn_status_string((tn_status)v), "");
  }
}

TEST(Names, Dtypes) {
  EXPECT_STREQ(tn_dtype_name(TN_F32), "f32");
  EXPECT_STREQ(tn_dtype_name(TN_F16), "f16");
  EXPECT_STREQ(tn_dtype_name(TN_BF16), "bf16");
  EXPECT_EQ(tn_dtype_size(TN_F32), 4u);
  EXPECT_EQ(tn_dtype_size(TN_F16), 2u);
  EXPECT_EQ(tn_dtype_size(TN_BF16), 2u);
  EXPECT_STREQ(tn_dtype_name(TN_F8_E4M3), "f8_e4m3");
  EXPECT_STREQ(tn_dtype_name(TN_F8_E5M2), "f8_e5m2");
  EXPECT_STREQ(tn_dtype_name(TN_I8), "i8");
  EXPECT_STREQ(tn_dtype_name(TN_U8), "u8");
  for (tn_dtype d : {TN_F8_E4M3, TN_F8_E5M2, TN_I8, TN_U8}) EXPECT_EQ(tn_dtype_size(d), 1u);
  for (int v : {7, 8, -1, 1000}) {
    SCOPED_TRACE(v);
    EXPECT_STREQ(tn_dtype_name((tn_dtype)v), "?");
    EXPECT_EQ(tn_dtype_size((tn_dtype)v), 0u);
  }
}

TEST(Names, Ops) {
  EXPECT_STREQ(tn_op_name(TN_OP_RMS_NORM), "rms_norm");
  EXPECT_STREQ(tn_op_name(TN_OP_L2_NORM), "l2_norm");
  EXPECT_STREQ(tn_op_name(TN_OP_ADD_RMS_NORM), "add_rms_norm");
  EXPECT_STREQ(tn_op_name(TN_OP_ADD), "add");
  EXPECT_STREQ(tn_op_name(TN_OP_MUL), "mul");
  EXPECT_STREQ(tn_op_name(TN_OP_SCALE), "scale");
  for (int v : {TN_OP_COUNT, -1, 77}) EXPECT_STREQ(tn_op_name((tn_op)v), "?");
  tn_op_args a = tn_op_args_init(TN_OP_L2_NORM);
  EXPECT_EQ(a.op, TN_OP_L2_NORM);
  EXPECT_EQ(a.x, nullptr);
  EXPECT_EQ(a.weight, nullptr);
  EXPECT_EQ(a.mul, nullptr);
  EXPECT_EQ(a.residual, nullptr);
  EXPECT_EQ(a.y, nullptr);
  EXPECT_EQ(a.residual_out, nullptr);
  EXPECT_EQ(a.eps, 1e-6f);
  EXPECT_EQ(a.scale, 1.0f);
  EXPECT_EQ(a.weight_offset, 0.0f);
  EXPECT_STREQ(tn_version(), "0.2.0");
}

TEST(Context, CreateDestroy) {
  tn_context_destroy(nullptr);  // a no-op
  tn_context *ctx = nullptr;
  ASSERT_EQ(tn_context_create(&ctx), TN_OK);
  ASSERT_NE(ctx, nullptr);
  EXPECT_STREQ(tn_context_last_error(ctx), "");
  EXPECT_GE(tn_context_num_threads(ctx), 1);
  EXPECT_EQ(tn_context_set_num_threads(ctx, 3), TN_OK);
  EXPECT_EQ(tn_context_num_threads(ctx), 3);
  EXPECT_EQ(tn_context_set_num_threads(ctx, 0), TN_OK);  // back to automatic
  EXPECT_GE(tn_context_num_threads(ctx), 1);
  EXPECT_EQ(tn_context_set_num_threads(ctx, -5), TN_OK);
  EXPECT_GE(tn_context_num_threads(ctx), 1);
  tn_context_destroy(ctx);
}

TEST(Context, ThreadsFromEnvironment) {
  // TNORM_NUM_THREADS is read when a context has no explicit count: a positive integer, else the
  // number of online processors.
  const char *old = getenv("TNORM_NUM_THREADS");
  std::string saved = old != nullptr ? old : "";
  long online = sysconf(_SC_NPROCESSORS_ONLN);
  tn_context *ctx = nullptr;
  ASSERT_EQ(tn_context_create(&ctx), TN_OK);
  setenv("TNORM_NUM_THREADS", "3", 1);
  EXPECT_EQ(tn_context_num_threads(ctx), 3);
  EXPECT_EQ(tn_context_set_num_threads(ctx, 2), TN_OK);
  EXPECT_EQ(tn_context_num_threads(ctx), 2);  // the explicit count wins
  EXPECT_EQ(tn_context_set_num_threads(ctx, 0), TN_OK);
  EXPECT_EQ(tn_context_num_threads(ctx), 3);
  for (const char *bad : {"0", "-2", "abc", "4x", ""}) {
    SCOPED_TRACE(bad);
    setenv("TNORM_NUM_THREADS", bad, 1);
    EXPECT_EQ(tn_context_num_threads(ctx), online > 0 ? (int)online : 1);
  }
  // An op still runs with the environment's count.
  setenv("TNORM_NUM_THREADS", "2", 1);
  std::vector<float> x(64 * 1024, 0.5f), y(64 * 1024);
  tn_tensor tx = tn_tensor_2d(x.data(), TN_F32, 64, 1024), ty = tn_tensor_2d(y.data(), TN_F32, 64, 1024);
  EXPECT_EQ(tn_rms_norm(ctx, &tx, nullptr, 0.0f, 0.0f, &ty), TN_OK) << tn_context_last_error(ctx);
  EXPECT_EQ(y[0], 1.0f);
  EXPECT_EQ(y.back(), 1.0f);
  if (old != nullptr)
    setenv("TNORM_NUM_THREADS", saved.c_str(), 1);
  else
    unsetenv("TNORM_NUM_THREADS");
  tn_context_destroy(ctx);
}

// ------------------------------------------------------------------------------------------------
// Readings of the spec that an earlier version got wrong; each states the reading it checks.
// ------------------------------------------------------------------------------------------------

// "index: CUDA device ordinal; 0 for the CPU": a CPU tensor with index 5 is refused.
TEST_F(Validation, CpuDeviceIndexMustBeZero) {
  tx.device.index = ty.device.index = 5;
  ExpectArgsRefused(Rms(), TN_ERR_DEVICE, {"index 5"});
}

// A call on CUDA tensors gives TN_ERR_UNAVAILABLE where no GPU is usable, with rows == 0 as well.
TEST_F(Validation, CudaWithZeroRowsIsUnavailable) {
  SKIP_IF_CUDA_AVAILABLE();
  for (tn_tensor *t : {&tx, &ty}) {
    t->device.kind = TN_DEVICE_CUDA;
    t->rows = 0;
  }
  tn_op_args a = Rms();
  ExpectRefused([&] { return tn_op_run(ctx, &a); }, TN_ERR_UNAVAILABLE, {"CUDA"});
}

// "any other overlap between an output and another operand is refused": views that share no byte are
// not an overlap, also when one view has a single row or the row pitches differ.
TEST_F(Validation, DisjointViewsAreAccepted) {
  // The weight in the gap after y's first row (y = columns [0, 64) of a 10 x 128 buffer).
  std::vector<float> buf(10 * 128, 1.0f), xb(10 * 64, 0.5f);
  tn_tensor by = tn_tensor_strided(buf.data(), TN_F32, 10, 64, 128);
  tn_tensor wv = tn_tensor_vector(buf.data() + 64, TN_F32, 64);
  tn_tensor bx = tn_tensor_2d(xb.data(), TN_F32, 10, 64);
  tn_op_args a = Rms();
  a.x = &bx;
  a.y = &by;
  a.weight = &wv;
  ExpectArgsAccepted(a);
  // x = columns [0, 64) of the even rows of a 10 x 128 buffer (pitch 256 floats), y = columns [64, 128) of
  // rows 0, 4 and 8 (pitch 512 floats): no shared byte, different pitches.
  std::vector<float> c(10 * 128, 1.0f);
  tn_tensor x3 = tn_tensor_strided(c.data(), TN_F32, 3, 64, 256);
  tn_tensor y3 = tn_tensor_strided(c.data() + 64, TN_F32, 3, 64, 512);
  tn_op_args b = L2();
  b.x = &x3;
  b.y = &y3;
  ExpectArgsAccepted(b);
}

// ------------------------------------------------------------------------------------------------
// 3-D views [rows, heads, dim]
// ------------------------------------------------------------------------------------------------

TEST_F(Validation, HeadViewShapes) {
  // A 2-row buffer of 2 heads of 8 (row_stride 16) over 32 floats: x's own storage.
  std::vector<float> hb(64, 0.5f), yb(64);
  for (size_t i = 0; i < hb.size(); i++) hb[i] = 0.25f * (float)(i % 9) - 1.0f;
  Region hin{hb.data(), hb.size() * 4}, hout{yb.data(), yb.size() * 4};
  auto heads = [&](float *p, int64_t rows, int64_t h, int64_t row_stride, int64_t head_stride) {
    return tn_tensor_heads(p, TN_F32, rows, h, D, row_stride, head_stride);
  };
  tn_tensor hx = heads(hb.data(), 2, 2, 16, 8), hy = heads(yb.data(), 2, 2, 16, 8);
  tn_op_args a = Rms();
  a.x = &hx;
  a.y = &hy;
  {
    tn_tensor bad = hx;
    bad.heads = -1;
    a.x = &bad;
    ExpectArgsRefused(a, TN_ERR_SHAPE, {"rms_norm: x has -1 heads; must be >= 0"}, {hout}, {hin});
    bad = heads(hb.data(), 2, 2, 16, 7);
    ExpectArgsRefused(a, TN_ERR_SHAPE, {"x has head_stride 7, less than its dim 8"}, {hout}, {hin});
    bad = heads(hb.data(), 2, 2, 15, 8);
    ExpectArgsRefused(a, TN_ERR_SHAPE, {"x has row_stride 15, less than its 2 heads span (16 elements"}, {hout},
                      {hin});
    bad = heads(hb.data(), 2, INT64_MAX / 2, INT64_MAX, 8);
    ExpectArgsRefused(a, TN_ERR_OVERFLOW, {"x of", "heads x head_stride 8 overflows 64 bits"}, {hout}, {hin});
    a.x = &hx;
  }
  {
    // y and mul must have x's heads (each its own head_stride).
    tn_tensor y2 = tn_tensor_2d(yb.data(), TN_F32, 2, D);
    a.y = &y2;
    ExpectArgsRefused(a, TN_ERR_SHAPE, {"y has 1 heads per row, x has 2"}, {hout}, {hin});
    tn_tensor y4 = heads(yb.data(), 1, 4, 32, 8);
    a.y = &y4;
    ExpectArgsRefused(a, TN_ERR_SHAPE, {"y is 1 x 8, x is 2 x 8"}, {hout}, {hin});
    tn_tensor y3 = heads(yb.data(), 2, 3, 24, 8);
    a.y = &y3;
    ExpectArgsRefused(a, TN_ERR_SHAPE, {"y has 3 heads per row, x has 2"}, {hout}, {hin});
    a.y = &hy;
    tn_tensor m2 = tn_tensor_2d(mul.data(), TN_F32, 2, D);
    a.mul = &m2;
    ExpectArgsRefused(a, TN_ERR_SHAPE, {"mul has 1 heads per row, x has 2"}, {hout}, {hin});
    a.mul = nullptr;
  }
  {
    // Vectors (weight, bias) are one row without heads.
    std::vector<float> wbuf(16, 1.0f);
    tn_tensor wh = tn_tensor_heads(wbuf.data(), TN_F32, 1, 2, D, 16, 8);
    a.weight = &wh;
    ExpectArgsRefused(a, TN_ERR_SHAPE, {"weight is 1 x 8 with heads; must be one row of dim 8 elements"}, {hout},
                      {hin});
    a.weight = nullptr;
  }
  // Only rms_norm and l2_norm take 3-D views.
  for (tn_op op : {TN_OP_ADD_RMS_NORM, TN_OP_LAYER_NORM, TN_OP_ADD_LAYER_NORM, TN_OP_ADD, TN_OP_MUL, TN_OP_SCALE}) {
    tn_op_args b = tn_op_args_init(op);
    b.x = &hx;
    b.y = &hy;
    tn_tensor r3 = heads(res.data(), 1, 2, 16, 8), ro3 = heads(rout.data(), 1, 2, 16, 8);
    r3.rows = ro3.rows = 1;
    if (op == TN_OP_ADD_RMS_NORM || op == TN_OP_ADD_LAYER_NORM || op == TN_OP_ADD) b.residual = &r3;
    if (op == TN_OP_ADD_RMS_NORM || op == TN_OP_ADD_LAYER_NORM) b.residual_out = &ro3;
    if (op == TN_OP_MUL) b.mul = &r3;
    ExpectArgsRefused(b, TN_ERR_SHAPE, {tn_op_name(op), "x is a 3-D view (2 heads); this op takes 2-D views"}, {hout},
                      {hin});
  }
  // heads 0 and 1 are both a 2-D view.
  for (int64_t h : {0, 1}) {
    tn_tensor x2 = tx;
    x2.heads = h;
    x2.head_stride = 12345;  // ignored for a 2-D view
    tn_op_args b = Rms();
    b.x = &x2;
    ExpectArgsAccepted(b);
  }
}

// Accepted 3-D views: each head normalised on its own, in place too; the gaps between heads untouched.
TEST_F(Validation, HeadViewsAccepted) {
  std::vector<float> hb(2 * 40), before;
  for (size_t i = 0; i < hb.size(); i++) hb[i] = 0.125f * (float)(i % 11) - 0.5f;
  before = hb;
  // 2 rows of 3 heads of 8, head_stride 12 (4-float gaps), row_stride 40 (4 more after the last head).
  tn_tensor hx = tn_tensor_heads(hb.data(), TN_F32, 2, 3, D, 40, 12);
  tn_op_args a = L2();
  a.x = &hx;
  a.y = &hx;
  a.l2_mode = TN_L2_MAX_NORM_EPS;
  ExpectArgsAccepted(a);
  for (int64_t r = 0; r < 2; r++)
    for (int64_t h = 0; h < 3; h++) {
      double ss = 0;
      for (int64_t i = 0; i < D; i++) ss += (double)before[r * 40 + h * 12 + i] * before[r * 40 + h * 12 + i];
      for (int64_t i = 0; i < D; i++) {
        const double want = before[r * 40 + h * 12 + i] / std::max(sqrt(ss), 1e-6);
        EXPECT_NEAR(hb[r * 40 + h * 12 + i], want, 1e-6) << "row " << r << " head " << h << " col " << i;
      }
    }
  for (int64_t r = 0; r < 2; r++)
    for (int64_t k = 0; k < 40; k++)
      if (k >= 36 || k % 12 >= D) EXPECT_EQ(hb[r * 40 + k], before[r * 40 + k]) << "gap element " << r * 40 + k;
}

// Q and K of one packed QKV buffer: disjoint spans are not an overlap; heads interleaved with another view's
// heads are (a row of a 3-D view covers its whole span).
TEST_F(Validation, HeadViewOverlaps) {
  std::vector<float> qkv(2 * 32, 0.5f);
  Region all{qkv.data(), qkv.size() * 4};
  tn_tensor q = tn_tensor_heads(qkv.data(), TN_F32, 2, 2, D, 32, 8);       // elements [0, 16) of a row
  tn_tensor k = tn_tensor_heads(qkv.data() + 16, TN_F32, 2, 2, D, 32, 8);  // [16, 32)
  tn_op_args a = Rms();
  a.x = &q;
  a.y = &k;
  ExpectArgsAccepted(a);
  tn_tensor qi = tn_tensor_heads(qkv.data(), TN_F32, 2, 2, D, 32, 16);     // heads at 0 and 16
  tn_tensor ki = tn_tensor_heads(qkv.data() + 8, TN_F32, 2, 2, D, 32, 16); // heads at 8 and 24
  a.x = &qi;
  a.y = &ki;
  ExpectArgsRefused(a, TN_ERR_OVERLAP, {"y overlaps x"}, {}, {all});
  // A y that is x with another head_stride is not the same view.
  tn_tensor q2 = tn_tensor_heads(qkv.data(), TN_F32, 2, 2, D, 32, 9);
  a.x = &q;
  a.y = &q2;
  ExpectArgsRefused(a, TN_ERR_OVERLAP, {"y overlaps x without being the same view"}, {}, {all});
}

// ------------------------------------------------------------------------------------------------
// Numerics modes: casting, residual_mode, l2_mode
// ------------------------------------------------------------------------------------------------

TEST_F(Validation, Casting) {
  for (tn_op_args a : {Rms(), L2(), Add()}) {
    a.casting = (tn_casting)7;
    ExpectArgsRefused(a, TN_ERR_VALUE, {tn_op_name(a.op), "unknown casting 7"});
    a.casting = (tn_casting)-1;
    ExpectArgsRefused(a, TN_ERR_VALUE, {"unknown casting -1"});
    a.casting = TN_CASTING_LLAMA;
    ExpectArgsAccepted(a);
  }
  for (tn_op op : {TN_OP_ADD, TN_OP_MUL, TN_OP_SCALE}) {
    tn_op_args a = tn_op_args_init(op);
    a.x = &tx;
    a.y = &ty;
    if (op == TN_OP_ADD) a.residual = &tres;
    if (op == TN_OP_MUL) a.mul = &tmul;
    a.casting = TN_CASTING_LLAMA;
    ExpectArgsRefused(a, TN_ERR_VALUE, {tn_op_name(op), "casting applies to the norms only"});
  }
}

TEST_F(Validation, ResidualMode) {
  tn_op_args a = Add();
  a.residual_mode = (tn_residual_mode)2;
  ExpectArgsRefused(a, TN_ERR_VALUE, {"add_rms_norm: unknown residual_mode 2"});
  a.residual_mode = TN_RESIDUAL_NORM_F32;
  ExpectArgsAccepted(a);
  for (tn_op_args b : {Rms(), L2()}) {
    b.residual_mode = TN_RESIDUAL_NORM_F32;
    ExpectArgsRefused(b, TN_ERR_VALUE, {tn_op_name(b.op), "residual_mode applies to add_rms_norm and add_layer_norm"});
  }
  tn_op_args c = Rms();
  c.op = TN_OP_LAYER_NORM;
  c.residual_mode = TN_RESIDUAL_NORM_F32;
  ExpectArgsRefused(c, TN_ERR_VALUE, {"layer_norm: residual_mode applies"});
}

TEST_F(Validation, L2Mode) {
  tn_op_args a = L2();
  a.l2_mode = (tn_l2_mode)5;
  ExpectArgsRefused(a, TN_ERR_VALUE, {"l2_norm: unknown l2_mode 5"});
  a.l2_mode = TN_L2_MAX_NORM_EPS;
  ExpectArgsAccepted(a);
  for (tn_op_args b : {Rms(), Add()}) {
    b.l2_mode = TN_L2_MAX_NORM_EPS;
    ExpectArgsRefused(b, TN_ERR_VALUE, {tn_op_name(b.op), "l2_mode applies to l2_norm only"});
  }
}

// ------------------------------------------------------------------------------------------------
// The residual stream: residual and residual_out both of x's dtype, or both f32; y of x's dtype.
// ------------------------------------------------------------------------------------------------

TEST_F(Validation, ResidualStreamDtypes) {
  std::vector<uint16_t> xb(R * D, 0x3f80), yb(R * D), hb(R * D, 0x3c00), rob16(R * D);
  tn_tensor bx = tn_tensor_2d(xb.data(), TN_BF16, R, D), by = tn_tensor_2d(yb.data(), TN_BF16, R, D);
  tn_tensor h16 = tn_tensor_2d(hb.data(), TN_F16, R, D), bro = tn_tensor_2d(rob16.data(), TN_BF16, R, D);
  Region outs[] = {{yb.data(), yb.size() * 2}, {rob16.data(), rob16.size() * 2}};
  for (tn_op op : {TN_OP_ADD_RMS_NORM, TN_OP_ADD_LAYER_NORM}) {
    SCOPED_TRACE(tn_op_name(op));
    tn_op_args a = tn_op_args_init(op);
    a.x = &bx;
    a.y = &by;
    a.residual = &tres;  // f32 beside bf16 x: the f32 residual stream
    a.residual_out = &trout;
    for (tn_residual_mode mode : {TN_RESIDUAL_NORM_STORED, TN_RESIDUAL_NORM_F32}) {
      a.residual_mode = mode;
      ExpectArgsAccepted(a);
      // residual_out = float(x) + float(residual), in f32 exactly.
      for (int64_t i = 0; i < R * D; i++) EXPECT_EQ(rout[i], 1.0f + res[i]) << i;
    }
    a.residual_mode = TN_RESIDUAL_NORM_STORED;
    a.residual = &h16;
    ExpectArgsRefused(a, TN_ERR_DTYPE, {"residual is f16, x is bf16 (the residual stream may also be f32)"},
                      {outs[0], outs[1], {rout.data(), rout.size() * 4}}, {{hb.data(), hb.size() * 2}});
    a.residual = &tres;
    a.residual_out = &bro;
    ExpectArgsRefused(a, TN_ERR_DTYPE, {"residual_out is bf16, residual is f32; must be the same"},
                      {outs[0], outs[1]});
    tn_tensor bres = bx;
    a.residual = &bres;
    a.residual_out = &trout;
    ExpectArgsRefused(a, TN_ERR_DTYPE, {"residual_out is f32, residual is bf16; must be the same"},
                      {outs[0], {rout.data(), rout.size() * 4}});
    // y (and mul) stay x's dtype.
    a.residual = &tres;
    a.y = &ty;
    ExpectArgsRefused(a, TN_ERR_DTYPE, {"y is f32, x is bf16"}, {{rout.data(), rout.size() * 4}});
    a.y = &by;
    if (op == TN_OP_ADD_RMS_NORM) {
      a.mul = &tmul;
      ExpectArgsRefused(a, TN_ERR_DTYPE, {"mul is f32, x is bf16"}, {outs[0], {rout.data(), rout.size() * 4}});
      a.mul = nullptr;
    }
    // f32 x takes only an f32 residual.
    tn_op_args b = tn_op_args_init(op);
    b.x = &tx;
    b.y = &ty;
    b.residual = &bres;
    b.residual_out = &bro;
    ExpectArgsRefused(b, TN_ERR_DTYPE, {"residual is bf16, x is f32"}, {outs[1]}, {{xb.data(), xb.size() * 2}});
  }
  // add (not a residual stream): b is x's dtype.
  tn_op_args c = tn_op_args_init(TN_OP_ADD);
  c.x = &bx;
  c.residual = &tres;
  c.y = &by;
  ExpectArgsRefused(c, TN_ERR_DTYPE, {"add: residual is f32, x is bf16"}, {outs[0]});
}

// ------------------------------------------------------------------------------------------------
// layer_norm and add_layer_norm: bias, weight and the operands they take
// ------------------------------------------------------------------------------------------------

TEST_F(Validation, LayerNormOperands) {
  std::vector<float> bias(D + 8, 0.25f);
  tn_tensor tb = tn_tensor_vector(bias.data(), TN_F32, D);
  tn_op_args a = tn_op_args_init(TN_OP_LAYER_NORM);
  a.x = &tx;
  a.y = &ty;
  a.weight = &tw;
  a.bias = &tb;
  ExpectArgsAccepted(a);
  {
    tn_tensor b7 = tn_tensor_vector(bias.data(), TN_F32, 7);
    a.bias = &b7;
    ExpectArgsRefused(a, TN_ERR_SHAPE, {"layer_norm: bias has 7 elements, dim is 8"});
    tn_tensor b2 = tn_tensor_2d(bias.data(), TN_F32, 2, D / 2);
    a.bias = &b2;
    ExpectArgsRefused(a, TN_ERR_SHAPE, {"bias is 2 x 4; must be one row of dim 8 elements"});
    a.bias = &tb;
  }
  {
    // bf16 x: a bias of f32 or bf16, not f16.
    std::vector<uint16_t> xb(R * D, 0x3f80), yb(R * D), bh(D, 0x3c00);
    tn_tensor bx = tn_tensor_2d(xb.data(), TN_BF16, R, D), by = tn_tensor_2d(yb.data(), TN_BF16, R, D);
    tn_tensor bf16b = tn_tensor_vector(bh.data(), TN_F16, D);
    tn_op_args b = tn_op_args_init(TN_OP_LAYER_NORM);
    b.x = &bx;
    b.y = &by;
    b.bias = &bf16b;
    ExpectArgsRefused(b, TN_ERR_DTYPE, {"bias is f16; must be f32 or x's dtype bf16"}, {{yb.data(), yb.size() * 2}});
    b.bias = &tb;
    ExpectArgsAccepted(b);
  }
  {
    tn_op_args b = a;
    b.mul = &tmul;
    ExpectArgsRefused(b, TN_ERR_OPERAND, {"layer_norm: takes no mul"});
    b = a;
    b.scale = 2.0f;
    ExpectArgsRefused(b, TN_ERR_VALUE, {"layer_norm: scale is 2; this op takes none"});
    b = a;
    b.weight = nullptr;
    b.weight_offset = 1.0f;
    ExpectArgsRefused(b, TN_ERR_VALUE, {"weight_offset is 1 without a weight"});
    b = a;
    b.eps = -1.0f;
    ExpectArgsRefused(b, TN_ERR_VALUE, {"layer_norm: eps is -1"});
  }
  // bias on the ops that take none.
  for (tn_op_args b : {Rms(), L2(), Add()}) {
    b.bias = &tb;
    ExpectArgsRefused(b, TN_ERR_OPERAND, {tn_op_name(b.op), "takes no bias"});
  }
  // add_layer_norm needs residual and residual_out.
  tn_op_args c = a;
  c.op = TN_OP_ADD_LAYER_NORM;
  ExpectArgsRefused(c, TN_ERR_NULL, {"add_layer_norm: residual is required"});
  c.residual = &tres;
  ExpectArgsRefused(c, TN_ERR_NULL, {"add_layer_norm: residual_out is required"});
  c.residual_out = &trout;
  ExpectArgsAccepted(c);
  ExpectMatchesReference(c);
  // An output over the bias: refused.
  tn_tensor yb = tn_tensor_2d(bias.data(), TN_F32, 1, D);
  tn_tensor x1 = tn_tensor_2d(x.data(), TN_F32, 1, D);
  tn_op_args d = a;
  d.x = &x1;
  d.y = &yb;
  ExpectArgsRefused(d, TN_ERR_OVERLAP, {"y overlaps bias"}, {}, {{bias.data(), bias.size() * 4}});
  // Both entry points with every operand optional but y.
  ExpectRefused([&] { return tn_layer_norm(ctx, &tx, nullptr, nullptr, 1e-5f, nullptr); }, TN_ERR_NULL,
                {"layer_norm: y is required"});
  ExpectRefused([&] { return tn_add_layer_norm(ctx, &tx, nullptr, nullptr, nullptr, 1e-5f, &ty, &trout); },
                TN_ERR_NULL, {"add_layer_norm: residual is required"});
  EXPECT_EQ(tn_layer_norm(ctx, &tx, nullptr, nullptr, 1e-5f, &ty), TN_OK) << tn_context_last_error(ctx);
}

// ------------------------------------------------------------------------------------------------
// The rope
// ------------------------------------------------------------------------------------------------

TEST_F(Validation, Rope) {
  std::vector<int32_t> pos(R, 0);
  std::vector<float> table(3 * D, 0.5f);
  tn_tensor cs = tn_tensor_2d(table.data(), TN_F32, 3, D);
  Region tin{table.data(), table.size() * 4};
  auto Rope = [&]() {
    tn_op_args a = Rms();
    a.weight = &tw;
    a.rope.style = TN_ROPE_NEOX;
    a.rope.positions = pos.data();
    a.rope.theta = 10000.0f;
    return a;
  };
  ExpectArgsAccepted(Rope());
  {
    tn_op_args a = Rope();
    a.rope.style = (tn_rope_style)7;
    ExpectArgsRefused(a, TN_ERR_VALUE, {"rms_norm: unknown rope style 7"});
    a.rope.style = TN_ROPE_NONE;
    a.rope.cos_sin = &cs;
    ExpectArgsRefused(a, TN_ERR_OPERAND, {"cos_sin given without a rope style"}, {}, {tin});
  }
  // Only rms_norm, and without a multiplicand.
  for (tn_op_args a : {L2(), Add()}) {
    a.rope.style = TN_ROPE_GPTJ;
    a.rope.positions = pos.data();
    a.rope.theta = 10000.0f;
    ExpectArgsRefused(a, TN_ERR_VALUE, {tn_op_name(a.op), "takes no rope (rms_norm does)"});
    a.rope.cos_sin = &cs;
    ExpectArgsRefused(a, TN_ERR_OPERAND, {tn_op_name(a.op), "takes no cos_sin operand"}, {}, {tin});
  }
  {
    tn_op_args a = Rope();
    a.op = TN_OP_LAYER_NORM;
    ExpectArgsRefused(a, TN_ERR_VALUE, {"layer_norm: takes no rope"});
    a = Rope();
    a.mul = &tmul;
    ExpectArgsRefused(a, TN_ERR_OPERAND, {"a rope and a multiplicand cannot be combined"});
  }
  // rotary_dim: even, 2 .. dim, 0 for dim.
  for (int64_t rot : {(int64_t)1, (int64_t)3, (int64_t)7, (int64_t)10, (int64_t)-2, (int64_t)16}) {
    tn_op_args a = Rope();
    a.rope.rotary_dim = rot;
    ExpectArgsRefused(a, TN_ERR_VALUE,
                      {"rotary_dim is " + std::to_string(rot) + "; must be even, from 2 to dim 8 (0 means dim)"});
  }
  for (int64_t rot : {(int64_t)0, (int64_t)2, (int64_t)4, (int64_t)8}) {
    tn_op_args a = Rope();
    a.rope.rotary_dim = rot;
    ExpectArgsAccepted(a);
  }
  // Heads of more than TN_ROPE_MAX_DIM elements.
  {
    const int64_t big = TN_ROPE_MAX_DIM + 1;
    std::vector<float> xb(2 * big, 1.0f), yb(2 * big);
    tn_tensor bx = tn_tensor_2d(xb.data(), TN_F32, 2, big), by = tn_tensor_2d(yb.data(), TN_F32, 2, big);
    tn_op_args a = Rope();
    a.x = &bx;
    a.y = &by;
    a.weight = nullptr;
    ExpectArgsRefused(a, TN_ERR_SHAPE, {"rope on heads of 513 elements; at most 512"}, {{yb.data(), yb.size() * 4}});
    tn_tensor bx512 = tn_tensor_strided(xb.data(), TN_F32, 2, TN_ROPE_MAX_DIM, big),
              by512 = tn_tensor_strided(yb.data(), TN_F32, 2, TN_ROPE_MAX_DIM, big);
    a.x = &bx512;
    a.y = &by512;
    ExpectArgsAccepted(a);
  }
  // Positions.
  {
    tn_op_args a = Rope();
    a.rope.positions = nullptr;
    ExpectArgsRefused(a, TN_ERR_NULL, {"rope positions are NULL"});
    tn_tensor x0 = tx;
    x0.rows = 0;
    tn_tensor y0 = ty;
    y0.rows = 0;
    a.x = &x0;
    a.y = &y0;
    ExpectArgsAccepted(a);  // nothing to rotate
    a = Rope();
    a.rope.positions_i64 = 2;
    ExpectArgsRefused(a, TN_ERR_VALUE, {"positions_i64 is 2; must be 0 (int32) or 1 (int64)"});
  }
  // theta without a table.
  for (float theta : {0.0f, -1.0f, kNaN, kInf}) {
    tn_op_args a = Rope();
    a.rope.theta = theta;
    ExpectArgsRefused(a, TN_ERR_VALUE, {"rope theta is", "without a cos_sin table; must be finite and > 0"});
    a.rope.cos_sin = &cs;
    ExpectArgsAccepted(a);  // a table makes theta unused
  }
  // The table: rows of rotary_dim elements, at least one row, f32 or x's dtype, no heads.
  {
    tn_op_args a = Rope();
    a.rope.cos_sin = &cs;
    a.rope.rotary_dim = 4;
    ExpectArgsRefused(a, TN_ERR_SHAPE, {"cos_sin has rows of 8 elements; must be rotary_dim = 4"}, {}, {tin});
    tn_tensor cs4 = tn_tensor_2d(table.data(), TN_F32, 3, 4);
    a.rope.cos_sin = &cs4;
    ExpectArgsAccepted(a);
    a.rope.rotary_dim = 0;
    ExpectArgsRefused(a, TN_ERR_SHAPE, {"cos_sin has rows of 4 elements; must be rotary_dim = 8"}, {}, {tin});
    tn_tensor none = cs;
    none.rows = 0;
    a.rope.cos_sin = &none;
    ExpectArgsRefused(a, TN_ERR_SHAPE, {"cos_sin has no rows"}, {}, {tin});
    tn_tensor ch = tn_tensor_heads(table.data(), TN_F32, 1, 2, D, 2 * D, D);
    a.rope.cos_sin = &ch;
    ExpectArgsRefused(a, TN_ERR_SHAPE, {"cos_sin has rows of 8 elements with heads"}, {}, {tin});
    std::vector<uint16_t> th(3 * D, 0x3c00);
    tn_tensor c16 = tn_tensor_2d(th.data(), TN_F16, 3, D);
    a.rope.cos_sin = &c16;
    ExpectArgsRefused(a, TN_ERR_DTYPE, {"cos_sin is f16; must be f32 or x's dtype f32"}, {}, {tin});
    // An output over the table.
    tn_tensor yt = tn_tensor_2d(table.data(), TN_F32, R, D / 2);
    tn_tensor x4 = tn_tensor_2d(x.data(), TN_F32, R, D / 2);
    a.x = &x4;
    a.y = &yt;
    a.weight = nullptr;
    a.rope.cos_sin = &cs4;
    ExpectArgsRefused(a, TN_ERR_OVERLAP, {"y overlaps cos_sin"}, {}, {tin});
  }
  // On the CPU a table position outside the table is refused when the op runs (validation cannot read the
  // positions on every device), with the row and the position named and nothing written.
  {
    tn_op_args a = Rope();
    a.rope.cos_sin = &cs;
    pos[2] = 3;
    EXPECT_EQ(tn_op_validate(ctx, &a), TN_OK) << tn_context_last_error(ctx);
    ExpectRefused([&] { return tn_op_run(ctx, &a); }, TN_ERR_VALUE, {"rope position 3 of row 2", "cos_sin"}, {},
                  {tin});
    pos[2] = -5;
    ExpectRefused([&] { return tn_op_run(ctx, &a); }, TN_ERR_VALUE, {"rope position -5 of row 2"}, {}, {tin});
    std::vector<int64_t> pos64(R, 2);
    a.rope.positions = pos64.data();
    a.rope.positions_i64 = 1;
    ExpectArgsAccepted(a);
    pos64[3] = (int64_t)1 << 33;
    ExpectRefused([&] { return tn_op_run(ctx, &a); }, TN_ERR_VALUE, {"rope position 8589934592 of row 3"}, {}, {tin});
  }
  // The entry point: NULL rope or style NONE is plain rms_norm.
  EXPECT_EQ(tn_rms_norm_rope(ctx, &tx, &tw, 0.0f, 1e-6f, nullptr, &ty), TN_OK) << tn_context_last_error(ctx);
  tn_rope r = Rope().rope;
  r.rotary_dim = 5;
  ExpectRefused([&] { return tn_rms_norm_rope(ctx, &tx, &tw, 0.0f, 1e-6f, &r, &ty); }, TN_ERR_VALUE,
                {"rotary_dim is 5"});
}

}  // namespace

namespace {
// The thread count has the same bound through the API as through TNORM_NUM_THREADS.
TEST(ContextThreads, SetNumThreadsIsBounded) {
  tn_context *ctx = nullptr;
  ASSERT_EQ(tn_context_create(&ctx), TN_OK);
  EXPECT_EQ(tn_context_set_num_threads(ctx, 3), TN_OK);
  EXPECT_EQ(tn_context_num_threads(ctx), 3);
  EXPECT_EQ(tn_context_set_num_threads(ctx, 100000), TN_ERR_VALUE);
  EXPECT_NE(std::string(tn_context_last_error(ctx)).find("100000"), std::string::npos) << tn_context_last_error(ctx);
  EXPECT_EQ(tn_context_num_threads(ctx), 3);  // unchanged by the refused call
  EXPECT_EQ(tn_context_set_num_threads(ctx, 0), TN_OK);
  EXPECT_GE(tn_context_num_threads(ctx), 1);
  tn_context_destroy(ctx);
}
}  // namespace

// tn_quant_shapes_get: the tensors a quantized output takes, as validation asks for them.
TEST(QuantShapes, EachLayoutAndFormat) {
  tn_quant_shapes s;
  tn_quant q = tn_quant_init(TN_QUANT_FP8_E4M3);  // per token, row-major f32
  ASSERT_EQ(tn_quant_shapes_get(&q, 5, 256, &s), TN_OK);
  EXPECT_EQ(s.q_dtype, TN_F8_E4M3);
  EXPECT_EQ(s.q_rows, 5);
  EXPECT_EQ(s.q_dim, 256);
  EXPECT_EQ(s.scales_dtype, TN_F32);
  EXPECT_EQ(s.scales_rows, 5);
  EXPECT_EQ(s.scales_dim, 1);
  EXPECT_EQ(s.group, 256);
  q.scaling = TN_QUANT_SCALE_GROUP;
  q.group_size = 128;
  q.pow2_scales = 1;
  q.layout = TN_SCALES_COLUMN_MAJOR;
  ASSERT_EQ(tn_quant_shapes_get(&q, 5, 256, &s), TN_OK);
  EXPECT_EQ(s.scales_dtype, TN_U8);
  EXPECT_EQ(s.scales_rows, 2);
  EXPECT_EQ(s.scales_dim, 5);
  tn_quant n = tn_quant_init(TN_QUANT_NVFP4);
  n.layout = TN_SCALES_SWIZZLED;
  ASSERT_EQ(tn_quant_shapes_get(&n, 130, 80, &s), TN_OK);
  EXPECT_EQ(s.q_dtype, TN_U8);
  EXPECT_EQ(s.q_dim, 40);
  EXPECT_EQ(s.scales_dtype, TN_F8_E4M3);
  EXPECT_EQ(s.scales_rows, 256);
  EXPECT_EQ(s.scales_dim, 8);  // 5 groups of 16, rounded up to 4
  EXPECT_EQ(s.group, 16);
  tn_quant t = tn_quant_init(TN_QUANT_INT8);
  t.scaling = TN_QUANT_SCALE_TENSOR;
  ASSERT_EQ(tn_quant_shapes_get(&t, 3, 7, &s), TN_OK);
  EXPECT_EQ(s.scales_rows, 0);
  EXPECT_EQ(s.scales_dim, 0);
  // What tn_op_run would refuse, refused here alike.
  EXPECT_EQ(tn_quant_shapes_get(&q, 5, 200, &s), TN_ERR_SHAPE);  // 200 % 128
  q.group_size = 100;
  EXPECT_EQ(tn_quant_shapes_get(&q, 5, 200, &s), TN_ERR_VALUE);
  t.layout = TN_SCALES_SWIZZLED;
  EXPECT_EQ(tn_quant_shapes_get(&t, 3, 7, &s), TN_ERR_VALUE);
  tn_quant none = tn_quant_init(TN_QUANT_NONE);
  EXPECT_EQ(tn_quant_shapes_get(&none, 3, 7, &s), TN_ERR_VALUE);
  EXPECT_EQ(tn_quant_shapes_get(nullptr, 3, 7, &s), TN_ERR_NULL);
  EXPECT_EQ(tn_quant_shapes_get(&n, 3, 32, nullptr), TN_ERR_NULL);
}
