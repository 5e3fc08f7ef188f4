// The CUDA backend on device 0, against the float64 reference (tools/common/reference.h) and against the
// CPU backend run on the same host inputs.
//
// Suites:
//   GpuOps                    every op variant x dtype over dims from 1 to 131072, row counts and layouts
//                             (contiguous, strided, in place, offset by one element, offset by one byte),
//                             which between them reach every row shape (G threads per row, staged in shared
//                             memory, staged and read again) in every access mode (whole chunks, vectors,
//                             elements, bytes)
//   GpuSpecial                zero rows, NaN/Inf rows, rows whose float32 sum of squares overflows or
//                             vanishes, an outlier channel, f16 subnormals
//   GpuErrors                 a missing device, mixed devices, an absurd allocation, a caller's stream
//   GpuCapture                ops captured into a CUDA graph and replayed
//   SanitizedSmall            a few quick cases, small enough for compute-sanitizer
//   SanitizedBatchInvariance  a row alone gives the bytes it gives in a batch (also small enough for it)
//
// Inputs are random from a seed printed at the start: TNORM_TEST_SEED=<n> repeats a run. Every output
// byte on the device is poisoned with 0xFF before each call; the gaps of strided inputs hold a NaN that
// would show if read; every byte of an output's buffer outside the view must come back unchanged.
// This binary runs only where a GPU is: a test fails (it does not skip) when CUDA is unavailable.
#include <gtest/gtest.h>

#include <cuda.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cinttypes>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <iomanip>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "cuda_test_util.h"
#include "op_variant.h"
#include "reference.h"
#include "tnorm.h"

namespace {

using namespace tn_cuda_test;

class SeedPrinter : public ::testing::Environment {
 public:
  void SetUp() override {
    printf("tnorm CUDA test seed: %" PRIu64 " (TNORM_TEST_SEED=%" PRIu64 " repeats this run)\n", BaseSeed(),
           BaseSeed());
    fflush(stdout);
  }
};
::testing::Environment *const g_seed_env = ::testing::AddGlobalTestEnvironment(new SeedPrinter);

// ------------------------------------------------------------------------------------------------
// Op variants
// ------------------------------------------------------------------------------------------------

const Variant kVariants[] = {
    {"rms_norm", TN_OP_RMS_NORM, kNoWeight, 0.0f, false, 1.0f},
    {"rms_norm_w", TN_OP_RMS_NORM, kWeightXDtype, 0.0f, false, 1.0f},
    {"rms_norm_wf32_offset1", TN_OP_RMS_NORM, kWeightF32, 1.0f, false, 1.0f},
    {"rms_norm_w_mul", TN_OP_RMS_NORM, kWeightXDtype, 0.0f, true, 1.0f},
    {"l2_norm", TN_OP_L2_NORM, kNoWeight, 0.0f, false, 1.0f},
    {"l2_norm_scale037", TN_OP_L2_NORM, kNoWeight, 0.0f, false, 0.37f},
    {"add_rms_norm", TN_OP_ADD_RMS_NORM, kNoWeight, 0.0f, false, 1.0f},
    {"add_rms_norm_w", TN_OP_ADD_RMS_NORM, kWeightXDtype, 0.0f, false, 1.0f},
    {"add_rms_norm_w_mul", TN_OP_ADD_RMS_NORM, kWeightXDtype, 0.0f, true, 1.0f},
};
constexpr int kVariantCount = (int)(sizeof kVariants / sizeof kVariants[0]);

const tn_dtype kDtypes[] = {TN_F32, TN_F16, TN_BF16};

const Variant &VariantNamed(const char *name) {
  for (const Variant &v : kVariants)
    if (strcmp(v.name, name) == 0) return v;
  ADD_FAILURE() << "no op variant named " << name;
  return kVariants[0];
}

// ------------------------------------------------------------------------------------------------
// A problem: the host inputs of one call (contiguous rows x dim), their float64 reference and the CPU
// backend's outputs. The GPU runs it in any layout; the reference of a row does not depend on the other
// rows, so a call on the first rows of a problem is checked against the first rows of its results.
// ------------------------------------------------------------------------------------------------

struct Problem {
  const Variant *v = nullptr;
  tn_dtype dt = TN_F32;
  int64_t rows = 0, dim = 0;
  float eps = 1e-6f;
  uint64_t seed = 0;
  std::vector<uint8_t> x, res, mul, w;  // inputs in their dtypes (w: one row of dim)
  std::vector<double> ref_y, ref_r;     // the float64 reference of y and residual_out
  std::vector<uint8_t> cpu_y, cpu_r;    // the CPU backend's y and residual_out

  bool add() const { return v->op == TN_OP_ADD_RMS_NORM; }
  bool has_mul() const { return v->mul; }
  bool has_weight() const { return v->weight != kNoWeight; }
  tn_dtype wdt() const { return v->weight == kWeightF32 ? TN_F32 : dt; }
  size_t es() const { return ESize(dt); }
  size_t row_bytes() const { return (size_t)dim * es(); }
  uint8_t *Row(std::vector<uint8_t> &b, int64_t r) { return b.data() + (size_t)r * row_bytes(); }
  const uint8_t *Row(const std::vector<uint8_t> &b, int64_t r) const { return b.data() + (size_t)r * row_bytes(); }
  void Set(std::vector<uint8_t> &b, int64_t r, int64_t i, float value) { tn_store(dt, Row(b, r), i, value); }
  float Get(const std::vector<uint8_t> &b, int64_t r, int64_t i) const { return tn_load(dt, Row(b, r), i); }
};

// Rows [0, rows) of a contiguous buffer: offset + N(0,1) * scale, the scale drawn per row from
// {1e-3, 1, 30} (rows of very different magnitudes in one call) unless fixed_scale > 0.
void FillRows(tn_dtype dt, uint8_t *dst, int64_t rows, int64_t dim, Random &rng, double fixed_scale = 0.0,
              double offset = 0.0) {
  static const double kScales[3] = {1e-3, 1.0, 30.0};
  const std::vector<float> &pool = NormalPool();
  // The per-row choices are drawn in order (reproducible); the rows are then written in parallel.
  std::vector<float> scales((size_t)rows);
  std::vector<size_t> starts((size_t)rows);
  for (int64_t r = 0; r < rows; r++) {
    scales[(size_t)r] = (float)(fixed_scale > 0 ? fixed_scale : kScales[rng.Below(3)]);
    starts[(size_t)r] = (size_t)rng.Below(kPoolSize - (size_t)dim + 1);
  }
  const size_t row_bytes = (size_t)dim * ESize(dt);
  ParallelFor(rows, dim, [&](int, int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; r++) {
      const float *src = pool.data() + starts[(size_t)r];
      const float scale = scales[(size_t)r], off = (float)offset;
      uint8_t *row = dst + (size_t)r * row_bytes;
      for (int64_t i = 0; i < dim; i++) tn_store(dt, row, i, off + src[i] * scale);
    }
  });
}

// Shapes p and fills its inputs with random data: x (and residual) N(0,1) times per-row scales (or
// fixed_scale), mul N(0,1), the weight around 1 (around 0 where weight_offset adds 1).
void MakeProblem(Problem &p, const Variant &v, tn_dtype dt, int64_t rows, int64_t dim, uint64_t seed,
                 double fixed_scale = 0.0) {
  p.v = &v;
  p.dt = dt;
  p.rows = rows;
  p.dim = dim;
  p.eps = 1e-6f;
  p.seed = seed;
  Random rng(seed);
  const size_t n = (size_t)rows * p.row_bytes();
  p.x.resize(n);
  FillRows(dt, p.x.data(), rows, dim, rng, fixed_scale);
  p.res.clear();
  if (p.add()) {
    p.res.resize(n);
    FillRows(dt, p.res.data(), rows, dim, rng, fixed_scale);
  }
  p.mul.clear();
  if (p.has_mul()) {
    p.mul.resize(n);
    FillRows(dt, p.mul.data(), rows, dim, rng, 1.0);
  }
  p.w.clear();
  if (p.has_weight()) {
    p.w.resize((size_t)dim * ESize(p.wdt()));
    FillRows(p.wdt(), p.w.data(), 1, dim, rng, 0.1, v.weight_offset != 0.0f ? 0.0 : 1.0);
  }
}

std::string Describe(const Problem &p) {
  std::ostringstream s;
  s << "op " << p.v->name << " (" << tn_op_name(p.v->op) << "), dtype " << tn_dtype_name(p.dt) << ", dim " << p.dim
    << ", eps " << p.eps << ", TNORM_TEST_SEED=" << BaseSeed();
  return s.str();
}

// The tensors and arguments of one call; args points into this object, so it is never copied.
struct Call {
  tn_tensor x{}, res{}, mul{}, w{}, y{}, rout{};
  tn_op_args args{};

  Call() = default;
  Call(const Call &) = delete;
  Call &operator=(const Call &) = delete;

  // Points args at this call's tensors as the variant takes them (the others stay NULL).
  void Bind(const Variant &v, float eps) {
    args = tn_op_args_init(v.op);
    args.x = &x;
    args.y = &y;
    args.eps = eps;
    args.scale = v.scale;
    if (v.weight != kNoWeight) {
      args.weight = &w;
      args.weight_offset = v.weight_offset;
    }
    if (v.mul) args.mul = &mul;
    if (v.op == TN_OP_ADD_RMS_NORM) {
      args.residual = &res;
      args.residual_out = &rout;
    }
  }
  // A copy of other arguments, with their tensors held here (so that the copy can be changed).
  void Assign(const tn_op_args &a) {
    args = a;
    auto take = [](const tn_tensor *from, tn_tensor &to) -> const tn_tensor * {
      if (from == nullptr) return nullptr;
      to = *from;
      return &to;
    };
    args.x = take(a.x, x);
    args.residual = take(a.residual, res);
    args.mul = take(a.mul, mul);
    args.weight = take(a.weight, w);
    args.y = take(a.y, y);
    args.residual_out = take(a.residual_out, rout);
  }
  void SetRows(int64_t rows) {
    for (tn_tensor *t : {&x, &res, &mul, &y, &rout}) t->rows = rows;
  }
};

// Host tensors over rows [r0, r1) of p, writing the CPU outputs.
void BindHost(Problem &p, int64_t r0, int64_t r1, Call &c) {
  auto rows_of = [&](std::vector<uint8_t> &b) {
    return tn_tensor_2d(b.data() + (size_t)r0 * p.row_bytes(), p.dt, r1 - r0, p.dim);
  };
  c.x = rows_of(p.x);
  c.y = rows_of(p.cpu_y);
  if (p.add()) {
    c.res = rows_of(p.res);
    c.rout = rows_of(p.cpu_r);
  }
  if (p.has_mul()) c.mul = rows_of(p.mul);
  if (p.has_weight()) c.w = tn_tensor_vector(p.w.data(), p.wdt(), p.dim);
  c.Bind(*p.v, p.eps);
}

// Computes p's float64 reference (on several threads) and runs the CPU backend on it.
bool Solve(tn_context *ctx, Problem &p) {
  const size_t n = (size_t)(p.rows * p.dim);
  p.ref_y.resize(n);
  p.ref_r.resize(p.add() ? n : 0);
  p.cpu_y.assign(n * p.es(), 0xff);
  p.cpu_r.assign(p.add() ? n * p.es() : 0, 0xff);
  std::atomic<bool> ok{true};
  ParallelFor(p.rows, p.dim, [&](int, int64_t r0, int64_t r1) {
    if (r1 <= r0) return;
    Call c;
    BindHost(p, r0, r1, c);
    if (tn_reference_run(&c.args, p.ref_y.data() + r0 * p.dim, p.add() ? p.ref_r.data() + r0 * p.dim : nullptr) != 0)
      ok = false;
  });
  EXPECT_TRUE(ok) << "the reference ran out of memory";
  Call c;
  BindHost(p, 0, p.rows, c);
  const tn_status st = tn_op_run(ctx, &c.args);
  EXPECT_EQ(st, TN_OK) << Describe(p) << ": the CPU backend: " << tn_context_last_error(ctx);
  return ok && st == TN_OK;
}

// ------------------------------------------------------------------------------------------------
// Layouts on the device
// ------------------------------------------------------------------------------------------------

enum Layout { kContiguous, kStrided, kInPlace, kElementOffset, kByteOffset };
const Layout kLayouts[] = {kContiguous, kStrided, kInPlace, kElementOffset, kByteOffset};

// Where a problem's operands go in their device buffers.
struct Geometry {
  std::string name;
  int64_t stride_pad = 0;       // row_stride = dim + stride_pad
  int64_t offset_elements = 0;  // every data pointer starts this many of its own elements ...
  size_t offset_bytes = 0;      // ... plus this many bytes into its (256-byte aligned) allocation
  bool in_place = false;        // y is x (and residual_out is residual)
};

Geometry GeometryOf(Layout layout) {
  Geometry g;
  switch (layout) {
    case kContiguous:
      g.name = "contiguous";
      break;
    case kStrided:
      g.name = "strided (row_stride dim + 5)";
      g.stride_pad = 5;
      break;
    case kInPlace:
      g.name = "in place";
      g.in_place = true;
      break;
    case kElementOffset:  // aligned to elements, never to 16 bytes: element access mode
      g.name = "offset by one element";
      g.offset_elements = 1;
      break;
    case kByteOffset:  // not even aligned to elements: byte access mode
      g.name = "offset by one byte";
      g.offset_bytes = 1;
      break;
  }
  return g;
}

// Bytes kept after an operand's last row, so that a write just past it shows.
constexpr size_t kGuard = 64;

// One operand on the device: its buffer and the host image of what the buffer holds before a call (the
// rows; a NaN in the gaps, before the first element and in the guard; all 0xFF for an output).
struct DevOperand {
  DeviceBuffer buf;
  std::vector<uint8_t> image;
  tn_dtype dt = TN_F32;
  int64_t rows = 0, dim = 0, stride = 0;
  size_t offset = 0;  // bytes from the allocation to element 0

  size_t es() const { return ESize(dt); }
  size_t RowBytes() const { return (size_t)dim * es(); }
  size_t RowStart(int64_t r) const { return offset + (size_t)(r * stride) * es(); }
  // The bytes a call on the first view_rows rows writes or could wrongly write nearby: up to the end of
  // the next row (or of the guard), so that a call on a few rows does not read back the whole buffer.
  size_t Span(int64_t view_rows) const { return std::min(image.size(), RowStart(view_rows) + RowBytes() + kGuard); }
  tn_tensor View(int64_t view_rows) const {
    return tn_tensor_on(tn_tensor_strided(buf.data() + offset, dt, view_rows, dim, stride), Gpu());
  }

  void Shape(tn_dtype d, int64_t r, int64_t n, int64_t s, const Geometry &g) {
    dt = d;
    rows = r;
    dim = n;
    stride = s;
    offset = (size_t)g.offset_elements * ESize(d) + g.offset_bytes;
    image.resize(RowStart(r) + kGuard);
  }
  // The image of an input: the rows of `data` (contiguous), NaN everywhere else. Each NaN byte is the
  // one at its position in the rows' element grid, so gaps read as whole NaN elements.
  void SetInput(const uint8_t *data) {
    uint8_t nan[4];
    NaNBytes(dt, nan);
    const size_t e = es(), phase = e - offset % e;
    auto fill = [&](size_t from, size_t to) {
      for (size_t i = from; i < to; i++) image[i] = nan[(i + phase) % e];
    };
    fill(0, offset);
    for (int64_t r = 0; r < rows; r++) {
      memcpy(image.data() + RowStart(r), data + (size_t)r * RowBytes(), RowBytes());
      fill(RowStart(r) + RowBytes(), r + 1 < rows ? RowStart(r + 1) : image.size());
    }
  }
  void SetOutput() { memset(image.data(), 0xff, image.size()); }
};

// Where byte i of an operand's buffer is, for messages.
std::string Locate(const DevOperand &d, int64_t view_rows, size_t i) {
  std::ostringstream s;
  if (i < d.offset) {
    s << "before the first element";
  } else {
    const size_t pitch = (size_t)d.stride * d.es();
    const int64_t row = (int64_t)((i - d.offset) / pitch);
    const size_t within = (i - d.offset) % pitch;
    if (row < view_rows && within >= d.RowBytes())
      s << "in the gap after row " << row;
    else if (row < view_rows)
      s << "in row " << row << " (inside the view)";
    else if (row < d.rows)
      s << "in row " << row << ", past the view's " << view_rows << " rows";
    else
      s << "in the guard after the buffer's last row";
  }
  return s.str();
}

// Runs problems on cuda:0 in a geometry. Load once, then Run on the first `rows` rows any number of
// times (in increasing order of rows: each run restores only the span the previous runs could touch).
// Failures are reported where they happen (ADD_FAILURE, with the op, dtype, shape and layout; not at all
// while quiet, for callers that summarise many failures) and the functions return false.
class GpuRunner {
 public:
  explicit GpuRunner(tn_context *ctx) : ctx_(ctx) {}

  void SetQuiet(bool quiet) { quiet_ = quiet; }

  // Puts p's inputs on the device and poisons the outputs (whole buffers).
  bool Load(const Problem &p, const Geometry &g) {
    p_ = &p;
    g_ = g;
    const int64_t stride = p.dim + g.stride_pad;
    x_.Shape(p.dt, p.rows, p.dim, stride, g);
    x_.SetInput(p.x.data());
    std::vector<DevOperand *> used = {&x_};
    if (p.add()) {
      res_.Shape(p.dt, p.rows, p.dim, stride, g);
      res_.SetInput(p.res.data());
      used.push_back(&res_);
    }
    if (p.has_mul()) {
      mul_.Shape(p.dt, p.rows, p.dim, stride, g);
      mul_.SetInput(p.mul.data());
      used.push_back(&mul_);
    }
    if (p.has_weight()) {
      w_.Shape(p.wdt(), 1, p.dim, p.dim, g);
      w_.SetInput(p.w.data());
      used.push_back(&w_);
    }
    if (!g.in_place) {
      y_.Shape(p.dt, p.rows, p.dim, stride, g);
      y_.SetOutput();
      used.push_back(&y_);
      if (p.add()) {
        rout_.Shape(p.dt, p.rows, p.dim, stride, g);
        rout_.SetOutput();
        used.push_back(&rout_);
      }
    }
    for (DevOperand *d : used) {
      const tn_status st = d->buf.Reserve(ctx_, d->image.size());
      if (st != TN_OK) {
        Report(Where(p.rows) + ": tn_malloc of " + std::to_string(d->image.size()) + " bytes: " +
               tn_status_name(st) + ": " + tn_context_last_error(ctx_));
        return false;
      }
      if (!Upload(*d, d->image.data(), d->image.size())) return false;
    }
    call_.x = x_.View(p.rows);
    call_.res = res_.View(p.rows);
    call_.mul = mul_.View(p.rows);
    call_.w = w_.View(1);
    call_.y = YOut().View(p.rows);
    call_.rout = ROut().View(p.rows);
    call_.Bind(*p.v, p.eps);
    return true;
  }

  // The arguments of a call on the first `rows` rows.
  const tn_op_args &Args(int64_t rows) {
    call_.SetRows(rows);
    return call_.args;
  }

  // Restores what a call on `rows` rows may have changed: the outputs' poison, or in place the inputs.
  bool Reset(int64_t rows) {
    if (g_.in_place) {
      if (!Upload(x_, x_.image.data(), x_.Span(rows))) return false;
      return !p_->add() || Upload(res_, res_.image.data(), res_.Span(rows));
    }
    if (!Upload(y_, Ones(y_.Span(rows)), y_.Span(rows))) return false;
    return !p_->add() || Upload(rout_, Ones(rout_.Span(rows)), rout_.Span(rows));
  }

  // Reads the outputs of a call on `rows` rows back as contiguous rows (r stays empty without a
  // residual_out) and checks that no byte of their buffers outside the view changed.
  bool Collect(int64_t rows, std::vector<uint8_t> &y, std::vector<uint8_t> &r) {
    bool ok = CollectOne(YOut(), rows, "y", y);
    r.clear();
    if (p_->add()) ok = CollectOne(ROut(), rows, "residual_out", r) && ok;
    return ok;
  }

  // Reset, run, synchronize, collect.
  bool Run(int64_t rows, std::vector<uint8_t> &y, std::vector<uint8_t> &r) {
    if (!Reset(rows)) return false;
    tn_status st = tn_op_run(ctx_, &Args(rows));
    if (st != TN_OK) {
      Report(Where(rows) + ": tn_op_run: " + tn_status_name(st) + ": " + tn_context_last_error(ctx_));
      return false;
    }
    st = tn_synchronize(ctx_, Gpu());
    if (st != TN_OK) {
      Report(Where(rows) + ": tn_synchronize: " + tn_status_name(st) + ": " + tn_context_last_error(ctx_));
      return false;
    }
    return Collect(rows, y, r);
  }

  // Whether every input buffer (those not written in place) still holds exactly what was loaded.
  bool InputsUnchanged() {
    bool ok = true;
    auto check = [&](DevOperand &d, const char *name) {
      if (!Download(d, scratch_, d.image.size())) {
        ok = false;
        return;
      }
      if (scratch_ != d.image) {
        const size_t i = (size_t)(std::mismatch(scratch_.begin(), scratch_.end(), d.image.begin()).first -
                                  scratch_.begin());
        Report(Where(p_->rows) + ": input " + name + " changed at byte " + std::to_string(i) + " (" +
               Locate(d, d.rows, i) + ")");
        ok = false;
      }
    };
    if (!g_.in_place) check(x_, "x");
    if (p_->add() && !g_.in_place) check(res_, "residual");
    if (p_->has_mul()) check(mul_, "mul");
    if (p_->has_weight()) check(w_, "weight");
    return ok;
  }

  std::string Where(int64_t rows) const {
    std::ostringstream s;
    s << "op " << p_->v->name << " (" << tn_op_name(p_->v->op) << "), dtype " << tn_dtype_name(p_->dt) << ", rows "
      << rows << ", dim " << p_->dim << ", layout " << g_.name << ", eps " << p_->eps
      << ", TNORM_TEST_SEED=" << BaseSeed();
    return s.str();
  }

 private:
  void Report(const std::string &message) {
    if (!quiet_) ADD_FAILURE() << message;
  }
  DevOperand &YOut() { return g_.in_place ? x_ : y_; }
  DevOperand &ROut() { return g_.in_place ? res_ : rout_; }

  bool Upload(DevOperand &d, const uint8_t *src, size_t bytes) {
    const tn_status st = tn_memcpy(ctx_, d.buf.data(), Gpu(), src, tn_cpu_device(), bytes);
    if (st != TN_OK)
      Report(Where(p_->rows) + ": tn_memcpy to the device: " + tn_status_name(st) + ": " + tn_context_last_error(ctx_));
    return st == TN_OK;
  }
  bool Download(DevOperand &d, std::vector<uint8_t> &dst, size_t bytes) {
    dst.resize(bytes);
    const tn_status st = tn_memcpy(ctx_, dst.data(), tn_cpu_device(), d.buf.data(), Gpu(), bytes);
    if (st != TN_OK)
      Report(Where(p_->rows) + ": tn_memcpy from the device: " + tn_status_name(st) + ": " +
             tn_context_last_error(ctx_));
    return st == TN_OK;
  }

  bool CollectOne(DevOperand &d, int64_t rows, const char *name, std::vector<uint8_t> &out) {
    const size_t span = d.Span(rows), rb = d.RowBytes();
    if (!Download(d, scratch_, span)) return false;
    out.resize((size_t)rows * rb);
    // Expected: the image, with the view's rows as they came back.
    expect_.assign(d.image.begin(), d.image.begin() + (ptrdiff_t)span);
    for (int64_t r = 0; r < rows; r++) {
      memcpy(out.data() + (size_t)r * rb, scratch_.data() + d.RowStart(r), rb);
      memcpy(expect_.data() + d.RowStart(r), scratch_.data() + d.RowStart(r), rb);
    }
    if (memcmp(expect_.data(), scratch_.data(), span) == 0) return true;
    const size_t i =
        (size_t)(std::mismatch(scratch_.begin(), scratch_.end(), expect_.begin()).first - scratch_.begin());
    std::ostringstream s;
    s << Where(rows) << ": " << name << ": byte " << i << " of its buffer, " << Locate(d, rows, i)
      << ", was written: 0x" << std::hex << (int)expect_[i] << " became 0x" << (int)scratch_[i];
    Report(s.str());
    return false;
  }

  tn_context *ctx_;
  const Problem *p_ = nullptr;
  Geometry g_;
  bool quiet_ = false;
  DevOperand x_, res_, mul_, w_, y_, rout_;
  Call call_;
  std::vector<uint8_t> scratch_, expect_;
};

// ------------------------------------------------------------------------------------------------
// Checking outputs
// ------------------------------------------------------------------------------------------------

// How far (in ulps of the output dtype) the GPU's outputs may be from the CPU backend's. f16/bf16: 1.
// f32: the two backends reduce a row's squares in different orders (the CPU in 16 lanes of dim / 16
// sequential terms, the GPU in G threads of a few terms each, params.h), so their float32 sums differ by
// rounding errors that grow with dim, and every output of the row shifts alike. Measured on an H100 with
// these tests' data: at most ~11 ulps on random rows up to dim 70000, but 137 - 157 at dim 70000 with a
// 1000x outlier channel, almost all of it the CPU's (its outlier's lane rounds the small squares away: the
// CPU alone is ~140 ulps from float64 there, 264 at dim 131072). The allowance, 1.5 sqrt(dim) + 4 (401
// ulps at 70000), is of the order of the reference's own tolerance (2e-5 relative, 170 - 340 ulps) there
// and much tighter at the common dims (100 ulps at 4096). An f16/bf16 ulp is 2^13 / 2^16 f32 ulps: there
// the difference rounds to at most one.
int64_t CpuUlpTolerance(tn_dtype dt, int64_t dim) {
  return dt == TN_F32 ? 4 + (int64_t)std::ceil(1.5 * std::sqrt((double)dim)) : 1;
}

// Whether a GPU output agrees with the CPU's: NaN with NaN (payloads may differ), Inf with the same Inf,
// finite values within `tolerance` ulps.
bool AgreesWithCpu(tn_dtype dt, uint32_t g, uint32_t c, int64_t tolerance, int64_t *ulps) {
  const bool gn = BitsIsNaN(dt, g), cn = BitsIsNaN(dt, c);
  if (gn || cn) return gn && cn;
  if (BitsIsInf(dt, g) || BitsIsInf(dt, c)) return g == c;
  *ulps = std::llabs(OrderedBits(dt, g) - OrderedBits(dt, c));
  return *ulps <= tolerance;
}

// A lower bound of tn_reference_error's tolerance for finite references, so that most elements skip the
// full rule: f16/bf16 one ulp at the reference's magnitude, f32 (slightly less than) 2e-5 relative.
double FastTolerance(tn_dtype dt, double ref) {
  if (dt == TN_F32) return 2e-5 * 0.999 * std::fabs(ref);
  if (!std::isfinite(ref)) return -1.0;  // Inf or NaN: never the shortcut
  const int mant = dt == TN_F16 ? 10 : 7, min_exp = dt == TN_F16 ? -14 : -126;
  const int e = ref != 0.0 ? std::max(std::ilogb(ref), min_exp) : min_exp;
  return std::ldexp(1.0, e - mant);
}

struct Mismatch {
  bool found = false;
  const char *output = "";
  const char *why = "";
  int64_t row = 0, col = 0;
  uint32_t got_bits = 0, cpu_bits = 0;
  double want = 0;
};

struct CheckResult {
  int64_t bad = 0;
  Mismatch first;
  int64_t max_cpu_ulps = 0;
};

// Compares the first `rows` rows of GPU outputs (contiguous) with p's reference and CPU outputs:
// y within the reference's tolerance (tn_reference_error <= 1) and within CpuUlpTolerance of the CPU;
// residual_out exactly x + residual rounded once, as the reference and the CPU give it; no element the
// poison (never written).
CheckResult CompareOutputs(const Problem &p, int64_t rows, const std::vector<uint8_t> &y,
                           const std::vector<uint8_t> &r) {
  const tn_dtype dt = p.dt;
  const int64_t dim = p.dim, tolerance = CpuUlpTolerance(dt, dim);
  std::vector<CheckResult> slots(kMaxSlots);
  ParallelFor(rows, dim, [&](int slot, int64_t r0, int64_t r1) {
    CheckResult &res = slots[(size_t)slot];
    auto fail = [&](const char *output, const char *why, int64_t row, int64_t col, uint32_t g, uint32_t c,
                    double want) {
      if (res.bad++ > 0) return;
      res.first = {true, output, why, row, col, g, c, want};
    };
    for (int64_t row = r0; row < r1; row++) {
      const uint8_t *gy = p.Row(y, row), *cy = p.Row(p.cpu_y, row);
      const double *ry = p.ref_y.data() + row * dim;
      for (int64_t i = 0; i < dim; i++) {
        const uint32_t gb = Bits(dt, gy, i), cb = Bits(dt, cy, i);
        const float g = BitsToFloat(dt, gb);
        const double want = ry[i];
        int64_t ulps = 0;
        if (BitsIsPoison(dt, gb)) {
          fail("y", "the poison: never written", row, i, gb, cb, want);
        } else if (!(std::fabs((double)g - want) <= FastTolerance(dt, want)) &&
                   !(tn_reference_error(dt, g, want) <= 1.0)) {
          fail("y", "outside the float64 reference's tolerance", row, i, gb, cb, want);
        } else if (!AgreesWithCpu(dt, gb, cb, tolerance, &ulps)) {
          fail("y", "too far from the CPU backend's result", row, i, gb, cb, want);
        }
        res.max_cpu_ulps = std::max(res.max_cpu_ulps, ulps);
      }
      if (!p.add()) continue;
      const uint8_t *gr = p.Row(r, row), *cr = p.Row(p.cpu_r, row);
      const double *rr = p.ref_r.data() + row * dim;
      for (int64_t i = 0; i < dim; i++) {
        const uint32_t gb = Bits(dt, gr, i), cb = Bits(dt, cr, i);
        const float g = BitsToFloat(dt, gb);
        const double want = rr[i];
        int64_t ulps = 0;
        if (BitsIsPoison(dt, gb))
          fail("residual_out", "the poison: never written", row, i, gb, cb, want);
        else if (!(std::isnan(want) ? std::isnan(g) : (double)g == want))
          fail("residual_out", "not x + residual rounded once", row, i, gb, cb, want);
        else if (!AgreesWithCpu(dt, gb, cb, 0, &ulps))
          fail("residual_out", "differs from the CPU backend's", row, i, gb, cb, want);
      }
    }
  });
  CheckResult all;
  for (const CheckResult &s : slots) {  // slots hold increasing row ranges: the first found is the first
    all.bad += s.bad;
    if (s.first.found && !all.first.found) all.first = s.first;
    all.max_cpu_ulps = std::max(all.max_cpu_ulps, s.max_cpu_ulps);
  }
  return all;
}

// The largest f32 distance to the CPU in a passing call, and where, printed at the end: the data behind
// CpuUlpTolerance.
struct LargestF32Distance {
  int64_t ulps = 0;
  std::string where;
};
LargestF32Distance g_largest_f32_distance;

// Checks a call's outputs (CompareOutputs); reports the first bad element with the call's description,
// unless quiet.
bool CheckOutputs(const Problem &p, int64_t rows, const std::vector<uint8_t> &y, const std::vector<uint8_t> &r,
                  const std::string &where, bool report = true) {
  const CheckResult c = CompareOutputs(p, rows, y, r);
  if (c.bad == 0 && p.dt == TN_F32 && c.max_cpu_ulps > g_largest_f32_distance.ulps)
    g_largest_f32_distance = {c.max_cpu_ulps, where};
  if (c.bad == 0) return true;
  if (!report) return false;
  const Mismatch &m = c.first;
  std::ostringstream s;
  s << where << ": " << c.bad << " bad element(s); the first: " << m.output << " row " << m.row << " column "
    << m.col << ": got " << std::setprecision(9) << BitsToFloat(p.dt, m.got_bits) << " (bits 0x" << std::hex
    << m.got_bits << std::dec << "), expected " << std::setprecision(17) << m.want << "; the CPU backend gave "
    << std::setprecision(9) << BitsToFloat(p.dt, m.cpu_bits) << " (bits 0x" << std::hex << m.cpu_bits << std::dec
    << "): " << m.why;
  if (std::string(m.why).find("CPU") != std::string::npos && strcmp(m.output, "y") == 0)
    s << " (allowed: " << CpuUlpTolerance(p.dt, p.dim) << " ulps)";
  ADD_FAILURE() << s.str();
  return false;
}

class MaxUlpsPrinter : public ::testing::Environment {
 public:
  void TearDown() override {
    if (g_largest_f32_distance.ulps > 0)
      printf("largest f32 distance between the GPU's and the CPU's outputs in a passing call: %" PRId64
             " ulps (%s)\n",
             g_largest_f32_distance.ulps, g_largest_f32_distance.where.c_str());
  }
};
::testing::Environment *const g_ulps_env = ::testing::AddGlobalTestEnvironment(new MaxUlpsPrinter);

// ------------------------------------------------------------------------------------------------
// The fixture: a context with CUDA available (else the test fails), runners whose device buffers are
// freed before the context.
// ------------------------------------------------------------------------------------------------

class CudaTest : public CudaContextTest {
 protected:
  void TearDown() override {
    for (auto &r : runners_) r.reset();  // their device buffers go through the context
    CudaContextTest::TearDown();
  }

  GpuRunner &Runner(int i) {
    if (!runners_[i]) runners_[i].reset(new GpuRunner(ctx));
    return *runners_[i];
  }

  bool Solve(Problem &p) { return ::Solve(ctx, p); }

  // Solves p, runs all its rows on the GPU in geometry g and checks them (and, if asked, that no input
  // changed). The GPU's outputs are left in out_y_ / out_r_.
  bool RunAndCheck(Problem &p, const Geometry &g, bool check_inputs = false) {
    if (!Solve(p)) return false;
    GpuRunner &run = Runner(0);
    if (!run.Load(p, g) || !run.Run(p.rows, out_y_, out_r_)) return false;
    bool ok = CheckOutputs(p, p.rows, out_y_, out_r_, run.Where(p.rows));
    if (check_inputs) ok = run.InputsUnchanged() && ok;
    return ok;
  }

  std::string Last() const { return tn_context_last_error(ctx); }

  std::unique_ptr<GpuRunner> runners_[2];
  std::vector<uint8_t> out_y_, out_r_;
};

#define EXPECT_TN_OK(expr)                                                                          \
  do {                                                                                              \
    const tn_status st_ = (expr);                                                                   \
    EXPECT_EQ(st_, TN_OK) << #expr << ": " << tn_status_name(st_) << ": " << tn_context_last_error(ctx); \
  } while (0)
#define ASSERT_TN_OK(expr)                                                                          \
  do {                                                                                              \
    const tn_status st_ = (expr);                                                                   \
    ASSERT_EQ(st_, TN_OK) << #expr << ": " << tn_status_name(st_) << ": " << tn_context_last_error(ctx); \
  } while (0)
#define ASSERT_CU_OK(expr)                                             \
  do {                                                                 \
    const CUresult r_ = (expr);                                        \
    ASSERT_EQ(r_, CUDA_SUCCESS) << #expr << ": " << CuError(r_);       \
  } while (0)

// Every byte of a collected output is still the poison (nothing ran).
void ExpectAllPoison(const std::vector<uint8_t> &bytes, const std::string &what) {
  const auto it = std::find_if(bytes.begin(), bytes.end(), [](uint8_t b) { return b != 0xff; });
  EXPECT_TRUE(it == bytes.end()) << what << ": byte " << (it - bytes.begin()) << " was written";
}

std::string DtypeName(tn_dtype dt) { return tn_dtype_name(dt); }

// ------------------------------------------------------------------------------------------------
// GpuOps: the sweep. Per (variant, dtype, dim), one problem of as many rows as the largest row count
// allowed (rows x dim <= 4M elements, for the float64 reference's sake), solved once; every layout and
// row count runs on the first rows of it.
// ------------------------------------------------------------------------------------------------

struct OpParam {
  int variant;
  tn_dtype dt;
};

void PrintTo(const OpParam &p, std::ostream *os) { *os << kVariants[p.variant].name << "_" << tn_dtype_name(p.dt); }

std::vector<OpParam> AllOpParams() {
  std::vector<OpParam> ps;
  for (int v = 0; v < kVariantCount; v++)
    for (tn_dtype dt : kDtypes) ps.push_back({v, dt});
  return ps;
}

std::string OpParamName(const ::testing::TestParamInfo<OpParam> &info) {
  return std::string(kVariants[info.param.variant].name) + "_" + tn_dtype_name(info.param.dt);
}

class GpuOps : public CudaTest, public ::testing::WithParamInterface<OpParam> {};

// Row shapes by dim (registry.c): G = 1 .. 1024 threads per row up to 32768 bf16/f16 or 16384 f32
// elements, then staged in shared memory, then (past the shared memory a block may have) read again.
const int64_t kSweepDims[] = {1,    2,    3,    7,    31,   33,   96,    127,   128,   129,   255,
                              256,  257,  511,  512,  513,  769,  1152,  1536,  2304,  2560,  3584,
                              4096, 5120, 7168, 8193, 16384, 32768, 65536, 70000, 131072};
const int64_t kSweepRows[] = {1, 17, 65, 257};
constexpr int64_t kMaxSweepElements = (int64_t)4 << 20;
// Byte mode reads and writes every element byte by byte: a few dims, one per row-shape family.
const int64_t kByteOffsetDims[] = {3, 33, 257, 4096, 70000};

// The first failed calls are reported in full; the sweep then goes on quietly and ends with a summary of
// every failed call, so that one run shows all the shapes and layouts that fail.
constexpr int kReportedCalls = 10;

TEST_P(GpuOps, Sweep) {
  const Variant &v = kVariants[GetParam().variant];
  const tn_dtype dt = GetParam().dt;
  GpuRunner &run = Runner(0);
  Problem p;
  int failed_calls = 0;
  std::map<int64_t, std::map<std::string, std::vector<int64_t>>> failed;  // dim -> layout -> rows
  for (int64_t dim : kSweepDims) {
    int64_t max_rows = 0;
    for (int64_t rows : kSweepRows)
      if (rows * dim <= kMaxSweepElements) max_rows = rows;
    MakeProblem(p, v, dt, max_rows, dim, SeedFor(std::string("sweep ") + v.name + " " + DtypeName(dt) + " " +
                                                 std::to_string(dim)));
    if (!Solve(p)) FAIL() << "the reference or the CPU backend failed";
    for (Layout layout : kLayouts) {
      if (layout == kByteOffset &&
          std::find(std::begin(kByteOffsetDims), std::end(kByteOffsetDims), dim) == std::end(kByteOffsetDims))
        continue;
      const Geometry g = GeometryOf(layout);
      run.SetQuiet(failed_calls >= kReportedCalls);
      if (!run.Load(p, g)) {
        failed_calls++;
        failed[dim][g.name].push_back(-1);
        continue;
      }
      for (int64_t rows : kSweepRows) {
        if (rows > max_rows) break;
        const bool report = failed_calls < kReportedCalls;
        run.SetQuiet(!report);
        if (!run.Run(rows, out_y_, out_r_) || !CheckOutputs(p, rows, out_y_, out_r_, run.Where(rows), report)) {
          failed_calls++;
          failed[dim][g.name].push_back(rows);
        }
      }
    }
  }
  run.SetQuiet(false);
  if (failed_calls > kReportedCalls) {
    std::ostringstream s;
    s << failed_calls << " calls failed (the first " << kReportedCalls << " are reported above); all of them:";
    for (const auto &d : failed) {
      s << "\n  dim " << d.first << ":";
      for (const auto &l : d.second) {
        s << " " << l.first << " (rows";
        for (int64_t rows : l.second) s << " " << (rows < 0 ? std::string("?: the load failed") : std::to_string(rows));
        s << ");";
      }
    }
    ADD_FAILURE() << s.str();
  }
}

INSTANTIATE_TEST_SUITE_P(, GpuOps, ::testing::ValuesIn(AllOpParams()), OpParamName);

// ------------------------------------------------------------------------------------------------
// GpuSpecial: batches of 5 rows with something special in the middle row (row 2), every variant and
// dtype, dims reaching each row-shape family.
// ------------------------------------------------------------------------------------------------

class GpuSpecial : public CudaTest {
 protected:
  // fn(variant, dtype, dim) for every combination, stopping the test after 10 failed ones.
  void ForEach(const std::vector<int64_t> &dims, const std::vector<tn_dtype> &dtypes,
               const std::function<bool(const Variant &, tn_dtype, int64_t)> &fn) {
    int failed = 0;
    for (const Variant &v : kVariants)
      for (tn_dtype dt : dtypes)
        for (int64_t dim : dims)
          if (!fn(v, dt, dim) && ++failed >= 10) {
            ADD_FAILURE() << "stopping after 10 failed cases";
            return;
          }
  }

  std::string Seed(const char *what, const Variant &v, tn_dtype dt, int64_t dim) {
    return std::string(what) + " " + v.name + " " + DtypeName(dt) + " " + std::to_string(dim);
  }

  // Every element of the GPU's y in rows other than `special` is finite.
  bool OtherRowsFinite(const Problem &p, int64_t special, const std::string &what) {
    for (int64_t r = 0; r < p.rows; r++) {
      if (r == special) continue;
      for (int64_t i = 0; i < p.dim; i++) {
        const uint32_t b = Bits(p.dt, p.Row(out_y_, r), i);
        if (BitsIsNaN(p.dt, b) || BitsIsInf(p.dt, b)) {
          ADD_FAILURE() << Describe(p) << ", " << what << ": y row " << r << " column " << i << " is "
                        << BitsToFloat(p.dt, b) << " although only row " << special << " is special";
          return false;
        }
      }
    }
    return true;
  }

  static constexpr int64_t kRows = 5, kMid = 2;
  const std::vector<int64_t> dims_ = {1, 7, 33, 128, 4096, 70000};
  const std::vector<tn_dtype> all_dtypes_ = {TN_F32, TN_F16, TN_BF16};
};

TEST_F(GpuSpecial, AllZeroRowGivesZeros) {
  ForEach(dims_, all_dtypes_, [&](const Variant &v, tn_dtype dt, int64_t dim) {
    Problem p;
    MakeProblem(p, v, dt, kRows, dim, SeedFor(Seed("zero", v, dt, dim)));
    memset(p.Row(p.x, kMid), 0, p.row_bytes());
    if (p.add()) memset(p.Row(p.res, kMid), 0, p.row_bytes());
    if (!RunAndCheck(p, GeometryOf(kContiguous))) return false;
    for (int64_t i = 0; i < dim; i++) {
      const float y = BitsToFloat(dt, Bits(dt, p.Row(out_y_, kMid), i));
      if (y != 0.0f) {
        ADD_FAILURE() << Describe(p) << ": all-zero row: y column " << i << " is " << y << ", not 0";
        return false;
      }
    }
    return true;
  });
}

TEST_F(GpuSpecial, NanOrInfStaysInItsRow) {
  struct Poke {
    const char *what;
    bool residual;
    float value;
  };
  const Poke pokes[] = {{"NaN in x", false, NAN},
                        {"+Inf in x", false, INFINITY},
                        {"-Inf in x", false, -INFINITY},
                        {"NaN in residual", true, NAN},
                        {"Inf in residual", true, INFINITY}};
  ForEach(dims_, all_dtypes_, [&](const Variant &v, tn_dtype dt, int64_t dim) {
    bool ok = true;
    for (const Poke &poke : pokes) {
      if (poke.residual && v.op != TN_OP_ADD_RMS_NORM) continue;
      Problem p;
      MakeProblem(p, v, dt, kRows, dim, SeedFor(Seed(poke.what, v, dt, dim)));
      p.Set(poke.residual ? p.res : p.x, kMid, dim / 2, poke.value);
      // The reference gives the special row (NaN everywhere for NaN; zeros and a NaN at the Inf for Inf)
      // and the other rows; the GPU must match both.
      const bool ran = RunAndCheck(p, GeometryOf(kContiguous));
      ok = ran && OtherRowsFinite(p, kMid, poke.what) && ok;
    }
    return ok;
  });
}

// Rows whose float32 sum of squares overflows (|x| ~ 1e30, 1e20) or vanishes (|x| ~ 1e-30 with eps = 0):
// the library reduces them again scaled by a power of two, so they still normalise correctly.
TEST_F(GpuSpecial, HugeAndTinyRowsWithZeroEps) {
  const double kRowScales[] = {1e30, 1e-30, 1.0, 1e20};
  ForEach(dims_, {TN_F32, TN_BF16}, [&](const Variant &v, tn_dtype dt, int64_t dim) {
    Problem p;
    MakeProblem(p, v, dt, 4, dim, SeedFor(Seed("huge-tiny", v, dt, dim)), 1.0);
    p.eps = 0.0f;
    Random rng(p.seed ^ 0x77);
    for (int64_t r = 0; r < 4; r++) {
      FillRows(dt, p.Row(p.x, r), 1, dim, rng, kRowScales[r]);
      if (p.add()) FillRows(dt, p.Row(p.res, r), 1, dim, rng, kRowScales[r] * 0.5);
    }
    return RunAndCheck(p, GeometryOf(kContiguous)) && OtherRowsFinite(p, -1, "huge and tiny rows");
  });
}

TEST_F(GpuSpecial, OutlierChannel) {
  ForEach({2, 7, 33, 128, 4096, 70000}, all_dtypes_, [&](const Variant &v, tn_dtype dt, int64_t dim) {
    // N(0,1) rows (so that 1000x the largest stays finite in f16), one channel per row 1000x the row's
    // largest magnitude, alternating in sign.
    Problem p;
    MakeProblem(p, v, dt, kRows, dim, SeedFor(Seed("outlier", v, dt, dim)), 1.0);
    for (int64_t r = 0; r < kRows; r++) {
      double m = 0;
      for (int64_t i = 0; i < dim; i++) m = std::max(m, (double)std::fabs(p.Get(p.x, r, i)));
      p.Set(p.x, r, (dim / 2 + r) % dim, (float)((r % 2 ? -1000.0 : 1000.0) * std::max(m, 1e-3)));
    }
    return RunAndCheck(p, GeometryOf(kContiguous));
  });
}

// f16 subnormal inputs (|x| < 2^-14): a whole batch of them, with eps 1e-6 and with eps 0 (their squares
// are normal float32 values), then one subnormal row among normal ones.
TEST_F(GpuSpecial, SubnormalF16) {
  ForEach(dims_, {TN_F16}, [&](const Variant &v, tn_dtype dt, int64_t dim) {
    bool ok = true;
    for (float eps : {1e-6f, 0.0f}) {
      Problem p;
      MakeProblem(p, v, dt, kRows, dim, SeedFor(Seed("subnormal", v, dt, dim)), 1e-6);
      p.eps = eps;
      bool any_nonzero = false;
      for (int64_t i = 0; i < dim; i++) {
        const float x = p.Get(p.x, 0, i);
        EXPECT_LT(std::fabs(x), 0x1p-14f) << "the test data should be f16 subnormals";
        any_nonzero = any_nonzero || x != 0.0f;
      }
      EXPECT_TRUE(any_nonzero || dim < 8) << "the test data should not all round to zero";
      ok = RunAndCheck(p, GeometryOf(kContiguous)) && ok;
    }
    Problem p;
    MakeProblem(p, v, dt, kRows, dim, SeedFor(Seed("one subnormal row", v, dt, dim)));
    Random rng(p.seed ^ 0x99);
    FillRows(dt, p.Row(p.x, kMid), 1, dim, rng, 1e-6);
    if (p.add()) FillRows(dt, p.Row(p.res, kMid), 1, dim, rng, 1e-6);
    return RunAndCheck(p, GeometryOf(kContiguous)) && ok;
  });
}

// ------------------------------------------------------------------------------------------------
// GpuErrors: refused calls write nothing; allocation failures say so; a caller's stream is used.
// ------------------------------------------------------------------------------------------------

class GpuErrors : public CudaTest {};

TEST_F(GpuErrors, MissingDeviceIsRefusedAndNothingWritten) {
  int count = 0;
  ASSERT_TN_OK(tn_device_count(ctx, TN_DEVICE_CUDA, &count));
  const int missing = count <= 7 ? 7 : count;
  Problem p;
  MakeProblem(p, VariantNamed("add_rms_norm_w"), TN_BF16, 4, 256, SeedFor("missing device"));
  GpuRunner &run = Runner(0);
  ASSERT_TRUE(run.Load(p, GeometryOf(kContiguous)));  // real buffers on cuda:0, outputs poisoned
  // The same buffers, labelled as living on a device that does not exist.
  Call c;
  c.Assign(run.Args(p.rows));
  for (tn_tensor *t : {&c.x, &c.res, &c.w, &c.y, &c.rout}) t->device.index = missing;
  tn_status st = tn_op_run(ctx, &c.args);
  EXPECT_EQ(st, TN_ERR_DEVICE) << tn_status_name(st) << ": " << Last();
  EXPECT_NE(Last(), "") << "a refused call says why";
  st = tn_op_prepare(ctx, &c.args);
  EXPECT_EQ(st, TN_ERR_DEVICE) << tn_status_name(st) << ": " << Last();
  void *q = nullptr;
  st = tn_malloc(ctx, tn_cuda_device(missing), 256, &q);
  EXPECT_EQ(st, TN_ERR_DEVICE) << tn_status_name(st) << ": " << Last();
  EXPECT_EQ(q, nullptr);
  // Nothing was written (the buffers around the view included) and the inputs are as loaded.
  ASSERT_TN_OK(tn_synchronize(ctx, Gpu()));
  ASSERT_TRUE(run.Collect(p.rows, out_y_, out_r_));
  ExpectAllPoison(out_y_, "y");
  ExpectAllPoison(out_r_, "residual_out");
  EXPECT_TRUE(run.InputsUnchanged());
}

TEST_F(GpuErrors, MixedDevicesAreRefusedAndNothingWritten) {
  Problem p;
  MakeProblem(p, VariantNamed("add_rms_norm_w"), TN_BF16, 4, 256, SeedFor("mixed devices"));
  GpuRunner &run = Runner(0);
  ASSERT_TRUE(run.Load(p, GeometryOf(kContiguous)));
  std::vector<uint8_t> host_y((size_t)p.rows * p.row_bytes(), 0xff), host_r = host_y;
  const tn_tensor host_y_t = tn_tensor_2d(host_y.data(), p.dt, p.rows, p.dim);
  const tn_tensor host_r_t = tn_tensor_2d(host_r.data(), p.dt, p.rows, p.dim);
  const tn_tensor host_x_t = tn_tensor_2d(p.x.data(), p.dt, p.rows, p.dim);
  const tn_tensor host_w_t = tn_tensor_vector(p.w.data(), p.wdt(), p.dim);
  struct Mix {
    const char *what;
    std::function<void(Call &)> change;
  };
  const Mix mixes[] = {
      {"y on the CPU", [&](Call &c) { c.y = host_y_t; }},
      {"residual_out on the CPU", [&](Call &c) { c.rout = host_r_t; }},
      {"weight on the CPU", [&](Call &c) { c.w = host_w_t; }},
      {"x on the CPU, the rest on cuda:0", [&](Call &c) { c.x = host_x_t; }},
      {"y on cuda:1, the rest on cuda:0", [&](Call &c) { c.y.device.index = 1; }},
  };
  for (const Mix &m : mixes) {
    Call c;
    c.Assign(run.Args(p.rows));
    m.change(c);
    const tn_status st = tn_op_run(ctx, &c.args);
    EXPECT_EQ(st, TN_ERR_DEVICE) << m.what << ": " << tn_status_name(st) << ": " << Last();
  }
  ASSERT_TN_OK(tn_synchronize(ctx, Gpu()));
  ASSERT_TRUE(run.Collect(p.rows, out_y_, out_r_));
  ExpectAllPoison(out_y_, "device y");
  ExpectAllPoison(out_r_, "device residual_out");
  ExpectAllPoison(host_y, "host y");
  ExpectAllPoison(host_r, "host residual_out");
  EXPECT_TRUE(run.InputsUnchanged());
}

TEST_F(GpuErrors, AbsurdAllocationIsOutOfMemory) {
  int sentinel = 0;
  void *p = &sentinel;
  const tn_status st = tn_malloc(ctx, Gpu(), (size_t)1 << 50, &p);
  EXPECT_EQ(st, TN_ERR_NO_MEMORY) << tn_status_name(st) << ": " << Last();
  std::string message = Last();
  std::transform(message.begin(), message.end(), message.begin(),
                 [](unsigned char ch) { return (char)std::tolower(ch); });
  EXPECT_NE(message.find("cuda"), std::string::npos) << "the message should name CUDA: " << Last();
  EXPECT_EQ(p, (void *)&sentinel) << "a failed tn_malloc should leave *ptr alone";
  if (st == TN_OK && p != &sentinel) tn_free(ctx, Gpu(), p);
  // The context still works.
  void *q = nullptr;
  ASSERT_TN_OK(tn_malloc(ctx, Gpu(), 4096, &q));
  EXPECT_NE(q, nullptr);
  EXPECT_TN_OK(tn_free(ctx, Gpu(), q));
}

// A stream made for a test: the context goes back to the default stream, a capture left open by a failed
// assertion is ended and the stream destroyed when the scope ends. Needs a current context (declare a
// PrimaryContextScope before it).
class TestStream {
 public:
  explicit TestStream(tn_context *ctx) : ctx(ctx) { status_ = cuStreamCreate(&stream_, CU_STREAM_NON_BLOCKING); }
  ~TestStream() {
    if (stream_ == nullptr) return;
    CUstreamCaptureStatus capturing = CU_STREAM_CAPTURE_STATUS_NONE;
    if (cuStreamIsCapturing(stream_, &capturing) == CUDA_SUCCESS && capturing != CU_STREAM_CAPTURE_STATUS_NONE) {
      CUgraph g = nullptr;
      cuStreamEndCapture(stream_, &g);
      if (g != nullptr) cuGraphDestroy(g);
    }
    cuStreamSynchronize(stream_);
    tn_context_set_stream(ctx, TN_DEVICE_CUDA, nullptr);
    cuStreamDestroy(stream_);
  }
  TestStream(const TestStream &) = delete;
  TestStream &operator=(const TestStream &) = delete;
  CUstream get() const { return stream_; }
  CUresult status() const { return status_; }

 private:
  tn_context *ctx;
  CUstream stream_ = nullptr;
  CUresult status_;
};

TEST_F(GpuErrors, OpsRunOnTheCallersStream) {
  PrimaryContextScope primary;
  ASSERT_TRUE(primary.ok()) << CuError(primary.status());
  TestStream stream(ctx);
  ASSERT_EQ(stream.status(), CUDA_SUCCESS) << "cuStreamCreate: " << CuError(stream.status());
  ASSERT_TN_OK(tn_context_set_stream(ctx, TN_DEVICE_CUDA, stream.get()));
  struct Case {
    const char *variant;
    tn_dtype dt;
    int64_t rows, dim;
    Layout layout;
  };
  const Case cases[] = {{"rms_norm_w", TN_BF16, 257, 5120, kContiguous},
                        {"add_rms_norm_w", TN_F32, 65, 4096, kInPlace},
                        {"rms_norm", TN_F16, 17, 70000, kStrided}};
  GpuRunner &run = Runner(0);
  for (const Case &k : cases) {
    Problem p;
    MakeProblem(p, VariantNamed(k.variant), k.dt, k.rows, k.dim, SeedFor(std::string("stream ") + k.variant));
    ASSERT_TRUE(Solve(p));
    ASSERT_TRUE(run.Load(p, GeometryOf(k.layout)));
    ASSERT_TRUE(run.Reset(p.rows));
    ASSERT_TN_OK(tn_op_run(ctx, &run.Args(p.rows)));
    ASSERT_TN_OK(tn_synchronize(ctx, Gpu()));
    // tn_synchronize waited for this (non-blocking) stream: nothing is left on it.
    EXPECT_EQ(cuStreamQuery(stream.get()), CUDA_SUCCESS) << run.Where(p.rows);
    ASSERT_TRUE(run.Collect(p.rows, out_y_, out_r_));
    EXPECT_TRUE(CheckOutputs(p, p.rows, out_y_, out_r_, run.Where(p.rows) + ", on the caller's stream"));
  }
  // Back on the default stream, ops still run.
  ASSERT_TN_OK(tn_context_set_stream(ctx, TN_DEVICE_CUDA, nullptr));
  Problem p;
  MakeProblem(p, VariantNamed("l2_norm"), TN_F16, 17, 4096, SeedFor("default stream again"));
  EXPECT_TRUE(RunAndCheck(p, GeometryOf(kContiguous)));
}

// ------------------------------------------------------------------------------------------------
// GpuCapture: prepared ops captured into a CUDA graph compile nothing, run nothing while captured, and
// give the right results when the graph is launched (twice: the ops are not in place, so the second
// launch rewrites the same values).
// ------------------------------------------------------------------------------------------------

class GpuCapture : public CudaTest {};

TEST_F(GpuCapture, PreparedOpsCaptureAndReplay) {
  PrimaryContextScope primary;
  ASSERT_TRUE(primary.ok()) << CuError(primary.status());
  TestStream stream(ctx);
  ASSERT_EQ(stream.status(), CUDA_SUCCESS) << "cuStreamCreate: " << CuError(stream.status());
  ASSERT_TN_OK(tn_context_set_stream(ctx, TN_DEVICE_CUDA, stream.get()));

  Problem a, b;
  MakeProblem(a, VariantNamed("rms_norm_w"), TN_BF16, 8, 4096, SeedFor("capture a"));
  MakeProblem(b, VariantNamed("add_rms_norm_w"), TN_F16, 5, 5120, SeedFor("capture b"));
  ASSERT_TRUE(Solve(a));
  ASSERT_TRUE(Solve(b));
  GpuRunner &ra = Runner(0), &rb = Runner(1);
  ASSERT_TRUE(ra.Load(a, GeometryOf(kContiguous)));
  ASSERT_TRUE(rb.Load(b, GeometryOf(kStrided)));
  const tn_op_args &args_a = ra.Args(a.rows), &args_b = rb.Args(b.rows);
  ASSERT_TN_OK(tn_op_prepare(ctx, &args_a));
  ASSERT_TN_OK(tn_op_prepare(ctx, &args_b));
  ASSERT_TN_OK(tn_synchronize(ctx, Gpu()));  // the loads' copies are done before the capture starts

  tn_kernel_cache_stats before, after;
  tn_kernel_cache_stats_get(&before);
  ASSERT_CU_OK(cuStreamBeginCapture(stream.get(), CU_STREAM_CAPTURE_MODE_GLOBAL));
  const tn_status sa = tn_op_run(ctx, &args_a);
  const std::string ea = Last();
  const tn_status sb = tn_op_run(ctx, &args_b);
  const std::string eb = Last();
  CUgraph graph = nullptr;
  const CUresult ended = cuStreamEndCapture(stream.get(), &graph);
  tn_kernel_cache_stats_get(&after);
  EXPECT_EQ(sa, TN_OK) << "tn_op_run while capturing: " << tn_status_name(sa) << ": " << ea;
  EXPECT_EQ(sb, TN_OK) << "tn_op_run while capturing: " << tn_status_name(sb) << ": " << eb;
  ASSERT_EQ(ended, CUDA_SUCCESS) << "cuStreamEndCapture: " << CuError(ended);
  std::unique_ptr<CUgraph_st, CUresult (*)(CUgraph)> graph_owner(graph, cuGraphDestroy);
  EXPECT_EQ(after.compiled, before.compiled) << "a prepared op compiled a kernel while being captured";
  EXPECT_EQ(after.loaded_from_disk, before.loaded_from_disk) << "a prepared op loaded a kernel while being captured";
  ASSERT_EQ(sa, TN_OK);
  ASSERT_EQ(sb, TN_OK);

  // Captured, not run: the outputs are still the poison.
  ASSERT_TRUE(ra.Collect(a.rows, out_y_, out_r_));
  ExpectAllPoison(out_y_, "y of the captured rms_norm before the graph's launch");
  ASSERT_TRUE(rb.Collect(b.rows, out_y_, out_r_));
  ExpectAllPoison(out_y_, "y of the captured add_rms_norm before the graph's launch");
  ExpectAllPoison(out_r_, "residual_out of the captured add_rms_norm before the graph's launch");

  CUgraphExec exec = nullptr;
#if CUDA_VERSION >= 12000
  ASSERT_CU_OK(cuGraphInstantiate(&exec, graph, 0));
#else
  ASSERT_CU_OK(cuGraphInstantiate(&exec, graph, nullptr, nullptr, 0));
#endif
  std::unique_ptr<CUgraphExec_st, CUresult (*)(CUgraphExec)> exec_owner(exec, cuGraphExecDestroy);
  ASSERT_CU_OK(cuGraphLaunch(exec, stream.get()));
  ASSERT_CU_OK(cuGraphLaunch(exec, stream.get()));
  ASSERT_CU_OK(cuStreamSynchronize(stream.get()));
  ASSERT_TN_OK(tn_synchronize(ctx, Gpu()));

  ASSERT_TRUE(ra.Collect(a.rows, out_y_, out_r_));
  EXPECT_TRUE(CheckOutputs(a, a.rows, out_y_, out_r_, ra.Where(a.rows) + ", from a graph launched twice"));
  ASSERT_TRUE(rb.Collect(b.rows, out_y_, out_r_));
  EXPECT_TRUE(CheckOutputs(b, b.rows, out_y_, out_r_, rb.Where(b.rows) + ", from a graph launched twice"));
  EXPECT_TRUE(ra.InputsUnchanged());
  EXPECT_TRUE(rb.InputsUnchanged());
}

// ------------------------------------------------------------------------------------------------
// SanitizedSmall: one quick case per path a decode step takes, small enough to run under
// compute-sanitizer (memcheck, racecheck, synccheck, initcheck); each also checks its inputs unchanged.
// ------------------------------------------------------------------------------------------------

class SanitizedSmall : public CudaTest {
 protected:
  void RunCase(const char *variant, tn_dtype dt, int64_t rows, int64_t dim, Layout layout) {
    Problem p;
    MakeProblem(p, VariantNamed(variant), dt, rows, dim,
                SeedFor(std::string("small ") + variant + " " + DtypeName(dt) + " " + std::to_string(dim)));
    EXPECT_TRUE(RunAndCheck(p, GeometryOf(layout), /*check_inputs=*/true));
  }
};

TEST_F(SanitizedSmall, RmsNormBf16OneRowWithWeight) { RunCase("rms_norm_w", TN_BF16, 1, 4096, kContiguous); }
TEST_F(SanitizedSmall, AddRmsNormF16InPlace) { RunCase("add_rms_norm_w", TN_F16, 3, 5120, kInPlace); }
TEST_F(SanitizedSmall, L2NormF32Strided) { RunCase("l2_norm", TN_F32, 17, 128, kStrided); }
// 70000 bf16 elements: staged in shared memory.
TEST_F(SanitizedSmall, RmsNormBf16Staged) { RunCase("rms_norm_w", TN_BF16, 2, 70000, kContiguous); }
// 70000 f32 elements (280 KB) exceed a block's shared memory: staged and read again.
TEST_F(SanitizedSmall, RmsNormF32StagedReread) { RunCase("rms_norm_w", TN_F32, 2, 70000, kContiguous); }
TEST_F(SanitizedSmall, ByteMisaligned) { RunCase("add_rms_norm_w", TN_BF16, 3, 1000, kByteOffset); }
TEST_F(SanitizedSmall, MulElementMisaligned) { RunCase("rms_norm_w_mul", TN_F16, 2, 4096, kElementOffset); }

// ------------------------------------------------------------------------------------------------
// SanitizedBatchInvariance: a batch of 300 random rows, then a few of its rows alone (rows = 1) in another
// buffer at another offset: 16-byte aligned, one element in (element mode) and one byte in (byte mode).
// The reduction order depends on (dtype, dim) alone, so each must give the batch's bytes exactly.
// ------------------------------------------------------------------------------------------------

class SanitizedBatchInvariance : public CudaTest {
 protected:
  void Check(tn_dtype dt) {
    const char *const variants[] = {"rms_norm_w_mul", "l2_norm_scale037", "add_rms_norm_w", "rms_norm_w", "l2_norm"};
    // 4096 rows take G = 128 threads (f16, bf16) or 256 (f32), 12000 G = 512 (f16, bf16); add_rms_norm's
    // rows of 257 .. 2048 chunks (4096, 5120, 12000 in f16/bf16) its pair shapes, few rows or many. The batch has
    // more rows than an H100 or H200 has SMs, so it takes the register kernels where a row alone takes
    // the few-rows (wide) form of the same G: both must reduce a row alike. 513 (f32) and 1152 (f16,
    // bf16) take the pair shape of G = 128 (two chunks a thread), few rows or many.
    const int64_t dims[] = {128, 513, 1152, 4095, 4096, 5120, 12000, 70000};
    const int64_t batch_rows = 300, picks[] = {0, 21, 299};
    int failed = 0;
    for (const char *name : variants) {
      for (int64_t dim : dims) {
        if (failed >= 10) FAIL() << "stopping after 10 failures";
        const Variant &v = VariantNamed(name);
        Problem batch;
        MakeProblem(batch, v, dt, batch_rows, dim,
                    SeedFor(std::string("batch ") + name + " " + DtypeName(dt) + " " + std::to_string(dim)));
        GpuRunner &batch_run = Runner(0);
        if (!Solve(batch) || !batch_run.Load(batch, GeometryOf(kContiguous)) ||
            !batch_run.Run(batch_rows, out_y_, out_r_)) {
          failed++;
          continue;
        }
        // The batch against the reference; its rows are compared alone either way, since a row that
        // depends on its neighbours fails both checks and the second one says so.
        if (!CheckOutputs(batch, batch_rows, out_y_, out_r_, batch_run.Where(batch_rows))) failed++;
        const std::vector<uint8_t> batch_y = out_y_, batch_r = out_r_;
        GpuRunner &alone = Runner(1);
        for (int64_t r : picks) {
          Problem one;
          Alone(batch, r, one);
          for (int mode = 0; mode < 3; mode++) {
            Geometry g;
            g.offset_bytes = 4096 + 16 * (size_t)(r + 1);  // somewhere else than row r of the batch
            g.offset_elements = mode == 1 ? 1 : 0;
            g.offset_bytes += mode == 2 ? 1 : 0;
            g.name = std::string("alone at byte ") + std::to_string(g.offset_bytes) +
                     (mode == 0 ? "" : mode == 1 ? " plus one element" : "");
            std::vector<uint8_t> y, rr;
            if (!alone.Load(one, g) || !alone.Run(1, y, rr)) {
              failed++;
              continue;
            }
            if (memcmp(y.data(), batch.Row(batch_y, r), batch.row_bytes()) != 0 ||
                (batch.add() && memcmp(rr.data(), batch.Row(batch_r, r), batch.row_bytes()) != 0)) {
              ADD_FAILURE() << alone.Where(1) << ": row " << r << " of a batch of " << batch_rows
                            << " gives other bytes when run alone (" << FirstDifference(batch, y, batch_y, r)
                            << ")";
              failed++;
            }
          }
        }
      }
    }
  }

  // `one` is row r of `batch` alone (the same weight).
  static void Alone(const Problem &batch, int64_t r, Problem &one) {
    one.v = batch.v;
    one.dt = batch.dt;
    one.rows = 1;
    one.dim = batch.dim;
    one.eps = batch.eps;
    one.seed = batch.seed;
    auto row = [&](const std::vector<uint8_t> &b) {
      return b.empty() ? std::vector<uint8_t>()
                       : std::vector<uint8_t>(batch.Row(b, r), batch.Row(b, r) + batch.row_bytes());
    };
    one.x = row(batch.x);
    one.res = row(batch.res);
    one.mul = row(batch.mul);
    one.w = batch.w;
  }

  static std::string FirstDifference(const Problem &batch, const std::vector<uint8_t> &y,
                                     const std::vector<uint8_t> &batch_y, int64_t r) {
    for (int64_t i = 0; i < batch.dim; i++) {
      const uint32_t a = Bits(batch.dt, y.data(), i), b = Bits(batch.dt, batch.Row(batch_y, r), i);
      if (a != b) {
        std::ostringstream s;
        s << "first at y column " << i << ": " << std::setprecision(9) << BitsToFloat(batch.dt, a) << " alone, "
          << BitsToFloat(batch.dt, b) << " in the batch";
        return s.str();
      }
    }
    return "in residual_out";
  }
};

TEST_F(SanitizedBatchInvariance, F32) { Check(TN_F32); }
TEST_F(SanitizedBatchInvariance, F16) { Check(TN_F16); }
TEST_F(SanitizedBatchInvariance, Bf16) { Check(TN_BF16); }

}  // namespace
