// add, mul and scale on the CPU: every element against the float32 model of the spec (one operation in
// float32, one rounding to the dtype: bit-exact) and against the float64 reference (within tolerance),
// over dtypes, dims, row counts and layouts (strided, in place, b broadcast over rows), with poisoned
// outputs and row gaps that must stay untouched; then each bad input, refused with nothing written.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "reference.h"
#include "rng.h"
#include "tnorm.h"

namespace {

uint64_t Seed() {
  static const uint64_t seed = [] {
    const char *env = std::getenv("TNORM_TEST_SEED");
    uint64_t s = env != nullptr ? std::strtoull(env, nullptr, 10) : (uint64_t)std::time(nullptr) * 2654435761u;
    std::printf("elementwise test seed: %llu (TNORM_TEST_SEED=%llu repeats this run)\n", (unsigned long long)s,
                (unsigned long long)s);
    return s;
  }();
  return seed;
}

// A host buffer holding a rows x dim view with the given row stride, every byte first 0xff (NaN in every
// dtype), so an element not written or a gap byte written is seen.
struct Buffer {
  std::vector<unsigned char> bytes;
  tn_tensor view;
  Buffer(tn_dtype dt, int64_t rows, int64_t dim, int64_t stride) {
    const size_t elems = rows > 0 ? (size_t)((rows - 1) * stride + dim) : 1;
    bytes.assign(elems * tn_dtype_size(dt), 0xff);
    view = tn_tensor_strided(bytes.data(), dt, rows, dim, stride);
  }
  // A copy views its own bytes.
  Buffer(const Buffer &o) : bytes(o.bytes), view(o.view) { view.data = bytes.data(); }
  Buffer &operator=(const Buffer &) = delete;
  void Fill(tn_rng *rng, double mean) {
    for (int64_t r = 0; r < view.rows; r++)
      for (int64_t i = 0; i < view.dim; i++)
        tn_reference_store(&view, r, i, (float)(mean + 2.0 * tn_rng_normal(rng)));
  }
  bool GapsUntouched() const {
    const size_t es = tn_dtype_size(view.dtype);
    for (int64_t r = 0; r + 1 < view.rows; r++)
      for (size_t k = (size_t)(r * view.row_stride + view.dim) * es; k < (size_t)((r + 1) * view.row_stride) * es; k++)
        if (bytes[k] != 0xff) return false;
    return true;
  }
};

enum Layout { kContiguous, kStrided, kInPlace, kOutIsB, kBroadcast, kLayoutCount };
const char *const kLayoutNames[kLayoutCount] = {"contiguous", "strided", "in place (y is x)", "y is b",
                                                 "b one row"};

// The spec's value of one element: x op b in float32, rounded once to the dtype.
float Model(tn_op op, tn_dtype dt, float x, float b, float scale) {
  const float v = op == TN_OP_ADD ? x + b : op == TN_OP_MUL ? x * b : x * scale;
  return tn_round_to(dt, v);
}

bool SameValue(float a, float b) { return (std::isnan(a) && std::isnan(b)) || std::memcmp(&a, &b, sizeof a) == 0; }

void RunCase(tn_context *ctx, tn_op op, tn_dtype dt, int64_t rows, int64_t dim, Layout layout, uint64_t seed) {
  SCOPED_TRACE(std::string(tn_op_name(op)) + " " + tn_dtype_name(dt) + " " + std::to_string(rows) + " x " +
               std::to_string(dim) + " " + kLayoutNames[layout] + " seed " + std::to_string(seed));
  tn_rng rng = {seed};
  const int64_t stride = layout == kStrided ? dim + 3 : dim;
  const bool has_b = op != TN_OP_SCALE;
  if (!has_b && (layout == kOutIsB || layout == kBroadcast)) return;
  Buffer x(dt, rows, dim, stride), b(dt, layout == kBroadcast ? 1 : rows, dim, stride), y(dt, rows, dim, stride);
  x.Fill(&rng, 0.0);
  b.Fill(&rng, 1.0);
  const Buffer x0 = x, b0 = b;  // the inputs as they were, for the model and the reference
  const float scale = -0.37f;
  tn_op_args a = tn_op_args_init(op);
  a.x = &x.view;
  if (op == TN_OP_ADD) a.residual = &b.view;
  if (op == TN_OP_MUL) a.mul = &b.view;
  if (op == TN_OP_SCALE) a.scale = scale;
  const Buffer *out = layout == kInPlace ? &x : layout == kOutIsB ? &b : &y;
  a.y = &out->view;
  std::vector<double> ref((size_t)(rows * dim) + 1);
  tn_op_args ra = a;  // the reference reads the untouched copies
  ra.x = &x0.view;
  if (op == TN_OP_ADD) ra.residual = &b0.view;
  if (op == TN_OP_MUL) ra.mul = &b0.view;
  ASSERT_EQ(tn_reference_run(&ra, ref.data(), nullptr), 0);

  ASSERT_EQ(tn_op_run(ctx, &a), TN_OK) << tn_context_last_error(ctx);
  for (int64_t r = 0; r < rows; r++) {
    for (int64_t i = 0; i < dim; i++) {
      const float xv = tn_reference_load(&x0.view, r, i);
      const float bv = has_b ? tn_reference_load(&b0.view, layout == kBroadcast ? 0 : r, i) : 0.0f;
      const float want = Model(op, dt, xv, bv, scale), got = tn_reference_load(&out->view, r, i);
      ASSERT_TRUE(SameValue(got, want)) << "row " << r << " col " << i << ": got " << got << ", want " << want;
      ASSERT_LE(tn_reference_error(dt, got, ref[(size_t)(r * dim + i)]), 1.0) << "row " << r << " col " << i;
    }
  }
  EXPECT_TRUE(out->GapsUntouched());
}

TEST(Elementwise, Sweep) {
  tn_context *ctx = nullptr;
  ASSERT_EQ(tn_context_create(&ctx), TN_OK);
  uint64_t seed = Seed();
  for (tn_op op : {TN_OP_ADD, TN_OP_MUL, TN_OP_SCALE})
    for (tn_dtype dt : {TN_F32, TN_F16, TN_BF16})
      for (int64_t dim : {1, 3, 7, 8, 33, 511, 512, 513, 4096, 70000})
        for (int64_t rows : {0, 1, 17, 65})
          for (int layout = 0; layout < kLayoutCount; layout++) {
            if ((int64_t)rows * dim > (1 << 20)) continue;
            RunCase(ctx, op, dt, rows, dim, (Layout)layout, seed++);
            if (HasFatalFailure()) {
              tn_context_destroy(ctx);
              return;
            }
          }
  tn_context_destroy(ctx);
}

// Special values go through the one rounding: NaN stays NaN, Inf stays Inf, overflow gives Inf.
TEST(Elementwise, SpecialValues) {
  tn_context *ctx = nullptr;
  ASSERT_EQ(tn_context_create(&ctx), TN_OK);
  const float big = 60000.0f, nan = std::nanf(""), inf = INFINITY;
  std::vector<float> xs = {nan, inf, -inf, big, 1e-8f, 0.0f, -0.0f, 3.0f};
  std::vector<float> bs = {1.0f, 1.0f, -1.0f, big, 1e-8f, -0.0f, -0.0f, nan};
  for (tn_dtype dt : {TN_F32, TN_F16, TN_BF16}) {
    Buffer x(dt, 1, 8, 8), b(dt, 1, 8, 8), y(dt, 1, 8, 8);
    for (int i = 0; i < 8; i++) {
      tn_reference_store(&x.view, 0, i, xs[i]);
      tn_reference_store(&b.view, 0, i, bs[i]);
    }
    for (tn_op op : {TN_OP_ADD, TN_OP_MUL}) {
      SCOPED_TRACE(std::string(tn_op_name(op)) + " " + tn_dtype_name(dt));
      ASSERT_EQ(op == TN_OP_ADD ? tn_add(ctx, &x.view, &b.view, &y.view) : tn_mul(ctx, &x.view, &b.view, &y.view),
                TN_OK);
      for (int i = 0; i < 8; i++) {
        const float xv = tn_reference_load(&x.view, 0, i), bv = tn_reference_load(&b.view, 0, i);
        EXPECT_TRUE(SameValue(tn_reference_load(&y.view, 0, i), Model(op, dt, xv, bv, 1.0f))) << i;
      }
    }
  }
  tn_context_destroy(ctx);
}

class ElementwiseErrors : public ::testing::Test {
 protected:
  void SetUp() override { ASSERT_EQ(tn_context_create(&ctx), TN_OK); }
  void TearDown() override { tn_context_destroy(ctx); }
  // The call is refused with `want`, the message names the key, and y keeps its poison.
  void ExpectRefused(tn_status got, tn_status want, const char *key) {
    EXPECT_EQ(got, want) << tn_context_last_error(ctx);
    EXPECT_NE(std::string(tn_context_last_error(ctx)).find(key), std::string::npos) << tn_context_last_error(ctx);
    for (unsigned char c : y.bytes) ASSERT_EQ(c, 0xff);
  }
  tn_context *ctx = nullptr;
  Buffer x{TN_F32, 4, 8, 8}, b{TN_F32, 4, 8, 8}, row{TN_F32, 1, 8, 8}, y{TN_F32, 4, 8, 8};
};

TEST_F(ElementwiseErrors, ShapesDtypesScalarsOperands) {
  tn_rng rng = {Seed()};
  x.Fill(&rng, 0.0), b.Fill(&rng, 0.0), row.Fill(&rng, 0.0);
  tn_tensor two = tn_tensor_2d(b.bytes.data(), TN_F32, 2, 8);  // neither x's rows nor one row
  ExpectRefused(tn_add(ctx, &x.view, &two, &y.view), TN_ERR_SHAPE, "residual is 2 x 8, x is 4 x 8");
  tn_tensor short_row = tn_tensor_2d(row.bytes.data(), TN_F32, 1, 7);
  ExpectRefused(tn_mul(ctx, &x.view, &short_row, &y.view), TN_ERR_SHAPE, "mul is 1 x 7");
  tn_tensor half = tn_tensor_2d(b.bytes.data(), TN_BF16, 4, 8);
  ExpectRefused(tn_add(ctx, &x.view, &half, &y.view), TN_ERR_DTYPE, "residual is bf16, x is f32");
  ExpectRefused(tn_scale(ctx, &x.view, NAN, &y.view), TN_ERR_VALUE, "scale is nan");
  ExpectRefused(tn_add(ctx, &x.view, nullptr, &y.view), TN_ERR_NULL, "add: residual is required");
  tn_op_args a = tn_op_args_init(TN_OP_SCALE);
  a.x = &x.view, a.y = &y.view, a.mul = &b.view;
  ExpectRefused(tn_op_run(ctx, &a), TN_ERR_OPERAND, "scale: takes no mul operand");
  a = tn_op_args_init(TN_OP_ADD);
  a.x = &x.view, a.y = &y.view, a.residual = &b.view, a.scale = 2.0f;
  ExpectRefused(tn_op_run(ctx, &a), TN_ERR_VALUE, "add: scale is 2");
  // y over the broadcast row (not the same view): a partial overlap.
  tn_tensor y_over_row = tn_tensor_strided(row.bytes.data(), TN_F32, 4, 2, 2);
  tn_tensor x_small = tn_tensor_2d(x.bytes.data(), TN_F32, 4, 2);
  tn_tensor row_small = tn_tensor_2d(row.bytes.data(), TN_F32, 1, 2);
  EXPECT_EQ(tn_add(ctx, &x_small, &row_small, &y_over_row), TN_ERR_OVERLAP) << tn_context_last_error(ctx);
  // eps is not theirs: a NaN eps in the descriptor is ignored.
  a = tn_op_args_init(TN_OP_MUL);
  a.x = &x.view, a.y = &y.view, a.mul = &row.view, a.eps = NAN;
  EXPECT_EQ(tn_op_run(ctx, &a), TN_OK) << tn_context_last_error(ctx);
}

}  // namespace
