// The CUDA backend on what models ask beyond rms_norm's default path: 3-D views of heads, TN_CASTING_LLAMA,
// an f32 residual stream and the residual modes, l2_norm's max(norm, eps), layer_norm and add_layer_norm,
// and rms_norm with a fused rope. Each call runs on cuda:0 and is checked against the float64 reference
// (tools/common/reference.h) and against the CPU backend on the same host inputs.
//
// Suites:
//   GpuModelOps                 every feature x dtype, dims reaching each row shape (G threads per row, the
//                               few-rows form, staged in shared memory, staged and read again), layouts
//                               (contiguous, strided, in place, offset by one byte)
//   GpuModelRope                NEOX and GPTJ, partial rotary (chunk-aligned halves and not), a table of f32
//                               or x's dtype, theta, int32 and int64 positions, clamped positions, casting
//   GpuModelQkv                 a packed QKV buffer of a real config (32 Q heads, 8 KV heads, head_dim 128)
//                               normalised (and rotated) in place, Q then K, V untouched
//   GpuModelSpecial             zero, NaN/Inf, huge and tiny rows, constant rows, for the new kernels
//   GpuModelCapture             a prepared rope op captured into a CUDA graph and replayed; tn_graph too
//   SanitizedSmallModels        a few quick cases of each new kernel family, for compute-sanitizer
//   SanitizedModelsBatchInvariance  a row (or token) alone gives the bytes it gives in a batch
//
// Tolerance: against the reference, tn_reference_error_slack <= 1 (the spec's one ulp or 2e-5, plus the
// reference's slack where cancellation or a casting mode's intermediate rounding allows an honest float32
// evaluation to differ; tools/common/reference.h); against the CPU, twice that slack plus one ulp (f32:
// the reduction orders' difference).
//
// Without a GPU, tests/cuda/emulator/run.sh runs these tests (bar the graph captures, which call the
// driver) with the kernels compiled for the host and each block's threads as fibers.
//
// Inputs are random from the seed printed by the binary (TNORM_TEST_SEED=<n> repeats a run). Output bytes
// on the device are poisoned with 0xFF before each call; every element of an output view must be written;
// every byte of every buffer outside the output views (the gaps of strided views, the V heads of a QKV
// buffer, a guard after the last row) must come back unchanged; the gaps of inputs hold NaNs that would
// show if read.
#include <gtest/gtest.h>

#include <cuda.h>

#include <algorithm>
#include <atomic>
#include <cinttypes>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <iomanip>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "cuda_test_util.h"
#include "reference.h"
#include "tnorm.h"

namespace {

using namespace tn_cuda_test;

constexpr size_t kGuardBytes = 64;

// ------------------------------------------------------------------------------------------------
// A call's description
// ------------------------------------------------------------------------------------------------

enum Vec { kNone, kXDtype, kF32 };  // a weight or bias: absent, of x's dtype, float32
enum Table { kTheta, kTableF32, kTableX };

struct Spec {
  tn_op op = TN_OP_RMS_NORM;
  tn_dtype dt = TN_BF16;
  int64_t rows = 1, dim = 1, heads = 1;
  // Layout: row_stride (0: the natural one plus stride_pad), head_stride (0: dim + head_pad), where the
  // views start in their buffers (elements, then bytes), in place (y is x, residual_out is residual).
  int64_t row_stride = 0, stride_pad = 0, head_stride = 0, head_pad = 0, elem_offset = 0;
  size_t byte_offset = 0;
  bool in_place = false;
  Vec weight = kNone, bias = kNone;
  float weight_offset = 0.0f;
  bool mul = false;
  bool residual_f32 = false;
  tn_residual_mode residual_mode = TN_RESIDUAL_NORM_STORED;
  tn_casting casting = TN_CASTING_EXACT;
  tn_l2_mode l2_mode = TN_L2_RSQRT_EPS;
  float eps = 1e-6f, scale = 1.0f;
  // The rope.
  tn_rope_style rope = TN_ROPE_NONE;
  int64_t rotary_dim = 0, table_rows = 2048;
  Table table = kTableF32;
  bool positions_i64 = false, out_of_table = false;
  float theta = 10000.0f;
  // Data: x (and the residual) N(0, 1) times a per-row scale from {1e-3, 1, 30}, or this fixed one; x
  // shifted by x_shift.
  double x_scale = 0.0, x_shift = 0.0;

  bool adds() const { return op == TN_OP_ADD_RMS_NORM || op == TN_OP_ADD_LAYER_NORM; }
  bool roped() const { return rope != TN_ROPE_NONE; }
  tn_dtype rdt() const { return residual_f32 ? TN_F32 : dt; }
  int64_t RowStride() const {
    if (row_stride > 0) return row_stride;
    return (heads > 1 ? (heads - 1) * HeadStride() + dim : dim) + stride_pad;
  }
  int64_t HeadStride() const { return head_stride > 0 ? head_stride : dim + head_pad; }
  int64_t Rotary() const { return rotary_dim != 0 ? rotary_dim : dim; }
};

std::string Describe(const Spec &s) {
  std::ostringstream o;
  o << tn_op_name(s.op) << " " << tn_dtype_name(s.dt) << " rows " << s.rows << " heads " << s.heads << " dim "
    << s.dim << " row_stride " << s.RowStride();
  if (s.heads > 1) o << " head_stride " << s.HeadStride();
  if (s.elem_offset || s.byte_offset) o << " offset " << s.elem_offset << " elements + " << s.byte_offset << " bytes";
  if (s.in_place) o << " in place";
  if (s.weight != kNone) o << " weight " << (s.weight == kF32 ? "f32" : "x") << " offset " << s.weight_offset;
  if (s.bias != kNone) o << " bias " << (s.bias == kF32 ? "f32" : "x");
  if (s.mul) o << " mul";
  if (s.adds()) o << " residual " << tn_dtype_name(s.rdt()) << (s.residual_mode == TN_RESIDUAL_NORM_F32 ? " norm_f32" : "");
  if (s.casting == TN_CASTING_LLAMA) o << " llama";
  if (s.op == TN_OP_L2_NORM) o << " scale " << s.scale << (s.l2_mode == TN_L2_MAX_NORM_EPS ? " max_norm_eps" : "");
  if (s.x_scale > 0) o << " x scale " << s.x_scale;
  if (s.x_shift != 0) o << " x shift " << s.x_shift;
  o << " eps " << s.eps;
  if (s.roped()) {
    o << " rope " << (s.rope == TN_ROPE_NEOX ? "neox" : "gptj") << " rotary " << s.Rotary() << " "
      << (s.table == kTheta ? "theta" : s.table == kTableF32 ? "table f32" : "table x") << " positions "
      << (s.positions_i64 ? "i64" : "i32") << (s.out_of_table ? " (some outside the table)" : "");
  }
  o << ", TNORM_TEST_SEED=" << BaseSeed();
  return o.str();
}

// ------------------------------------------------------------------------------------------------
// One operand: a buffer (its host image before the call, and a device copy) and the view in it.
// ------------------------------------------------------------------------------------------------

struct Operand {
  bool used = false, output = false;
  tn_dtype dt = TN_F32;
  int64_t rows = 0, dim = 0, row_stride = 0, heads = 1, head_stride = 0;
  size_t offset = 0;  // bytes from the buffer to the view's first element
  std::vector<uint8_t> image;
  DeviceBuffer dev;

  size_t es() const { return ESize(dt); }
  size_t At(int64_t r, int64_t h, int64_t i) const {
    return offset + (size_t)(r * row_stride + h * head_stride + i) * es();
  }
  // The buffer: up to the end of the last row's pitch (or its last element), then a guard.
  size_t Bytes() const {
    const int64_t span = rows > 0 ? std::max(rows * row_stride, (rows - 1) * row_stride + (heads - 1) * head_stride + dim) : 0;
    return offset + (size_t)span * es() + kGuardBytes;
  }
  void Shape(tn_dtype d, int64_t r, int64_t n, int64_t stride, int64_t h, int64_t hs, size_t off) {
    used = true;
    dt = d;
    rows = r;
    dim = n;
    row_stride = stride;
    heads = h;
    head_stride = hs;
    offset = off;
  }
  tn_tensor View(uint8_t *base, bool device) const {
    const tn_tensor t = heads > 1 ? tn_tensor_heads(base + offset, dt, rows, heads, dim, row_stride, head_stride)
                                  : tn_tensor_strided(base + offset, dt, rows, dim, row_stride);
    return device ? tn_tensor_on(t, Gpu()) : t;
  }
  // Forgets the view (the device buffer is kept for reuse).
  void Reset() {
    used = output = false;
    heads = 1;
    offset = 0;
    image.clear();
  }
  // Marks the view's bytes in `mask`.
  void MarkView(std::vector<uint8_t> &mask) const {
    for (int64_t r = 0; r < rows; r++)
      for (int64_t h = 0; h < heads; h++) std::fill_n(mask.begin() + (ptrdiff_t)At(r, h, 0), (size_t)dim * es(), 1);
  }
};

// A NaN of the dtype everywhere (whole elements on the view's element grid), for the gaps of inputs.
void FillNaN(Operand &o) {
  uint8_t nan[4];
  NaNBytes(o.dt, nan);
  const size_t e = o.es(), phase = (e - o.offset % e) % e;
  for (size_t i = 0; i < o.image.size(); i++) o.image[i] = nan[(i + phase) % e];
}

// N(0, 1) * scale + shift in every element of the view; scale per row from {1e-3, 1, 30} unless fixed.
void FillView(Operand &o, Random &rng, double fixed_scale, double shift = 0.0) {
  static const double kScales[3] = {1e-3, 1.0, 30.0};
  const std::vector<float> &pool = NormalPool();
  for (int64_t r = 0; r < o.rows; r++) {
    const double scale = fixed_scale > 0 ? fixed_scale : kScales[rng.Below(3)];
    for (int64_t h = 0; h < o.heads; h++) {
      const size_t start = (size_t)rng.Below(kPoolSize - (size_t)o.dim + 1);
      for (int64_t i = 0; i < o.dim; i++)
        tn_store(o.dt, o.image.data() + o.At(r, h, i), 0, (float)(shift + pool[start + (size_t)i] * scale));
    }
  }
}

// ------------------------------------------------------------------------------------------------
// A case: its operands, the reference and the CPU backend's results, the GPU's run and the checks.
// ------------------------------------------------------------------------------------------------

enum Slot { kX, kRes, kMul, kW, kBias, kY, kROut, kTable, kSlots };
const char *const kSlotNames[kSlots] = {"x", "residual", "mul", "weight", "bias", "y", "residual_out", "cos_sin"};

struct Case {
  Spec s;
  uint64_t seed = 0;
  Operand op[kSlots];
  std::vector<uint8_t> positions;      // what the GPU reads (int32 or int64 per row)
  std::vector<uint8_t> ref_positions;  // what the reference and the CPU read (clamped into the table)
  DeviceBuffer dev_positions;
  std::vector<double> ref_y, ref_r;           // the float64 reference: y (rows x heads x dim), residual_out
  std::vector<double> ref_slack;              // the reference's slack for each element of y
  std::vector<uint8_t> cpu_y_image, cpu_r_image;  // the CPU backend's y and residual_out buffers
  std::vector<uint8_t> gpu[kSlots];           // every buffer as it came back from the device

  Slot YSlot() const { return s.in_place ? kX : kY; }
  Slot RSlot() const { return s.in_place ? kRes : kROut; }
};

// The tensors and arguments of a call, host or device; args points into this object.
struct Bound {
  tn_tensor t[kSlots];
  tn_op_args args;
  Bound(const Bound &) = delete;
  Bound() = default;
};

// Binds the case's operands over the buffers base[slot] (host images or device buffers), rows [r0, r1).
void Bind(const Case &c, uint8_t *const base[kSlots], const uint8_t *positions, bool device, int64_t r0, int64_t r1,
          Bound &b) {
  const Spec &s = c.s;
  for (int i = 0; i < kSlots; i++) {
    if (!c.op[i].used) continue;
    b.t[i] = c.op[i].View(base[i], device);
    const bool rowwise = i != kW && i != kBias && i != kTable;
    if (rowwise) {
      b.t[i].data = (uint8_t *)b.t[i].data + (size_t)(r0 * c.op[i].row_stride) * c.op[i].es();
      b.t[i].rows = r1 - r0;
    }
  }
  b.args = tn_op_args_init(s.op);
  tn_op_args &a = b.args;
  a.x = &b.t[kX];
  a.y = &b.t[c.YSlot()];
  a.eps = s.eps;
  a.scale = s.scale;
  a.casting = s.casting;
  a.l2_mode = s.l2_mode;
  if (s.weight != kNone) {
    a.weight = &b.t[kW];
    a.weight_offset = s.weight_offset;
  }
  if (s.bias != kNone) a.bias = &b.t[kBias];
  if (s.mul) a.mul = &b.t[kMul];
  if (s.adds()) {
    a.residual = &b.t[kRes];
    a.residual_out = &b.t[c.RSlot()];
    a.residual_mode = s.residual_mode;
  }
  if (s.roped()) {
    a.rope.style = s.rope;
    a.rope.rotary_dim = s.rotary_dim;
    a.rope.positions = positions + (size_t)r0 * (s.positions_i64 ? 8 : 4);
    a.rope.positions_i64 = s.positions_i64 ? 1 : 0;
    a.rope.theta = s.theta;
    a.rope.cos_sin = s.table == kTheta ? nullptr : &b.t[kTable];
  }
}

// Shapes the case's operands from its spec and fills them (seeded).
void MakeCase(Case &c, const Spec &s, uint64_t seed) {
  c.s = s;
  c.seed = seed;
  for (Operand &o : c.op) o.Reset();
  const int64_t stride = s.RowStride(), hs = s.HeadStride();
  const size_t off = (size_t)s.elem_offset * ESize(s.dt) + s.byte_offset;
  Random rng(seed);
  auto row_operand = [&](Slot slot, tn_dtype dt, int64_t heads) {
    Operand &o = c.op[slot];
    const size_t off_d = (size_t)s.elem_offset * ESize(dt) + s.byte_offset;
    o.Shape(dt, s.rows, s.dim, heads > 1 ? stride : (dt == s.dt ? stride : s.dim + s.stride_pad), heads, hs, off_d);
    o.image.assign(o.Bytes(), 0);
    FillNaN(o);
  };
  const int64_t heads = s.heads;
  row_operand(kX, s.dt, heads);
  FillView(c.op[kX], rng, s.x_scale, s.x_shift);
  if (s.adds()) {
    row_operand(kRes, s.rdt(), 1);
    FillView(c.op[kRes], rng, s.x_scale);
  }
  if (s.mul) {
    row_operand(kMul, s.dt, heads);
    FillView(c.op[kMul], rng, 1.0);
  }
  auto vector_operand = [&](Slot slot, Vec kind, double scale, double shift) {
    Operand &o = c.op[slot];
    o.Shape(kind == kF32 ? TN_F32 : s.dt, 1, s.dim, s.dim, 1, s.dim, off);
    o.image.assign(o.Bytes(), 0);
    FillNaN(o);
    FillView(o, rng, scale, shift);
  };
  if (s.weight != kNone) vector_operand(kW, s.weight, 0.1, s.weight_offset != 0.0f ? 0.0 : 1.0);
  if (s.bias != kNone) vector_operand(kBias, s.bias, 0.5, 0.0);
  if (!s.in_place) {
    Operand &y = c.op[kY];
    y.Shape(s.dt, s.rows, s.dim, c.op[kX].row_stride, heads, hs, off);
    y.image.assign(y.Bytes(), 0xff);
    y.output = true;
    if (s.adds()) {
      Operand &r = c.op[kROut];
      r.Shape(s.rdt(), s.rows, s.dim, c.op[kRes].row_stride, 1, s.dim, c.op[kRes].offset);
      r.image.assign(r.Bytes(), 0xff);
      r.output = true;
    }
  } else {
    c.op[kX].output = true;
    if (s.adds()) c.op[kRes].output = true;
  }
  if (s.roped()) {
    const int64_t rot = s.Rotary(), half = rot / 2;
    if (s.table != kTheta) {
      Operand &t = c.op[kTable];
      const tn_dtype tdt = s.table == kTableF32 ? TN_F32 : s.dt;
      // Rows 8 elements apart beyond rotary_dim (a gap, and the pitch of a real table's rows when
      // rotary_dim is a multiple of 8); a byte offset makes the table misaligned too.
      t.Shape(tdt, s.table_rows, rot, rot + 8, 1, rot, (size_t)s.byte_offset);
      t.image.assign(t.Bytes(), 0);
      FillNaN(t);
      for (int64_t p = 0; p < s.table_rows; p++)
        for (int64_t i = 0; i < half; i++) {
          const double f = std::pow((double)s.theta, -(double)(2 * i) / (double)rot), a = (double)p * f;
          tn_store(tdt, t.image.data() + t.At(p, 0, i), 0, (float)std::cos(a));
          tn_store(tdt, t.image.data() + t.At(p, 0, half + i), 0, (float)std::sin(a));
        }
    }
    const size_t ps = s.positions_i64 ? 8 : 4;
    c.positions.assign((size_t)s.rows * ps + 8, 0);
    c.ref_positions = c.positions;
    const int64_t limit = s.table == kTheta ? (int64_t)1 << 20 : s.table_rows;
    for (int64_t r = 0; r < s.rows; r++) {
      int64_t pos = (int64_t)rng.Below((uint64_t)limit), clamped = pos;
      if (s.out_of_table && r % 3 == 1) pos = -1 - (int64_t)rng.Below(1000), clamped = 0;
      if (s.out_of_table && r % 3 == 2) pos = s.table_rows + (int64_t)rng.Below(1000), clamped = s.table_rows - 1;
      if (s.positions_i64) {
        memcpy(c.positions.data() + (size_t)r * 8, &pos, 8);
        memcpy(c.ref_positions.data() + (size_t)r * 8, &clamped, 8);
      } else {
        const int32_t p32 = (int32_t)pos, c32 = (int32_t)clamped;
        memcpy(c.positions.data() + (size_t)r * 4, &p32, 4);
        memcpy(c.ref_positions.data() + (size_t)r * 4, &c32, 4);
      }
    }
  }
}

// The float64 reference (on several threads, by row ranges) and the CPU backend's run on host copies.
bool Solve(tn_context *ctx, Case &c) {
  const Spec &s = c.s;
  const int64_t vec = s.heads * s.dim;
  c.ref_y.assign((size_t)(s.rows * vec), 0.0);
  c.ref_r.assign(s.adds() ? (size_t)(s.rows * s.dim) : 0, 0.0);
  c.ref_slack.assign((size_t)(s.rows * vec), 0.0);
  std::atomic<bool> ok{true};
  uint8_t *images[kSlots];
  for (int i = 0; i < kSlots; i++) images[i] = c.op[i].image.data();
  ParallelFor(s.rows, vec * 4, [&](int, int64_t r0, int64_t r1) {
    if (r1 <= r0) return;
    Bound b;
    Bind(c, images, c.ref_positions.data(), false, r0, r1, b);
    if (tn_reference_run_slack(&b.args, c.ref_y.data() + r0 * vec, s.adds() ? c.ref_r.data() + r0 * s.dim : nullptr,
                               c.ref_slack.data() + r0 * vec) != 0)
      ok = false;
  });
  EXPECT_TRUE(ok) << Describe(s) << ": the reference failed";
  // The CPU backend over copies of the images (in place writes into the x and residual copies).
  std::vector<uint8_t> copies[kSlots];
  uint8_t *bases[kSlots];
  for (int i = 0; i < kSlots; i++) {
    copies[i] = c.op[i].image;
    bases[i] = copies[i].data();
  }
  Bound b;
  Bind(c, bases, c.ref_positions.data(), false, 0, s.rows, b);
  const tn_status st = tn_op_run(ctx, &b.args);
  EXPECT_EQ(st, TN_OK) << Describe(s) << ": the CPU backend: " << tn_status_name(st) << ": "
                       << tn_context_last_error(ctx);
  c.cpu_y_image = copies[c.YSlot()];
  if (s.adds()) c.cpu_r_image = copies[c.RSlot()];
  return ok && st == TN_OK;
}

// Puts every buffer (outputs poisoned) and the positions on cuda:0.
bool UploadCase(tn_context *ctx, Case &c) {
  for (int i = 0; i < kSlots; i++) {
    Operand &o = c.op[i];
    if (!o.used) continue;
    tn_status st = o.dev.Reserve(ctx, o.image.size());
    if (st == TN_OK) st = tn_memcpy(ctx, o.dev.data(), Gpu(), o.image.data(), tn_cpu_device(), o.image.size());
    if (st != TN_OK) {
      ADD_FAILURE() << Describe(c.s) << ": uploading " << kSlotNames[i] << ": " << tn_context_last_error(ctx);
      return false;
    }
  }
  if (c.s.roped()) {
    tn_status st = c.dev_positions.Reserve(ctx, c.positions.size());
    if (st == TN_OK)
      st = tn_memcpy(ctx, c.dev_positions.data(), Gpu(), c.positions.data(), tn_cpu_device(), c.positions.size());
    if (st != TN_OK) {
      ADD_FAILURE() << Describe(c.s) << ": uploading the positions: " << tn_context_last_error(ctx);
      return false;
    }
  }
  return true;
}

void BindDevice(const Case &c, Bound &b) {
  uint8_t *bases[kSlots];
  for (int i = 0; i < kSlots; i++) bases[i] = c.op[i].used ? c.op[i].dev.data() : nullptr;
  Bind(c, bases, c.dev_positions.data(), true, 0, c.s.rows, b);
}

// Waits for the device, then reads every buffer back into c.gpu.
bool Download(tn_context *ctx, Case &c) {
  if (tn_synchronize(ctx, Gpu()) != TN_OK) {
    ADD_FAILURE() << Describe(c.s) << ": tn_synchronize: " << tn_context_last_error(ctx);
    return false;
  }
  for (int i = 0; i < kSlots; i++) {
    const Operand &o = c.op[i];
    if (!o.used) continue;
    c.gpu[i].assign(o.image.size(), 0);
    if (tn_memcpy(ctx, c.gpu[i].data(), tn_cpu_device(), o.dev.data(), Gpu(), o.image.size()) != TN_OK) {
      ADD_FAILURE() << Describe(c.s) << ": reading " << kSlotNames[i] << " back: " << tn_context_last_error(ctx);
      return false;
    }
  }
  return true;
}

// Uploads, runs the op on cuda:0 and reads every buffer back into c.gpu.
bool RunGpu(tn_context *ctx, Case &c) {
  if (!UploadCase(ctx, c)) return false;
  Bound b;
  BindDevice(c, b);
  const tn_status st = tn_op_run(ctx, &b.args);
  if (st != TN_OK) {
    ADD_FAILURE() << Describe(c.s) << ": tn_op_run on cuda:0: " << tn_status_name(st) << ": "
                  << tn_context_last_error(ctx);
    return false;
  }
  return Download(ctx, c);
}

// ---- tolerances ----

double UlpOf(tn_dtype dt, double v) {
  const int mant = dt == TN_F16 ? 10 : dt == TN_BF16 ? 7 : 23, min_exp = dt == TN_F16 ? -14 : -126;
  const double a = std::fabs(v);
  const int e = a > 0 && std::isfinite(a) ? std::max(std::ilogb(a), min_exp) : min_exp;
  return std::ldexp(1.0, e - mant);
}

// Against the reference: tn_reference_error_slack <= 1, the spec's tolerance (one ulp of f16/bf16, 2e-5
// relative for f32) plus the reference's slack, which is 0 but where a float32 evaluation may honestly be
// further (layer_norm's x - mean and the rope's a cos - b sin cancel; under TN_CASTING_LLAMA a value next
// to a rounding boundary may round either way): see tools/common/reference.h.
// Against the CPU backend: NaN meets NaN and Inf the same Inf; finite values within twice the slack (each
// may use it) plus one ulp of f16/bf16, or for f32 the two reduction orders' difference that
// test_cuda_ops.cc allows (1.5 sqrt(dim) + 4 ulps).
bool NearCpu(tn_dtype dt, float got, float cpu, double slack, int64_t dim) {
  if (std::isnan(got) || std::isnan(cpu)) return std::isnan(got) && std::isnan(cpu);
  if (std::isinf(got) || std::isinf(cpu)) return got == cpu;
  const double mag = std::max(std::fabs((double)got), std::fabs((double)cpu));
  const double ulps = dt == TN_F32 ? 4 + 1.5 * std::sqrt((double)dim) : 1.0;
  return std::fabs((double)got - (double)cpu) <= 2 * slack + ulps * UlpOf(dt, mag);
}

// Checks a case's GPU results: y against the reference and the CPU; residual_out exactly the reference's
// (one rounding of x + residual) and the CPU's; no output element left as the poison; every byte outside
// the output views unchanged.
bool CheckCase(const Case &c, const std::string &where) {
  const Spec &s = c.s;
  const Operand &yo = c.op[c.YSlot()];
  const std::vector<uint8_t> &gy = c.gpu[c.YSlot()];
  int64_t bad = 0;
  std::ostringstream first;
  auto fail = [&](const std::string &m) {
    if (bad++ == 0) first << m;
  };
  for (int64_t r = 0; r < s.rows && bad < 1000; r++) {
    for (int64_t h = 0; h < s.heads; h++) {
      const double *ref = c.ref_y.data() + (r * s.heads + h) * s.dim;
      const double *slack = c.ref_slack.data() + (r * s.heads + h) * s.dim;
      for (int64_t i = 0; i < s.dim; i++) {
        const size_t at = yo.At(r, h, i);
        const uint32_t gb = Bits(s.dt, gy.data() + at, 0), cb = Bits(s.dt, c.cpu_y_image.data() + at, 0);
        const float g = BitsToFloat(s.dt, gb), cpu = BitsToFloat(s.dt, cb);
        const char *why = BitsIsPoison(s.dt, gb)                                    ? "the poison, never written"
                          : !(tn_reference_error_slack(s.dt, g, ref[i], slack[i]) <= 1.0) ? "too far from the reference"
                          : !NearCpu(s.dt, g, cpu, slack[i], s.dim)                    ? "too far from the CPU backend"
                                                                                        : nullptr;
        if (why == nullptr) continue;
        std::ostringstream m;
        m << "y row " << r << " head " << h << " column " << i << ": got " << std::setprecision(9) << g << " (0x"
          << std::hex << gb << std::dec << "), reference " << std::setprecision(17) << ref[i] << " (slack "
          << std::setprecision(3) << slack[i] << "), CPU " << std::setprecision(9) << cpu << " (0x" << std::hex
          << cb << std::dec << "): " << why;
        fail(m.str());
      }
    }
    if (!s.adds()) continue;
    const Operand &ro = c.op[c.RSlot()];
    const std::vector<uint8_t> &gr = c.gpu[c.RSlot()];
    const tn_dtype rdt = s.rdt();
    for (int64_t i = 0; i < s.dim; i++) {
      const size_t at = ro.At(r, 0, i);
      const uint32_t gb = Bits(rdt, gr.data() + at, 0), cb = Bits(rdt, c.cpu_r_image.data() + at, 0);
      const float g = BitsToFloat(rdt, gb);
      const double want = c.ref_r[(size_t)(r * s.dim + i)];
      const char *why = BitsIsPoison(rdt, gb) ? "the poison, never written"
                        : !(std::isnan(want) ? std::isnan(g) : (double)g == want) ? "not x + residual rounded once"
                        : !(BitsIsNaN(rdt, gb) ? BitsIsNaN(rdt, cb) : gb == cb) ? "differs from the CPU backend"
                                                                                : nullptr;
      if (why == nullptr) continue;
      std::ostringstream m;
      m << "residual_out row " << r << " column " << i << ": got " << std::setprecision(9) << g << ", reference "
        << std::setprecision(17) << want << ", CPU " << BitsToFloat(rdt, cb) << ": " << why;
      fail(m.str());
    }
  }
  // Bytes outside the output views: as before the call.
  for (int i = 0; i < kSlots && bad == 0; i++) {
    const Operand &o = c.op[i];
    if (!o.used) continue;
    std::vector<uint8_t> mask(o.image.size(), 0);
    if (o.output) o.MarkView(mask);
    for (size_t k = 0; k < o.image.size(); k++) {
      if (mask[k] || c.gpu[i][k] == o.image[k]) continue;
      std::ostringstream m;
      m << kSlotNames[i] << ": byte " << k << " of its buffer, outside "
        << (o.output ? "the output view" : "any output (an input)") << ", changed from 0x" << std::hex
        << (int)o.image[k] << " to 0x" << (int)c.gpu[i][k];
      fail(m.str());
      break;
    }
  }
  if (bad == 0) return true;
  ADD_FAILURE() << where << ": " << bad << " bad element(s) or byte(s); the first: " << first.str();
  return false;
}

// ------------------------------------------------------------------------------------------------
// Fixture
// ------------------------------------------------------------------------------------------------

class ModelTest : public CudaContextTest {
 protected:
  // Makes, solves, runs and checks one case; false (with the failure reported) when anything fails.
  bool Check(const Spec &s, const std::string &seed_name) {
    case_.reset(new Case);
    MakeCase(*case_, s, SeedFor(seed_name + " " + Describe(s)));
    if (!Solve(ctx, *case_)) return false;
    if (!RunGpu(ctx, *case_)) return false;
    return CheckCase(*case_, Describe(s));
  }

  // Runs fn over a list of specs, stopping after 10 failures.
  void CheckAll(const std::vector<Spec> &specs, const std::string &seed_name) {
    int failed = 0;
    for (const Spec &s : specs) {
      if (!Check(s, seed_name) && ++failed >= 10) {
        ADD_FAILURE() << "stopping after 10 failed cases";
        return;
      }
    }
  }

  std::unique_ptr<Case> case_;

  void TearDown() override {
    case_.reset();  // its device buffers go through the context
    CudaContextTest::TearDown();
  }
};

const tn_dtype kAllDtypes[] = {TN_F32, TN_F16, TN_BF16};

// Dims reaching each row shape: G = 1, 2, 8, 32 (several rows a block), 64 .. 1024 (a block a row; two
// chunks a thread up to G = 128 in rms_norm's families), the few-rows form (rows <= SMs, G >= 128), staged in shared memory (bf16 70000) and read again (f32 70000).
const int64_t kShapeDims[] = {1, 7, 33, 128, 1000, 4096, 5120, 16384, 70000};

// Rows for a dim: many short rows, few long ones (the reference's time), 3 rows past 16384 (so that the
// few-rows form runs too where it exists).
int64_t RowsFor(int64_t dim) { return dim >= 16384 ? 3 : dim >= 4096 ? 37 : dim >= 1000 ? 150 : 300; }

// The layouts each case runs in.
enum Layout { kContiguous, kStrided, kInPlace, kByteOffset };
Spec WithLayout(Spec s, Layout l) {
  switch (l) {
    case kContiguous:
      break;
    case kStrided:
      s.stride_pad = 5;
      if (s.heads > 1) s.head_pad = 3;
      break;
    case kInPlace:
      s.in_place = true;
      break;
    case kByteOffset:
      s.byte_offset = 1;
      break;
  }
  return s;
}

// ------------------------------------------------------------------------------------------------
// GpuModelOps
// ------------------------------------------------------------------------------------------------

class GpuModelOps : public ModelTest {};

// rms_norm and l2_norm on [rows, heads, dim] views: each head normalised on its own; y and mul have x's
// heads with their own strides.
TEST_F(GpuModelOps, ThreeDViews) {
  std::vector<Spec> specs;
  for (tn_dtype dt : kAllDtypes)
    for (int64_t dim : {64, 128, 256, 1000, 5120})
      for (Layout l : {kContiguous, kStrided, kInPlace, kByteOffset}) {
        Spec s;
        s.dt = dt;
        s.dim = dim;
        s.heads = dim >= 1000 ? 3 : 8;
        s.rows = dim >= 1000 ? 40 : 97;
        s.weight = kXDtype;
        specs.push_back(WithLayout(s, l));
        Spec l2 = s;
        l2.op = TN_OP_L2_NORM;
        l2.weight = kNone;
        l2.scale = 0.37f;
        specs.push_back(WithLayout(l2, l));
        if (l != kInPlace) {
          Spec m = s;
          m.mul = true;
          m.weight = kF32;
          m.weight_offset = 1.0f;
          specs.push_back(WithLayout(m, l));
        }
      }
  // One head per row, and many heads of one element.
  Spec one;
  one.dim = 4096;
  one.heads = 2;
  one.rows = 5;
  specs.push_back(one);
  Spec tiny;
  tiny.dim = 1;
  tiny.heads = 200;
  tiny.rows = 7;
  specs.push_back(tiny);
  CheckAll(specs, "3-D");
}

// TN_CASTING_LLAMA on every norm: the normalised value rounded to x's dtype before the weight.
TEST_F(GpuModelOps, LlamaCasting) {
  std::vector<Spec> specs;
  for (tn_dtype dt : kAllDtypes)
    for (int64_t dim : kShapeDims)
      for (tn_op op : {TN_OP_RMS_NORM, TN_OP_L2_NORM, TN_OP_ADD_RMS_NORM, TN_OP_LAYER_NORM, TN_OP_ADD_LAYER_NORM}) {
        Spec s;
        s.op = op;
        s.dt = dt;
        s.dim = dim;
        s.rows = RowsFor(dim);
        s.casting = TN_CASTING_LLAMA;
        s.weight = op == TN_OP_L2_NORM ? kNone : kXDtype;
        if (op == TN_OP_LAYER_NORM || op == TN_OP_ADD_LAYER_NORM) s.bias = kF32;
        specs.push_back(s);
        if (op == TN_OP_RMS_NORM || op == TN_OP_ADD_RMS_NORM) {
          Spec m = s;
          m.mul = true;  // general.cu
          specs.push_back(m);
        }
      }
  // In place, strided and byte-misaligned, and on heads.
  for (Layout l : {kStrided, kInPlace, kByteOffset}) {
    Spec s;
    s.op = TN_OP_ADD_RMS_NORM;
    s.dim = 4096;
    s.rows = 33;
    s.weight = kF32;
    s.casting = TN_CASTING_LLAMA;
    specs.push_back(WithLayout(s, l));
    Spec h;
    h.dim = 128;
    h.heads = 8;
    h.rows = 50;
    h.weight = kXDtype;
    h.casting = TN_CASTING_LLAMA;
    specs.push_back(WithLayout(h, l));
  }
  CheckAll(specs, "llama");
}

// add_rms_norm and add_layer_norm with an f32 residual stream beside f16/bf16 activations, and with the
// float32 sum normalised unrounded (NORM_F32), with and without a multiplicand.
TEST_F(GpuModelOps, ResidualStreams) {
  std::vector<Spec> specs;
  for (tn_dtype dt : kAllDtypes)
    for (int64_t dim : kShapeDims)
      for (tn_op op : {TN_OP_ADD_RMS_NORM, TN_OP_ADD_LAYER_NORM})
        for (int stream = 0; stream < 3; stream++) {  // f32 stream (stored), f32 stream (norm_f32), x's dtype norm_f32
          if (dt == TN_F32 && stream < 2) continue;   // an f32 stream beside f32 activations is the default path
          Spec s;
          s.op = op;
          s.dt = dt;
          s.dim = dim;
          s.rows = RowsFor(dim);
          s.weight = kXDtype;
          s.residual_f32 = stream < 2;
          s.residual_mode = stream == 0 ? TN_RESIDUAL_NORM_STORED : TN_RESIDUAL_NORM_F32;
          if (op == TN_OP_ADD_LAYER_NORM) s.bias = kXDtype;
          specs.push_back(s);
          if (op == TN_OP_ADD_RMS_NORM && (dim == 128 || dim == 5120)) {
            Spec m = s;
            m.mul = true;
            specs.push_back(m);
          }
        }
  for (Layout l : {kStrided, kInPlace, kByteOffset}) {
    for (tn_op op : {TN_OP_ADD_RMS_NORM, TN_OP_ADD_LAYER_NORM}) {
      Spec s;
      s.op = op;
      s.dt = TN_BF16;
      s.dim = 2048;
      s.rows = 21;
      s.residual_f32 = true;
      s.weight = kF32;
      specs.push_back(WithLayout(s, l));
      s.residual_f32 = false;
      s.residual_mode = TN_RESIDUAL_NORM_F32;
      specs.push_back(WithLayout(s, l));
    }
  }
  // A long f32-stream row held in float32: 40000 bf16 elements stage in shared memory, 70000 are read
  // again (in place: the sum is computed again from x and the residual, both unwritten then).
  for (int64_t dim : {40000, 70000})
    for (bool in_place : {false, true}) {
      Spec s;
      s.op = TN_OP_ADD_RMS_NORM;
      s.dt = TN_BF16;
      s.dim = dim;
      s.rows = 2;
      s.residual_f32 = true;
      s.weight = kXDtype;
      s.in_place = in_place;
      specs.push_back(s);
      s.residual_f32 = false;
      s.residual_mode = TN_RESIDUAL_NORM_F32;
      specs.push_back(s);
    }
  CheckAll(specs, "residual");
}

// l2_norm's x / max(||x||, eps), with rows whose norm is below eps and rows that vanish with tiny eps.
TEST_F(GpuModelOps, L2MaxNormEps) {
  std::vector<Spec> specs;
  for (tn_dtype dt : kAllDtypes)
    for (int64_t dim : kShapeDims)
      for (float eps : {1e-6f, 1e-12f, 0.0f, 0.5f}) {
        Spec s;
        s.op = TN_OP_L2_NORM;
        s.dt = dt;
        s.dim = dim;
        s.rows = std::min<int64_t>(RowsFor(dim), 40);
        s.eps = eps;
        s.l2_mode = TN_L2_MAX_NORM_EPS;
        s.scale = eps == 0.5f ? 2.0f : 1.0f;
        specs.push_back(s);
      }
  for (Layout l : {kStrided, kInPlace, kByteOffset}) {
    Spec s;
    s.op = TN_OP_L2_NORM;
    s.l2_mode = TN_L2_MAX_NORM_EPS;
    s.dim = 128;
    s.heads = 16;
    s.rows = 30;
    specs.push_back(WithLayout(s, l));
  }
  CheckAll(specs, "l2 max");
}

// layer_norm with and without weight and bias (f32 or x's dtype, an offset), every row shape, layouts.
TEST_F(GpuModelOps, LayerNorm) {
  std::vector<Spec> specs;
  for (tn_dtype dt : kAllDtypes)
    for (int64_t dim : kShapeDims)
      for (int wb = 0; wb < 4; wb++) {
        Spec s;
        s.op = TN_OP_LAYER_NORM;
        s.dt = dt;
        s.dim = dim;
        s.rows = RowsFor(dim);
        s.weight = wb & 1 ? (dim % 2 ? kF32 : kXDtype) : kNone;
        s.bias = wb & 2 ? (dim % 2 ? kXDtype : kF32) : kNone;
        if (wb == 3 && dim == 128) s.weight_offset = 1.0f;
        specs.push_back(s);
      }
  for (tn_dtype dt : kAllDtypes)
    for (int64_t dim : {33, 4096, 70000})
      for (Layout l : {kStrided, kInPlace, kByteOffset}) {
        Spec s;
        s.op = TN_OP_LAYER_NORM;
        s.dt = dt;
        s.dim = dim;
        s.rows = dim == 70000 ? 2 : 19;
        s.weight = kXDtype;
        s.bias = kXDtype;
        specs.push_back(WithLayout(s, l));
      }
  // Rows shifted from zero: N(0, 1) + shift. At 0.9 the mean's square is about 0.8 of the variance, where
  // E[x^2] - mean^2 still stands (the kernels' one-reduction path, up to a bit of cancellation); at 1.1 and
  // beyond, the mean first, then the deviations (the two-reduction path); at 1000, the cancellation that
  // E[x^2] - mean^2 could not survive.
  for (tn_dtype dt : kAllDtypes)
    for (double shift : {0.9, 1.1, 1000.0})
      for (int64_t dim : {128, 4096, 16384})
        for (tn_op op : {TN_OP_LAYER_NORM, TN_OP_ADD_LAYER_NORM}) {
          Spec far;
          far.op = op;
          far.dt = dt;
          far.dim = dim;
          far.rows = 9;
          far.x_scale = 1.0;
          far.x_shift = shift;
          far.weight = kXDtype;
          far.bias = kF32;
          specs.push_back(far);
        }
  CheckAll(specs, "layer_norm");
}

TEST_F(GpuModelOps, AddLayerNorm) {
  std::vector<Spec> specs;
  for (tn_dtype dt : kAllDtypes)
    for (int64_t dim : kShapeDims)
      for (Layout l : {kContiguous, kInPlace}) {
        Spec s;
        s.op = TN_OP_ADD_LAYER_NORM;
        s.dt = dt;
        s.dim = dim;
        s.rows = RowsFor(dim);
        s.weight = kXDtype;
        s.bias = dim % 2 ? kF32 : kXDtype;
        specs.push_back(WithLayout(s, l));
      }
  for (Layout l : {kStrided, kByteOffset}) {
    Spec s;
    s.op = TN_OP_ADD_LAYER_NORM;
    s.dim = 768;
    s.rows = 40;
    specs.push_back(WithLayout(s, l));
  }
  CheckAll(specs, "add_layer_norm");
}

// ------------------------------------------------------------------------------------------------
// GpuModelRope
// ------------------------------------------------------------------------------------------------

class GpuModelRope : public ModelTest {};

TEST_F(GpuModelRope, StylesTablesAndPositions) {
  std::vector<Spec> specs;
  for (tn_dtype dt : kAllDtypes)
    for (tn_rope_style style : {TN_ROPE_NEOX, TN_ROPE_GPTJ})
      for (Table table : {kTheta, kTableF32, kTableX})
        for (bool i64 : {false, true}) {
          Spec s;
          s.dt = dt;
          s.dim = 128;
          s.heads = 8;
          s.rows = 67;
          s.weight = kXDtype;
          s.rope = style;
          s.table = table;
          s.positions_i64 = i64;
          s.theta = i64 ? 1e6f : 10000.0f;
          specs.push_back(s);
        }
  CheckAll(specs, "rope styles");
}

// Every G a rope takes (dims 2 .. 512), partial rotary: halves of whole chunks (64 of 128: the partner one
// chunk away; 96 of 128) and not (36 of 128, 2 of 8), 2-D views (rows are the heads).
TEST_F(GpuModelRope, DimsAndPartialRotary) {
  std::vector<Spec> specs;
  struct D {
    int64_t dim, rotary;
  };
  const D dims[] = {{2, 0},    {8, 2},     {16, 0},   {24, 0},   {32, 16},  {64, 0},   {80, 0},  {128, 64},
                    {128, 96}, {128, 36},  {128, 0},  {192, 0},  {256, 128}, {256, 0}, {512, 0}, {512, 200},
                    {100, 50}};
  for (tn_dtype dt : kAllDtypes)
    for (const D &d : dims)
      for (tn_rope_style style : {TN_ROPE_NEOX, TN_ROPE_GPTJ}) {
        Spec s;
        s.dt = dt;
        s.dim = d.dim;
        s.rotary_dim = d.rotary;
        s.heads = d.dim >= 256 ? 2 : 5;
        s.rows = 41;
        s.weight = d.dim % 3 ? kXDtype : kF32;
        s.rope = style;
        s.table = d.dim % 2 ? kTheta : kTableF32;
        specs.push_back(s);
        Spec two = s;  // a 2-D view: each row its own token
        two.heads = 1;
        two.rows = 123;
        two.weight = kNone;
        two.table = kTableX;
        specs.push_back(two);
      }
  CheckAll(specs, "rope dims");
}

TEST_F(GpuModelRope, LlamaCastingAndWeightOffset) {
  std::vector<Spec> specs;
  for (tn_dtype dt : kAllDtypes)
    for (tn_rope_style style : {TN_ROPE_NEOX, TN_ROPE_GPTJ})
      for (Table table : {kTheta, kTableX}) {
        Spec s;
        s.dt = dt;
        s.dim = 128;
        s.heads = 4;
        s.rows = 50;
        s.weight = kXDtype;
        s.rope = style;
        s.table = table;
        s.casting = TN_CASTING_LLAMA;
        specs.push_back(s);
        Spec g = s;  // Gemma's (1 + w), f32 weight, exact casting
        g.casting = TN_CASTING_EXACT;
        g.weight = kF32;
        g.weight_offset = 1.0f;
        specs.push_back(g);
      }
  CheckAll(specs, "rope llama");
}

TEST_F(GpuModelRope, LayoutsAndClampedPositions) {
  std::vector<Spec> specs;
  for (tn_dtype dt : kAllDtypes)
    for (Layout l : {kContiguous, kStrided, kInPlace, kByteOffset}) {
      Spec s;
      s.dt = dt;
      s.dim = 64;
      s.heads = 6;
      s.rows = 33;
      s.weight = kXDtype;
      s.rope = TN_ROPE_NEOX;
      s.table = kTableX;
      s.positions_i64 = l == kStrided;
      specs.push_back(WithLayout(s, l));
    }
  // Positions outside the table are clamped to its first or last row (the reference and the CPU are
  // given the clamped positions).
  for (bool i64 : {false, true}) {
    Spec s;
    s.dim = 128;
    s.heads = 2;
    s.rows = 30;
    s.rope = TN_ROPE_GPTJ;
    s.table = kTableF32;
    s.table_rows = 100;
    s.positions_i64 = i64;
    s.out_of_table = true;
    specs.push_back(s);
  }
  // Many heads a token (a block loops over them) and one head of many tokens per block.
  Spec many;
  many.dim = 128;
  many.heads = 100;
  many.rows = 9;
  many.rope = TN_ROPE_NEOX;
  many.table = kTheta;
  specs.push_back(many);
  Spec f32big;
  f32big.dt = TN_F32;
  f32big.dim = 512;
  f32big.heads = 9;
  f32big.rows = 11;
  f32big.rope = TN_ROPE_NEOX;
  f32big.table = kTableF32;
  specs.push_back(f32big);
  CheckAll(specs, "rope layouts");
}

// ------------------------------------------------------------------------------------------------
// GpuModelQkv: a packed QKV buffer [tokens, (32 + 8 + 8) * 128] (a Llama 3 8B layer); Q's 32 heads then
// K's 8 normalised in place (with and without the rope), V never touched: every byte outside the view
// of each call, V's included, must come back unchanged.
// ------------------------------------------------------------------------------------------------

class GpuModelQkv : public ModelTest {};

TEST_F(GpuModelQkv, QThenKInPlaceVUntouched) {
  constexpr int64_t kQ = 32, kKv = 8, kHd = 128, kRow = (kQ + 2 * kKv) * kHd;
  std::vector<Spec> specs;
  for (tn_dtype dt : {TN_BF16, TN_F16, TN_F32})
    for (int rope = 0; rope < 3; rope++)
      for (int which = 0; which < 2; which++) {  // Q, then K
        Spec s;
        s.dt = dt;
        s.dim = kHd;
        s.rows = 77;
        s.heads = which == 0 ? kQ : kKv;
        s.head_stride = kHd;
        s.row_stride = kRow;
        s.elem_offset = which == 0 ? 0 : kQ * kHd;
        s.in_place = true;
        s.weight = kXDtype;
        s.casting = rope == 2 ? TN_CASTING_LLAMA : TN_CASTING_EXACT;
        if (rope > 0) {
          s.rope = TN_ROPE_NEOX;
          s.table = rope == 1 ? kTableF32 : kTheta;
          s.theta = 500000.0f;
        }
        specs.push_back(s);
      }
  CheckAll(specs, "qkv");
}

// ------------------------------------------------------------------------------------------------
// GpuModelSpecial
// ------------------------------------------------------------------------------------------------

class GpuModelSpecial : public ModelTest {
 protected:
  // The specs every special row is tried on: one of each new kernel family, in each dtype.
  std::vector<Spec> Families(int64_t dim) {
    std::vector<Spec> out;
    for (tn_dtype dt : kAllDtypes) {
      Spec s;
      s.dt = dt;
      s.dim = dim;
      s.rows = 5;
      s.x_scale = 1.0;
      Spec layer = s;
      layer.op = TN_OP_LAYER_NORM;
      layer.weight = kXDtype;
      layer.bias = kF32;
      out.push_back(layer);
      Spec add_layer = layer;
      add_layer.op = TN_OP_ADD_LAYER_NORM;
      out.push_back(add_layer);
      Spec heads = s;
      heads.heads = 3;
      heads.weight = kXDtype;
      out.push_back(heads);
      Spec l2 = s;
      l2.op = TN_OP_L2_NORM;
      l2.l2_mode = TN_L2_MAX_NORM_EPS;
      out.push_back(l2);
      if (dt != TN_F32) {
        Spec stream = s;
        stream.op = TN_OP_ADD_RMS_NORM;
        stream.residual_f32 = true;
        out.push_back(stream);
      }
      if (dim <= 512 && dim % 2 == 0) {
        Spec rope = s;
        rope.heads = 2;
        rope.rope = TN_ROPE_NEOX;
        rope.table = kTableF32;
        out.push_back(rope);
      }
    }
    return out;
  }
  // Sets row 2 (every head) of x (and of the residual) by fn(column).
  static void SetRow(Case &c, const std::function<float(int64_t)> &fn, bool residual_too) {
    for (int slot : {kX, kRes}) {
      Operand &o = c.op[slot];
      if (!o.used || (slot == kRes && !residual_too)) continue;
      for (int64_t h = 0; h < o.heads; h++)
        for (int64_t i = 0; i < o.dim; i++) tn_store(o.dt, o.image.data() + o.At(2, h, i), 0, slot == kX ? fn(i) : 0.0f);
    }
  }
  bool RunSpecial(Spec s, const std::string &what, const std::function<float(int64_t)> &fn) {
    case_.reset(new Case);
    MakeCase(*case_, s, SeedFor(what + " " + Describe(s)));
    SetRow(*case_, fn, true);
    if (!Solve(ctx, *case_) || !RunGpu(ctx, *case_)) return false;
    return CheckCase(*case_, Describe(s) + ", " + what);
  }
};

TEST_F(GpuModelSpecial, ZeroNanInfHugeTinyAndConstantRows) {
  int failed = 0;
  for (int64_t dim : {8, 128, 4096, 70000}) {
    for (const Spec &base : Families(dim)) {
      struct Row {
        const char *what;
        float eps;
        std::function<float(int64_t)> fn;
      };
      const Row rows[] = {
          {"zero row", 1e-6f, [](int64_t) { return 0.0f; }},
          {"NaN in the row", 1e-6f, [dim](int64_t i) { return i == dim / 2 ? NAN : 1.0f + (float)(i % 7); }},
          {"+Inf in the row", 1e-6f, [dim](int64_t i) { return i == dim / 3 ? INFINITY : (float)(i % 5) - 2.0f; }},
          {"huge row (1e30), eps 0", 0.0f, [](int64_t i) { return (float)((i % 9) - 4) * 1e30f; }},
          {"tiny row (1e-30), eps 0", 0.0f, [](int64_t i) { return (float)((i % 9) - 4) * 1e-30f; }},
          {"constant row", 1e-5f, [](int64_t) { return 3.25f; }},
      };
      for (const Row &r : rows) {
        Spec s = base;
        s.eps = r.eps;
        // 1e30 and 1e-30 are not f16 values (bf16 has float32's exponents).
        if (s.dt == TN_F16 && r.eps == 0.0f) continue;
        if (!RunSpecial(s, r.what, r.fn) && ++failed >= 10) FAIL() << "stopping after 10 failed cases";
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------
// GpuModelCapture: a prepared rope op (and a layer_norm) captured into a CUDA graph compile nothing, run
// nothing while captured, and give the right bytes when the graph is launched; the same through tn_graph.
// ------------------------------------------------------------------------------------------------

class GpuModelCapture : public ModelTest {};

TEST_F(GpuModelCapture, RopeInAStreamCapture) {
  PrimaryContextScope primary;
  ASSERT_TRUE(primary.ok()) << CuError(primary.status());
  CUstream stream = nullptr;
  ASSERT_EQ(cuStreamCreate(&stream, CU_STREAM_NON_BLOCKING), CUDA_SUCCESS);
  // At the end (a failed assertion included): any capture ended, the context back on the default stream,
  // then the stream destroyed.
  struct StreamGuard {
    tn_context *ctx;
    CUstream stream;
    ~StreamGuard() {
      CUstreamCaptureStatus capturing = CU_STREAM_CAPTURE_STATUS_NONE;
      if (cuStreamIsCapturing(stream, &capturing) == CUDA_SUCCESS && capturing != CU_STREAM_CAPTURE_STATUS_NONE) {
        CUgraph g = nullptr;
        cuStreamEndCapture(stream, &g);
        if (g != nullptr) cuGraphDestroy(g);
      }
      cuStreamSynchronize(stream);
      tn_context_set_stream(ctx, TN_DEVICE_CUDA, nullptr);
      cuStreamDestroy(stream);
    }
  } guard{ctx, stream};
  ASSERT_EQ(tn_context_set_stream(ctx, TN_DEVICE_CUDA, stream), TN_OK);

  Spec a;
  a.dim = 128;
  a.heads = 8;
  a.rows = 64;
  a.weight = kXDtype;
  a.rope = TN_ROPE_NEOX;
  a.table = kTheta;
  Spec b;
  b.op = TN_OP_LAYER_NORM;
  b.dt = TN_F16;
  b.dim = 768;
  b.rows = 10;
  b.weight = kXDtype;
  b.bias = kXDtype;
  Case ca, cb;
  MakeCase(ca, a, SeedFor("capture rope"));
  MakeCase(cb, b, SeedFor("capture layer_norm"));
  ASSERT_TRUE(Solve(ctx, ca));
  ASSERT_TRUE(Solve(ctx, cb));
  ASSERT_TRUE(UploadCase(ctx, ca));
  ASSERT_TRUE(UploadCase(ctx, cb));
  Bound ba, bb;
  BindDevice(ca, ba);
  BindDevice(cb, bb);
  ASSERT_EQ(tn_op_prepare(ctx, &ba.args), TN_OK) << tn_context_last_error(ctx);
  ASSERT_EQ(tn_op_prepare(ctx, &bb.args), TN_OK) << tn_context_last_error(ctx);
  ASSERT_EQ(tn_synchronize(ctx, Gpu()), TN_OK);

  tn_kernel_cache_stats before, after;
  tn_kernel_cache_stats_get(&before);
  ASSERT_EQ(cuStreamBeginCapture(stream, CU_STREAM_CAPTURE_MODE_GLOBAL), CUDA_SUCCESS);
  const tn_status sa = tn_op_run(ctx, &ba.args);
  const tn_status sb = tn_op_run(ctx, &bb.args);
  CUgraph graph = nullptr;
  const CUresult ended = cuStreamEndCapture(stream, &graph);
  tn_kernel_cache_stats_get(&after);
  EXPECT_EQ(sa, TN_OK);
  EXPECT_EQ(sb, TN_OK);
  ASSERT_EQ(ended, CUDA_SUCCESS) << CuError(ended);
  std::unique_ptr<CUgraph_st, CUresult (*)(CUgraph)> graph_owner(graph, cuGraphDestroy);
  EXPECT_EQ(after.compiled, before.compiled) << "a prepared op compiled a kernel while captured";
  EXPECT_EQ(after.loaded_from_disk, before.loaded_from_disk) << "a prepared op loaded a kernel while captured";

  // Captured, not run: the outputs are still the poison.
  ASSERT_TRUE(Download(ctx, ca));
  for (size_t k = 0; k < ca.gpu[kY].size(); k++) ASSERT_EQ(ca.gpu[kY][k], 0xff) << "rope y byte " << k << " written";

  CUgraphExec exec = nullptr;
#if CUDA_VERSION >= 12000
  ASSERT_EQ(cuGraphInstantiate(&exec, graph, 0), CUDA_SUCCESS);
#else
  ASSERT_EQ(cuGraphInstantiate(&exec, graph, nullptr, nullptr, 0), CUDA_SUCCESS);
#endif
  std::unique_ptr<CUgraphExec_st, CUresult (*)(CUgraphExec)> exec_owner(exec, cuGraphExecDestroy);
  ASSERT_EQ(cuGraphLaunch(exec, stream), CUDA_SUCCESS);
  ASSERT_EQ(cuGraphLaunch(exec, stream), CUDA_SUCCESS);
  ASSERT_EQ(cuStreamSynchronize(stream), CUDA_SUCCESS);
  ASSERT_TRUE(Download(ctx, ca));
  ASSERT_TRUE(Download(ctx, cb));
  EXPECT_TRUE(CheckCase(ca, Describe(a) + ", from a CUDA graph launched twice"));
  EXPECT_TRUE(CheckCase(cb, Describe(b) + ", from a CUDA graph launched twice"));
}

// Recorded with tn_graph_begin / tn_graph_end: an in-place rope on Q then on K of one QKV buffer, replayed
// as one CUDA graph. In place, so the expected bytes are those of one run: launched once.
TEST_F(GpuModelCapture, RopeInATnGraph) {
  Spec q;
  q.dim = 128;
  q.rows = 16;
  q.heads = 4;
  q.head_stride = 128;
  q.row_stride = 8 * 128;
  q.in_place = true;
  q.weight = kXDtype;
  q.rope = TN_ROPE_NEOX;
  q.table = kTableF32;
  q.positions_i64 = true;
  Case c;
  MakeCase(c, q, SeedFor("tn_graph rope"));
  ASSERT_TRUE(Solve(ctx, c));
  ASSERT_TRUE(UploadCase(ctx, c));
  Bound b;
  BindDevice(c, b);
  ASSERT_EQ(tn_graph_begin(ctx), TN_OK);
  ASSERT_EQ(tn_op_run(ctx, &b.args), TN_OK) << tn_context_last_error(ctx);
  tn_graph *g = nullptr;
  ASSERT_EQ(tn_graph_end(ctx, &g), TN_OK) << tn_context_last_error(ctx);
  std::unique_ptr<tn_graph, void (*)(tn_graph *)> owner(g, tn_graph_destroy);
  ASSERT_TRUE(Download(ctx, c));
  for (size_t k = 0; k < c.gpu[kX].size(); k++)
    ASSERT_EQ(c.gpu[kX][k], c.op[kX].image[k]) << "a recorded op ran before the graph's launch (byte " << k << ")";
  ASSERT_EQ(tn_graph_launch(ctx, g), TN_OK) << tn_context_last_error(ctx);
  ASSERT_TRUE(Download(ctx, c));
  tn_graph_info info;
  ASSERT_EQ(tn_graph_get_info(g, &info), TN_OK);
  EXPECT_EQ(info.device_graph, 1);
  EXPECT_TRUE(CheckCase(c, Describe(q) + ", from a tn_graph"));
}

// ------------------------------------------------------------------------------------------------
// SanitizedSmallModels: one quick case per new kernel family and path, small enough for compute-sanitizer
// (memcheck, racecheck).
// ------------------------------------------------------------------------------------------------

class SanitizedSmallModels : public ModelTest {};

TEST_F(SanitizedSmallModels, RmsNormHeadsBf16) {
  Spec s;
  s.dim = 128;
  s.heads = 8;
  s.rows = 5;
  s.weight = kXDtype;
  EXPECT_TRUE(Check(s, "small"));
}

TEST_F(SanitizedSmallModels, LlamaAddRmsNormF16InPlace) {
  Spec s;
  s.op = TN_OP_ADD_RMS_NORM;
  s.dt = TN_F16;
  s.dim = 4096;
  s.rows = 2;
  s.in_place = true;
  s.weight = kXDtype;
  s.casting = TN_CASTING_LLAMA;
  EXPECT_TRUE(Check(s, "small"));
}

TEST_F(SanitizedSmallModels, LayerNormBf16OneRow) {
  Spec s;
  s.op = TN_OP_LAYER_NORM;
  s.dim = 4096;
  s.weight = kXDtype;
  s.bias = kXDtype;
  EXPECT_TRUE(Check(s, "small"));
}

// Rows off layer_norm's one-reduction path, on groups of several warps (G = 64 and 128): shifted far from
// zero (mean^2 > var: the mean, then the deviations) and huge (x near 3e19: rescaled), so that a row's
// reductions differ in type (the pair of sums, then floats); their shared partial sums once overlapped,
// which racecheck reports and which gave a row of NaN now and then.
TEST_F(SanitizedSmallModels, LayerNormRowsOffTheOneReductionPath) {
  for (tn_op op : {TN_OP_LAYER_NORM, TN_OP_ADD_LAYER_NORM})
    for (int64_t dim : {2048, 4096})
      for (bool huge : {false, true}) {
        Spec s;
        s.op = op;
        s.dim = dim;
        s.rows = 3;
        s.weight = kXDtype;
        s.bias = kF32;
        if (huge) s.x_scale = 3e19;
        else s.x_shift = 1000.0;
        EXPECT_TRUE(Check(s, "small"));
      }
}

// 70000 bf16 elements: staged in shared memory; 70000 f32: read again.
TEST_F(SanitizedSmallModels, LayerNormStaged) {
  for (tn_dtype dt : {TN_BF16, TN_F32}) {
    Spec s;
    s.op = TN_OP_LAYER_NORM;
    s.dt = dt;
    s.dim = 70000;
    s.rows = 2;
    s.weight = kF32;
    EXPECT_TRUE(Check(s, "small"));
  }
}

TEST_F(SanitizedSmallModels, AddLayerNormF32StreamStrided) {
  Spec s;
  s.op = TN_OP_ADD_LAYER_NORM;
  s.dim = 1000;
  s.rows = 3;
  s.stride_pad = 5;
  s.residual_f32 = true;
  s.weight = kXDtype;
  s.bias = kXDtype;
  EXPECT_TRUE(Check(s, "small"));
}

TEST_F(SanitizedSmallModels, AddRmsNormNormF32ByteMisaligned) {
  Spec s;
  s.op = TN_OP_ADD_RMS_NORM;
  s.dim = 777;
  s.rows = 3;
  s.byte_offset = 1;
  s.residual_mode = TN_RESIDUAL_NORM_F32;
  s.mul = true;
  EXPECT_TRUE(Check(s, "small"));
}

TEST_F(SanitizedSmallModels, L2MaxNormF32Heads) {
  Spec s;
  s.op = TN_OP_L2_NORM;
  s.dt = TN_F32;
  s.dim = 64;
  s.heads = 4;
  s.rows = 9;
  s.l2_mode = TN_L2_MAX_NORM_EPS;
  EXPECT_TRUE(Check(s, "small"));
}

// Rotary dims of 2 mod 4 (odd halves) with few and many tokens a block: the block's shared memory (cos and
// sin rows, inv_freq, the staged weight) must hold exactly what the host sized, which memcheck sees.
TEST_F(SanitizedSmallModels, RopeOddHalvesSharedMemory) {
  std::vector<Spec> specs;
  struct D {
    int64_t dim, rotary, heads;
  };
  const D dims[] = {{8, 6, 1}, {8, 6, 3}, {8, 6, 5}, {40, 18, 1}, {40, 18, 7}, {104, 50, 1}, {104, 50, 3}};
  for (tn_dtype dt : kAllDtypes)
    for (const D &d : dims)
      for (tn_rope_style style : {TN_ROPE_NEOX, TN_ROPE_GPTJ}) {
        Spec s;
        s.dt = dt;
        s.dim = d.dim;
        s.rotary_dim = d.rotary;
        s.heads = d.heads;
        s.rows = 9;
        s.weight = kXDtype;
        s.rope = style;
        s.table = style == TN_ROPE_NEOX ? kTheta : kTableF32;
        specs.push_back(s);
      }
  CheckAll(specs, "rope odd halves");
}

TEST_F(SanitizedSmallModels, RopeNeoxTheta) {
  Spec s;
  s.dim = 128;
  s.heads = 8;
  s.rows = 3;
  s.in_place = true;
  s.weight = kXDtype;
  s.rope = TN_ROPE_NEOX;
  s.table = kTheta;
  EXPECT_TRUE(Check(s, "small"));
}

// rope.cu's paired kernels: blocks whose heads straddle tokens (12 heads, 32 heads a block of bf16 dim
// 128), both NEOX pair distances (rotary 128 and 64 of 128), GPTJ with a partial rotary from theta,
// positions outside the table.
TEST_F(SanitizedSmallModels, RopePairedBlocksStraddleTokens) {
  Spec s;
  s.dim = 128;
  s.heads = 12;
  s.rows = 7;
  s.weight = kF32;
  s.rope = TN_ROPE_NEOX;
  s.table = kTableF32;
  s.out_of_table = true;
  EXPECT_TRUE(Check(s, "small paired neox"));
  s.rotary_dim = 64;
  s.table = kTableX;
  s.casting = TN_CASTING_LLAMA;
  EXPECT_TRUE(Check(s, "small paired neox half rotary llama"));
  s.rope = TN_ROPE_GPTJ;
  s.rotary_dim = 32;
  s.table = kTheta;
  s.out_of_table = false;  // a table's clamp: theta takes every position as it is
  s.casting = TN_CASTING_EXACT;
  EXPECT_TRUE(Check(s, "small paired gptj partial"));
}

TEST_F(SanitizedSmallModels, RopeGptjTablePartial) {
  Spec s;
  s.dt = TN_F16;
  s.dim = 64;
  s.heads = 3;
  s.rows = 4;
  s.rotary_dim = 36;
  s.rope = TN_ROPE_NEOX;
  s.table = kTableX;
  s.positions_i64 = true;
  EXPECT_TRUE(Check(s, "small neox partial"));
  s.rope = TN_ROPE_GPTJ;
  EXPECT_TRUE(Check(s, "small gptj partial"));
}

// ------------------------------------------------------------------------------------------------
// SanitizedModelsBatchInvariance: a row (a token, with its heads) alone gives the bytes it gives in a batch
// of 300 (more rows than an H100 or H200 has SMs: register blocks where one row takes the few-rows form),
// also from another place in its buffer. Kept small: it runs under compute-sanitizer's memcheck too.
// ------------------------------------------------------------------------------------------------

class SanitizedModelsBatchInvariance : public ModelTest {
 protected:
  // Every element of y from column first_column on, as the GPU wrote it in case a and in case b (of the
  // same rows, heads and dim), byte for byte; `what` names b's op in a failure.
  static void ExpectSameY(const Case &a, const Case &b, int64_t first_column, const char *what) {
    const Operand &ay = a.op[a.YSlot()], &by = b.op[b.YSlot()];
    for (int64_t row = 0; row < a.s.rows; row++)
      for (int64_t h = 0; h < a.s.heads; h++)
        for (int64_t i = first_column; i < a.s.dim; i++)
          ASSERT_EQ(0, memcmp(a.gpu[a.YSlot()].data() + ay.At(row, h, i), b.gpu[b.YSlot()].data() + by.At(row, h, i),
                              ay.es()))
              << Describe(a.s) << ": row " << row << " head " << h << " column " << i << " differs from " << what;
  }

  // Case c of spec s, seeded by `what` and s, run on the GPU and checked against the reference: the first
  // side of a byte-for-byte comparison with another op.
  void RunChecked(Case &c, const Spec &s, const std::string &what) {
    MakeCase(c, s, SeedFor(what + " " + Describe(s)));
    ASSERT_TRUE(Solve(ctx, c));
    ASSERT_TRUE(RunGpu(ctx, c));
    ASSERT_TRUE(CheckCase(c, Describe(s)));
  }

  void CheckSpec(Spec s) {
    s.rows = 300;
    Case batch;
    MakeCase(batch, s, SeedFor("batch " + Describe(s)));
    ASSERT_TRUE(Solve(ctx, batch));
    ASSERT_TRUE(RunGpu(ctx, batch));
    ASSERT_TRUE(CheckCase(batch, Describe(s) + ", the batch"));
    for (int64_t r : {0, 151, 299}) {
      Spec one = s;
      one.rows = 1;
      one.byte_offset = r == 151 ? 16 : 0;  // elsewhere in its buffer
      Case alone;
      MakeCase(alone, one, 1);
      // The batch's row r (and position, and the same weight, bias and table) as the lone row.
      for (int slot = 0; slot < kSlots; slot++) {
        Operand &o = alone.op[slot];
        if (!o.used || o.output) continue;
        const Operand &from = batch.op[slot];
        const bool rowwise = slot != kW && slot != kBias && slot != kTable;
        for (int64_t h = 0; h < o.heads; h++)
          for (int64_t i = 0; i < o.dim; i++)
            memcpy(o.image.data() + o.At(0, h, i), from.image.data() + from.At(rowwise ? r : 0, h, i), o.es());
        if (!rowwise)
          for (int64_t rr = 1; rr < o.rows; rr++)
            for (int64_t i = 0; i < o.dim; i++)
              memcpy(o.image.data() + o.At(rr, 0, i), from.image.data() + from.At(rr, 0, i), o.es());
      }
      if (s.roped()) {
        const size_t ps = s.positions_i64 ? 8 : 4;
        memcpy(alone.positions.data(), batch.positions.data() + (size_t)r * ps, ps);
      }
      ASSERT_TRUE(RunGpu(ctx, alone));
      const Operand &by = batch.op[batch.YSlot()], &ay = alone.op[alone.YSlot()];
      for (int64_t h = 0; h < s.heads; h++)
        for (int64_t i = 0; i < s.dim; i++)
          ASSERT_EQ(0, memcmp(alone.gpu[alone.YSlot()].data() + ay.At(0, h, i), batch.gpu[batch.YSlot()].data() + by.At(r, h, i),
                              ay.es()))
              << Describe(s) << ": row " << r << " head " << h << " column " << i << " alone differs from the batch";
    }
  }
};

TEST_F(SanitizedModelsBatchInvariance, LayerNorm) {
  for (tn_dtype dt : {TN_F32, TN_BF16})
    for (int64_t dim : {128, 4096, 12000}) {
      Spec s;
      s.op = TN_OP_LAYER_NORM;
      s.dt = dt;
      s.dim = dim;
      s.weight = kXDtype;
      s.bias = kF32;
      CheckSpec(s);
    }
}

TEST_F(SanitizedModelsBatchInvariance, HeadsLlamaAndStreams) {
  for (tn_dtype dt : {TN_F16, TN_BF16}) {
    Spec h;
    h.dt = dt;
    h.dim = 128;
    h.heads = 4;
    h.weight = kXDtype;
    CheckSpec(h);
    Spec llama;
    llama.dt = dt;
    llama.dim = 4096;
    llama.weight = kXDtype;
    llama.casting = TN_CASTING_LLAMA;
    CheckSpec(llama);
    Spec stream;
    stream.op = TN_OP_ADD_RMS_NORM;
    stream.dt = dt;
    stream.dim = 4096;
    stream.residual_f32 = dt != TN_F32;
    stream.residual_mode = TN_RESIDUAL_NORM_F32;
    stream.weight = kXDtype;
    CheckSpec(stream);
  }
}

// rope.cu's paired kernels hold a head on half the threads of rms_norm's shape where that shape holds at most
// two chunks a lane (each thread two lanes' chunks, params.h's TN_KERNEL_ROPE_PAIRED_GROUP) and must reduce
// in its order all the same: the elements past rotary_dim, normalised and not rotated, come out with the
// bytes rms_norm gives the same heads. Heads of 4 .. 64 chunks (G = 2 .. 32; 128, float32 heads of
// TN_ROPE_MAX_DIM, on G = 32 in both), rows rescaled (x near 3e19, their squares past float32's range) and not.
TEST_F(SanitizedModelsBatchInvariance, RopeNormsAsRmsNorm) {
  for (tn_dtype dt : {TN_F32, TN_BF16})
    for (int64_t chunks : {4, 8, 16, 32, 64, 128})
      for (double x_scale : {0.0, 3e19}) {
        const int64_t per_chunk = dt == TN_F32 ? 4 : 8;
        if (chunks * per_chunk > TN_ROPE_MAX_DIM) continue;
        Spec plain;
        plain.dt = dt;
        plain.dim = chunks * per_chunk;
        plain.heads = 3;
        plain.rows = 40;
        plain.weight = kXDtype;
        plain.weight_offset = 1.0f;
        plain.x_scale = x_scale;
        Spec roped = plain;
        roped.rope = TN_ROPE_GPTJ;  // whole chunks: the paired kernels
        roped.rotary_dim = 2 * per_chunk;
        roped.table = kTheta;
        Case r, n;
        ASSERT_NO_FATAL_FAILURE(RunChecked(r, roped, "rope as rms_norm"));
        MakeCase(n, plain, 1);
        for (Slot slot : {kX, kW}) {
          ASSERT_EQ(n.op[slot].image.size(), r.op[slot].image.size()) << kSlotNames[slot];
          n.op[slot].image = r.op[slot].image;
        }
        ASSERT_TRUE(RunGpu(ctx, n));
        ExpectSameY(r, n, roped.rotary_dim, "rms_norm's");
        if (HasFatalFailure()) return;
      }
}

// A graph fuses add + layer_norm into add_layer_norm, which must give the bytes of the two: its y is
// layer_norm's of the sum it writes (residual_out), bit for bit. Rows of 1 .. 1025 chunks, on the register
// shapes of G = 8 .. 512 (rows of 9 .. 16 chunks had taken G = 16 in add_layer_norm's family and G = 8 in
// layer_norm's), partial last chunks among them, rescaled (x near 3e19) and not.
TEST_F(SanitizedModelsBatchInvariance, AddLayerNormAsLayerNorm) {
  for (tn_dtype dt : {TN_F32, TN_BF16})
    for (int64_t dim : {3, 8, 36, 60, 64, 72, 100, 128, 136, 520, 4096, 4100})
      for (double x_scale : {0.0, 3e19}) {
        const int64_t d = dt == TN_F32 ? dim : 2 * dim;  // bf16: the same chunks as f32's dim
        Spec fused;
        fused.op = TN_OP_ADD_LAYER_NORM;
        fused.dt = dt;
        fused.dim = d;
        fused.rows = 24;
        fused.weight = kXDtype;
        fused.bias = kF32;
        fused.x_scale = x_scale;
        Spec plain = fused;
        plain.op = TN_OP_LAYER_NORM;
        Case f, n;
        ASSERT_NO_FATAL_FAILURE(RunChecked(f, fused, "add_layer_norm as layer_norm"));
        MakeCase(n, plain, 1);
        ASSERT_EQ(n.op[kX].image.size(), f.gpu[f.RSlot()].size());
        n.op[kX].image = f.gpu[f.RSlot()];  // the sum as add_layer_norm wrote it
        for (Slot slot : {kW, kBias}) n.op[slot].image = f.op[slot].image;
        ASSERT_TRUE(RunGpu(ctx, n));
        ExpectSameY(f, n, 0, "layer_norm's of the sum");
        if (HasFatalFailure()) return;
      }
}

// rms_norm without a weight runs kernels with no code for one (norm.cu's unweighted family); with a weight of
// ones it runs the weighted kernels, whose product by 1 changes no bit: the same bytes, few rows or many.
TEST_F(SanitizedModelsBatchInvariance, UnweightedAsWeightOfOnes) {
  for (tn_dtype dt : {TN_F32, TN_BF16})
    for (int64_t dim : {3, 64, 520, 1000, 4096, 12000, 70000})
      for (int64_t rows : {1, 200}) {
        Spec plain;
        plain.op = TN_OP_RMS_NORM;
        plain.dt = dt;
        plain.dim = dim;
        plain.rows = rows;
        Spec ones = plain;
        ones.weight = kXDtype;
        Case u, w;
        ASSERT_NO_FATAL_FAILURE(RunChecked(u, plain, "unweighted as a weight of ones"));
        MakeCase(w, ones, 1);
        w.op[kX].image = u.op[kX].image;
        Operand &weight = w.op[kW];
        for (int64_t i = 0; i < weight.dim; i++) tn_store(weight.dt, weight.image.data() + weight.At(0, 0, i), 0, 1.0f);
        ASSERT_TRUE(RunGpu(ctx, w));
        ExpectSameY(u, w, 0, "rms_norm's with a weight of ones");
        if (HasFatalFailure()) return;
      }
}

TEST_F(SanitizedModelsBatchInvariance, Rope) {
  for (tn_dtype dt : {TN_F32, TN_BF16}) {
    Spec s;
    s.dt = dt;
    s.dim = 128;
    s.heads = 5;
    s.weight = kXDtype;
    s.rope = TN_ROPE_NEOX;
    s.table = kTheta;
    CheckSpec(s);
  }
}

}  // namespace
