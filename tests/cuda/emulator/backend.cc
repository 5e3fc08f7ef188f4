// The CUDA backend with its kernels run on the host: tn_cuda_backend and tn_cuda_build_all defined here in
// place of src/cuda/backend.c's (which the linker then leaves out of libtnorm.a), device memory in host
// memory with guard bytes around every allocation (checked after every launch), each launch planned by
// backend.c itself (plan.c) and run by runtime.cc (every kernel family, the elementwise ops too). The GPU
// tests linked with it run unchanged, bar the ones that call the driver directly and the checks that a
// graph was captured (a tn_graph replays op by op here).
#include <map>

#include "shim.h"
extern "C" {
#include "core/backend.h"
#include "core/error.h"
#include "core/ops.h"
#include "cuda/registry.h"
tn_status emu_plan(tn_context *ctx, const tn_op_args *a, const tn_run_options *o, tn_kernel_key *key,
                   tn_kernel_params *p, int *block, int64_t *blocks, unsigned *smem);
}
#include "add_rms_norm.cu"
#include "elementwise.cu"
#include "general.cu"
#include "layer_norm.cu"
#include "norm.cu"
#include "norm_x.cu"
#include "rope.cu"

namespace {

using Kernel = std::function<void()>;

// The kernel of a key, bound to its arguments (runtime key -> template instance).
template <int DT, int MODE>
bool KernelOf(tn_kernel_key k, const tn_kernel_params &p, Kernel &fn) {
#define TN_EMU_ROW_FAMILY(prefix)                                                     \
  switch (k.shape) {                                                                  \
    case 0: fn = [p] { prefix##_registers<DT, 1, MODE>(p); }; return true;             \
    case 1: fn = [p] { prefix##_registers<DT, 2, MODE>(p); }; return true;             \
    case 2: fn = [p] { prefix##_registers<DT, 4, MODE>(p); }; return true;             \
    case 3: fn = [p] { prefix##_registers<DT, 8, MODE>(p); }; return true;             \
    case 4: fn = [p] { prefix##_registers<DT, 16, MODE>(p); }; return true;            \
    case 5: fn = [p] { prefix##_registers<DT, 32, MODE>(p); }; return true;            \
    case 6: fn = [p] { prefix##_registers<DT, 64, MODE>(p); }; return true;            \
    case 7: fn = [p] { prefix##_registers<DT, 128, MODE>(p); }; return true;           \
    case 8: fn = [p] { prefix##_registers<DT, 256, MODE>(p); }; return true;           \
    case 9: fn = [p] { prefix##_registers<DT, 512, MODE>(p); }; return true;           \
    case 10: fn = [p] { prefix##_registers<DT, 1024, MODE>(p); }; return true;         \
    case TN_SHAPE_SHARED: fn = [p] { prefix##_staged<DT, 1, MODE>(p); }; return true;  \
    case TN_SHAPE_REREAD: fn = [p] { prefix##_staged<DT, 2, MODE>(p); }; return true;  \
    case 14: fn = [p] { prefix##_wide<DT, 128, MODE>(p); }; return true;               \
    case 15: fn = [p] { prefix##_wide<DT, 256, MODE>(p); }; return true;               \
    case 16: fn = [p] { prefix##_wide<DT, 512, MODE>(p); }; return true;               \
  }                                                                                   \
  return false;
// The pair shapes (two chunks a thread), in the families that have them; then the family's other shapes.
#define TN_EMU_PAIR_SHAPES(prefix)                                                                   \
  switch (k.shape) {                                                                                 \
    case TN_SHAPE_PAIR_FIRST: fn = [p] { prefix##_registers<DT, 32, MODE, 2>(p); }; return true;     \
    case TN_SHAPE_PAIR_FIRST + 1: fn = [p] { prefix##_registers<DT, 64, MODE, 2>(p); }; return true;  \
    case TN_SHAPE_PAIR_FIRST + 2: fn = [p] { prefix##_registers<DT, 128, MODE, 2>(p); }; return true; \
  }
// add_rms_norm's own pair shapes of G = 256 .. 1024.
#define TN_EMU_WIDE_PAIR_SHAPES(prefix)                                                               \
  switch (k.shape) {                                                                                  \
    case TN_SHAPE_PAIR_FIRST + 3: fn = [p] { prefix##_registers<DT, 256, MODE, 2>(p); }; return true;  \
    case TN_SHAPE_PAIR_FIRST + 4: fn = [p] { prefix##_registers<DT, 512, MODE, 2>(p); }; return true;  \
    case TN_SHAPE_PAIR_FIRST + 5: fn = [p] { prefix##_registers<DT, 1024, MODE, 2>(p); }; return true; \
  }
  switch (k.family) {
    case TN_FAMILY_NORM: TN_EMU_PAIR_SHAPES(tn_norm) TN_EMU_ROW_FAMILY(tn_norm)
    case TN_FAMILY_NORM_UNWEIGHTED: TN_EMU_PAIR_SHAPES(tn_norm_unweighted) TN_EMU_ROW_FAMILY(tn_norm_unweighted)
    case TN_FAMILY_NORM_MUL: TN_EMU_PAIR_SHAPES(tn_norm_mul) TN_EMU_ROW_FAMILY(tn_norm_mul)
    case TN_FAMILY_ADD_NORM:
      TN_EMU_PAIR_SHAPES(tn_add_norm) TN_EMU_WIDE_PAIR_SHAPES(tn_add_norm) TN_EMU_ROW_FAMILY(tn_add_norm)
    case TN_FAMILY_ADD_NORM_MUL:
      TN_EMU_PAIR_SHAPES(tn_add_norm_mul) TN_EMU_WIDE_PAIR_SHAPES(tn_add_norm_mul) TN_EMU_ROW_FAMILY(tn_add_norm_mul)
    case TN_FAMILY_NORM_X: TN_EMU_PAIR_SHAPES(tn_normx) TN_EMU_ROW_FAMILY(tn_normx)
    case TN_FAMILY_LAYER: TN_EMU_ROW_FAMILY(tn_layer)
    case TN_FAMILY_ADD_LAYER: TN_EMU_ROW_FAMILY(tn_add_layer)
    case TN_FAMILY_GENERAL:
      switch (k.shape) {  // general.cu has no few-rows form (its staged row would not fit)
        case 0: fn = [p] { tn_general_registers<DT, 1, MODE>(p); }; return true;
        case 1: fn = [p] { tn_general_registers<DT, 2, MODE>(p); }; return true;
        case 2: fn = [p] { tn_general_registers<DT, 4, MODE>(p); }; return true;
        case 3: fn = [p] { tn_general_registers<DT, 8, MODE>(p); }; return true;
        case 4: fn = [p] { tn_general_registers<DT, 16, MODE>(p); }; return true;
        case 5: fn = [p] { tn_general_registers<DT, 32, MODE>(p); }; return true;
        case 7: fn = [p] { tn_general_registers<DT, 128, MODE>(p); }; return true;
        case 8: fn = [p] { tn_general_registers<DT, 256, MODE>(p); }; return true;
        case 9: fn = [p] { tn_general_registers<DT, 512, MODE>(p); }; return true;
        case TN_SHAPE_PAIR_FIRST + 1: fn = [p] { tn_general_registers<DT, 64, MODE, 2>(p); }; return true;
        case TN_SHAPE_SHARED: fn = [p] { tn_general_staged<DT, 1, MODE>(p); }; return true;
        case TN_SHAPE_REREAD: fn = [p] { tn_general_staged<DT, 2, MODE>(p); }; return true;
      }
      return false;
    case TN_FAMILY_ROPE:
      switch (k.shape) {
        case 0: fn = [p] { tn_rope_registers<DT, 1, MODE>(p); }; return true;
        case 1: fn = [p] { tn_rope_registers<DT, 2, MODE>(p); }; return true;
        case 2: fn = [p] { tn_rope_registers<DT, 4, MODE>(p); }; return true;
        case 3: fn = [p] { tn_rope_registers<DT, 8, MODE>(p); }; return true;
        case 4: fn = [p] { tn_rope_registers<DT, 16, MODE>(p); }; return true;
        case 5: fn = [p] { tn_rope_registers<DT, 32, MODE>(p); }; return true;
      }
      return false;
    case TN_FAMILY_ELEMENTWISE:  // the key's shape is the op
      switch (k.shape) {
        case TN_KERNEL_ELEMENTWISE_ADD: fn = [p] { tn_elementwise<DT, TN_KERNEL_ELEMENTWISE_ADD, MODE>(p); }; return true;
        case TN_KERNEL_ELEMENTWISE_MUL: fn = [p] { tn_elementwise<DT, TN_KERNEL_ELEMENTWISE_MUL, MODE>(p); }; return true;
        case TN_KERNEL_ELEMENTWISE_SCALE:
          fn = [p] { tn_elementwise<DT, TN_KERNEL_ELEMENTWISE_SCALE, MODE>(p); };
          return true;
      }
      return false;
    default:
      return false;
  }
#undef TN_EMU_ROW_FAMILY
#undef TN_EMU_PAIR_SHAPES
#undef TN_EMU_WIDE_PAIR_SHAPES
}

template <int DT>
bool KernelOfDtype(tn_kernel_key k, const tn_kernel_params &p, Kernel &fn) {
  if (k.mode == TN_KERNEL_MODE_WHOLE) return KernelOf<DT, TN_KERNEL_MODE_WHOLE>(k, p, fn);
  if (k.mode == TN_KERNEL_MODE_VECTORS) return KernelOf<DT, TN_KERNEL_MODE_VECTORS>(k, p, fn);
  if (k.mode == TN_KERNEL_MODE_ELEMENTS) return KernelOf<DT, TN_KERNEL_MODE_ELEMENTS>(k, p, fn);
  return KernelOf<DT, TN_KERNEL_MODE_BYTES>(k, p, fn);
}

// Device memory: host memory between two guards of 0xCD bytes.
const size_t kGuard = 4096;
std::map<void *, size_t> allocations;

void CheckGuards(const tn_op_args *a, tn_kernel_key key) {
  for (const auto &e : allocations) {
    const unsigned char *b = (const unsigned char *)e.first;
    for (size_t i = 0; i < kGuard; i++) {
      if (b[-1 - (ptrdiff_t)i] == 0xCD && b[e.second + i] == 0xCD) continue;
      fprintf(stderr,
              "emulator: %s (%s, %lld rows, %lld heads, dim %lld; kernel family %d shape %d mode %d) wrote %zu bytes "
              "%s an allocation of %zu bytes\n",
              tn_op_name(a->op), tn_dtype_name(a->x->dtype), (long long)a->x->rows, (long long)a->x->heads,
              (long long)a->x->dim, (int)key.family, key.shape, key.mode, i + 1,
              b[-1 - (ptrdiff_t)i] != 0xCD ? "before" : "after", e.second);
      abort();
    }
  }
}

int device_state;

tn_status Open(tn_context *, void **state) {
  *state = &device_state;
  return TN_OK;
}
void Close(void *) {}
int DeviceCount(void *) { return 1; }

tn_status Run(void *, tn_context *ctx, const tn_op_args *a, const tn_run_options *options) {
  tn_kernel_key key;
  tn_kernel_params p;
  int block;
  int64_t blocks;
  unsigned smem;
  TN_FORWARD_IF_ERROR(emu_plan(ctx, a, options, &key, &p, &block, &blocks, &smem));
  TN_RETURN_ERROR_IF(!tn_kernel_family_has(key.family, key.shape, key.mode), ctx, TN_ERR_INTERNAL,
                     "emulator: the kernel chosen (family %d shape %d mode %d) is not in the registry", (int)key.family,
                     key.shape, key.mode);
  Kernel fn;
  const bool found = a->x->dtype == TN_F32   ? KernelOfDtype<TN_KERNEL_F32>(key, p, fn)
                     : a->x->dtype == TN_F16 ? KernelOfDtype<TN_KERNEL_F16>(key, p, fn)
                                             : KernelOfDtype<TN_KERNEL_BF16>(key, p, fn);
  TN_RETURN_ERROR_IF(!found, ctx, TN_ERR_UNAVAILABLE, "emulator: family %d is not emulated", (int)key.family);
  emu_launch((unsigned)blocks, (unsigned)block, smem, fn);
  CheckGuards(a, key);
  return TN_OK;
}

tn_status Prepare(void *, tn_context *, const tn_op_args *, const tn_run_options *) { return TN_OK; }

tn_status Alloc(void *, tn_context *, int, size_t bytes, void **ptr) {
  if (bytes == 0) {
    *ptr = nullptr;
    return TN_OK;
  }
  const size_t n = (bytes + 255) / 256 * 256;
  unsigned char *b = (unsigned char *)aligned_alloc(256, n + 2 * kGuard);
  if (b == nullptr) return TN_ERR_NO_MEMORY;
  memset(b, 0xCD, kGuard);
  memset(b + kGuard + n, 0xCD, kGuard);
  *ptr = b + kGuard;
  allocations[*ptr] = n;
  return TN_OK;
}

tn_status Release(void *, tn_context *, int, void *ptr) {
  if (ptr == nullptr) return TN_OK;
  allocations.erase(ptr);
  free((unsigned char *)ptr - kGuard);
  return TN_OK;
}

tn_status Copy(void *, tn_context *, void *dst, tn_device, const void *src, tn_device, size_t bytes) {
  memcpy(dst, src, bytes);
  return TN_OK;
}
tn_status Synchronize(void *, tn_context *, int) { return TN_OK; }
tn_status SetStream(void *, tn_context *, void *) { return TN_OK; }

}  // namespace

extern "C" {
extern const tn_backend tn_cuda_backend;
const tn_backend tn_cuda_backend = {
    .name = "cuda (emulated on the host)",
    .kind = TN_DEVICE_CUDA,
    .open = Open,
    .close = Close,
    .device_count = DeviceCount,
    .run = Run,
    .prepare = Prepare,
    .alloc = Alloc,
    .release = Release,
    .copy = Copy,
    .synchronize = Synchronize,
    .set_stream = SetStream,
};
tn_status tn_cuda_build_all(tn_context *ctx, int, int *) {
  return tn_error(ctx, TN_ERR_UNAVAILABLE, "the emulated CUDA backend compiles no kernels");
}
}
