// Misuse of the C API that must end in a clear status, not in undefined behaviour: sizes that wrap, and
// operands at any byte alignment (on the CPU they run on aligned copies, with the same bytes as aligned
// operands). One context shared by two threads is tests/threads/'s.
#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "test_context.h"
#include "test_seed.h"
#include "tnorm.h"

namespace {

using tnorm_test::Context;
using tnorm_test::GlobalSeed;
using tnorm_test::Rng;

TEST(Misuse, MallocRefusesSizesThatWrap) {
  Context c;
  for (size_t bytes : {SIZE_MAX, SIZE_MAX - 1, SIZE_MAX - 62}) {
    SCOPED_TRACE(bytes);
    void *p = reinterpret_cast<void *>(0x1234);
    EXPECT_EQ(tn_malloc(c.ctx, tn_cpu_device(), bytes, &p), TN_ERR_OVERFLOW);
    EXPECT_EQ(p, reinterpret_cast<void *>(0x1234));
    EXPECT_NE(std::strstr(tn_context_last_error(c.ctx), "address space"), nullptr) << tn_context_last_error(c.ctx);
  }
  void *p = reinterpret_cast<void *>(0x1234);
  // Rounds to a multiple of 64 without wrapping, then no allocator has that much.
  EXPECT_EQ(tn_malloc(c.ctx, tn_cpu_device(), SIZE_MAX - 63, &p), TN_ERR_NO_MEMORY);
  EXPECT_EQ(p, reinterpret_cast<void *>(0x1234));
}

// A row so long that the backend's float32 scratch rows (the weight's and one per chunk) overflow
// size_t, while x itself (2^61 f16 elements, 2^62 bytes) still passes the address-space check: refused
// before anything is allocated or read (the pointers are never dereferenced).
TEST(Misuse, ScratchSizesThatWrapAreRefused) {
  Context c;
  const int64_t dim = int64_t(1) << 61;
  void *fake_x = reinterpret_cast<void *>(uintptr_t(4096));
  void *fake_w = reinterpret_cast<void *>((uintptr_t(1) << 62) + 8192);  // past x's 2^62 bytes
  tn_tensor x = tn_tensor_2d(fake_x, TN_F16, 1, dim), w = tn_tensor_vector(fake_w, TN_F16, dim);
  EXPECT_EQ(tn_rms_norm(c.ctx, &x, &w, 0.0f, 1e-6f, &x), TN_ERR_OVERFLOW);
  EXPECT_NE(std::strstr(tn_context_last_error(c.ctx), "scratch"), nullptr) << tn_context_last_error(c.ctx);
}

// ---- alignment ----

// A buffer whose data starts `offset` bytes past a 64-byte boundary.
struct Buffer {
  std::vector<unsigned char> storage;
  size_t offset = 0;
  Buffer(size_t bytes, size_t off) : storage(bytes + 128), offset(off) {}
  unsigned char *data() {
    uintptr_t p = reinterpret_cast<uintptr_t>(storage.data());
    return reinterpret_cast<unsigned char *>((p + 63) / 64 * 64 + offset);
  }
};

uint16_t ToHalfBits(tn_dtype dt, float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  if (dt == TN_BF16) return uint16_t(u >> 16);  // truncation is fine: any finite input will do
  // f16 of a value in [-4, 4]: built from its parts, exact enough for an input.
  const uint32_t sign = (u >> 16) & 0x8000;
  const int exp = int((u >> 23) & 0xff) - 127 + 15;
  if (exp <= 0) return uint16_t(sign);
  return uint16_t(sign | (uint32_t(exp) << 10) | ((u >> 13) & 0x3ff));
}

// One operand: its logical shape and layout, filled with the same random values in both of its copies.
struct Operand {
  tn_dtype dtype;
  int64_t rows, heads, dim, row_stride, head_stride;
  Buffer aligned, shifted;
  Operand(tn_dtype dt, int64_t r, int64_t h, int64_t d, int64_t rs, int64_t hs, size_t shift)
      : dtype(dt), rows(r), heads(h), dim(d), row_stride(rs), head_stride(hs),
        aligned(Bytes(dt, r, rs), 0), shifted(Bytes(dt, r, rs), shift) {}
  static size_t Bytes(tn_dtype dt, int64_t r, int64_t rs) { return size_t(r * rs) * tn_dtype_size(dt); }
  size_t bytes() const { return Bytes(dtype, rows, row_stride); }
  void Fill(Rng &rng) {
    for (size_t i = 0; i < bytes() / tn_dtype_size(dtype); i++) {
      const float v = float(rng.Normal());
      if (dtype == TN_F32) std::memcpy(aligned.data() + 4 * i, &v, 4);
      else {
        const uint16_t h = ToHalfBits(dtype, v);
        std::memcpy(aligned.data() + 2 * i, &h, 2);
      }
    }
    std::memcpy(shifted.data(), aligned.data(), bytes());
  }
  tn_tensor View(bool shift) {
    tn_tensor t = tn_tensor_strided(shift ? shifted.data() : aligned.data(), dtype, rows, dim, row_stride);
    t.heads = heads;
    t.head_stride = head_stride;
    return t;
  }
};

struct AlignmentCase {
  const char *name;
  tn_op op;
  bool weight, mul, bias, rope, heads3d, in_place;
};

// Runs the op on operands at a 64-byte boundary, then on copies `shift` bytes off (outputs poisoned
// alike), and expects the same status and the same bytes in every output, gaps between rows included.
void ExpectSameBytesAtShift(const AlignmentCase &k, tn_dtype dt, size_t shift, uint64_t seed) {
  SCOPED_TRACE(std::string(k.name) + " " + tn_dtype_name(dt) + " shifted by " + std::to_string(shift));
  Rng rng(seed);
  const int64_t rows = 37, heads = k.heads3d ? 3 : 1, dim = k.rope ? 64 : 200;
  const int64_t hs = dim + 5, rs = k.heads3d ? heads * hs + 3 : dim + 7;
  const bool adds = k.op == TN_OP_ADD_RMS_NORM || k.op == TN_OP_ADD_LAYER_NORM || k.op == TN_OP_ADD;
  Operand x(dt, rows, heads, dim, rs, hs, shift), y(dt, rows, heads, dim, rs, hs, shift);
  Operand res(dt, rows, 1, dim, dim + 3, dim, shift), res_out(dt, rows, 1, dim, dim + 1, dim, shift);
  Operand mul(dt, rows, 1, dim, dim + 2, dim, shift), w(TN_F32, 1, 1, dim, dim, dim, shift);
  Operand b(dt, 1, 1, dim, dim, dim, shift), table(dt, 512, 1, dim, dim, dim, shift);
  for (Operand *o : {&x, &y, &res, &res_out, &mul, &w, &b, &table}) o->Fill(rng);
  std::vector<unsigned char> pos_aligned(8 * rows + 64), pos_shifted(8 * rows + 64);
  int64_t *positions = reinterpret_cast<int64_t *>((reinterpret_cast<uintptr_t>(pos_aligned.data()) + 63) / 64 * 64);
  unsigned char *positions_shifted =
      reinterpret_cast<unsigned char *>((reinterpret_cast<uintptr_t>(pos_shifted.data()) + 63) / 64 * 64 + shift);
  for (int64_t r = 0; r < rows; r++) positions[r] = int64_t(rng.Below(512));
  std::memcpy(positions_shifted, positions, 8 * size_t(rows));

  tn_status status[2];
  for (int s = 0; s < 2; s++) {
    tn_tensor tx = x.View(s), ty = k.in_place ? tx : y.View(s), tres = res.View(s), tro = res_out.View(s);
    tn_tensor tm = mul.View(s), tw = w.View(s), tb = b.View(s), tt = table.View(s);
    tn_op_args a = tn_op_args_init(k.op);
    a.x = &tx;
    a.y = &ty;
    if (k.weight) a.weight = &tw;
    if (k.bias) a.bias = &tb;
    if (k.mul || k.op == TN_OP_MUL) a.mul = &tm;
    if (adds) a.residual = &tres;
    if (adds && k.op != TN_OP_ADD) a.residual_out = &tro;
    if (k.op == TN_OP_SCALE) a.scale = 0.75f;
    if (k.rope) {
      a.rope.style = TN_ROPE_NEOX;
      a.rope.positions = s ? static_cast<const void *>(positions_shifted) : positions;
      a.rope.positions_i64 = 1;
      a.rope.cos_sin = &tt;
    }
    Context c;
    status[s] = tn_op_run(c.ctx, &a);
    EXPECT_EQ(status[s], TN_OK) << tn_context_last_error(c.ctx);
  }
  EXPECT_EQ(0, std::memcmp(x.aligned.data(), x.shifted.data(), x.bytes()));
  EXPECT_EQ(0, std::memcmp(y.aligned.data(), y.shifted.data(), y.bytes()));
  EXPECT_EQ(0, std::memcmp(res_out.aligned.data(), res_out.shifted.data(), res_out.bytes()));
}

const AlignmentCase kAlignmentCases[] = {
    {"rms_norm", TN_OP_RMS_NORM, true, false, false, false, false, false},
    {"rms_norm_mul_in_place", TN_OP_RMS_NORM, true, true, false, false, false, true},
    {"rms_norm_heads", TN_OP_RMS_NORM, false, false, false, false, true, false},
    {"rms_norm_rope_table", TN_OP_RMS_NORM, true, false, false, true, true, true},
    {"l2_norm_heads", TN_OP_L2_NORM, false, false, false, false, true, false},
    {"add_rms_norm_mul", TN_OP_ADD_RMS_NORM, true, true, false, false, false, false},
    {"layer_norm", TN_OP_LAYER_NORM, true, false, true, false, false, false},
    {"add_layer_norm", TN_OP_ADD_LAYER_NORM, true, false, true, false, false, true},
    {"add", TN_OP_ADD, false, false, false, false, false, false},
    {"mul", TN_OP_MUL, false, false, false, false, false, false},
    {"scale", TN_OP_SCALE, false, false, false, false, false, true},
};

TEST(Misuse, AnyAlignmentGivesTheSameBytes) {
  uint64_t seed = GlobalSeed() ^ 0xa11e;
  for (const AlignmentCase &k : kAlignmentCases)
    for (tn_dtype dt : {TN_F32, TN_F16, TN_BF16})
      for (size_t shift : {size_t(1), size_t(2), size_t(3)}) ExpectSameBytesAtShift(k, dt, shift, seed++);
}

// A call refused after staging (a rope position outside the table, found by the backend) writes
// nothing through the copies either.
TEST(Misuse, MisalignedCallThatFailsWritesNothing) {
  Context c;
  const int64_t rows = 4, dim = 8;
  Buffer xb(4 * rows * dim, 1), tb(4 * 2 * dim, 0), pb(8 * rows, 4);
  float init = 0.5f;
  for (int64_t i = 0; i < rows * dim; i++) std::memcpy(xb.data() + 4 * i, &init, 4);
  for (int64_t i = 0; i < 2 * dim; i++) std::memcpy(tb.data() + 4 * i, &init, 4);
  const int64_t pos[rows] = {0, 1, 7, 0};  // 7 is past the table's 2 rows
  std::memcpy(pb.data(), pos, sizeof pos);
  std::vector<unsigned char> before(xb.data(), xb.data() + 4 * rows * dim);
  tn_tensor x = tn_tensor_2d(xb.data(), TN_F32, rows, dim), table = tn_tensor_2d(tb.data(), TN_F32, 2, dim);
  tn_rope rope = {TN_ROPE_NEOX, 0, pb.data(), 1, 0.0f, &table};
  EXPECT_EQ(tn_rms_norm_rope(c.ctx, &x, nullptr, 0.0f, 1e-6f, &rope, &x), TN_ERR_VALUE);
  EXPECT_NE(std::strstr(tn_context_last_error(c.ctx), "position 7"), nullptr) << tn_context_last_error(c.ctx);
  EXPECT_EQ(0, std::memcmp(before.data(), xb.data(), before.size()));
}

}  // namespace
