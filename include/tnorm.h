/*
 * tnorm — normalisation kernels for transformer inference (RMSNorm, L2Norm and their fused forms).
 *
 * This header is the whole public API and its specification. It is ordered from simple to advanced:
 * a worked example, statuses, tensors, the context, the ops, and the generic op entry point.
 *
 * Worked example: normalise a 4 x 4096 bf16 activation with a bf16 weight, in place.
 *
 *     #include <tnorm.h>
 *
 *     tn_context *ctx;
 *     if (tn_context_create(&ctx) != TN_OK) return 1;
 *     tn_tensor x = tn_tensor_2d(act, TN_BF16, 4, 4096);        // rows x dim, contiguous
 *     tn_tensor w = tn_tensor_vector(weight, TN_BF16, 4096);    // one row of dim elements
 *     tn_status st = tn_rms_norm(ctx, &x, &w, 0.0f, 1e-6f, &x); // y may be x itself
 *     if (st != TN_OK) fprintf(stderr, "%s\n", tn_context_last_error(ctx));
 *     tn_context_destroy(ctx);
 *
 * Semantics, common to every op and backend:
 * - All arithmetic is done in float32; each result is rounded once to the output dtype, to nearest even
 *   (TN_CASTING_LLAMA, below, names the extra roundings of the models that round more often).
 *   f16/bf16 conversions are exact for every bit pattern (NaN stays NaN, Inf, subnormals).
 * - A tensor is a view of `rows x dim` elements; rows may be strided (row_stride >= dim, in elements) so a
 *   view into a packed buffer needs no copy. Reductions run over dim.
 * - rows == 0 is a valid no-op; dim == 0 is an error. eps must be finite and >= 0.
 * - A row of zeros gives zeros when eps > 0. NaN or Inf in a row propagates to that row only. A finite
 *   row whose float32 sum of squares would overflow (|x| beyond about 1e19) or vanish with eps == 0 is
 *   reduced again scaled by an exact power of two, so its result stays right instead of 0 or Inf.
 * - The library assumes the default floating-point environment (round to nearest, no flush-to-zero).
 * - An output may be exactly the same view as a row-shaped input (in place); any other overlap between an
 *   output and another operand is refused. Outputs never overlap each other.
 * - A row gives the same bytes whatever its position and the number of rows in the call (batch invariance).
 * - Index arithmetic is 64-bit: rows * dim may exceed 2^31.
 * - On any error nothing is written; the status says what kind of error it was and
 *   tn_context_last_error() says exactly what, with the numbers involved.
 * - The library never aborts, exits or prints.
 */
#ifndef TNORM_H
#define TNORM_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32) && defined(TNORM_SHARED_BUILD)
#define TN_API __declspec(dllexport)
#elif defined(__GNUC__)
#define TN_API __attribute__((visibility("default")))
#else
#define TN_API
#endif

#define TNORM_VERSION_MAJOR 0
#define TNORM_VERSION_MINOR 2
#define TNORM_VERSION_PATCH 0

/* "MAJOR.MINOR.PATCH" of the library actually loaded. */
TN_API const char *tn_version(void);

/* ------------------------------------------------------------------------------------------------ */
/* Statuses. One table: the enum, tn_status_name() and tn_status_string() are generated from it.     */
/* ------------------------------------------------------------------------------------------------ */

#define TN_STATUS_TABLE(X)                                                                     \
  X(TN_OK, 0, "success")                                                                       \
  X(TN_ERR_NULL, 1, "a required pointer is NULL")                                              \
  X(TN_ERR_SHAPE, 2, "shapes or strides do not agree")                                         \
  X(TN_ERR_DTYPE, 3, "unsupported dtype or dtypes that do not agree")                          \
  X(TN_ERR_VALUE, 4, "a scalar argument is out of range")                                      \
  X(TN_ERR_OVERLAP, 5, "an output partially overlaps another operand")                         \
  X(TN_ERR_OVERFLOW, 6, "a size does not fit in 64 bits or in the address space")              \
  X(TN_ERR_OPERAND, 7, "an operand is missing, or given to an op that takes none")             \
  X(TN_ERR_DEVICE, 8, "tensors on different devices, or a device the op cannot run on")        \
  X(TN_ERR_UNAVAILABLE, 9, "the backend for this device is not available")                     \
  X(TN_ERR_NO_MEMORY, 10, "out of memory")                                                     \
  X(TN_ERR_BACKEND, 11, "the backend reported an error")                                       \
  X(TN_ERR_INTERNAL, 12, "internal error")                                                     \
  X(TN_ERR_BUSY, 13, "the context is inside a call on another thread")

typedef enum tn_status {
#define TN_STATUS_ENUM_(name, value, text) name = value,
  TN_STATUS_TABLE(TN_STATUS_ENUM_)
#undef TN_STATUS_ENUM_
} tn_status;

/* The enumerator's name ("TN_ERR_SHAPE"), or "TN_UNKNOWN_STATUS". Never NULL. */
TN_API const char *tn_status_name(tn_status status);
/* A short generic description ("shapes or strides do not agree"). Never NULL. */
TN_API const char *tn_status_string(tn_status status);

/* ------------------------------------------------------------------------------------------------ */
/* Tensors                                                                                          */
/* ------------------------------------------------------------------------------------------------ */

typedef enum tn_dtype {
  TN_F32 = 0,
  TN_F16 = 1,
  TN_BF16 = 2,
  /* Storage of quantized outputs and their scales only (tn_quant); no op computes in them. */
  TN_F8_E4M3 = 3, /* OCP FP8 e4m3fn (torch.float8_e4m3fn): max 448, no infinities */
  TN_F8_E5M2 = 4, /* OCP FP8 e5m2 (torch.float8_e5m2): max 57344 */
  TN_I8 = 5,      /* int8 */
  TN_U8 = 6,      /* bytes: NVFP4's packed E2M1 pairs, UE8M0 power-of-two scales */
} tn_dtype;
/* The dtypes ops compute in (x, weight, y, ...): f32, f16, bf16. */
#define TN_DTYPE_COUNT 3
/* Every dtype, the storage ones included. */
#define TN_DTYPE_ALL_COUNT 7

/* "f32", "f16", "bf16", "f8_e4m3", "f8_e5m2", "i8", "u8"; "?" for a value outside the enum. */
TN_API const char *tn_dtype_name(tn_dtype dtype);
/* Bytes per element: 4, 2, 2, 1, 1, 1, 1; 0 for a value outside the enum. */
TN_API size_t tn_dtype_size(tn_dtype dtype);

typedef enum tn_device_kind { TN_DEVICE_CPU = 0, TN_DEVICE_CUDA = 1 } tn_device_kind;
#define TN_DEVICE_KIND_COUNT 2

typedef struct tn_device {
  tn_device_kind kind;
  int index; /* CUDA device ordinal; 0 for the CPU */
} tn_device;

/* A view of rows x dim elements of one dtype. Row r starts at element r * row_stride from data.
 * Inputs are only read, whatever the constness of `data`.
 *
 * A 3-D view [rows, heads, dim] (heads > 1; 0 and 1 both mean a 2-D view) holds `heads` vectors of dim
 * elements per row (a token's attention heads): head h of row r starts at element
 * r * row_stride + h * head_stride, with head_stride >= dim and row_stride >= (heads - 1) * head_stride + dim
 * (token-major, as Q or K inside a packed QKV buffer). The norms reduce each head on its own; the ops
 * that take 3-D views say so. For overlap checks a row of a 3-D view covers its whole span, from its first
 * head to the end of its last.
 *
 * data needs no alignment. On CUDA an operand not aligned to 16 bytes is read in elements, and one not
 * aligned to its element byte by byte; on the CPU an operand not aligned to its element (or rope positions
 * not aligned to theirs) is copied to aligned memory, the op runs there and the outputs are copied back, so
 * such a call also costs a copy of those operands and memory for it. Aligned operands cost nothing extra. */
typedef struct tn_tensor {
  void *data;
  tn_dtype dtype;
  int64_t rows;
  int64_t dim;
  int64_t row_stride; /* in elements, >= dim */
  tn_device device;
  int64_t heads;       /* vectors of dim elements per row; 0 or 1 for a 2-D view */
  int64_t head_stride; /* in elements, between the heads of a row; ignored for a 2-D view */
} tn_tensor;

/* A contiguous rows x dim tensor in host memory. */
static inline tn_tensor tn_tensor_2d(const void *data, tn_dtype dtype, int64_t rows, int64_t dim) {
  tn_tensor t;
  t.data = (void *)data;
  t.dtype = dtype;
  t.rows = rows;
  t.dim = dim;
  t.row_stride = dim;
  t.device.kind = TN_DEVICE_CPU;
  t.device.index = 0;
  t.heads = 1;
  t.head_stride = dim;
  return t;
}

/* A rows x dim tensor in host memory whose rows start row_stride elements apart. */
static inline tn_tensor tn_tensor_strided(const void *data, tn_dtype dtype, int64_t rows, int64_t dim,
                                          int64_t row_stride) {
  tn_tensor t = tn_tensor_2d(data, dtype, rows, dim);
  t.row_stride = row_stride;
  return t;
}

/* A [tokens, heads, head_dim] view in host memory: head h of token t starts at element
 * t * token_stride + h * head_stride (Q heads inside a packed QKV buffer: token_stride = the QKV row,
 * head_stride = head_dim). */
static inline tn_tensor tn_tensor_heads(const void *data, tn_dtype dtype, int64_t tokens, int64_t heads,
                                        int64_t head_dim, int64_t token_stride, int64_t head_stride) {
  tn_tensor t = tn_tensor_strided(data, dtype, tokens, head_dim, token_stride);
  t.heads = heads;
  t.head_stride = head_stride;
  return t;
}

/* A vector of n elements (a weight): one row of n. */
static inline tn_tensor tn_tensor_vector(const void *data, tn_dtype dtype, int64_t n) {
  return tn_tensor_2d(data, dtype, 1, n);
}

/* ------------------------------------------------------------------------------------------------ */
/* Context                                                                                          */
/* ------------------------------------------------------------------------------------------------ */

/* A context owns the backends' state (the CPU thread pool, the CUDA stream) and the last error.
 * One context serves one caller thread at a time; use one context per thread for concurrent calls.
 * A call on a context that another thread is inside of returns TN_ERR_BUSY at once, doing nothing and
 * leaving the last error alone (it belongs to the call in progress); tn_context_destroy must not race
 * with any call on the same context. */
typedef struct tn_context tn_context;

/* Creates a context. The CPU thread count is taken from the environment variable TNORM_NUM_THREADS
 * when set (a positive integer), else the number of online processors. */
TN_API tn_status tn_context_create(tn_context **out);
/* Destroys a context; NULL is a no-op. */
TN_API void tn_context_destroy(tn_context *ctx);

/* The message of the last failed call on this context ("rms_norm: weight has 7 elements, dim is 8"),
 * or "" when the last call succeeded. Valid until the next call on the context. ctx may be NULL. */
TN_API const char *tn_context_last_error(const tn_context *ctx);

/* Number of CPU threads the CPU backend uses (>= 1, at most 1024). Setting n <= 0 restores the automatic
 * count; n > 1024 is refused with TN_ERR_VALUE. */
TN_API tn_status tn_context_set_num_threads(tn_context *ctx, int n);
TN_API int tn_context_num_threads(const tn_context *ctx);

/* TN_OK when ops can run on tensors of this device kind; otherwise TN_ERR_UNAVAILABLE, with the reason
 * in the last error (for example, no NVIDIA driver on this machine). */
TN_API tn_status tn_device_available(tn_context *ctx, tn_device_kind kind);

/* ------------------------------------------------------------------------------------------------ */
/* Devices, memory and streams                                                                      */
/*                                                                                                  */
/* An op runs on the device its tensors name (all of them on one device). On a CUDA device the op is  */
/* queued on the context's stream and returns at once; it allocates nothing, synchronises nothing and */
/* queries nothing from the device, so it may be captured into a CUDA graph (compile its kernel first  */
/* with tn_op_prepare). CUDA needs compute capability 7.0 or later; the driver and NVRTC are loaded at */
/* run time, so the library also runs where neither exists (the CUDA device is then unavailable).     */
/* The tensors' device field is trusted: a host pointer labelled CUDA faults on the device.           */
/* ------------------------------------------------------------------------------------------------ */

/* The same tensor, labelled as living on a device: tn_tensor_on(tn_tensor_2d(p, TN_BF16, r, d), dev). */
static inline tn_tensor tn_tensor_on(tn_tensor t, tn_device device) {
  t.device = device;
  return t;
}

static inline tn_device tn_cuda_device(int index) {
  tn_device d;
  d.kind = TN_DEVICE_CUDA;
  d.index = index;
  return d;
}

static inline tn_device tn_cpu_device(void) {
  tn_device d;
  d.kind = TN_DEVICE_CPU;
  d.index = 0;
  return d;
}

/* Number of devices of a kind (1 for the CPU); 0 with TN_ERR_UNAVAILABLE and the reason when none. */
TN_API tn_status tn_device_count(tn_context *ctx, tn_device_kind kind, int *count);

/* The stream ops on CUDA devices are queued on (a CUstream or cudaStream_t of the device the tensors
 * are on); NULL, the default, is the legacy default stream. The CPU takes only NULL. */
TN_API tn_status tn_context_set_stream(tn_context *ctx, tn_device_kind kind, void *stream);

/* Device memory (host memory for the CPU), aligned to 64 bytes. bytes == 0 gives NULL; tn_free(NULL) is a
 * no-op. A size the address space cannot hold is TN_ERR_OVERFLOW, one no allocator has TN_ERR_NO_MEMORY;
 * *ptr is then unchanged. */
TN_API tn_status tn_malloc(tn_context *ctx, tn_device device, size_t bytes, void **ptr);
TN_API tn_status tn_free(tn_context *ctx, tn_device device, void *ptr);

/* Copies bytes between any two devices, in the context's stream order. A copy that reads or writes host
 * memory has finished when the call returns; a copy between CUDA buffers may still run (as an op). */
TN_API tn_status tn_memcpy(tn_context *ctx, void *dst, tn_device dst_device, const void *src, tn_device src_device,
                           size_t bytes);

/* Waits until everything queued on the context's stream for this device kind has finished; a CUDA error
 * raised meanwhile (a fault in a kernel) is returned here with the CUDA message. */
TN_API tn_status tn_synchronize(tn_context *ctx, tn_device device);

/* ------------------------------------------------------------------------------------------------ */
/* Ops                                                                                              */
/*                                                                                                  */
/* x, y, mul: rows x dim, all of x's dtype (f32, f16 or bf16). residual and residual_out: rows x dim, */
/* both of x's dtype, or both f32 (an f32 residual stream beside f16/bf16 activations).              */
/* weight, bias: vectors of dim elements (rows == 1), of x's dtype or f32; NULL when absent.         */
/* rms_norm and l2_norm also take 3-D views [rows, heads, dim] (per-head norm, see tn_tensor): y and */
/* mul then have x's heads; the other ops take 2-D views.                                            */
/* ------------------------------------------------------------------------------------------------ */

/* y = x * rsqrt(mean(x^2) + eps) * (weight + weight_offset).
 * weight_offset is 0 for most models and 1 for Gemma's (1 + w) convention. With weight == NULL the
 * scale is 1 and weight_offset must be 0. */
TN_API tn_status tn_rms_norm(tn_context *ctx, const tn_tensor *x, const tn_tensor *weight,
                             float weight_offset, float eps, const tn_tensor *y);

/* y = rms_norm(x) * mul, elementwise, in the same pass (a norm followed by a gate). */
TN_API tn_status tn_rms_norm_mul(tn_context *ctx, const tn_tensor *x, const tn_tensor *weight,
                                 float weight_offset, const tn_tensor *mul, float eps,
                                 const tn_tensor *y);

/* y = x * rsqrt(sum(x^2) + eps) * scale. scale must be finite; 1 gives the plain L2 norm.
 * (tn_op_args.l2_mode gives the other convention, x / max(||x||, eps).) */
TN_API tn_status tn_l2_norm(tn_context *ctx, const tn_tensor *x, float eps, float scale,
                            const tn_tensor *y);

/* s = round(x + residual) to the residual's dtype; residual_out = s; y = rms_norm(s) with weight, in one
 * pass (tn_op_args.residual_mode: normalise s as stored, the default, or the float32 sum).
 * residual_out may be residual itself and y may be x itself (the residual stream updated in place).
 * Its sum of squares may be taken in another order than tn_rms_norm's (on CUDA, for rows of 2049 .. 16384
 * f16/bf16 or 1025 .. 8192 f32 elements), so y can differ from tn_add then tn_rms_norm in the last bit;
 * a graph that fuses those two ops into this one gives their bytes. */
TN_API tn_status tn_add_rms_norm(tn_context *ctx, const tn_tensor *x, const tn_tensor *residual,
                                 const tn_tensor *weight, float weight_offset, float eps,
                                 const tn_tensor *y, const tn_tensor *residual_out);

/* add_rms_norm with y = rms_norm(s) * mul, elementwise, in the same pass (residual add, norm, gate).
 * mul is required, as for tn_rms_norm_mul. */
TN_API tn_status tn_add_rms_norm_mul(tn_context *ctx, const tn_tensor *x, const tn_tensor *residual,
                                     const tn_tensor *weight, float weight_offset, const tn_tensor *mul,
                                     float eps, const tn_tensor *y, const tn_tensor *residual_out);

/* y = (x - mean(x)) * rsqrt(mean((x - mean(x))^2) + eps) * weight + bias (BERT, ViT, Whisper); weight and
 * bias each optional. Statistics in float32: the CPU takes the mean first, then the variance of the
 * deviations (two passes over the row); the CUDA kernels reduce the sums of x and x^2 together and take
 * var = E[x^2] - mean^2 where mean^2 <= var (the subtraction cancels at most one bit), the two passes for
 * any other row (one shifted far from zero), so that no row loses precision to cancellation. */
TN_API tn_status tn_layer_norm(tn_context *ctx, const tn_tensor *x, const tn_tensor *weight,
                               const tn_tensor *bias, float eps, const tn_tensor *y);

/* s = round(x + residual), as tn_add_rms_norm; residual_out = s; y = layer_norm(s). */
TN_API tn_status tn_add_layer_norm(tn_context *ctx, const tn_tensor *x, const tn_tensor *residual,
                                   const tn_tensor *weight, const tn_tensor *bias, float eps,
                                   const tn_tensor *y, const tn_tensor *residual_out);

/* ------------------------------------------------------------------------------------------------ */
/* Quantized outputs: rms_norm, add_rms_norm, layer_norm and add_layer_norm (2-D views) write their  */
/* result quantized, with its scales, in the same pass (tn_op_args.quant); tn_quantize quantizes a    */
/* tensor on its own. y is then optional: given, it receives the unquantized result too.              */
/*                                                                                                  */
/* The numerics, the same bytes on every backend:                                                    */
/* - v, the value quantized: with TN_QUANT_FROM_ROUNDED the op's result rounded to x's dtype (what y */
/*   receives: q is then the bytes of the op followed by tn_quantize of its y), with TN_QUANT_FROM_F32 */
/*   the float32 result before that rounding (one rounding in all). The two agree for f32 x.          */
/*   tn_quantize's v is x itself.                                                                    */
/* - q = encode(v / s), s the element's scale: one float32 division, rounded to nearest even (not a  */
/*   multiply by a reciprocal), then the format's encoding: round to nearest even once; finite values  */
/*   beyond the format's largest, and infinities, saturate to +-largest (E4M3 448, E5M2 57344, INT8   */
/*   127, E2M1 6); NaN gives 0x7f with its sign for FP8, 0 for INT8 and E2M1; FP8 subnormals are kept. */
/* - Static scales (TN_QUANT_SCALE_TENSOR): s = scale[0], an f32 read at run time from x's device (a  */
/*   captured CUDA graph stays valid when the value changes). It must be finite and > 0: the CPU      */
/*   refuses any other value; a GPU kernel cannot report it and quantizes with it as it is.          */
/* - Dynamic scales (TOKEN: one per row; GROUP: one per group_size elements of a row): a = max |v| over */
/*   the row or group (NaN elements skipped; an infinity makes a infinite, and then each infinity of    */
/*   the group gives +-largest, its sign kept, where inf / inf would give a NaN of no defined sign);   */
/*   s = a / qmax (float32;                                                                          */
/*   qmax the format's largest), then s = min(s, scale_ub) when scale_ub > 0, then s = max(s,          */
/*   scale_min), so that a row of zeros gets a finite scale. With pow2_scales, s is then rounded up to  */
/*   a power of two, 2^ceil(log2 s) within [2^-127, 2^127] (DeepGEMM's scales), and stored as its      */
/*   UE8M0 byte, the exponent + 127. The scale stored is the s that divided.                          */
/* - MXFP8: E4M3 values, groups of 32 with power-of-two (UE8M0) scales as above (an exact multiple of   */
/*   a block's amax never saturates, unlike the OCP rule 2^(floor(log2 a) - 8)).                       */
/* - NVFP4: E2M1 values, two per byte (element 2i in the low nibble); groups of 16; G = scale[0], the  */
/*   f32 global scale (commonly 448 * 6 / amax of the tensor). A group's scale byte is                 */
/*   sb = e4m3((a / 6) * G) and its s = float(sb) / G (each operation one float32 rounding); a group    */
/*   whose sb is 0 gets q = 0.                                                                       */
/* ------------------------------------------------------------------------------------------------ */

typedef enum tn_quant_format {
  TN_QUANT_NONE = 0,     /* no quantized output */
  TN_QUANT_FP8_E4M3 = 1, /* q: TN_F8_E4M3, rows x dim */
  TN_QUANT_FP8_E5M2 = 2, /* q: TN_F8_E5M2, rows x dim */
  TN_QUANT_INT8 = 3,     /* q: TN_I8, rows x dim, symmetric (-127 .. 127) */
  TN_QUANT_MXFP8 = 4,    /* q: TN_F8_E4M3, rows x dim; scales TN_U8 (UE8M0) per 32 elements */
  TN_QUANT_NVFP4 = 5,    /* q: TN_U8, rows x dim / 2; scales TN_F8_E4M3 per 16 elements; global scale */
} tn_quant_format;

typedef enum tn_quant_scaling {
  TN_QUANT_SCALE_TENSOR = 0, /* static: quant.scale, one f32 (FP8, INT8) */
  TN_QUANT_SCALE_TOKEN = 1,  /* dynamic, one per row (FP8, INT8) */
  TN_QUANT_SCALE_GROUP = 2,  /* dynamic, one per group of group_size elements (MXFP8 and NVFP4 take only this) */
} tn_quant_scaling;

typedef enum tn_quant_source {
  TN_QUANT_FROM_ROUNDED = 0, /* the result rounded to x's dtype: the bytes of the op, then tn_quantize */
  TN_QUANT_FROM_F32 = 1,     /* the float32 result: one rounding */
} tn_quant_source;

/* Where the dynamic scales go in the scales tensor (s(r, g): row r's scale for group g; TOKEN has g = 0). */
typedef enum tn_scale_layout {
  TN_SCALES_ROW_MAJOR = 0,    /* scales is rows x groups: s(r, g) at row r, element g */
  TN_SCALES_COLUMN_MAJOR = 1, /* scales is groups x rows: s(r, g) at row g, element r; its row_stride may pad
                                 rows (DeepGEMM reads f32 scales padded to a multiple of 4) */
  TN_SCALES_SWIZZLED = 2,     /* MXFP8 and NVFP4: the 128 x 4 tiles block-scaled GEMMs (cuBLASLt, CUTLASS)
                                 read. scales is contiguous, rows rounded up to 128 x groups rounded up to
                                 4; s(r, g) is byte ((r / 128) * (groups4 / 4) + g / 4) * 512 + (r % 32) * 16
                                 + ((r % 128) / 32) * 4 + g % 4; the padding is written as zeros */
} tn_scale_layout;

typedef struct tn_quant {
  tn_quant_format format;
  tn_quant_scaling scaling;
  int64_t group_size;      /* GROUP: 32, 64 or 128 for FP8 and INT8; 0 means the format's own (MXFP8 32, NVFP4 16) */
  tn_quant_source source;
  int pow2_scales;         /* dynamic FP8 and INT8 scales as UE8M0 powers of two (scales TN_U8); MXFP8 always */
  tn_scale_layout layout;  /* of the dynamic scales */
  float scale_ub;          /* dynamic FP8, INT8, MXFP8: an upper bound on s, > 0; 0 for none (NVFP4: unused) */
  float scale_min;         /* dynamic FP8, INT8, MXFP8: the least s, finite and > 0 (tn_quant_init: 2^-126;
                              NVFP4: unused, its scales follow from the global scale) */
  const tn_tensor *q;      /* output, on x's device */
  const tn_tensor *scale;  /* input, one f32 on x's device: TENSOR's s, or NVFP4's global scale; else NULL */
  const tn_tensor *scales; /* output of the dynamic scales: f32 (TN_U8 with pow2_scales and for MXFP8,
                              TN_F8_E4M3 for NVFP4) in `layout`; NULL with TENSOR */
} tn_quant;

/* A tn_quant for `format` with TOKEN scaling (GROUP for MXFP8 and NVFP4), the format's group size,
 * source ROUNDED, row-major f32 scales, no upper bound, scale_min 2^-126, and no tensors. */
TN_API tn_quant tn_quant_init(tn_quant_format format);

/* The tensors a quantized output of rows x dim takes: q's dtype and shape, and the dynamic scales' dtype and
 * shape in quant->layout (0 x 0 with a static scale; the column-major shape is the least, its row_stride may
 * pad). */
typedef struct tn_quant_shapes {
  tn_dtype q_dtype;
  int64_t q_rows, q_dim;
  tn_dtype scales_dtype;
  int64_t scales_rows, scales_dim;
  int64_t group; /* elements per scale: the group, or dim for per-token and per-tensor scales */
} tn_quant_shapes;

/* Fills *out for quant's format, scaling, group_size, pow2_scales and layout (its tensors are not read);
 * TN_ERR_VALUE for a combination tn_op_run would refuse, TN_ERR_SHAPE for a dim the group does not divide,
 * TN_ERR_NULL for a NULL pointer. */
TN_API tn_status tn_quant_shapes_get(const tn_quant *quant, int64_t rows, int64_t dim, tn_quant_shapes *out);

/* "none", "fp8_e4m3", "fp8_e5m2", "int8", "mxfp8", "nvfp4"; "?" outside the enum. */
TN_API const char *tn_quant_format_name(tn_quant_format format);

/* q (and scales) = quantize(x), as above; x rows x dim of f32, f16 or bf16. */
TN_API tn_status tn_quantize(tn_context *ctx, const tn_tensor *x, const tn_quant *quant);

/* rms_norm with its result quantized; y may be NULL (only q and the scales are written). */
TN_API tn_status tn_rms_norm_quant(tn_context *ctx, const tn_tensor *x, const tn_tensor *weight, float weight_offset,
                                   float eps, const tn_quant *quant, const tn_tensor *y);

/* add_rms_norm with its result quantized; residual_out is written as always, y may be NULL. */
TN_API tn_status tn_add_rms_norm_quant(tn_context *ctx, const tn_tensor *x, const tn_tensor *residual,
                                       const tn_tensor *weight, float weight_offset, float eps,
                                       const tn_quant *quant, const tn_tensor *y, const tn_tensor *residual_out);

/* ------------------------------------------------------------------------------------------------ */
/* Rotary position embedding fused after the norm (Q and K heads: Qwen3 q_norm/k_norm, Gemma 3/4).   */
/*                                                                                                  */
/* On each head n = rms_norm(x) (with weight), the first rotary_dim elements are rotated in pairs    */
/* (a, b) by the angle of the pair's frequency i at the row's position:                               */
/*     a' = a * cos - b * sin,   b' = b * cos + a * sin                                              */
/* NEOX pairs element i with i + rotary_dim / 2 (split halves: HF's rotate_half, vLLM's is_neox);     */
/* GPTJ pairs 2i with 2i + 1 (interleaved). Elements from rotary_dim on pass through, normalised.    */
/* cos and sin come from a table (cos_sin: one row per position, rotary_dim elements: the rotary_dim  */
/* / 2 cosines then the rotary_dim / 2 sines, f32 or x's dtype, as vLLM's cos_sin_cache), or are      */
/* computed from theta: angle = float(position) * inv_freq_i in float32, with                        */
/* inv_freq_i = float(theta^(-2i / rotary_dim)) and cos, sin taken in double and rounded to float32.  */
/* positions: one per row (token) of x, int32 or int64, on x's device. A position outside the table   */
/* is an error on the CPU (nothing written); on CUDA the host cannot read it and it is clamped to the */
/* table's first or last row.                                                                         */
/* ------------------------------------------------------------------------------------------------ */

typedef enum tn_rope_style {
  TN_ROPE_NONE = 0, /* no rotation */
  TN_ROPE_NEOX = 1, /* pairs (i, i + rotary_dim / 2) */
  TN_ROPE_GPTJ = 2, /* pairs (2i, 2i + 1) */
} tn_rope_style;

/* The most elements per head (dim) of an rms_norm with a rope. */
#define TN_ROPE_MAX_DIM 512

typedef struct tn_rope {
  tn_rope_style style;
  int64_t rotary_dim;       /* elements rotated at the start of each head: even, 2 .. dim; 0 means dim */
  const void *positions;    /* one per row of x */
  int positions_i64;        /* 1: int64 positions, 0: int32 */
  float theta;              /* the frequency base (10000, 1e6, ...) when cos_sin is NULL; must be > 0 then */
  const tn_tensor *cos_sin; /* the table, or NULL to compute cos and sin from theta */
} tn_rope;

/* y = rope(rms_norm(x)) on every head of x (a 3-D view, or a 2-D one whose rows are the heads):
 * Q or K heads normalised and rotated in place inside a packed QKV buffer when y is x. dim is at most
 * TN_ROPE_MAX_DIM. rope may be NULL, or have style NONE: plain rms_norm. Casting is TN_CASTING_EXACT;
 * tn_op_args gives the others. */
TN_API tn_status tn_rms_norm_rope(tn_context *ctx, const tn_tensor *x, const tn_tensor *weight, float weight_offset,
                                  float eps, const tn_rope *rope, const tn_tensor *y);

/* ------------------------------------------------------------------------------------------------ */
/* Numerics modes (fields of tn_op_args), to match a reference implementation bit for bit.            */
/* ------------------------------------------------------------------------------------------------ */

/* Where the result of a norm is rounded. */
typedef enum tn_casting {
  /* Everything in float32, one rounding at the end. HF Gemma3RMSNorm, torch's F.rms_norm and
   * F.layer_norm: (x.float() * rsqrt(mean(x.float()^2) + eps) * (1 + w.float())).to(x.dtype). */
  TN_CASTING_EXACT = 0,
  /* The normalised x is rounded to x's dtype before anything multiplies it; the weight (+ bias), the
   * multiplicand or the scale then follow as in EXACT, with the one final rounding. HF LlamaRMSNorm and
   * Qwen3RMSNorm: w * (x.float() * rsqrt(mean(x.float()^2) + eps)).to(x.dtype). With a rope the weighted
   * value is rounded too, and every step of HF's (q * cos) + (rotate_half(q) * sin) is rounded as torch
   * rounds it. */
  TN_CASTING_LLAMA = 1,
} tn_casting;

/* What add_rms_norm and add_layer_norm normalise when the residual is f16/bf16 (with an f32 residual the
 * two are the same). */
typedef enum tn_residual_mode {
  TN_RESIDUAL_NORM_STORED = 0, /* the sum rounded to the residual's dtype, as stored (HF) */
  TN_RESIDUAL_NORM_F32 = 1,    /* the float32 sum; residual_out still gets it rounded (FlashInfer, quack) */
} tn_residual_mode;

/* l2_norm's convention. */
typedef enum tn_l2_mode {
  TN_L2_RSQRT_EPS = 0, /* x * rsqrt(sum(x^2) + eps) (Gated DeltaNet, FLA) */
  /* x * (1 / max(sqrt(sum(x^2)), eps)) (ggml's l2_norm; torch's F.normalize divides by the same
   * denominator, which can differ from this product in the last float32 bit) */
  TN_L2_MAX_NORM_EPS = 1,
} tn_l2_mode;

/* ------------------------------------------------------------------------------------------------ */
/* Elementwise ops: what real graphs put around the norms (and what a graph fuses into them).       */
/* b is rows x dim like x, or one row of dim elements applied to every row (a broadcast). One        */
/* rounding to x's dtype; y may be x itself.                                                         */
/* ------------------------------------------------------------------------------------------------ */

/* y = x + b */
TN_API tn_status tn_add(tn_context *ctx, const tn_tensor *x, const tn_tensor *b, const tn_tensor *y);
/* y = x * b */
TN_API tn_status tn_mul(tn_context *ctx, const tn_tensor *x, const tn_tensor *b, const tn_tensor *y);
/* y = x * scale; scale must be finite. */
TN_API tn_status tn_scale(tn_context *ctx, const tn_tensor *x, float scale, const tn_tensor *y);

/* ------------------------------------------------------------------------------------------------ */
/* Generic entry point: one descriptor for every op. The functions above fill it and call tn_op_run. */
/* ------------------------------------------------------------------------------------------------ */

typedef enum tn_op {
  TN_OP_RMS_NORM = 0,       /* x, weight?, mul? | cos_sin?      -> y                */
  TN_OP_L2_NORM = 1,        /* x                                -> y                */
  TN_OP_ADD_RMS_NORM = 2,   /* x, residual, weight?, mul?       -> y, residual_out  */
  TN_OP_ADD = 3,            /* x, residual (b)                  -> y                */
  TN_OP_MUL = 4,            /* x, mul (b)                       -> y                */
  TN_OP_SCALE = 5,          /* x, scale                         -> y                */
  TN_OP_LAYER_NORM = 6,     /* x, weight?, bias?                -> y                */
  TN_OP_ADD_LAYER_NORM = 7, /* x, residual, weight?, bias?      -> y, residual_out  */
  TN_OP_QUANTIZE = 8,       /* x, quant                         -> quant's q, scales */
} tn_op;
#define TN_OP_COUNT 9

/* "rms_norm", "l2_norm", "add_rms_norm", "add", "mul", "scale", "layer_norm", "add_layer_norm",
 * "quantize"; "?" outside the enum. */
TN_API const char *tn_op_name(tn_op op);

typedef struct tn_op_args {
  tn_op op;
  const tn_tensor *x;
  const tn_tensor *weight;       /* optional (rms_norm, add_rms_norm, layer_norm, add_layer_norm) */
  const tn_tensor *mul;          /* optional (rms_norm, add_rms_norm); required (mul: b, may broadcast) */
  const tn_tensor *residual;     /* required (add_rms_norm, add_layer_norm; add: b, may broadcast) */
  const tn_tensor *y;            /* required                                             */
  const tn_tensor *residual_out; /* required (add_rms_norm, add_layer_norm)              */
  float eps;           /* the norms'; not used by add, mul and scale */
  float scale;         /* l2_norm, scale; must be 1 for the other ops */
  float weight_offset; /* the ops with a weight; must be 0 when there is no weight */
  const tn_tensor *bias;         /* optional (layer_norm, add_layer_norm)                */
  tn_casting casting;            /* the norms; TN_CASTING_EXACT for the others           */
  tn_residual_mode residual_mode; /* add_rms_norm, add_layer_norm; NORM_STORED elsewhere */
  tn_l2_mode l2_mode;            /* l2_norm; TN_L2_RSQRT_EPS elsewhere                   */
  tn_rope rope;                  /* rms_norm without mul; style TN_ROPE_NONE elsewhere   */
  /* A quantized output (rms_norm, add_rms_norm, layer_norm, add_layer_norm, without a rope; quantize):
   * format TN_QUANT_NONE for none. With one, y is optional (the quantize op takes none). */
  tn_quant quant;
} tn_op_args;

/* Arguments with every operand NULL, eps = 1e-6, scale = 1, weight_offset = 0, the default modes, no
 * rope and no quantized output (quant = tn_quant_init(TN_QUANT_NONE)). */
TN_API tn_op_args tn_op_args_init(tn_op op);

/* Validates the arguments (every rule above), picks the backend from the tensors' device and runs. */
TN_API tn_status tn_op_run(tn_context *ctx, const tn_op_args *args);

/* Only validates: the status and message tn_op_run would give before running anything. */
TN_API tn_status tn_op_validate(tn_context *ctx, const tn_op_args *args);

/* Validates, then gets the op's kernel ready (on CUDA: compiled, or read from the disk cache, and loaded)
 * without running it, so that a later tn_op_run with the same shapes, dtypes and alignments compiles
 * nothing (needed before capturing a CUDA graph, and to move the first-use cost out of a timed path). */
TN_API tn_status tn_op_prepare(tn_context *ctx, const tn_op_args *args);

/* ------------------------------------------------------------------------------------------------ */
/* Graphs: record a sequence of ops, fuse neighbours, replay the result many times.                 */
/*                                                                                                  */
/* Between tn_graph_begin and tn_graph_end, ops called on the context are validated and recorded,   */
/* not run (each keeps its kind, operands and the bytes it reads and writes). tn_graph_end fuses:     */
/*   add -> rms_norm   => add_rms_norm (the sum is still written); add -> layer_norm likewise;       */
/*   rms_norm -> mul   => rms_norm with the multiplicand (add_rms_norm -> mul likewise, so that     */
/*                        add -> rms_norm -> mul becomes one add_rms_norm with the multiplicand);   */
/*   l2_norm -> scale  => l2_norm with the scale (when l2_norm's own scale is 1);                   */
/*   rms_norm, add_rms_norm, layer_norm or add_layer_norm -> quantize of its y                       */
/*                     => the norm with that quantized output (source ROUNDED: the bytes of the two  */
/*                        ops), y still written only where a later op reads it; so add -> rms_norm   */
/*                        -> quantize becomes one add_rms_norm with a quantized output;              */
/* each only where the second op is the first to touch the first's output, nothing in between writes */
/* the first's inputs, and (for the last two, whose fused op no longer writes the intermediate) no    */
/* later recorded op reads it. A fused op gives the same bytes as the pair did. TNORM_GRAPH_FUSION=0  */
/* turns fusion off, to bisect a wrong result.                                                        */
/*                                                                                                  */
/* tn_graph_launch replays the ops in order. When every op is on one CUDA device, the first launch    */
/* captures them into a CUDA graph and instantiates it; every launch then queues that one graph on   */
/* the context's stream (kernels compiled beforehand, nothing allocated per launch). Otherwise (CPU,  */
/* or ops on several devices) the ops run one by one. tn_graph_update gives a graph the ops of a new  */
/* recording, typically the same sequence over other buffers: when the two have as many ops, the     */
/* instantiated CUDA graph is updated in place (new pointers, shapes, scalars), else rebuilt.        */
/* ------------------------------------------------------------------------------------------------ */

typedef struct tn_graph tn_graph;

typedef struct tn_graph_info {
  int recorded_ops;        /* ops recorded */
  int ops;                 /* ops after fusion */
  int fused_add_rms_norm;  /* add + rms_norm (or layer_norm) pairs fused */
  int fused_rms_norm_mul;  /* rms_norm (or add_rms_norm) + mul pairs fused */
  int fused_l2_norm_scale; /* l2_norm + scale pairs fused */
  int fused_norm_quantize; /* norm + quantize pairs fused */
  int device_graph;        /* 1 once launches go as one CUDA graph */
  int instantiations;      /* CUDA graphs instantiated for this graph */
  int updates_in_place;    /* tn_graph_update calls that patched the instantiated graph */
} tn_graph_info;

/* Starts recording on ctx; TN_ERR_VALUE when already recording. */
TN_API tn_status tn_graph_begin(tn_context *ctx);
/* Stops recording and gives the fused graph (an empty one when nothing was recorded). */
TN_API tn_status tn_graph_end(tn_context *ctx, tn_graph **graph);
/* Runs the graph's ops (the first launch on a CUDA device also builds its CUDA graph); refused while ctx
 * is recording. A graph is launched from one thread at a time. */
TN_API tn_status tn_graph_launch(tn_context *ctx, tn_graph *graph);
/* Replaces graph's ops by those of `recorded` (which is left as it was, and may then be destroyed); see
 * above for what happens to graph's CUDA graph. On error graph is unchanged. */
TN_API tn_status tn_graph_update(tn_context *ctx, tn_graph *graph, const tn_graph *recorded);
TN_API tn_status tn_graph_get_info(const tn_graph *graph, tn_graph_info *info);
/* The fusions applied, in order ("add + rms_norm -> add_rms_norm; ..."), or "". Never NULL. */
TN_API const char *tn_graph_fusions(const tn_graph *graph);
/* NULL is a no-op. */
TN_API void tn_graph_destroy(tn_graph *graph);

/* ------------------------------------------------------------------------------------------------ */
/* CUDA kernels: compiled on first use with NVRTC for the device's architecture, kept in memory for   */
/* the process and on disk across processes, in TNORM_CACHE_DIR (default $XDG_CACHE_HOME/tnorm, else  */
/* ~/.cache/tnorm; an empty TNORM_CACHE_DIR turns the disk cache off). Entries are keyed by source,    */
/* options, architecture and NVRTC version; a damaged entry is detected and rebuilt.                  */
/* ------------------------------------------------------------------------------------------------ */

/* Compiles every kernel variant for compute capability `arch` (90 for sm_90) into the disk cache; needs
 * NVRTC but no GPU. *count (may be NULL) receives the number of variants. */
TN_API tn_status tn_cuda_build_kernels(tn_context *ctx, int arch, int *count);

/* Process-wide counters of the kernel caches since the library was loaded. */
typedef struct tn_kernel_cache_stats {
  uint64_t compiled;         /* compiled with NVRTC */
  uint64_t loaded_from_disk; /* read from a valid disk-cache entry instead */
  uint64_t disk_writes;      /* entries written to the disk cache */
  uint64_t disk_rejected;    /* entries found damaged or for another key, rebuilt */
  uint64_t memory_hits;      /* kernels found already loaded */
  double compile_seconds;    /* total time spent in NVRTC */
} tn_kernel_cache_stats;

TN_API void tn_kernel_cache_stats_get(tn_kernel_cache_stats *out);

/* ------------------------------------------------------------------------------------------------ */
/* Timing marks in stream order (CUDA events; the host clock on the CPU), for benchmarks.             */
/* ------------------------------------------------------------------------------------------------ */

typedef struct tn_event tn_event;

TN_API tn_status tn_event_create(tn_context *ctx, tn_device device, tn_event **event);
/* Records the mark on the context's stream for the event's device. */
TN_API tn_status tn_event_record(tn_context *ctx, tn_event *event);
/* Milliseconds between two recorded marks of one device; waits for `end`. */
TN_API tn_status tn_event_elapsed_ms(tn_context *ctx, const tn_event *start, const tn_event *end, double *ms);
/* NULL is a no-op. */
TN_API void tn_event_destroy(tn_event *event);

#ifdef __cplusplus
}
#endif

#endif /* TNORM_H */
