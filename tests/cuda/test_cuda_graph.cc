// Graphs on the GPU: random chains of add, mul, scale, rms_norm, l2_norm and add_rms_norm over a pool of
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
  size_t Bytes() const { return (size_t)(kRows * kStride) * tn_dtype_size(dt); }
  tn_tensor View(int b) {
    return tn_tensor_on(tn_tensor_strided(dev[(size_t)b], dt, b >= kBuffers ? 1 : kRows, kDim, kStride),
                        tn_cuda_device(0));
  }
  void Load(const std::vector<std::vector<uint8_t>> &host) {
    for (int b = 0; b < kAll; b++)
      ASSERT_EQ(tn_memcpy(ctx, dev[(size_t)b], tn_cuda_device(0), host[(size_t)b].data(), tn_cpu_device(), Bytes()),
                TN_OK);
  }
  std::vector<std::vector<uint8_t>> Save() {
    std::vector<std::vector<uint8_t>> host(kAll, std::vector<uint8_t>(Bytes()));
    EXPECT_EQ(tn_synchronize(ctx, tn_cuda_device(0)), TN_OK) << tn_context_last_error(ctx);
    for (int b = 0; b < kAll; b++)
      EXPECT_EQ(tn_memcpy(ctx, host[(size_t)b].data(), tn_cpu_device(), dev[(size_t)b], tn_cuda_device(0), Bytes()),
                TN_OK);
    return host;
  }
  tn_status RunOp(const Op &o) {
    tn_tensor x = View(o.x), y = View(o.y), b = o.b >= 0 ? View(o.b) : tn_tensor{},
              ro = o.r_out >= 0 ? View(o.r_out) : tn_tensor{};
    tn_op_args a = tn_op_args_init(o.op);
    a.x = &x;
    a.y = &y;
    if (o.op == TN_OP_ADD) a.residual = &b;
    if (o.op == TN_OP_MUL) a.mul = &b;
    if (o.op == TN_OP_SCALE || o.op == TN_OP_L2_NORM) a.scale = o.scale;
    if (o.op == TN_OP_RMS_NORM && o.b >= 0) a.weight = &b;
    if (o.op == TN_OP_ADD_RMS_NORM) a.residual = &b, a.residual_out = &ro;
    return tn_op_run(ctx, &a);
  }
  tn_dtype dt = TN_BF16;
  std::vector<void *> dev;
};

TEST_F(GpuGraph, RandomChainsGiveTheSameBytes) {
  Random rng(SeedFor("gpu graph chains"));
  int fused_total = 0;
  for (int chain = 0; chain < 60; chain++) {
    dt = (tn_dtype)(chain % 3);
    for (void *p : dev) tn_free(ctx, tn_cuda_device(0), p);
    dev.assign(kAll, nullptr);
    for (int b = 0; b < kAll; b++) ASSERT_EQ(tn_malloc(ctx, tn_cuda_device(0), Bytes(), &dev[(size_t)b]), TN_OK);
    std::vector<std::vector<uint8_t>> init(kAll, std::vector<uint8_t>(Bytes(), 0x5a));
    for (int b = 0; b < kAll; b++) {
      tn_tensor t = tn_tensor_strided(init[(size_t)b].data(), dt, b >= kBuffers ? 1 : kRows, kDim, kStride);
      for (int64_t r = 0; r < t.rows; r++)
        for (int64_t i = 0; i < kDim; i++) tn_reference_store(&t, r, i, (float)(0.5 + rng.Normal()));
    }
    // One by one, keeping what each output held before its last write.
    Load(init);
    std::vector<Op> ops;
    std::vector<int> last_kind(kAll, -1);
    // Per buffer, its bytes before each norm write since its last other write (see the CPU test).
    std::vector<std::vector<std::vector<uint8_t>>> before(kAll);
    const tn_op kinds[] = {TN_OP_ADD, TN_OP_MUL, TN_OP_SCALE, TN_OP_RMS_NORM, TN_OP_L2_NORM, TN_OP_ADD_RMS_NORM};
    while ((int)ops.size() < 6) {
      Op o{kinds[rng.Below(6)], (int)rng.Below(kBuffers), -1, 0, -1, 1.0f};
      o.y = rng.Below(4) == 0 ? o.x : (int)rng.Below(kBuffers);
      if (o.op == TN_OP_ADD || o.op == TN_OP_MUL) o.b = rng.Below(6) == 0 ? kBuffers + 1 : (int)rng.Below(kBuffers);
      if (o.op == TN_OP_RMS_NORM && rng.Below(4) != 0) o.b = kBuffers;
      if (o.op == TN_OP_SCALE) o.scale = 0.75f;
      if (o.op == TN_OP_ADD_RMS_NORM) o.b = (int)rng.Below(kBuffers), o.r_out = (int)rng.Below(kBuffers);
      const std::vector<uint8_t> prior = Save()[(size_t)o.y];
      if (RunOp(o) != TN_OK) continue;
      ops.push_back(o);
      if (o.op == TN_OP_RMS_NORM || o.op == TN_OP_L2_NORM) before[(size_t)o.y].push_back(prior);
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
    fused_total += info.recorded_ops - info.ops;
    for (int b = 0; b < kAll; b++) {
      if (fused[(size_t)b] == one[(size_t)b]) continue;
      const bool dead = (last_kind[(size_t)b] == TN_OP_RMS_NORM || last_kind[(size_t)b] == TN_OP_L2_NORM) &&
                        info.ops < info.recorded_ops &&
                        std::count(before[(size_t)b].begin(), before[(size_t)b].end(), fused[(size_t)b]) > 0;
      EXPECT_TRUE(dead) << "chain " << chain << " " << tn_dtype_name(dt) << ": buffer " << b
                        << " differs; fusions: " << tn_graph_fusions(g);
    }
    tn_graph_destroy(g);
    if (HasFailure()) return;
  }
  EXPECT_GT(fused_total, 3);
}

}  // namespace
