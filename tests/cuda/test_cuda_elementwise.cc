// add, mul and scale on the GPU: every output byte equal to the CPU backend's for the same inputs (an
// elementwise op has no reduction order, so the two must agree bit for bit, NaN payloads aside), over
// dtypes, dims, row counts and layouts: strided, in place, b broadcast over rows, pointers one element
// and one byte off alignment. Outputs are poisoned first; the bytes around every view must not change.
#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "cuda_test_util.h"
#include "reference.h"
#include "tnorm.h"

namespace {

using namespace tn_cuda_test;

enum Layout { kContiguous, kStrided, kInPlace, kBroadcast, kElementOffset, kByteOffset, kLayoutCount };
const char *const kLayoutNames[kLayoutCount] = {"contiguous", "strided", "in place", "b one row",
                                                 "one element off", "one byte off"};

// A rows x dim view at `offset` bytes into a host buffer with `pad` spare bytes after it, all 0xFF first.
struct HostView {
  std::vector<uint8_t> bytes;
  tn_tensor view;
  size_t offset, extent;
  HostView(tn_dtype dt, int64_t rows, int64_t dim, int64_t stride, size_t off) : offset(off) {
    extent = rows > 0 ? (size_t)((rows - 1) * stride + dim) * tn_dtype_size(dt) : 0;
    bytes.assign(offset + extent + 64, 0xff);
    view = tn_tensor_strided(bytes.data() + offset, dt, rows, dim, stride);
  }
};

bool SameBits(tn_dtype dt, const uint8_t *a, const uint8_t *b, size_t n) {
  const size_t es = tn_dtype_size(dt);
  for (size_t i = 0; i < n; i += es) {
    const uint32_t x = Bits(dt, a + i, 0), y = Bits(dt, b + i, 0);
    if (x != y && !(BitsIsNaN(dt, x) && BitsIsNaN(dt, y))) return false;
  }
  return true;
}

class GpuElementwise : public CudaContextTest {
 protected:

  // Copies a host view's whole buffer to the device (same offset), returning the device view.
  tn_tensor Upload(const HostView &h, void **block) {
    EXPECT_EQ(tn_malloc(ctx, tn_cuda_device(0), h.bytes.size() + 16, block), TN_OK) << tn_context_last_error(ctx);
    EXPECT_EQ(tn_memcpy(ctx, *block, tn_cuda_device(0), h.bytes.data(), tn_cpu_device(), h.bytes.size()), TN_OK);
    tn_tensor t = h.view;
    t.data = (uint8_t *)*block + h.offset;
    t.device = tn_cuda_device(0);
    return t;
  }

  void RunCase(tn_op op, tn_dtype dt, int64_t rows, int64_t dim, Layout layout) {
    const std::string what = std::string(tn_op_name(op)) + " " + tn_dtype_name(dt) + " " + std::to_string(rows) +
                             " x " + std::to_string(dim) + " " + kLayoutNames[layout];
    SCOPED_TRACE(what);
    Random rng(SeedFor("elementwise " + what));
    const int64_t stride = layout == kStrided ? dim + 3 : dim;
    const size_t off = layout == kElementOffset ? tn_dtype_size(dt) : layout == kByteOffset ? 1 : 0;
    HostView x(dt, rows, dim, stride, off), b(dt, layout == kBroadcast ? 1 : rows, dim, stride, off),
        y(dt, rows, dim, stride, off);
    for (HostView *h : {&x, &b})
      for (int64_t r = 0; r < h->view.rows; r++)
        for (int64_t i = 0; i < dim; i++) tn_reference_store(&h->view, r, i, (float)(3.0 * rng.Normal()));
    const bool in_place = layout == kInPlace;

    // The CPU result, on copies.
    HostView cx = x, cb = b, cy = y;
    cx.view.data = cx.bytes.data() + off, cb.view.data = cb.bytes.data() + off, cy.view.data = cy.bytes.data() + off;
    tn_op_args a = tn_op_args_init(op);
    a.x = &cx.view;
    if (op == TN_OP_ADD) a.residual = &cb.view;
    if (op == TN_OP_MUL) a.mul = &cb.view;
    if (op == TN_OP_SCALE) a.scale = 0.73f;
    a.y = in_place ? &cx.view : &cy.view;
    ASSERT_EQ(tn_op_run(ctx, &a), TN_OK) << tn_context_last_error(ctx);

    // The GPU result.
    void *bx = nullptr, *bb = nullptr, *by = nullptr;
    tn_tensor dx = Upload(x, &bx), db = Upload(b, &bb), dy = Upload(y, &by);
    a.x = &dx;
    if (op == TN_OP_ADD) a.residual = &db;
    if (op == TN_OP_MUL) a.mul = &db;
    a.y = in_place ? &dx : &dy;
    ASSERT_EQ(tn_op_run(ctx, &a), TN_OK) << tn_context_last_error(ctx);
    ASSERT_EQ(tn_synchronize(ctx, tn_cuda_device(0)), TN_OK) << tn_context_last_error(ctx);
    HostView &gpu_out = in_place ? x : y;
    const HostView &cpu_out = in_place ? cx : cy;
    ASSERT_EQ(tn_memcpy(ctx, gpu_out.bytes.data(), tn_cpu_device(), in_place ? bx : by, tn_cuda_device(0),
                        gpu_out.bytes.size()),
              TN_OK);
    tn_free(ctx, tn_cuda_device(0), bx), tn_free(ctx, tn_cuda_device(0), bb), tn_free(ctx, tn_cuda_device(0), by);
    // Every byte of the buffer: the rows equal the CPU's, gaps and margins still as they were.
    ASSERT_EQ(gpu_out.bytes.size(), cpu_out.bytes.size());
    EXPECT_TRUE(SameBits(dt, gpu_out.bytes.data() + off, cpu_out.bytes.data() + off, gpu_out.extent));
    EXPECT_EQ(std::memcmp(gpu_out.bytes.data(), cpu_out.bytes.data(), off), 0);
    EXPECT_EQ(std::memcmp(gpu_out.bytes.data() + off + gpu_out.extent, cpu_out.bytes.data() + off + cpu_out.extent,
                          64),
              0);
  }

};

TEST_F(GpuElementwise, MatchesTheCpuBitForBit) {
  for (tn_op op : {TN_OP_ADD, TN_OP_MUL, TN_OP_SCALE})
    for (tn_dtype dt : {TN_F32, TN_F16, TN_BF16})
      for (int64_t dim : {1, 7, 8, 33, 512, 4096, 70000})
        for (int64_t rows : {1, 17, 65})
          for (int layout = 0; layout < kLayoutCount; layout++) {
            if (op == TN_OP_SCALE && layout == kBroadcast) continue;
            if (rows * dim > (1 << 20)) continue;
            RunCase(op, dt, rows, dim, (Layout)layout);
            if (HasFatalFailure()) return;
          }
}

}  // namespace
