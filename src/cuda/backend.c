/* The CUDA backend: devices (primary contexts, attributes read once), kernels loaded from the registry
 * onto each device and kept for the process, and the launch of an op on the context's stream.
 *
 * An op does no allocation, no synchronisation and no device query: everything it needs about the
 * device was read when the device was first used, and its kernel was loaded on first use (or by
 * tn_op_prepare). Kernels are launched with programmatic stream serialisation on sm_90 and later, so
 * a kernel's launch overlaps the tail of the one before it (the kernels wait on griddepcontrol.wait
 * before touching memory); TNORM_CUDA_PDL=0 turns that off. */
#include "backend.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../core/context.h"
#include "../core/error.h"
#include "../core/ops.h"
#include "../core/tensor.h"
#include "driver.h"
#include "registry.h"

#define TN_CUDA_MAX_DEVICES 64

#define TN_MAX_GRID_BLOCKS 2147483647 /* CUDA's limit on gridDim.x */

typedef struct loaded_kernel {
  _Atomic int ready;
  CUfunction fn;
  int blocks_per_sm; /* occupancy without dynamic shared memory (the elementwise kernels' grid) */
} loaded_kernel;

typedef struct device_info {
  CUdevice dev;
  CUcontext primary;
  int arch; /* 10 * major + minor */
  int sms;
  int max_block_smem; /* opt-in maximum per block */
  int pdl;
  loaded_kernel kernels[TN_KERNEL_VARIANTS];
} device_info;

/* Process-wide: devices are opened once and their kernels shared by every context. */
static pthread_mutex_t registry_lock = PTHREAD_MUTEX_INITIALIZER;
static device_info *_Atomic devices[TN_CUDA_MAX_DEVICES];

typedef struct cuda_state {
  const tn_cuda_driver *cu;
  int device_count;
  CUstream stream;
  /* While capturing a graph, runs go to capture_streams[capture_index] (created on first use, per device)
   * rather than the caller's stream, which may itself be capturing or busy. */
  int capturing, capture_index;
  CUstream capture_streams[TN_CUDA_MAX_DEVICES];
} cuda_state;

static tn_status cuda_open(tn_context *ctx, void **state) {
  const char *reason = NULL;
  const tn_cuda_driver *cu = tn_cuda_driver_get(&reason);
  TN_RETURN_ERROR_IF(cu == NULL, ctx, TN_ERR_UNAVAILABLE, "CUDA unavailable: %s", reason);
  int count = 0;
  CUresult r = cu->DeviceGetCount(&count);
  if (r != CUDA_SUCCESS) {
    tn_cuda_error(ctx, r, "cuDeviceGetCount");
    return tn_error(ctx, TN_ERR_UNAVAILABLE, "CUDA unavailable: %s", tn_context_last_error(ctx));
  }
  TN_RETURN_ERROR_IF(count <= 0, ctx, TN_ERR_UNAVAILABLE, "CUDA unavailable: the driver sees no CUDA device");
  TN_RETURN_ERROR_IF(tn_nvrtc_get(&reason) == NULL, ctx, TN_ERR_UNAVAILABLE, "CUDA unavailable: %s", reason);
  cuda_state *s = calloc(1, sizeof *s);
  TN_RETURN_ERROR_IF(s == NULL, ctx, TN_ERR_NO_MEMORY, "cuda: out of memory creating the backend");
  s->cu = cu;
  s->device_count = count < TN_CUDA_MAX_DEVICES ? count : TN_CUDA_MAX_DEVICES;
  *state = s;
  return TN_OK;
}

static void cuda_close(void *state) {
  cuda_state *s = state;
  for (int i = 0; i < s->device_count; i++) {
    device_info *d = atomic_load_explicit(&devices[i], memory_order_acquire);
    if (s->capture_streams[i] == NULL || d == NULL) continue;
    CUcontext popped;
    if (s->cu->CtxPushCurrent(d->primary) != CUDA_SUCCESS) continue;
    s->cu->StreamDestroy(s->capture_streams[i]);
    s->cu->CtxPopCurrent(&popped);
  }
  free(s);
}

static int cuda_device_count(void *state) { return ((cuda_state *)state)->device_count; }

static tn_status device_open(cuda_state *s, tn_context *ctx, int index, device_info *d) {
  const tn_cuda_driver *cu = s->cu;
  int major = 0, minor = 0;
  TN_CUDA_CALL(ctx, cu->DeviceGet(&d->dev, index), "cuDeviceGet");
  TN_CUDA_CALL(ctx, cu->DeviceGetAttribute(&major, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, d->dev), "attribute");
  TN_CUDA_CALL(ctx, cu->DeviceGetAttribute(&minor, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, d->dev), "attribute");
  TN_CUDA_CALL(ctx, cu->DeviceGetAttribute(&d->sms, CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, d->dev), "attribute");
  TN_CUDA_CALL(ctx,
               cu->DeviceGetAttribute(&d->max_block_smem, CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN, d->dev),
               "attribute");
  TN_RETURN_ERROR_IF(major < 7, ctx, TN_ERR_UNAVAILABLE, "cuda: device %d has compute capability %d.%d; tnorm needs 7.0",
                     index, major, minor);
  TN_CUDA_CALL(ctx, cu->DevicePrimaryCtxRetain(&d->primary, d->dev), "cuDevicePrimaryCtxRetain");
  d->arch = major * 10 + minor;
  const char *pdl = getenv("TNORM_CUDA_PDL");
  d->pdl = major >= 9 && !(pdl != NULL && strcmp(pdl, "0") == 0);
  return TN_OK;
}

/* The device's info, opened on first use (the primary context is retained for the process). */
static tn_status device_get(cuda_state *s, tn_context *ctx, int index, device_info **out) {
  TN_RETURN_ERROR_IF(index < 0 || index >= s->device_count, ctx, TN_ERR_DEVICE,
                     "cuda: device %d does not exist; this machine has %d", index, s->device_count);
  device_info *d = atomic_load_explicit(&devices[index], memory_order_acquire);
  if (d != NULL) {
    *out = d;
    return TN_OK;
  }
  pthread_mutex_lock(&registry_lock);
  tn_status st = TN_OK;
  d = atomic_load_explicit(&devices[index], memory_order_relaxed);
  if (d == NULL) {
    d = calloc(1, sizeof *d);
    if (d == NULL) {
      st = tn_error(ctx, TN_ERR_NO_MEMORY, "cuda: out of memory opening device %d", index);
    } else if ((st = device_open(s, ctx, index, d)) != TN_OK) {
      free(d);
      d = NULL;
    } else {
      atomic_store_explicit(&devices[index], d, memory_order_release);
    }
  }
  pthread_mutex_unlock(&registry_lock);
  *out = d;
  return st;
}

/* Stage bytes a staged block may use: the opt-in maximum less the kernel's own shared memory. */
static size_t max_stage_bytes(const device_info *d) {
  return d->max_block_smem > 1024 ? (size_t)d->max_block_smem - 1024 : 0;
}

/* Every driver call that needs a context runs between enter_device (the device opened, its primary context
 * pushed) and leave_device (popped; the call's result, named `what`, made a status). */
static tn_status push_device(const cuda_state *s, tn_context *ctx, const device_info *d) {
  TN_CUDA_CALL(ctx, s->cu->CtxPushCurrent(d->primary), "cuCtxPushCurrent");
  return TN_OK;
}

static tn_status enter_device(cuda_state *s, tn_context *ctx, int index, device_info **d) {
  TN_FORWARD_IF_ERROR(device_get(s, ctx, index, d));
  return push_device(s, ctx, *d);
}

static tn_status leave_device(const cuda_state *s, tn_context *ctx, CUresult r, const char *what) {
  CUcontext popped;
  s->cu->CtxPopCurrent(&popped);
  return r == CUDA_SUCCESS ? TN_OK : tn_cuda_error(ctx, r, what);
}

static tn_status load_kernel(cuda_state *s, tn_context *ctx, device_info *d, tn_kernel_key key, loaded_kernel *k) {
  const tn_cuda_driver *cu = s->cu;
  tn_kernel_binary bin;
  TN_FORWARD_IF_ERROR(tn_kernel_build(ctx, key, d->arch, &bin));
  tn_status st = TN_OK;
  CUmodule module;
  CUfunction fn;
  CUresult r;
  if ((st = push_device(s, ctx, d)) != TN_OK) {
    tn_kernel_binary_free(&bin);
    return st;
  }
  const int block = tn_kernel_key_block_threads(key);
  int blocks = 0, static_smem = 0;
  if ((r = cu->ModuleLoadData(&module, bin.cubin)) != CUDA_SUCCESS) {
    st = tn_cuda_error(ctx, r, "cuModuleLoadData");
  } else if ((r = cu->ModuleGetFunction(&fn, module, bin.lowered_name)) != CUDA_SUCCESS) {
    st = tn_cuda_error(ctx, r, "cuModuleGetFunction");
  } else if ((r = cu->FuncGetAttribute(&static_smem, CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES, fn)) != CUDA_SUCCESS) {
    st = tn_cuda_error(ctx, r, "cuFuncGetAttribute");
  } else if ((key.shape == TN_SHAPE_SHARED || key.family == TN_FAMILY_ROPE) &&
             (r = cu->FuncSetAttribute(fn, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                                       d->max_block_smem - static_smem)) != CUDA_SUCCESS) {
    st = tn_cuda_error(ctx, r, "cuFuncSetAttribute");
  } else if ((r = cu->OccupancyMaxActiveBlocksPerMultiprocessor(&blocks, fn, block, 0)) != CUDA_SUCCESS) {
    st = tn_cuda_error(ctx, r, "cuOccupancyMaxActiveBlocksPerMultiprocessor");
  }
  leave_device(s, ctx, CUDA_SUCCESS, NULL);
  tn_kernel_binary_free(&bin);
  if (st != TN_OK) return st; /* a module that loaded stays loaded: harmless, and rare */
  k->fn = fn;
  k->blocks_per_sm = blocks > 0 ? blocks : 1;
  return TN_OK;
}

/* The kernel on device d, loaded on first use; thread-safe (one lock for the registry). */
static tn_status kernel_get(cuda_state *s, tn_context *ctx, device_info *d, tn_kernel_key key, loaded_kernel **out) {
  loaded_kernel *k = &d->kernels[tn_kernel_key_index(key)];
  if (atomic_load_explicit(&k->ready, memory_order_acquire)) {
    tn_kernel_stats_add_memory_hit();
    *out = k;
    return TN_OK;
  }
  pthread_mutex_lock(&registry_lock);
  tn_status st = TN_OK;
  if (!atomic_load_explicit(&k->ready, memory_order_relaxed)) {
    st = load_kernel(s, ctx, d, key, k);
    if (st == TN_OK) atomic_store_explicit(&k->ready, 1, memory_order_release);
  } else {
    tn_kernel_stats_add_memory_hit();
  }
  pthread_mutex_unlock(&registry_lock);
  *out = k;
  return st;
}

/* ---- choosing and launching a kernel ---- */

static int aligned(const void *p, size_t a) { return ((uintptr_t)p & (a - 1)) == 0; }

/* The access mode every operand allows: 16-byte vectors when each pointer is 16-byte aligned and each row
 * pitch (and head pitch, in a 3-D view) a multiple of 16 bytes; element accesses when each pointer is
 * aligned to its element; else bytes. A rope's table and positions are read element by element in every
 * mode: they need only their elements aligned. */
static int access_mode(const tn_op_args *a) {
  int vectors = 1, elements = 1;
  for (int o = 0; o < TN_OPERAND_COUNT; o++) {
    const tn_tensor *t = tn_op_operand(a, (tn_operand)o);
    if (t == NULL) continue;
    const size_t es = tn_dtype_size(t->dtype);
    if (o != TN_OPERAND_COS_SIN && (!aligned(t->data, 16) || ((size_t)t->row_stride * es) % 16 != 0)) vectors = 0;
    if (tn_tensor_head_count(t) > 1 && ((size_t)t->head_stride * es) % 16 != 0) vectors = 0;
    if (!aligned(t->data, es)) elements = 0;
  }
  if (a->rope.style != TN_ROPE_NONE && !aligned(a->rope.positions, 4)) elements = 0;
  return vectors && elements ? TN_KERNEL_MODE_VECTORS : elements ? TN_KERNEL_MODE_ELEMENTS : TN_KERNEL_MODE_BYTES;
}

/* Whether the call is an l2_norm with a scale other than 1 (a product by 1 changes no bit, so a scale of 1
 * is no scale): norm_x's kernels multiply by it, the norm family's have no code for it. */
static int l2_scaled(const tn_op_args *a) { return a->op == TN_OP_L2_NORM && a->scale != 1.0f; }

/* The family of an op (registry.h): the default path of each op to the first four or the unweighted one,
 * whose kernels carry no run-time knob; the rest by what the call needs. */
static tn_kernel_family family_for(const tn_op_args *a) {
  /* TN_CASTING_LLAMA's roundings to float32 change nothing: f32 calls keep the default path. */
  const int llama = a->casting == TN_CASTING_LLAMA && a->x->dtype != TN_F32;
  const int heads = tn_tensor_head_count(a->x) > 1;
  if (a->rope.style != TN_ROPE_NONE) return TN_FAMILY_ROPE;
  if (tn_op_adds_residual(a->op)) {
    /* A residual of x's dtype whose sum is normalised as stored (with f32 the two modes agree): the
     * chunk-holding families; else the float32 row of general.cu. */
    const int plain = a->residual->dtype == a->x->dtype &&
                      (a->residual_mode == TN_RESIDUAL_NORM_STORED || a->x->dtype == TN_F32);
    if (!plain) return TN_FAMILY_GENERAL;
    /* layer_norm.cu's kernels have no TN_CASTING_LLAMA (its rounding costs a branch per element). */
    if (a->op == TN_OP_ADD_LAYER_NORM) return llama ? TN_FAMILY_GENERAL : TN_FAMILY_ADD_LAYER;
    if (!llama) return a->mul != NULL ? TN_FAMILY_ADD_NORM_MUL : TN_FAMILY_ADD_NORM;
    return a->mul != NULL ? TN_FAMILY_GENERAL : TN_FAMILY_NORM_X;
  }
  if (a->op == TN_OP_LAYER_NORM) return llama ? TN_FAMILY_GENERAL : TN_FAMILY_LAYER;
  if (a->mul != NULL) return !llama && !heads ? TN_FAMILY_NORM_MUL : TN_FAMILY_GENERAL;
  if (llama || heads || l2_scaled(a) || a->l2_mode != TN_L2_RSQRT_EPS) return TN_FAMILY_NORM_X;
  return a->weight != NULL ? TN_FAMILY_NORM : TN_FAMILY_NORM_UNWEIGHTED;
}

static int64_t rotary_dim_of(const tn_op_args *a) { return a->rope.rotary_dim != 0 ? a->rope.rotary_dim : a->x->dim; }

/* Threads a head of rope.cu's paired kernels, for a row shape of g threads (whole chunks: the kernel's
 * count of them is the same). */
static int rope_paired_group(const tn_op_args *a, int g) {
  return TN_KERNEL_ROPE_PAIRED_GROUP(g, a->x->dim / tn_kernel_chunk_elements(a->x->dtype));
}

/* Whether a rope with whole chunks, a row shape of g threads, can take rope.cu's paired kernels: rotary_dim
 * / 2 a whole number of chunks, and every pair in one thread's chunks (GPTJ's always are; NEOX's when the
 * halves are D * rope_paired_group chunks apart, D = 1 or 2 of a thread's four chunks). */
static int rope_paired(const tn_op_args *a, int g) {
  const int64_t v = tn_kernel_chunk_elements(a->x->dtype), half = rotary_dim_of(a) / 2;
  if (half % v != 0) return 0;
  if (a->rope.style == TN_ROPE_GPTJ) return 1;
  const int64_t apart = half / v, threads = rope_paired_group(a, g); /* chunks; threads a head */
  return apart % threads == 0 && (apart / threads == 1 || apart / threads == TN_KERNEL_REG_CHUNKS / 2);
}

/* Vectors a row kernel reduces: rows, or rows x heads of a 3-D view. */
static int64_t vectors_of(const tn_tensor *x) { return x->rows * tn_tensor_head_count(x); }

static tn_kernel_key key_for(const device_info *d, const tn_op_args *a, const tn_run_options *options) {
  tn_kernel_key key;
  key.dtype = a->x->dtype;
  key.mode = access_mode(a);
  if (!tn_op_is_norm(a->op)) {
    key.family = TN_FAMILY_ELEMENTWISE;
    key.shape = a->op == TN_OP_ADD ? TN_KERNEL_ELEMENTWISE_ADD : a->op == TN_OP_MUL ? TN_KERNEL_ELEMENTWISE_MUL : TN_KERNEL_ELEMENTWISE_SCALE;
    return key;
  }
  key.family = family_for(a);
  /* Rows without a partial chunk take the whole-chunk kernels where the family has them (every operand of a
   * row kernel has x's dim, so x's says it for all). */
  if (key.mode == TN_KERNEL_MODE_VECTORS && a->x->dim % tn_kernel_chunk_elements(a->x->dtype) == 0 &&
      tn_kernel_family_has_mode(key.family, TN_KERNEL_MODE_WHOLE))
    key.mode = TN_KERNEL_MODE_WHOLE;
  /* The later families have no element-access kernels: such calls take the byte ones. */
  if (!tn_kernel_family_has_mode(key.family, key.mode)) key.mode = TN_KERNEL_MODE_BYTES;
  /* The shape follows from (family, dtype, dim) alone, as does the reduction order (registry.c), but for an
   * add_rms_norm fused from an add and an rms_norm, which takes rms_norm's; rows few enough for a block each
   * take the family's few-rows form of it, where it has one. */
  key.shape = tn_kernel_call_shape(tn_kernel_order_family(key.family, options->as_rms_norm), a->x->dtype,
                                   a->x->dim, key.mode, max_stage_bytes(d), vectors_of(a->x) <= d->sms);
  /* A rope's whole-chunk kernels are the paired ones (rope.cu): the rest take its vector kernels, of the same
   * shapes. */
  if (key.family == TN_FAMILY_ROPE && key.mode == TN_KERNEL_MODE_WHOLE &&
      !rope_paired(a, tn_kernel_group_threads(key.shape)))
    key.mode = TN_KERNEL_MODE_VECTORS;
  return key;
}

/* A row operand's stride for the kernels: 0 for one row applied to every row of x (a broadcast). */
static long long row_stride_of(const tn_tensor *t, const tn_tensor *x) {
  return t->rows == 1 && x->rows != 1 ? 0 : t->row_stride;
}

/* Threads per block and tokens per block of a rope launch: a token's heads take G threads each; a block
 * takes whole tokens, at least TN_KERNEL_ROPE_MIN_BLOCK threads' worth, at most TN_KERNEL_ROPE_MAX_BLOCK
 * threads (a token with more heads loops over them). */
static void rope_geometry(const tn_op_args *a, int g, int *block, int *tokens_per_block) {
  const int64_t per_token = tn_tensor_head_count(a->x) * g;
  int64_t tpb = 1, threads = per_token;
  if (per_token < TN_KERNEL_ROPE_MIN_BLOCK) {
    tpb = (TN_KERNEL_ROPE_MIN_BLOCK + per_token - 1) / per_token;
    threads = tpb * per_token;
  }
  threads = (threads + 31) / 32 * 32;
  *block = threads < TN_KERNEL_ROPE_MAX_BLOCK ? (int)threads : TN_KERNEL_ROPE_MAX_BLOCK;
  *tokens_per_block = (int)tpb;
}

/* A rope launch's dynamic shared memory (params.h: TN_KERNEL_ROPE_SLOT_CHUNKS). */
static size_t rope_smem(const tn_op_args *a, int g, int block, int tokens_per_block) {
  const size_t rotary = (size_t)rotary_dim_of(a);
  size_t bytes = (size_t)(block / g) * TN_KERNEL_ROPE_SLOT_CHUNKS(g) * 16 + (size_t)tokens_per_block * rotary * 4;
  bytes += (rotary / 2 + 3) / 4 * 16;          /* inv_freq, padded to a multiple of 4 floats */
  bytes += ((size_t)a->x->dim + 7) / 8 * 8 * 4; /* the staged weight, whole chunks */
  return bytes;
}

/* A paired rope launch's (rope.cu: tn_rope_paired): the staged weight, inv_freq padded to a multiple of 4
 * floats, then tokens_per_block rows of rotary_dim floats. */
static size_t rope_paired_smem(const tn_op_args *a, int tokens_per_block) {
  const size_t rotary = (size_t)rotary_dim_of(a);
  return ((size_t)a->x->dim + (rotary / 2 + 3) / 4 * 4 + (size_t)tokens_per_block * rotary) * 4;
}

static tn_kernel_params params_for(const tn_op_args *a) {
  tn_kernel_params p;
  memset(&p, 0, sizeof p);
  p.x = a->x->data;
  p.x_stride = a->x->row_stride;
  p.y = a->y->data;
  p.y_stride = a->y->row_stride;
  p.rows = a->x->rows;
  p.dim = a->x->dim;
  p.eps = a->eps;
  p.scale = a->scale;
  p.weight_offset = a->weight_offset;
  p.count = a->op == TN_OP_L2_NORM ? 1.0f : (float)a->x->dim;
  p.has_scale = l2_scaled(a) || a->op == TN_OP_SCALE;
  if (a->weight != NULL) {
    p.weight = a->weight->data;
    p.has_weight = 1;
    p.weight_f32 = a->weight->dtype == TN_F32;
  }
  if (a->op == TN_OP_ADD || a->op == TN_OP_MUL) { /* the elementwise kernel reads b as the residual */
    const tn_tensor *b = a->op == TN_OP_ADD ? a->residual : a->mul;
    p.residual = b->data;
    p.residual_stride = row_stride_of(b, a->x);
    return p;
  }
  if (a->mul != NULL) {
    p.mul = a->mul->data;
    p.mul_stride = a->mul->row_stride;
    p.mul_head_stride = a->mul->head_stride;
  }
  if (a->residual != NULL) {
    p.residual = a->residual->data;
    p.residual_stride = a->residual->row_stride;
  }
  if (a->residual_out != NULL) {
    p.residual_out = a->residual_out->data;
    p.residual_out_stride = a->residual_out->row_stride;
  }
  /* The later families' fields (norm.cu and add_rms_norm.cu read none of them). */
  const int64_t heads = tn_tensor_head_count(a->x);
  const int half_dtype = a->x->dtype != TN_F32;
  p.heads = heads;
  p.x_head_stride = a->x->head_stride;
  p.y_head_stride = a->y->head_stride;
  int flags = 0;
  if (a->casting == TN_CASTING_LLAMA) flags |= TN_KERNEL_FLAG_LLAMA;
  if (a->op == TN_OP_L2_NORM && a->l2_mode == TN_L2_MAX_NORM_EPS) flags |= TN_KERNEL_FLAG_MAX_NORM;
  if (tn_op_adds_residual(a->op)) {
    flags |= TN_KERNEL_FLAG_ADD;
    if (half_dtype && a->residual->dtype == TN_F32) flags |= TN_KERNEL_FLAG_RESIDUAL_F32;
    if (a->residual->dtype == a->x->dtype && a->residual_mode == TN_RESIDUAL_NORM_STORED) flags |= TN_KERNEL_FLAG_ROUND_SUM;
  }
  if (tn_op_is_layer_norm(a->op)) flags |= TN_KERNEL_FLAG_LAYER;
  if (a->mul != NULL) flags |= TN_KERNEL_FLAG_MUL;
  if (a->bias != NULL) {
    flags |= TN_KERNEL_FLAG_BIAS;
    p.bias = a->bias->data;
    p.bias_f32 = a->bias->dtype == TN_F32;
  }
  if (a->rope.style != TN_ROPE_NONE) {
    /* rope.cu: rows are the tokens, heads the vectors of each (a 2-D view: one each) */
    if (a->rope.style == TN_ROPE_GPTJ) flags |= TN_KERNEL_FLAG_ROPE_GPTJ;
    if (a->rope.positions_i64) flags |= TN_KERNEL_FLAG_POS_I64;
    p.positions = a->rope.positions;
    p.rotary_dim = (int)rotary_dim_of(a);
    p.theta = a->rope.theta;
    if (a->rope.cos_sin != NULL) {
      flags |= TN_KERNEL_FLAG_ROPE_TABLE;
      if (a->rope.cos_sin->dtype == TN_F32) flags |= TN_KERNEL_FLAG_TABLE_F32;
      p.cos_sin = a->rope.cos_sin->data;
      p.cos_sin_stride = a->rope.cos_sin->row_stride;
      p.cos_sin_rows = a->rope.cos_sin->rows;
    }
  } else if (heads > 1) {
    /* Row kernels reduce vectors: a 3-D view's rows x heads of them. */
    flags |= TN_KERNEL_FLAG_HEADS;
    p.rows = a->x->rows * heads;
  }
  p.flags = flags;
  return p;
}

static tn_status cuda_prepare_on(cuda_state *s, tn_context *ctx, const tn_op_args *a, const tn_run_options *options,
                                 device_info **d, loaded_kernel **k, tn_kernel_key *key) {
  TN_RETURN_ERROR_IF(a->quant.format != TN_QUANT_NONE, ctx, TN_ERR_UNAVAILABLE,
                     "%s: quantized outputs (%s) run on the CPU backend only; this build has no CUDA kernels for "
                     "them", tn_op_name(a->op), tn_quant_format_name(a->quant.format));
  TN_FORWARD_IF_ERROR(device_get(s, ctx, a->x->device.index, d));
  *key = key_for(*d, a, options);
  return kernel_get(s, ctx, *d, *key, k);
}

static tn_status cuda_prepare(void *state, tn_context *ctx, const tn_op_args *a, const tn_run_options *options) {
  device_info *d;
  loaded_kernel *k;
  tn_kernel_key key;
  return cuda_prepare_on(state, ctx, a, options, &d, &k, &key);
}

/* A launch: the kernel's arguments, threads per block, blocks and dynamic shared memory. */
typedef struct launch_plan {
  tn_kernel_params p;
  int block;
  int64_t blocks;
  unsigned dynamic_smem;
} launch_plan;

static tn_status plan_launch(tn_context *ctx, const device_info *d, const tn_op_args *a, tn_kernel_key key,
                             int blocks_per_sm, const tn_run_options *options, launch_plan *plan) {
  tn_kernel_params p = params_for(a);
  p.round_before_last = options->round_before_last;
  int block = tn_kernel_key_block_threads(key);
  int64_t blocks;
  unsigned dynamic_smem = 0;
  if (key.family == TN_FAMILY_ELEMENTWISE) { /* one thread per 16-byte chunk of every row */
    const int64_t per_chunk = tn_kernel_chunk_elements(a->x->dtype);
    blocks = (a->x->rows * ((a->x->dim + per_chunk - 1) / per_chunk) + block - 1) / block;
    /* A grid that strides over the chunks: at most what is resident at once. */
    const int64_t resident = (int64_t)blocks_per_sm * d->sms;
    if (blocks > resident) blocks = resident;
  } else if (key.family == TN_FAMILY_ROPE) {
    const int64_t heads = tn_tensor_head_count(a->x);
    size_t smem;
    if (key.mode == TN_KERNEL_MODE_WHOLE) {
      /* The paired kernels take the vectors of the 3-D view as a register row kernel does, each head on
       * rope_paired_group threads; tokens_per_block: the most tokens a block's heads in a row can touch. */
      const int64_t per_block = block / rope_paired_group(a, tn_kernel_group_threads(key.shape));
      p.tokens_per_block = (int)((per_block - 1 + heads - 1) / heads + 1);
      blocks = (vectors_of(a->x) + per_block - 1) / per_block;
      smem = rope_paired_smem(a, p.tokens_per_block);
    } else {
      const int g = tn_kernel_group_threads(key.shape);
      int tokens_per_block;
      rope_geometry(a, g, &block, &tokens_per_block);
      p.tokens_per_block = tokens_per_block;
      blocks = (a->x->rows + tokens_per_block - 1) / tokens_per_block;
      smem = rope_smem(a, g, block, tokens_per_block);
    }
    TN_RETURN_ERROR_IF(smem > (size_t)max_stage_bytes(d), ctx, TN_ERR_SHAPE,
                       "rms_norm: a rope over %lld heads of %lld elements needs %zu bytes of shared memory a block; "
                       "this device has %zu", (long long)heads, (long long)a->x->dim, smem, max_stage_bytes(d));
    dynamic_smem = (unsigned)smem;
    if (blocks > TN_MAX_GRID_BLOCKS) blocks = TN_MAX_GRID_BLOCKS;
  } else {
    const int64_t rows_per_block = tn_kernel_rows_per_block(key.shape);
    blocks = (vectors_of(a->x) + rows_per_block - 1) / rows_per_block;
    if (key.shape == TN_SHAPE_SHARED) dynamic_smem = (unsigned)tn_kernel_stage_bytes(key.family, a->x->dtype, a->x->dim);
    /* A block for every row (or every block's worth of rows), as far as the grid's limit goes; the
     * kernels stride over any rows beyond it. A block that finishes a row hands its slot to a fresh
     * block at once, so rows in every phase (loading, reducing, storing) overlap on each SM, where in a
     * grid of only the resident blocks, each striding over many rows, a block waits on its own row's
     * loads before it asks for the next row (docs/performance.md, "The grid and the fetch distance
     * (backend.c)"). */
    if (blocks > TN_MAX_GRID_BLOCKS) blocks = TN_MAX_GRID_BLOCKS;
  }
  /* The kernels that fetch ahead (rope.cu's paired ones their table rows, the row kernels of row.cuh's
   * tn_fetch_row_ahead their rows of x and of the residual) do so for the block half a wave of resident
   * blocks on, which runs faster than a whole wave on (docs/performance.md, "The grid and the fetch
   * distance (backend.c)"). */
  p.ahead_blocks = (int)(blocks_per_sm * d->sms / 2);
  plan->p = p;
  plan->block = block;
  plan->blocks = blocks;
  plan->dynamic_smem = dynamic_smem;
  return TN_OK;
}

static tn_status cuda_run(void *state, tn_context *ctx, const tn_op_args *a, const tn_run_options *options) {
  cuda_state *s = state;
  const tn_cuda_driver *cu = s->cu;
  device_info *d;
  loaded_kernel *k;
  tn_kernel_key key;
  TN_FORWARD_IF_ERROR(cuda_prepare_on(s, ctx, a, options, &d, &k, &key));
  launch_plan plan;
  TN_FORWARD_IF_ERROR(plan_launch(ctx, d, a, key, k->blocks_per_sm, options, &plan));

  CUlaunchAttribute attr;
  memset(&attr, 0, sizeof attr);
  attr.id = CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
  attr.value.programmaticStreamSerializationAllowed = 1;
  CUlaunchConfig config;
  memset(&config, 0, sizeof config);
  config.gridDimX = (unsigned)plan.blocks;
  config.gridDimY = 1;
  config.gridDimZ = 1;
  config.blockDimX = (unsigned)plan.block;
  config.blockDimY = 1;
  config.blockDimZ = 1;
  config.sharedMemBytes = plan.dynamic_smem;
  config.hStream = s->capturing ? s->capture_streams[s->capture_index] : s->stream;
  config.attrs = d->pdl ? &attr : NULL;
  config.numAttrs = d->pdl ? 1 : 0;
  void *kernel_args[] = {&plan.p};

  TN_FORWARD_IF_ERROR(push_device(s, ctx, d));
  return leave_device(s, ctx, cu->LaunchKernelEx(&config, k->fn, kernel_args, NULL), "kernel launch");
}

/* ---- memory, streams, events ---- */

static tn_status cuda_alloc(void *state, tn_context *ctx, int index, size_t bytes, void **ptr) {
  cuda_state *s = state;
  if (bytes == 0) {
    *ptr = NULL;
    return TN_OK;
  }
  CUdeviceptr p = 0;
  device_info *d;
  TN_FORWARD_IF_ERROR(enter_device(s, ctx, index, &d));
  TN_FORWARD_IF_ERROR(leave_device(s, ctx, s->cu->MemAlloc(&p, bytes), "cuMemAlloc"));
  *ptr = (void *)(uintptr_t)p;
  return TN_OK;
}

static tn_status cuda_release(void *state, tn_context *ctx, int index, void *ptr) {
  cuda_state *s = state;
  if (ptr == NULL) return TN_OK;
  device_info *d;
  TN_FORWARD_IF_ERROR(enter_device(s, ctx, index, &d));
  return leave_device(s, ctx, s->cu->MemFree((CUdeviceptr)(uintptr_t)ptr), "cuMemFree");
}

static CUresult copy_and_wait(const tn_cuda_driver *cu, CUstream stream, void *dst, const void *src, size_t bytes,
                              int wait) {
  CUresult r = cu->MemcpyAsync((CUdeviceptr)(uintptr_t)dst, (CUdeviceptr)(uintptr_t)src, bytes, stream);
  if (r == CUDA_SUCCESS && wait) r = cu->StreamSynchronize(stream);
  return r;
}

static tn_status cuda_copy(void *state, tn_context *ctx, void *dst, tn_device dst_device, const void *src,
                           tn_device src_device, size_t bytes) {
  cuda_state *s = state;
  if (bytes == 0) return TN_OK;
  const int index = dst_device.kind == TN_DEVICE_CUDA ? dst_device.index : src_device.index;
  const int host_side = dst_device.kind != TN_DEVICE_CUDA || src_device.kind != TN_DEVICE_CUDA;
  device_info *d;
  TN_FORWARD_IF_ERROR(enter_device(s, ctx, index, &d));
  return leave_device(s, ctx, copy_and_wait(s->cu, s->stream, dst, src, bytes, host_side), "memcpy");
}

static tn_status cuda_synchronize(void *state, tn_context *ctx, int index) {
  cuda_state *s = state;
  device_info *d;
  TN_FORWARD_IF_ERROR(enter_device(s, ctx, index, &d));
  return leave_device(s, ctx, s->cu->StreamSynchronize(s->stream), "synchronize");
}

static tn_status cuda_set_stream(void *state, tn_context *ctx, void *stream) {
  (void)ctx;
  ((cuda_state *)state)->stream = (CUstream)stream;
  return TN_OK;
}

typedef struct cuda_event {
  CUevent event;
  int index;
} cuda_event;

static tn_status cuda_event_create(void *state, tn_context *ctx, int index, void **event) {
  cuda_state *s = state;
  cuda_event *e = calloc(1, sizeof *e);
  TN_RETURN_ERROR_IF(e == NULL, ctx, TN_ERR_NO_MEMORY, "event_create: out of memory");
  e->index = index;
  device_info *d;
  tn_status st = enter_device(s, ctx, index, &d);
  if (st == TN_OK) st = leave_device(s, ctx, s->cu->EventCreate(&e->event, CU_EVENT_DEFAULT), "cuEventCreate");
  if (st != TN_OK) {
    free(e);
    return st;
  }
  *event = e;
  return TN_OK;
}

static tn_status cuda_event_record(void *state, tn_context *ctx, void *event) {
  cuda_state *s = state;
  cuda_event *e = event;
  device_info *d;
  TN_FORWARD_IF_ERROR(enter_device(s, ctx, e->index, &d));
  return leave_device(s, ctx, s->cu->EventRecord(e->event, s->stream), "cuEventRecord");
}

static tn_status cuda_event_elapsed(void *state, tn_context *ctx, void *start, void *end, double *ms) {
  cuda_state *s = state;
  cuda_event *a = start, *b = end;
  float f = 0;
  TN_CUDA_CALL(ctx, s->cu->EventSynchronize(b->event), "cuEventSynchronize");
  TN_CUDA_CALL(ctx, s->cu->EventElapsedTime(&f, a->event, b->event), "cuEventElapsedTime");
  *ms = f;
  return TN_OK;
}

static void cuda_event_destroy(void *event) {
  cuda_event *e = event;
  const tn_cuda_driver *cu = tn_cuda_driver_get(NULL);
  if (cu != NULL && e->event != NULL) cu->EventDestroy(e->event);
  free(e);
}

/* ---- graphs: a recorded graph captured once, instantiated, then launched as one submission ---- */

typedef struct cuda_exec {
  CUgraphExec exec;
  int index;
} cuda_exec;

static tn_status cuda_capture_begin(void *state, tn_context *ctx, int index) {
  cuda_state *s = state;
  device_info *d;
  TN_FORWARD_IF_ERROR(enter_device(s, ctx, index, &d));
  CUresult r = CUDA_SUCCESS;
  if (s->capture_streams[index] == NULL) r = s->cu->StreamCreate(&s->capture_streams[index], CU_STREAM_NON_BLOCKING);
  /* Thread-local mode: another thread's unsafe calls do not invalidate this capture. */
  if (r == CUDA_SUCCESS) r = s->cu->StreamBeginCapture(s->capture_streams[index], CU_STREAM_CAPTURE_MODE_THREAD_LOCAL);
  if (r == CUDA_SUCCESS) {
    s->capturing = 1;
    s->capture_index = index;
  }
  return leave_device(s, ctx, r, "graph capture");
}

static void cuda_exec_destroy(void *exec) {
  cuda_exec *e = exec;
  if (e == NULL) return;
  const tn_cuda_driver *cu = tn_cuda_driver_get(NULL);
  if (cu != NULL && e->exec != NULL) cu->GraphExecDestroy(e->exec);
  free(e);
}

static tn_status cuda_capture_end(void *state, tn_context *ctx, int discard, void **exec, int *updated) {
  cuda_state *s = state;
  const tn_cuda_driver *cu = s->cu;
  const int index = s->capture_index;
  s->capturing = 0;
  *updated = 0;
  device_info *d;
  TN_FORWARD_IF_ERROR(enter_device(s, ctx, index, &d));
  CUgraph graph = NULL;
  CUresult r = cu->StreamEndCapture(s->capture_streams[index], &graph);
  const char *what = "graph capture";
  cuda_exec *old = *exec, *fresh = NULL;
  if (r == CUDA_SUCCESS && !discard) {
    CUgraphExecUpdateResultInfo info;
    memset(&info, 0, sizeof info);
    /* Same topology (a chain of as many kernels): new pointers, shapes or kernels are patched into the
     * instantiated graph; otherwise it is instantiated anew. */
    if (old != NULL && old->index == index && cu->GraphExecUpdate(old->exec, graph, &info) == CUDA_SUCCESS) {
      *updated = 1;
    } else if ((fresh = calloc(1, sizeof *fresh)) == NULL) {
      r = CUDA_ERROR_OUT_OF_MEMORY;
    } else if ((r = cu->GraphInstantiate(&fresh->exec, graph, 0)) != CUDA_SUCCESS) {
      what = "graph instantiate";
      free(fresh);
      fresh = NULL;
    } else {
      fresh->index = index;
    }
  }
  if (graph != NULL) cu->GraphDestroy(graph);
  tn_status st = leave_device(s, ctx, r, what);
  if (fresh != NULL) {
    cuda_exec_destroy(old);
    *exec = fresh;
  }
  return st;
}

static tn_status cuda_exec_launch(void *state, tn_context *ctx, void *exec) {
  cuda_state *s = state;
  cuda_exec *e = exec;
  device_info *d;
  TN_FORWARD_IF_ERROR(enter_device(s, ctx, e->index, &d));
  return leave_device(s, ctx, s->cu->GraphLaunch(e->exec, s->stream), "graph launch");
}

/* tn_cuda_build_all's workers: each takes the next variant until none is left or one failed. */
typedef struct build_job {
  pthread_mutex_t lock;
  int next, arch;
  tn_status status;
  char message[TN_ERROR_CAPACITY];
} build_job;

static void *build_worker(void *p) {
  build_job *job = p;
  /* The worker's own message buffer: a context that holds nothing but its last error, so that workers
   * never write the caller's (which belongs to the calling thread). */
  tn_context *own = calloc(1, sizeof *own);
  if (own == NULL) return NULL; /* the other workers (or the caller) do the work */
  for (;;) {
    pthread_mutex_lock(&job->lock);
    const int i = job->status == TN_OK && job->next < TN_KERNEL_VARIANTS ? job->next++ : -1;
    pthread_mutex_unlock(&job->lock);
    if (i < 0) break;
    tn_kernel_binary bin;
    tn_status st = tn_kernel_build(own, tn_kernel_key_at(i), job->arch, &bin);
    if (st == TN_OK) {
      tn_kernel_binary_free(&bin);
      continue;
    }
    pthread_mutex_lock(&job->lock);
    if (job->status == TN_OK) {
      job->status = st;
      snprintf(job->message, sizeof job->message, "%s", own->last_error);
    }
    pthread_mutex_unlock(&job->lock);
  }
  free(own);
  return NULL;
}

tn_status tn_cuda_build_all(tn_context *ctx, int arch, int *count) {
  TN_RETURN_ERROR_IF(arch < 70 || arch > 1000, ctx, TN_ERR_VALUE,
                     "build_kernels: architecture %d is not a compute capability such as 90", arch);
  build_job job;
  memset(&job, 0, sizeof job);
  pthread_mutex_init(&job.lock, NULL);
  job.arch = arch;
  /* NVRTC compiles one program per thread: use every processor. */
  enum { MAX_WORKERS = 64 };
  pthread_t workers[MAX_WORKERS];
  int wanted = tn_threads_wanted(NULL), started = 0;
  if (wanted > MAX_WORKERS) wanted = MAX_WORKERS;
  for (; started < wanted; started++)
    if (pthread_create(&workers[started], NULL, build_worker, &job) != 0) break;
  if (started == 0) build_worker(&job);
  for (int i = 0; i < started; i++) pthread_join(workers[i], NULL);
  pthread_mutex_destroy(&job.lock);
  TN_RETURN_ERROR_IF(job.status != TN_OK, ctx, job.status, "%s", job.message);
  TN_RETURN_ERROR_IF(job.next < TN_KERNEL_VARIANTS, ctx, TN_ERR_NO_MEMORY, "build_kernels: could not start a worker");
  if (count != NULL) *count = TN_KERNEL_VARIANTS;
  return TN_OK;
}

const tn_backend tn_cuda_backend = {
    .name = "cuda",
    .kind = TN_DEVICE_CUDA,
    .open = cuda_open,
    .close = cuda_close,
    .device_count = cuda_device_count,
    .run = cuda_run,
    .prepare = cuda_prepare,
    .alloc = cuda_alloc,
    .release = cuda_release,
    .copy = cuda_copy,
    .synchronize = cuda_synchronize,
    .set_stream = cuda_set_stream,
    .capture_begin = cuda_capture_begin,
    .capture_end = cuda_capture_end,
    .exec_launch = cuda_exec_launch,
    .exec_destroy = cuda_exec_destroy,
    .event_create = cuda_event_create,
    .event_record = cuda_event_record,
    .event_elapsed_ms = cuda_event_elapsed,
    .event_destroy = cuda_event_destroy,
};
