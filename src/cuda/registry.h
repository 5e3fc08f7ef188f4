/* The kernel registry: every kernel the CUDA backend can launch is named by a key (family, dtype, row
 * shape, access mode); its source is compiled with NVRTC on first use for the device's architecture and
 * kept in the disk cache. This part needs no GPU, so a machine without one can compile (and so check)
 * every variant. Loading onto a device and the in-memory cache are the backend's (backend.c). */
#ifndef TN_CUDA_REGISTRY_H
#define TN_CUDA_REGISTRY_H

#include <stddef.h>
#include <stdint.h>

#include "kernels/params.h"
#include "tnorm.h"

/* norm.cu: rms_norm and l2_norm, and rms_norm with a multiplicand; add_rms_norm.cu: add_rms_norm, and
 * add_rms_norm with a multiplicand;
 * elementwise.cu: add, mul and scale (whose key's shape is the op: TN_KERNEL_ELEMENTWISE_*). */
typedef enum tn_kernel_family {
  TN_FAMILY_NORM = 0,
  TN_FAMILY_NORM_MUL = 1,
  TN_FAMILY_ADD_NORM = 2,
  TN_FAMILY_ADD_NORM_MUL = 3,
  TN_FAMILY_ELEMENTWISE = 4,
  TN_FAMILY_COUNT = 5
} tn_kernel_family;


/* Row shapes: 0 .. 10 keep rows in registers with G = 1 << shape threads per row; then the staged ones;
 * then the few-rows ("wide") form of the register shapes with G = 64, 128, 256 and 512, which the backend
 * picks for those G when every row gets a block of its own (it reduces a row exactly as the register
 * shape of the same G). */
#define TN_SHAPE_REGISTER_COUNT 11
#define TN_SHAPE_SHARED 11
#define TN_SHAPE_REREAD 12
#define TN_SHAPE_WIDE_FIRST 13 /* G = TN_KERNEL_WIDE_MIN_GROUP */
#define TN_SHAPE_COUNT 17
/* Access modes and elementwise ops: TN_KERNEL_MODE_* and TN_KERNEL_ELEMENTWISE_* (kernels/params.h). */

typedef struct tn_kernel_key {
  tn_kernel_family family;
  tn_dtype dtype;
  int shape;
  int mode;
} tn_kernel_key;

/* The row families have TN_SHAPE_COUNT shapes, the elementwise family TN_KERNEL_ELEMENTWISE_COUNT ops. */
#define TN_KERNEL_VARIANTS                                                                          \
  ((TN_FAMILY_COUNT - 1) * TN_DTYPE_COUNT * TN_SHAPE_COUNT * TN_KERNEL_MODE_COUNT +                        \
   TN_DTYPE_COUNT * TN_KERNEL_ELEMENTWISE_COUNT * TN_KERNEL_MODE_COUNT)

int tn_kernel_key_index(tn_kernel_key key);
tn_kernel_key tn_kernel_key_at(int index);
/* The kernel's C++ name expression, e.g. "tn_norm_registers<2,128,2>". */
void tn_kernel_name(tn_kernel_key key, char *out, size_t capacity);

/* The row shape for rows of dim elements of dtype: the threads per row (and so the reduction order)
 * follow from (dtype, dim) alone. max_stage_bytes: the most dynamic shared memory a block may have. */
int tn_kernel_row_shape(tn_dtype dtype, int64_t dim, size_t max_stage_bytes);
/* Threads per row of a row shape (the reduction's group), threads per block of a row shape, and rows a
 * block takes at a time. */
int tn_kernel_group_threads(int shape);
int tn_kernel_block_threads(int shape);
int tn_kernel_rows_per_block(int shape);
/* The wide shape of register shape `shape`, or -1 when it has none. */
int tn_kernel_wide_shape(int shape);
int tn_kernel_shape_is_wide(int shape);
/* Threads per block of any kernel. */
int tn_kernel_key_block_threads(tn_kernel_key key);

/* A compiled kernel: the mangled name to look up in the module, then the cubin. */
typedef struct tn_kernel_binary {
  char *blob; /* lowered name, NUL, cubin */
  size_t size;
  const char *lowered_name;
  const void *cubin;
  size_t cubin_size;
} tn_kernel_binary;

/* Builds the kernel for compute capability `arch` (90 for sm_90): from the disk cache when a valid
 * entry is there, else with NVRTC (then stored). A compile failure returns TN_ERR_BACKEND with the
 * NVRTC log in the message. */
tn_status tn_kernel_build(tn_context *ctx, tn_kernel_key key, int arch, tn_kernel_binary *out);
void tn_kernel_binary_free(tn_kernel_binary *b);

/* Compiles `source` (which may include "row.cuh" and "params.h") and returns the binary of the kernel
 * named by name_expression; no disk cache. For tests of the compile path itself. */
tn_status tn_kernel_compile_source(tn_context *ctx, const char *source, const char *name_expression, int arch,
                                   tn_kernel_binary *out);

/* Process-wide counters (see tn_kernel_cache_stats in tnorm.h). */
void tn_kernel_stats_add_memory_hit(void);
void tn_kernel_stats_get(tn_kernel_cache_stats *out);

#endif
