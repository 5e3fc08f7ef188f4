// Graphs on the GPU: random chains of add, mul, scale, rms_norm, l2_norm, add_rms_norm and layer_norm over a pool of
// device buffers give the same bytes recorded, fused and replayed as run one by one on the GPU (the fused
// kernels round where the pair did), except an intermediate a fusion no longer writes.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "cuda_test_util.h"
#include "reference.h"
#include "tnorm.h"

namespace {

using namespace tn_cuda_test;

constexpr int64_t kRows = 9, kDim = 4096 + 8, kStride = 4096 + 16;
// The random chains' dims: rows on every kind of row shape a fusion moves between families (pairs of G =
// 32 .. 128, four chunks from G = 128, G = 8 and 16; 120 and 60: rows of 9 .. 16 chunks, which layer_norm's
// family holds on G = 8), in both the vector and the element access modes.
const int64_t kChainDims[] = {kDim, 2048, 1000, 520, 264, 130, 120, 60, 16};
constexpr int kBuffers = 6, kAll = kBuffers + 2;  // then one weight row and one broadcast row

struct Op {
  tn_op op;
  int x, b, y, r_out;
  float scale;
};

class GpuGraph : public CudaContextTest {
 protected:
  void TearDown() override {
    for (void *p : dev) tn_free(ctx, tn_cuda_device(0), p);
    CudaContextTest::TearDown();
  }
  size_t Bytes() const { return (size_t)(rows * stride) * tn_dtype_size(dt); }
  // count fresh device buffers of Bytes() each in place of the ones held.
  void Reallocate(size_t count) {
    for (void *p : dev) tn_free(ctx, tn_cuda_device(0), p);
    dev.assign(count, nullptr);
    for (void *&p : dev) ASSERT_EQ(tn_malloc(ctx, tn_cuda_device(0), Bytes(), &p), TN_OK);
  }
  tn_tensor View(int b) {
    return tn_tensor_on(tn_tensor_strided(dev[(size_t)(base + b)], dt, b >= kBuffers ? 1 : rows, dim, stride),
                        tn_cuda_device(0));
  }
  void Load(const std::vector<std::vector<uint8_t>> &host) {
    for (int b = 0; b < kAll; b++)
      ASSERT_EQ(tn_memcpy(ctx, dev[(size_t)(base + b)], tn_cuda_device(0), host[(size_t)b].data(), tn_cpu_device(),
                          Bytes()),
                TN_OK);
  }
  std::vector<std::vector<uint8_t>> Save() {
    std::vector<std::vector<uint8_t>> host(kAll, std::vector<uint8_t>(Bytes()));
    EXPECT_EQ(tn_synchronize(ctx, tn_cuda_device(0)), TN_OK) << tn_context_last_error(ctx);
    for (int b = 0; b < kAll; b++)
      EXPECT_EQ(tn_memcpy(ctx, host[(size_t)b].data(), tn_cpu_device(), dev[(size_t)(base + b)], tn_cuda_device(0),
                          Bytes()),
                TN_OK);
    return host;
  }
  tn_status RunOp(const Op &o) {
    tn_tensor x = View(o.x), y = View(o.y), b = o.b >= 0 ? View(o.b) : tn_tensor{},
              ro = o.r_out >= 0 ? View(o.r_out) : tn_tensor{}, bias = View(kBuffers + 1);
    tn_op_args a = tn_op_args_init(o.op);
    a.x = &x;
    a.y = &y;
    if (o.op == TN_OP_ADD) a.residual = &b;
    if (o.op == TN_OP_MUL) a.mul = &b;
    if (o.op == TN_OP_SCALE || o.op == TN_OP_L2_NORM) a.scale = o.scale;
    if (o.op == TN_OP_RMS_NORM && o.b >= 0) a.weight = &b;
    if (o.op == TN_OP_LAYER_NORM && o.b >= 0) a.weight = &b, a.bias = &bias;
    if (o.op == TN_OP_ADD_RMS_NORM) a.residual = &b, a.residual_out = &ro;
    return tn_op_run(ctx, &a);
  }
  // kAll fresh buffers per set, random values in the rows and 0x5a in the gaps between them.
  std::vector<std::vector<uint8_t>> RandomInit(Random &rng) {
    std::vector<std::vector<uint8_t>> init(kAll, std::vector<uint8_t>(Bytes(), 0x5a));
    for (int b = 0; b < kAll; b++) {
      tn_tensor t = tn_tensor_strided(init[(size_t)b].data(), dt, b >= kBuffers ? 1 : rows, dim, stride);
      for (int64_t r = 0; r < t.rows; r++)
        for (int64_t i = 0; i < dim; i++) tn_reference_store(&t, r, i, (float)(0.5 + rng.Normal()));
    }
    return init;
  }
  tn_graph *Record(const std::vector<Op> &ops) {
    EXPECT_EQ(tn_graph_begin(ctx), TN_OK);
    for (const Op &o : ops) EXPECT_EQ(RunOp(o), TN_OK) << tn_context_last_error(ctx);
    tn_graph *g = nullptr;
    EXPECT_EQ(tn_graph_end(ctx, &g), TN_OK);
    return g;
  }
  tn_dtype dt = TN_BF16;
  int64_t rows = kRows, dim = kDim, stride = kStride;  // the rows of every buffer
  std::vector<void *> dev;
  int base = 0;  // the buffer set View, Load and Save work on (dev[base .. base + kAll))
};

TEST_F(GpuGraph, RandomChainsGiveTheSameBytes) {
  Random rng(SeedFor("gpu graph chains"));
  int fused_total = 0, fused_layer = 0;
  for (int chain = 0; chain < 81; chain++) {
    dt = (tn_dtype)(chain % 3);
    dim = kChainDims[(chain / 3) % (sizeof kChainDims / sizeof kChainDims[0])];
    stride = (dim + 7) / 8 * 8 + 8;  // 16-byte rows apart in every dtype: the vector kernels (partial chunks too)
    ASSERT_NO_FATAL_FAILURE(Reallocate(kAll));
    const std::vector<std::vector<uint8_t>> init = RandomInit(rng);
    // One by one, keeping what each output held before its last write.
    Load(init);
    std::vector<Op> ops;
    std::vector<int> last_kind(kAll, -1);
    // Per buffer, its bytes before each norm write since its last other write (see the CPU test).
    std::vector<std::vector<std::vector<uint8_t>>> before(kAll);
    const tn_op kinds[] = {TN_OP_ADD, TN_OP_MUL, TN_OP_SCALE, TN_OP_RMS_NORM, TN_OP_L2_NORM, TN_OP_ADD_RMS_NORM,
                           TN_OP_LAYER_NORM};
    while ((int)ops.size() < 6) {
      Op o{kinds[rng.Below(7)], (int)rng.Below(kBuffers), -1, 0, -1, 1.0f};
      o.y = rng.Below(4) == 0 ? o.x : (int)rng.Below(kBuffers);
      if (o.op == TN_OP_ADD || o.op == TN_OP_MUL) o.b = rng.Below(6) == 0 ? kBuffers + 1 : (int)rng.Below(kBuffers);
      if ((o.op == TN_OP_RMS_NORM || o.op == TN_OP_LAYER_NORM) && rng.Below(4) != 0) o.b = kBuffers;
      if (o.op == TN_OP_SCALE) o.scale = 0.75f;
      if (o.op == TN_OP_ADD_RMS_NORM) o.b = (int)rng.Below(kBuffers), o.r_out = (int)rng.Below(kBuffers);
      // Half the time the op consumes the previous one's output in a pattern a fusion pass looks for, so
      // the chains do exercise the fusions (whether one applies still depends on the later ops).
      const Op *prev = ops.empty() ? nullptr : &ops.back();
      if (prev != nullptr && rng.Below(2) == 0) {
        if (prev->op == TN_OP_ADD)
          o = {rng.Below(3) == 0 ? TN_OP_LAYER_NORM : TN_OP_RMS_NORM, prev->y, kBuffers, o.y, -1, 1.0f};
        if (prev->op == TN_OP_RMS_NORM || prev->op == TN_OP_ADD_RMS_NORM)
          o = {TN_OP_MUL, prev->y, (int)rng.Below(kBuffers), o.y, -1, 1.0f};
        if (prev->op == TN_OP_L2_NORM) o = {TN_OP_SCALE, prev->y, -1, o.y, -1, 0.75f};
      }
      // Every seventh chain starts with add -> layer_norm (every dtype, most dims), so that the fusion occurs
      // whatever the seed (the random pattern above made it in as few as 2 of the 81 chains).
      if (chain % 7 == 3 && ops.size() < 2)
        o = ops.empty() ? Op{TN_OP_ADD, 0, 1, 2, -1, 1.0f} : Op{TN_OP_LAYER_NORM, 2, kBuffers, 3, -1, 1.0f};
      const std::vector<uint8_t> prior = Save()[(size_t)o.y];
      if (RunOp(o) != TN_OK) continue;
      ops.push_back(o);
      if (o.op == TN_OP_RMS_NORM || o.op == TN_OP_L2_NORM || o.op == TN_OP_ADD_RMS_NORM)
        before[(size_t)o.y].push_back(prior);
      else before[(size_t)o.y].clear();
      if (o.r_out >= 0) before[(size_t)o.r_out].clear();
      last_kind[(size_t)o.y] = o.op;
      if (o.r_out >= 0) last_kind[(size_t)o.r_out] = TN_OP_ADD;
    }
    const auto one = Save();
    // Recorded, fused, replayed.
    Load(init);
    ASSERT_EQ(tn_graph_begin(ctx), TN_OK);
    for (const Op &o : ops) ASSERT_EQ(RunOp(o), TN_OK) << tn_context_last_error(ctx);
    tn_graph *g = nullptr;
    ASSERT_EQ(tn_graph_end(ctx, &g), TN_OK);
    ASSERT_EQ(tn_graph_launch(ctx, g), TN_OK) << tn_context_last_error(ctx);
    const auto fused = Save();
    tn_graph_info info;
    tn_graph_get_info(g, &info);
    EXPECT_EQ(info.device_graph, 1);
    EXPECT_EQ(info.instantiations, 1);
    fused_total += info.recorded_ops - info.ops;
    fused_layer += std::strstr(tn_graph_fusions(g), "add_layer_norm") != nullptr;
    for (int b = 0; b < kAll; b++) {
      if (fused[(size_t)b] == one[(size_t)b]) continue;
      const int kind = last_kind[(size_t)b];
      const bool dead = (kind == TN_OP_RMS_NORM || kind == TN_OP_L2_NORM || kind == TN_OP_ADD_RMS_NORM) &&
                        info.ops < info.recorded_ops &&
                        std::count(before[(size_t)b].begin(), before[(size_t)b].end(), fused[(size_t)b]) > 0;
      std::string listing;
      for (const Op &o : ops)
        listing += std::string(" ") + tn_op_name(o.op) + "(x" + std::to_string(o.x) + ",b" + std::to_string(o.b) +
                   "->y" + std::to_string(o.y) + (o.r_out >= 0 ? ",r" + std::to_string(o.r_out) : "") + ")";
      size_t diff = 0, first = SIZE_MAX;
      for (size_t i = 0; i < fused[(size_t)b].size(); i++)
        if (fused[(size_t)b][i] != one[(size_t)b][i]) diff++, first = std::min(first, i);
      EXPECT_TRUE(dead) << "chain " << chain << " " << tn_dtype_name(dt) << " dim " << dim << ": buffer " << b << " differs in "
                        << diff << " bytes from byte " << first << "; ops:" << listing
                        << "; fusions: " << tn_graph_fusions(g);
    }
    tn_graph_destroy(g);
    if (HasFailure()) return;
  }
  EXPECT_GT(fused_total, 12);  // the chains do exercise the fusions
  EXPECT_GE(fused_layer, 12);
}

// add_rms_norm's own calls reduce rows of 257 .. 2048 chunks on pairs, where rms_norm keeps four chunks a
// thread: the add_rms_norm (with or without the mul) that a graph fuses from add -> rms_norm (-> mul) must
// take rms_norm's order, few rows (9: the few-rows forms) or many (300), or its bytes differ (float32 shows
// a last-bit difference of the scale in y). 1000 (bf16: 125 chunks) is a dim where the orders agree.
TEST_F(GpuGraph, AddThenRmsNormKeepsRmsNormsOrder) {
  Random rng(SeedFor("gpu graph add then rms_norm"));
  for (tn_dtype d : {TN_F32, TN_BF16})
    for (int64_t n : {1000, 2048, 4100, 8192, 12000})
      for (int64_t r : {9, 300})
        for (bool mul : {false, true}) {
          dt = d, dim = n, rows = r, stride = n;
          ASSERT_NO_FATAL_FAILURE(Reallocate(kAll));
          const std::vector<std::vector<uint8_t>> init = RandomInit(rng);
          std::vector<Op> ops = {{TN_OP_ADD, 0, 1, 2, -1, 1.0f}, {TN_OP_RMS_NORM, 2, kBuffers, 3, -1, 1.0f}};
          if (mul) ops.push_back({TN_OP_MUL, 3, 4, 5, -1, 1.0f});
          Load(init);
          for (const Op &o : ops) ASSERT_EQ(RunOp(o), TN_OK) << tn_context_last_error(ctx);
          const auto one = Save();
          Load(init);
          tn_graph *g = Record(ops);
          ASSERT_NE(g, nullptr);
          ASSERT_EQ(tn_graph_launch(ctx, g), TN_OK) << tn_context_last_error(ctx);
          const auto fused = Save();
          tn_graph_info info;
          tn_graph_get_info(g, &info);
          EXPECT_EQ(info.ops, 1) << tn_graph_fusions(g);  // one add_rms_norm (with the mul)
          const std::string what = std::string(tn_dtype_name(dt)) + " dim " + std::to_string(dim) + " rows " +
                                   std::to_string(rows) + (mul ? ", with the mul" : "");
          // Every buffer but the intermediate the fused op no longer writes (y of the rms_norm, with the mul).
          for (int b = 0; b < kAll; b++) {
            if (mul && b == 3) continue;
            EXPECT_TRUE(fused[(size_t)b] == one[(size_t)b]) << what << ": buffer " << b << " differs";
          }
          tn_graph_destroy(g);
          if (HasFailure()) return;
        }
}

// A graph is captured and instantiated once; a new recording of the same chain over other buffers updates
// it in place (and it then works on those buffers only); a recording of another length rebuilds it.
TEST_F(GpuGraph, UpdatedInPlaceWhenOnlyPointersChange) {
  Random rng(SeedFor("gpu graph update"));
  for (int d = 0; d < 3; d++) {
    dt = (tn_dtype)d;
    SCOPED_TRACE(tn_dtype_name(dt));
    ASSERT_NO_FATAL_FAILURE(Reallocate(3 * kAll));
    // Outputs 2 (the sum, read again), 5 (the gated norm) and 1 (the scaled l2_norm); 3 is fused away.
    const std::vector<Op> chain = {{TN_OP_ADD, 0, 4, 2, -1, 1.0f},         {TN_OP_RMS_NORM, 2, kBuffers, 3, -1, 1.0f},
                                   {TN_OP_MUL, 3, kBuffers + 1, 5, -1, 1.0f}, {TN_OP_L2_NORM, 2, -1, 1, -1, 1.0f},
                                   {TN_OP_SCALE, 1, -1, 1, -1, 0.5f}};
    const int outputs[] = {1, 2, 5};
    // Sets A (base 0) and B (base kAll) hold their own inputs; set C (base 2 kAll) runs one by one.
    const auto init_a = RandomInit(rng), init_b = RandomInit(rng);
    auto one_by_one = [&](const std::vector<std::vector<uint8_t>> &init) {
      base = 2 * kAll;
      Load(init);
      for (const Op &o : chain) EXPECT_EQ(RunOp(o), TN_OK) << tn_context_last_error(ctx);
      return Save();
    };
    const auto want_a = one_by_one(init_a), want_b = one_by_one(init_b);

    base = 0;
    Load(init_a);
    tn_graph *g = Record(chain);
    ASSERT_NE(g, nullptr);
    for (int launch = 0; launch < 3; launch++) ASSERT_EQ(tn_graph_launch(ctx, g), TN_OK) << tn_context_last_error(ctx);
    const auto got_a = Save();
    for (int b : outputs) EXPECT_EQ(got_a[(size_t)b], want_a[(size_t)b]) << "set A, buffer " << b;
    tn_graph_info info;
    ASSERT_EQ(tn_graph_get_info(g, &info), TN_OK);
    EXPECT_EQ(info.ops, 3) << tn_graph_fusions(g);
    EXPECT_EQ(info.device_graph, 1);
    EXPECT_EQ(info.instantiations, 1);
    EXPECT_EQ(info.updates_in_place, 0);

    base = kAll;
    Load(init_b);
    tn_graph *again = Record(chain);
    ASSERT_EQ(tn_graph_update(ctx, g, again), TN_OK) << tn_context_last_error(ctx);
    tn_graph_destroy(again);  // g keeps its own copy of the ops
    ASSERT_EQ(tn_graph_get_info(g, &info), TN_OK);
    EXPECT_EQ(info.instantiations, 1);
    EXPECT_EQ(info.updates_in_place, 1);
    ASSERT_EQ(tn_graph_launch(ctx, g), TN_OK) << tn_context_last_error(ctx);
    const auto got_b = Save();
    for (int b : outputs) EXPECT_EQ(got_b[(size_t)b], want_b[(size_t)b]) << "set B, buffer " << b;
    base = 0;
    EXPECT_EQ(Save(), got_a) << "the updated graph still wrote set A";

    // Another length: rebuilt, and right.
    base = kAll;
    Load(init_b);
    tn_graph *shorter = Record({chain[0], chain[1], chain[2]});
    ASSERT_EQ(tn_graph_update(ctx, g, shorter), TN_OK) << tn_context_last_error(ctx);
    tn_graph_destroy(shorter);
    ASSERT_EQ(tn_graph_launch(ctx, g), TN_OK) << tn_context_last_error(ctx);
    ASSERT_EQ(tn_graph_get_info(g, &info), TN_OK);
    EXPECT_EQ(info.instantiations, 2);
    EXPECT_EQ(info.ops, 2);
    const auto got_short = Save();
    for (int b : {2, 5}) EXPECT_EQ(got_short[(size_t)b], want_b[(size_t)b]) << "shorter, buffer " << b;
    EXPECT_EQ(got_short[1], init_b[1]) << "the dropped l2_norm still ran";
    tn_graph_destroy(g);
  }
}

// Errors leave the graph as it was.
TEST_F(GpuGraph, UpdateErrors) {
  ASSERT_NO_FATAL_FAILURE(Reallocate(kAll));
  tn_graph *g = Record({{TN_OP_ADD, 0, 1, 2, -1, 1.0f}});
  EXPECT_EQ(tn_graph_update(ctx, g, nullptr), TN_ERR_NULL);
  EXPECT_NE(std::string(tn_context_last_error(ctx)).find("recorded is NULL"), std::string::npos);
  EXPECT_EQ(tn_graph_update(ctx, nullptr, g), TN_ERR_NULL);
  ASSERT_EQ(tn_graph_begin(ctx), TN_OK);
  EXPECT_EQ(tn_graph_update(ctx, g, g), TN_ERR_VALUE);
  tn_graph *empty = nullptr;
  ASSERT_EQ(tn_graph_end(ctx, &empty), TN_OK);
  ASSERT_EQ(tn_graph_launch(ctx, g), TN_OK);
  tn_graph_info info;
  tn_graph_get_info(g, &info);
  EXPECT_EQ(info.ops, 1);
  EXPECT_EQ(info.instantiations, 1);
  // Updating to an empty recording: nothing to capture, the graph replays nothing.
  ASSERT_EQ(tn_graph_update(ctx, g, empty), TN_OK);
  EXPECT_EQ(tn_graph_launch(ctx, g), TN_OK);
  tn_graph_get_info(g, &info);
  EXPECT_EQ(info.ops, 0);
  EXPECT_EQ(info.device_graph, 0);
  tn_graph_destroy(empty);
  tn_graph_destroy(g);
}

}  // namespace
