// Graphs on the CPU: random chains of add, mul, scale, rms_norm, l2_norm, add_rms_norm and layer_norm over a small
// pool of buffers (in place, reused, broadcast rows, strided views) give the same bytes recorded, fused
// and replayed as run one by one; the fusions apply where the rules allow and not elsewhere
// (intermediate read later, a partial overlap, a broadcast operand, an input rewritten in between), and
// TNORM_GRAPH_FUSION=0 turns them off.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <string>
#include <vector>

#include "graph/graph.h"
#include "reference.h"
#include "rng.h"
#include "tnorm.h"

namespace {

uint64_t Seed() {
  static const uint64_t seed = [] {
    const char *env = std::getenv("TNORM_TEST_SEED");
    uint64_t s = env != nullptr ? std::strtoull(env, nullptr, 10) : (uint64_t)std::time(nullptr) ^ 0x9e3779b9u;
    std::printf("graph test seed: %llu (TNORM_TEST_SEED=%llu repeats this run)\n", (unsigned long long)s,
                (unsigned long long)s);
    return s;
  }();
  return seed;
}

constexpr int64_t kRows = 5, kDim = 40, kStride = 48;
constexpr int kBuffers = 6;

// A pool of kBuffers strided rows x dim buffers, one weight row and one broadcast row, all of one dtype.
struct Pool {
  tn_dtype dt;
  std::vector<std::vector<unsigned char>> bytes;
  explicit Pool(tn_dtype d) : dt(d), bytes(kBuffers + 2) {}
  tn_tensor View(int b) {
    const bool row = b >= kBuffers;
    return tn_tensor_strided(bytes[(size_t)b].data(), dt, row ? 1 : kRows, kDim, kStride);
  }
  void Fill(tn_rng *rng) {
    for (int b = 0; b < kBuffers + 2; b++) {
      bytes[(size_t)b].assign((size_t)(kRows * kStride) * tn_dtype_size(dt), 0x5a);
      tn_tensor t = View(b);
      for (int64_t r = 0; r < t.rows; r++)
        for (int64_t i = 0; i < kDim; i++) tn_reference_store(&t, r, i, (float)(0.5 + tn_rng_normal(rng)));
    }
  }
};

struct Op {
  tn_op op;
  int x, b, y, r_out;  // buffer indices (b: second operand, weight for the norms, layer_norm's bias the
                       // broadcast row beside it; -1 when none)
  float scale;
};

// Runs op on the pool (one by one, or recorded when ctx is recording).
tn_status RunOp(tn_context *ctx, Pool &p, const Op &o) {
  tn_tensor x = p.View(o.x), y = p.View(o.y), b = o.b >= 0 ? p.View(o.b) : tn_tensor{}, ro = o.r_out >= 0 ? p.View(o.r_out) : tn_tensor{},
            bias = p.View(kBuffers + 1);
  tn_op_args a = tn_op_args_init(o.op);
  a.x = &x;
  a.y = &y;
  switch (o.op) {
    case TN_OP_ADD: a.residual = &b; break;
    case TN_OP_MUL: a.mul = &b; break;
    case TN_OP_SCALE: a.scale = o.scale; break;
    case TN_OP_RMS_NORM: a.weight = o.b >= 0 ? &b : nullptr; break;
    case TN_OP_LAYER_NORM:
      if (o.b >= 0) a.weight = &b, a.bias = &bias;
      break;
    case TN_OP_L2_NORM: a.scale = o.scale; break;
    case TN_OP_ADD_RMS_NORM: a.residual = &b, a.residual_out = &ro; break;
    default: break;
  }
  return tn_op_run(ctx, &a);
}

// A random op over the pool; the caller drops it when validation refuses it (an overlap, say).
Op RandomOp(tn_rng *rng) {
  const tn_op ops[] = {TN_OP_ADD, TN_OP_MUL, TN_OP_SCALE, TN_OP_RMS_NORM, TN_OP_L2_NORM, TN_OP_ADD_RMS_NORM,
                       TN_OP_RMS_NORM, TN_OP_ADD, TN_OP_LAYER_NORM, TN_OP_ADD};
  Op o;
  o.op = ops[tn_rng_next(rng) % 10];
  o.x = (int)(tn_rng_next(rng) % kBuffers);
  o.y = tn_rng_next(rng) % 4 == 0 ? o.x : (int)(tn_rng_next(rng) % kBuffers);
  o.b = -1;
  o.r_out = -1;
  o.scale = o.op == TN_OP_SCALE ? 0.75f : 1.0f;
  const uint64_t pick = tn_rng_next(rng) % 8;
  if (o.op == TN_OP_ADD || o.op == TN_OP_MUL) o.b = pick == 0 ? kBuffers + 1 : (int)(pick % kBuffers);
  if ((o.op == TN_OP_RMS_NORM || o.op == TN_OP_LAYER_NORM) && pick < 6) o.b = kBuffers;  // the weight row
  if (o.op == TN_OP_ADD_RMS_NORM) {
    o.b = (int)(pick % kBuffers);
    o.r_out = tn_rng_next(rng) % 3 == 0 ? o.b : (int)(tn_rng_next(rng) % kBuffers);
  }
  return o;
}

class Graph : public ::testing::Test {
 protected:
  void SetUp() override { ASSERT_EQ(tn_context_create(&ctx), TN_OK); }
  void TearDown() override { tn_context_destroy(ctx); }
  tn_context *ctx = nullptr;
};

TEST_F(Graph, RandomChainsGiveTheSameBytes) {
  tn_rng rng = {Seed()};
  int fused_total = 0, fused_layer = 0;
  for (int chain = 0; chain < 400; chain++) {
    const tn_dtype dt = (tn_dtype)(chain % 3);
    Pool init(dt);
    init.Fill(&rng);
    // The chain: ops the validator accepts, run one by one on a copy.
    Pool one = init;
    std::vector<Op> ops;
    std::vector<int> last_writer_kind(kBuffers + 2, -1);
    // Per buffer, its bytes before each norm write since its last other write: a fusion may remove any
    // tail of those writes (a buffer can be a dead intermediate twice in a row).
    std::vector<std::vector<std::vector<unsigned char>>> before_norm_writes(kBuffers + 2);
    const int length = 2 + (int)(tn_rng_next(&rng) % 7);
    while ((int)ops.size() < length) {
      Op o = RandomOp(&rng);
      const std::vector<unsigned char> before = one.bytes[(size_t)o.y];
      if (RunOp(ctx, one, o) != TN_OK) continue;
      // A norm's y (add_rms_norm's too) is what a fusion with a following mul or scale may leave unwritten.
      const bool norm = o.op == TN_OP_RMS_NORM || o.op == TN_OP_L2_NORM || o.op == TN_OP_ADD_RMS_NORM;
      if (!norm) before_norm_writes[(size_t)o.y].clear();
      else before_norm_writes[(size_t)o.y].push_back(before);
      if (o.r_out >= 0) before_norm_writes[(size_t)o.r_out].clear();
      ops.push_back(o);
      last_writer_kind[(size_t)o.y] = o.op;
      if (o.r_out >= 0) last_writer_kind[(size_t)o.r_out] = TN_OP_ADD;
    }
    // The same chain recorded, fused and replayed on another copy.
    Pool fused = init;
    ASSERT_EQ(tn_graph_begin(ctx), TN_OK);
    for (const Op &o : ops) ASSERT_EQ(RunOp(ctx, fused, o), TN_OK) << tn_context_last_error(ctx);
    ASSERT_EQ(fused.bytes, init.bytes) << "a recorded op ran";
    tn_graph *g = nullptr;
    ASSERT_EQ(tn_graph_end(ctx, &g), TN_OK);
    ASSERT_EQ(tn_graph_launch(ctx, g), TN_OK) << tn_context_last_error(ctx);
    tn_graph_info info;
    ASSERT_EQ(tn_graph_get_info(g, &info), TN_OK);
    EXPECT_EQ(info.recorded_ops, (int)ops.size());
    EXPECT_EQ(info.ops + info.fused_add_rms_norm + info.fused_rms_norm_mul + info.fused_l2_norm_scale +
                  info.fused_norm_quantize,
              info.recorded_ops);
    fused_total += info.recorded_ops - info.ops;
    fused_layer += std::strstr(tn_graph_fusions(g), "add_layer_norm") != nullptr;
    // Every buffer as one by one, except an intermediate a fusion no longer writes: a norm's output whose
    // last writers were norms, left as it was just before one of them ran.
    for (int b = 0; b < kBuffers + 2; b++) {
      if (fused.bytes[(size_t)b] == one.bytes[(size_t)b]) continue;
      const int kind = last_writer_kind[(size_t)b];
      const bool dead = (kind == TN_OP_RMS_NORM || kind == TN_OP_L2_NORM || kind == TN_OP_ADD_RMS_NORM) &&
                        info.recorded_ops > info.ops &&
                        std::count(before_norm_writes[(size_t)b].begin(), before_norm_writes[(size_t)b].end(),
                                   fused.bytes[(size_t)b]) > 0;
      std::string listing;
      for (const Op &o : ops)
        listing += std::string(" ") + tn_op_name(o.op) + "(x" + std::to_string(o.x) + ",b" + std::to_string(o.b) +
                   "->y" + std::to_string(o.y) + (o.r_out >= 0 ? ",r" + std::to_string(o.r_out) : "") + ")";
      EXPECT_TRUE(dead) << "chain " << chain << " (" << tn_dtype_name(dt) << "): buffer " << b
                        << " differs; ops:" << listing << "; fusions: " << tn_graph_fusions(g);
    }
    tn_graph_destroy(g);
    if (HasFailure()) return;
  }
  EXPECT_GT(fused_total, 20);  // the random chains do exercise the fusions
  EXPECT_GT(fused_layer, 0);
}

// The three patterns fuse, and each gives the same bytes as the pair (bf16: the intermediate rounding).
TEST_F(Graph, ThePatternsFuse) {
  tn_rng rng = {Seed() + 1};
  for (tn_dtype dt : {TN_F32, TN_F16, TN_BF16}) {
    SCOPED_TRACE(tn_dtype_name(dt));
    Pool init(dt);
    init.Fill(&rng);
    const std::vector<std::vector<Op>> chains = {
        {{TN_OP_ADD, 0, 1, 2, -1, 1.0f}, {TN_OP_RMS_NORM, 2, kBuffers, 3, -1, 1.0f}},
        {{TN_OP_RMS_NORM, 0, kBuffers, 2, -1, 1.0f}, {TN_OP_MUL, 2, 1, 3, -1, 1.0f}},
        {{TN_OP_RMS_NORM, 0, kBuffers, 2, -1, 1.0f}, {TN_OP_MUL, 1, 2, 3, -1, 1.0f}},  // t as b
        {{TN_OP_L2_NORM, 0, -1, 2, -1, 1.0f}, {TN_OP_SCALE, 2, -1, 3, -1, 0.3f}},
        {{TN_OP_ADD, 0, 1, 2, -1, 1.0f}, {TN_OP_RMS_NORM, 2, kBuffers, 3, -1, 1.0f}, {TN_OP_MUL, 3, 4, 5, -1, 1.0f}},
    };
    const int want_fusions[] = {1, 1, 1, 1, 2};  // add -> rms_norm -> mul: one add_rms_norm with mul
    for (size_t c = 0; c < chains.size(); c++) {
      SCOPED_TRACE("chain " + std::to_string(c));
      Pool one = init, fused = init;
      for (const Op &o : chains[c]) ASSERT_EQ(RunOp(ctx, one, o), TN_OK) << tn_context_last_error(ctx);
      ASSERT_EQ(tn_graph_begin(ctx), TN_OK);
      for (const Op &o : chains[c]) ASSERT_EQ(RunOp(ctx, fused, o), TN_OK);
      tn_graph *g = nullptr;
      ASSERT_EQ(tn_graph_end(ctx, &g), TN_OK);
      tn_graph_info info;
      tn_graph_get_info(g, &info);
      EXPECT_EQ(info.recorded_ops - info.ops, want_fusions[c]) << tn_graph_fusions(g);
      ASSERT_EQ(tn_graph_launch(ctx, g), TN_OK) << tn_context_last_error(ctx);
      const int last_y = chains[c].back().y;
      EXPECT_EQ(fused.bytes[(size_t)last_y], one.bytes[(size_t)last_y]) << tn_graph_fusions(g);
      tn_graph_destroy(g);
    }
  }
}

// An add_rms_norm fused from add -> rms_norm (with the mul after it or not) asks the backend for rms_norm's
// reduction order (the CUDA one's own add_rms_norm differs on some rows); one recorded as add_rms_norm keeps
// its own, fused with a mul too. The CPU backend has one order: the option is checked on the fused nodes.
TEST_F(Graph, FusedAddRmsNormAsksForRmsNormsOrder) {
  Pool pool(TN_BF16);
  tn_rng rng = {Seed() + 3};
  pool.Fill(&rng);
  struct Chain {
    std::vector<Op> ops;
    int as_rms_norm;
  };
  const Chain chains[] = {
      {{{TN_OP_ADD, 0, 1, 2, -1, 1.0f}, {TN_OP_RMS_NORM, 2, kBuffers, 3, -1, 1.0f}}, 1},
      {{{TN_OP_ADD, 0, 1, 2, -1, 1.0f}, {TN_OP_RMS_NORM, 2, kBuffers, 3, -1, 1.0f}, {TN_OP_MUL, 3, 4, 5, -1, 1.0f}},
       1},
      {{{TN_OP_ADD_RMS_NORM, 0, 1, 3, 2, 1.0f}, {TN_OP_MUL, 3, 4, 5, -1, 1.0f}}, 0},
      {{{TN_OP_ADD, 0, 1, 2, -1, 1.0f}, {TN_OP_LAYER_NORM, 2, kBuffers, 3, -1, 1.0f}}, 0},
  };
  for (const Chain &c : chains) {
    ASSERT_EQ(tn_graph_begin(ctx), TN_OK);
    for (const Op &o : c.ops) ASSERT_EQ(RunOp(ctx, pool, o), TN_OK) << tn_context_last_error(ctx);
    tn_graph *g = nullptr;
    ASSERT_EQ(tn_graph_end(ctx, &g), TN_OK);
    ASSERT_EQ(g->count, 1) << tn_graph_fusions(g);
    EXPECT_EQ(g->nodes[0].options.as_rms_norm, c.as_rms_norm) << tn_graph_fusions(g);
    EXPECT_EQ(g->nodes[0].options.round_before_last, c.ops.back().op == TN_OP_MUL) << tn_graph_fusions(g);
    tn_graph_destroy(g);
  }
}

// Where the rules say no, nothing is fused, and the bytes are still those of the ops one by one.
TEST_F(Graph, NoFusionWhereTheRulesForbid) {
  tn_rng rng = {Seed() + 2};
  Pool init(TN_BF16);
  init.Fill(&rng);
  const std::vector<std::vector<Op>> chains = {
      // the intermediate (2) is read later
      {{TN_OP_RMS_NORM, 0, kBuffers, 2, -1, 1.0f}, {TN_OP_MUL, 2, 1, 3, -1, 1.0f}, {TN_OP_ADD, 2, 1, 4, -1, 1.0f}},
      // a broadcast row as the multiplicand (rms_norm's mul must be rows x dim)
      {{TN_OP_RMS_NORM, 0, kBuffers, 2, -1, 1.0f}, {TN_OP_MUL, 2, kBuffers + 1, 3, -1, 1.0f}},
      // add with a broadcast b
      {{TN_OP_ADD, 0, kBuffers + 1, 2, -1, 1.0f}, {TN_OP_RMS_NORM, 2, kBuffers, 3, -1, 1.0f}},
      // the producer's input rewritten between the two
      {{TN_OP_ADD, 0, 1, 2, -1, 1.0f}, {TN_OP_SCALE, 4, -1, 0, -1, 2.0f}, {TN_OP_RMS_NORM, 2, kBuffers, 3, -1, 1.0f}},
      // l2_norm with its own scale
      {{TN_OP_L2_NORM, 0, -1, 2, -1, 0.5f}, {TN_OP_SCALE, 2, -1, 3, -1, 0.3f}},
      // the consumer is not the first to touch the intermediate
      {{TN_OP_RMS_NORM, 0, kBuffers, 2, -1, 1.0f}, {TN_OP_SCALE, 2, -1, 4, -1, 3.0f}, {TN_OP_MUL, 2, 1, 3, -1, 1.0f}},
  };
  for (size_t c = 0; c < chains.size(); c++) {
    SCOPED_TRACE("chain " + std::to_string(c));
    Pool one = init, fused = init;
    std::vector<Op> ops = chains[c];
    for (Op &o : ops)
      if (o.op == TN_OP_L2_NORM) o.scale = 0.5f;
    for (const Op &o : ops) ASSERT_EQ(RunOp(ctx, one, o), TN_OK) << tn_context_last_error(ctx);
    ASSERT_EQ(tn_graph_begin(ctx), TN_OK);
    for (const Op &o : ops) ASSERT_EQ(RunOp(ctx, fused, o), TN_OK);
    tn_graph *g = nullptr;
    ASSERT_EQ(tn_graph_end(ctx, &g), TN_OK);
    tn_graph_info info;
    tn_graph_get_info(g, &info);
    EXPECT_EQ(info.ops, info.recorded_ops) << tn_graph_fusions(g);
    ASSERT_EQ(tn_graph_launch(ctx, g), TN_OK);
    EXPECT_EQ(fused.bytes, one.bytes);
    tn_graph_destroy(g);
  }
}

TEST_F(Graph, FusionCanBeTurnedOff) {
  tn_rng rng = {Seed() + 3};
  Pool p(TN_F32);
  p.Fill(&rng);
  setenv("TNORM_GRAPH_FUSION", "0", 1);
  ASSERT_EQ(tn_graph_begin(ctx), TN_OK);
  ASSERT_EQ(RunOp(ctx, p, {TN_OP_ADD, 0, 1, 2, -1, 1.0f}), TN_OK);
  ASSERT_EQ(RunOp(ctx, p, {TN_OP_RMS_NORM, 2, kBuffers, 3, -1, 1.0f}), TN_OK);
  tn_graph *g = nullptr;
  ASSERT_EQ(tn_graph_end(ctx, &g), TN_OK);
  unsetenv("TNORM_GRAPH_FUSION");
  tn_graph_info info;
  tn_graph_get_info(g, &info);
  EXPECT_EQ(info.ops, 2);
  EXPECT_STREQ(tn_graph_fusions(g), "");
  tn_graph_destroy(g);
}

TEST_F(Graph, Errors) {
  tn_graph *g = nullptr;
  EXPECT_EQ(tn_graph_end(ctx, &g), TN_ERR_VALUE);
  EXPECT_NE(std::string(tn_context_last_error(ctx)).find("not recording"), std::string::npos);
  ASSERT_EQ(tn_graph_begin(ctx), TN_OK);
  EXPECT_EQ(tn_graph_begin(ctx), TN_ERR_VALUE);
  // A bad op during recording is refused as it would be when run, and not recorded.
  Pool p(TN_F32);
  tn_rng rng = {Seed() + 4};
  p.Fill(&rng);
  tn_tensor x = p.View(0), y = p.View(1), w = tn_tensor_vector(p.bytes[kBuffers].data(), TN_F32, kDim - 1);
  EXPECT_EQ(tn_rms_norm(ctx, &x, &w, 0.0f, 1e-6f, &y), TN_ERR_SHAPE);
  EXPECT_EQ(tn_graph_launch(ctx, g), TN_ERR_NULL);
  ASSERT_EQ(tn_graph_end(ctx, &g), TN_OK);
  tn_graph_info info;
  tn_graph_get_info(g, &info);
  EXPECT_EQ(info.recorded_ops, 0);
  EXPECT_EQ(tn_graph_launch(ctx, g), TN_OK);
  tn_graph_destroy(g);
  tn_graph_destroy(nullptr);
}

// On the CPU, tn_graph_update swaps in the new recording's ops; the graph then works on its buffers only.
TEST_F(Graph, UpdateTakesTheNewRecording) {
  tn_rng rng = {Seed() + 5};
  Pool a(TN_BF16), b(TN_BF16);
  a.Fill(&rng);
  b.Fill(&rng);
  const std::vector<Op> chain = {{TN_OP_ADD, 0, 1, 2, -1, 1.0f}, {TN_OP_RMS_NORM, 2, kBuffers, 3, -1, 1.0f}};
  Pool want = b;
  for (const Op &o : chain) ASSERT_EQ(RunOp(ctx, want, o), TN_OK);
  auto record = [&](Pool &p) {
    tn_graph *g = nullptr;
    EXPECT_EQ(tn_graph_begin(ctx), TN_OK);
    for (const Op &o : chain) EXPECT_EQ(RunOp(ctx, p, o), TN_OK);
    EXPECT_EQ(tn_graph_end(ctx, &g), TN_OK);
    return g;
  };
  const Pool a_before = a;
  tn_graph *g = record(a), *next = record(b);
  ASSERT_EQ(tn_graph_update(ctx, g, next), TN_OK) << tn_context_last_error(ctx);
  tn_graph_destroy(next);
  ASSERT_EQ(tn_graph_launch(ctx, g), TN_OK) << tn_context_last_error(ctx);
  EXPECT_EQ(b.bytes, want.bytes);
  EXPECT_EQ(a.bytes, a_before.bytes);
  tn_graph_info info;
  ASSERT_EQ(tn_graph_get_info(g, &info), TN_OK);
  EXPECT_EQ(info.ops, 1);
  EXPECT_EQ(info.device_graph, 0);
  EXPECT_EQ(info.instantiations, 0);
  EXPECT_EQ(tn_graph_update(ctx, g, nullptr), TN_ERR_NULL);
  tn_graph_destroy(g);
}

}  // namespace

namespace {

// A norm's output read by the next op through a view shifted by one row (a partial overlap): no fusion,
// and the bytes are those of the ops one by one.
TEST_F(Graph, NoFusionOnPartialOverlap) {
  tn_rng rng = {Seed() + 6};
  for (tn_dtype dt : {TN_F32, TN_BF16}) {
    SCOPED_TRACE(tn_dtype_name(dt));
    Pool init(dt);
    init.Fill(&rng);
    auto chain = [&](Pool &p) {
      // rms_norm: rows 0..3 of buffer 0 -> rows 0..3 of buffer 2; mul reads rows 1..4 of buffer 2.
      const size_t pitch = (size_t)kStride * tn_dtype_size(dt);
      tn_tensor x = tn_tensor_strided(p.bytes[0].data(), dt, kRows - 1, kDim, kStride);
      tn_tensor t = tn_tensor_strided(p.bytes[2].data(), dt, kRows - 1, kDim, kStride);
      tn_tensor shifted = tn_tensor_strided(p.bytes[2].data() + pitch, dt, kRows - 1, kDim, kStride);
      tn_tensor m = tn_tensor_strided(p.bytes[1].data(), dt, kRows - 1, kDim, kStride);
      tn_tensor y = tn_tensor_strided(p.bytes[3].data(), dt, kRows - 1, kDim, kStride);
      tn_tensor w = p.View(kBuffers);
      EXPECT_EQ(tn_rms_norm(ctx, &x, &w, 0.0f, 1e-6f, &t), TN_OK) << tn_context_last_error(ctx);
      EXPECT_EQ(tn_mul(ctx, &shifted, &m, &y), TN_OK) << tn_context_last_error(ctx);
    };
    Pool one = init, fused = init;
    chain(one);
    ASSERT_EQ(tn_graph_begin(ctx), TN_OK);
    chain(fused);
    tn_graph *g = nullptr;
    ASSERT_EQ(tn_graph_end(ctx, &g), TN_OK);
    tn_graph_info info;
    tn_graph_get_info(g, &info);
    EXPECT_EQ(info.recorded_ops, 2);
    EXPECT_EQ(info.ops, 2) << tn_graph_fusions(g);
    ASSERT_EQ(tn_graph_launch(ctx, g), TN_OK) << tn_context_last_error(ctx);
    EXPECT_EQ(fused.bytes, one.bytes);
    tn_graph_destroy(g);
  }
}

}  // namespace

namespace {

// A quantize of buffer `x` of the pool into q (fp8_e4m3 with per-token scales, or int8 with a static scale).
struct QuantOut {
  std::vector<unsigned char> q = std::vector<unsigned char>((size_t)(kRows * kDim), 0xa5);
  std::vector<float> scales = std::vector<float>((size_t)kRows, -1.0f);
  float scale = 0.0625f;
  tn_tensor qt, st, scale_t;
  tn_quant Quant(bool dynamic) {
    qt = tn_tensor_2d(q.data(), dynamic ? TN_F8_E4M3 : TN_I8, kRows, kDim);
    st = tn_tensor_2d(scales.data(), TN_F32, kRows, 1);
    scale_t = tn_tensor_2d(&scale, TN_F32, 1, 1);
    tn_quant qu = tn_quant_init(dynamic ? TN_QUANT_FP8_E4M3 : TN_QUANT_INT8);
    qu.scaling = dynamic ? TN_QUANT_SCALE_TOKEN : TN_QUANT_SCALE_TENSOR;
    qu.q = &qt;
    if (dynamic) qu.scales = &st;
    else qu.scale = &scale_t;
    return qu;
  }
};

tn_status RunQuantize(tn_context *ctx, Pool &p, int x, QuantOut &out, bool dynamic) {
  tn_tensor xt = p.View(x);
  tn_quant qu = out.Quant(dynamic);
  return tn_quantize(ctx, &xt, &qu);
}

}  // namespace

// norm -> quantize of its y fuses into the norm with a quantized output, giving the bytes of the two ops;
// add -> rms_norm -> quantize becomes one add_rms_norm; y is still written where a later op reads it.
TEST_F(Graph, NormThenQuantizeFuses) {
  tn_rng rng = {Seed() + 7};
  for (tn_dtype dt : {TN_F32, TN_BF16}) {
    for (bool dynamic : {true, false}) {
      SCOPED_TRACE(std::string(tn_dtype_name(dt)) + (dynamic ? " fp8 per token" : " int8 static"));
      Pool init(dt);
      init.Fill(&rng);
      struct Chain {
        std::vector<Op> before;  // the ops before the quantize of buffer `quantized`
        int quantized;
        std::vector<Op> after;
        int fusions;
      };
      const Chain chains[] = {
          {{{TN_OP_RMS_NORM, 0, kBuffers, 2, -1, 1.0f}}, 2, {}, 1},
          {{{TN_OP_ADD, 0, 1, 2, -1, 1.0f}, {TN_OP_RMS_NORM, 2, kBuffers, 3, -1, 1.0f}}, 3, {}, 2},
          {{{TN_OP_RMS_NORM, 0, kBuffers, 2, -1, 1.0f}}, 2, {{TN_OP_MUL, 2, 1, 4, -1, 1.0f}}, 1},  // y read after
          {{{TN_OP_LAYER_NORM, 0, kBuffers, 2, -1, 1.0f}}, 2, {}, 1},
          {{{TN_OP_ADD_RMS_NORM, 0, 1, 3, 2, 1.0f}}, 3, {}, 1},
      };
      for (size_t c = 0; c < sizeof chains / sizeof chains[0]; c++) {
        SCOPED_TRACE("chain " + std::to_string(c));
        const Chain &ch = chains[c];
        Pool one = init, fused = init;
        QuantOut q_one, q_fused;
        for (const Op &o : ch.before) ASSERT_EQ(RunOp(ctx, one, o), TN_OK) << tn_context_last_error(ctx);
        ASSERT_EQ(RunQuantize(ctx, one, ch.quantized, q_one, dynamic), TN_OK) << tn_context_last_error(ctx);
        for (const Op &o : ch.after) ASSERT_EQ(RunOp(ctx, one, o), TN_OK);
        ASSERT_EQ(tn_graph_begin(ctx), TN_OK);
        for (const Op &o : ch.before) ASSERT_EQ(RunOp(ctx, fused, o), TN_OK);
        ASSERT_EQ(RunQuantize(ctx, fused, ch.quantized, q_fused, dynamic), TN_OK);
        for (const Op &o : ch.after) ASSERT_EQ(RunOp(ctx, fused, o), TN_OK);
        tn_graph *g = nullptr;
        ASSERT_EQ(tn_graph_end(ctx, &g), TN_OK);
        tn_graph_info info;
        tn_graph_get_info(g, &info);
        EXPECT_EQ(info.recorded_ops - info.ops, ch.fusions) << tn_graph_fusions(g);
        EXPECT_EQ(info.fused_norm_quantize, 1) << tn_graph_fusions(g);
        ASSERT_EQ(tn_graph_launch(ctx, g), TN_OK) << tn_context_last_error(ctx);
        EXPECT_EQ(q_fused.q, q_one.q);
        EXPECT_EQ(q_fused.scales, q_one.scales);
        // Every buffer as one by one, but the quantized y where nothing reads it after: the fused norm
        // leaves it out.
        for (int b = 0; b < kBuffers; b++)
          if (b != ch.quantized || !ch.after.empty()) EXPECT_EQ(fused.bytes[(size_t)b], one.bytes[(size_t)b]) << b;
        tn_graph_destroy(g);
      }
    }
  }
}
