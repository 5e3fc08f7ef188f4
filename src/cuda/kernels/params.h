/* The argument block of every tnorm kernel: included by the host (C) and by the kernels (NVRTC), so the
 * layout is written once. Fixed-width fields only; pointers are device addresses. Strides in elements. */
#ifndef TN_CUDA_KERNEL_PARAMS_H
#define TN_CUDA_KERNEL_PARAMS_H

typedef struct tn_kernel_params {
  const void *x;
  const void *residual;
  const void *mul;
  const void *weight;
  void *y;
  void *residual_out;
  long long rows;
  long long dim;
  long long x_stride;
  long long residual_stride;
  long long mul_stride;
  long long y_stride;
  long long residual_out_stride;
  float eps;
  float scale;         /* l2_norm's scale (1 elsewhere) */
  float weight_offset; /* added to every weight element in float32 */
  float count;         /* the divisor of the sum of squares: dim for rms_norm, 1 for l2_norm */
  int has_weight;
  int weight_f32; /* the weight is float32 (else x's dtype) */
  int has_scale;
  int round_before_last; /* round (x * inv) * w to the dtype before the multiplicand or scale (fused pairs) */
  /* The fields below are read only by the families of norm_x.cu, layer_norm.cu, general.cu and rope.cu, so
   * the older kernels' arguments keep their offsets. */
  const void *bias;
  long long heads; /* vectors per row of x: 1 for a 2-D view; rows above then counts the vectors */
  long long x_head_stride;
  long long y_head_stride;
  long long mul_head_stride;
  int flags;    /* TN_KERNEL_FLAG_*: the run-time knobs of those families */
  int bias_f32; /* the bias is float32 (else x's dtype) */
  /* rms_norm with a rope (rope.cu): rows are the tokens, heads the vectors of each */
  const void *positions;
  const void *cos_sin;
  long long cos_sin_stride;
  long long cos_sin_rows;
  int rotary_dim;
  int tokens_per_block; /* the slot kernels: tokens a block takes; the paired ones: the most a block touches */
  float theta;
  int ahead_blocks; /* blocks between a block and the one whose reads it fetches to L2 (rope.cu's paired
                       kernels: table rows; the row kernels that fetch ahead: x's and the residual's rows) */
} tn_kernel_params;

/* Run-time knobs (tn_kernel_params.flags) of the families that carry them; each family reads only its own. */
#define TN_KERNEL_FLAG_LLAMA 0x1         /* round the normalised value to the dtype before the weight */
#define TN_KERNEL_FLAG_MAX_NORM 0x2      /* l2_norm: 1 / max(sqrt(sum), eps) */
#define TN_KERNEL_FLAG_ADD 0x4           /* a residual is added first (norm_x.cu, general.cu) */
#define TN_KERNEL_FLAG_RESIDUAL_F32 0x8  /* residual and residual_out are float32 (x is f16/bf16) */
#define TN_KERNEL_FLAG_ROUND_SUM 0x10    /* the sum is normalised rounded to the residual's dtype */
#define TN_KERNEL_FLAG_LAYER 0x20        /* layer_norm's row: mean first, then the deviations */
#define TN_KERNEL_FLAG_MUL 0x40          /* a multiplicand (general.cu) */
#define TN_KERNEL_FLAG_BIAS 0x80         /* layer_norm's bias */
#define TN_KERNEL_FLAG_HEADS 0x100       /* a 3-D view: vector v is head v % heads of row v / heads */
#define TN_KERNEL_FLAG_ROPE_GPTJ 0x200   /* pairs (2i, 2i + 1); else NEOX's (i, i + rotary_dim / 2) */
#define TN_KERNEL_FLAG_ROPE_TABLE 0x400  /* cos and sin from cos_sin; else from theta */
#define TN_KERNEL_FLAG_TABLE_F32 0x800   /* the table is float32 (else x's dtype) */
#define TN_KERNEL_FLAG_POS_I64 0x1000    /* positions are int64 (else int32) */

/* rope.cu's slot kernels: threads per block at most (a block takes whole tokens, each token's heads G
 * threads apiece), and the threads a block aims at when a token has fewer. */
#define TN_KERNEL_ROPE_MAX_BLOCK 256
#define TN_KERNEL_ROPE_MIN_BLOCK 128
/* rope.cu's paired kernels hold TN_KERNEL_REG_CHUNKS chunks a thread at every G: a head of `chunks` chunks
 * has TN_KERNEL_ROPE_PAIRED_GROUP(G, chunks) threads, the fewest that hold it so. Where that is G / 2 (the
 * register shape holds at most two chunks a lane there: G = 2 .. 16, or G = 32 with at most 64 chunks),
 * a thread takes the chunks of two of the G lanes, t and t + G / 2, and does the first step of the
 * G-lane butterfly itself: the same sums, in the same order. So a thread holds four chunks at every G,
 * which the paired kernels run faster than two (docs/performance.md, "The rope (rope.cu, params.h)"). */
#define TN_KERNEL_ROPE_PAIRED_GROUP(G, CHUNKS) \
  ((G) > 1 && (TN_KERNEL_CHUNKS_OF(G) < TN_KERNEL_REG_CHUNKS || (CHUNKS) <= 2 * (G)) ? (G) / 2 : (G))
/* rope.cu's shared memory: each group's slot for its head's chunks (TN_KERNEL_CHUNKS_OF(G) * G, padded to
 * G more than a multiple of 8, so that a quarter warp's 16-byte accesses fall in 8 different bank groups),
 * then tokens_per_block rows of rotary_dim floats (the cosines, then the sines), then rotary_dim / 2 floats
 * of inv_freq (theta only). */
#define TN_KERNEL_ROPE_SLOT_CHUNKS(G) \
  (TN_KERNEL_CHUNKS_OF(G) * (G) + (8 - ((TN_KERNEL_CHUNKS_OF(G) - 1) * (G)) % 8) % 8)

/* dtype codes, as tn_dtype */
#define TN_KERNEL_F32 0
#define TN_KERNEL_F16 1
#define TN_KERNEL_BF16 2

/* op codes, as tn_op */
#define TN_KERNEL_RMS_NORM 0
#define TN_KERNEL_L2_NORM 1
#define TN_KERNEL_ADD_RMS_NORM 2

/* Row-kernel shapes. A row is cut into 16-byte chunks; thread t of a row's group of G threads owns chunks
 * t, t + G, t + 2G, ... and sums their squares in that order, element by element; the group then adds its
 * G partial sums as a fixed butterfly (and, above one warp, the warps' sums in warp order). The order is
 * G's alone (how many chunks a thread can hold does not change it). Every kernel of one (family, dtype,
 * dim) uses the same G, so every path reduces a row in the same order, and the families a graph's fusions
 * move an op between keep the same G (registry.c). */
#define TN_KERNEL_REG_CHUNKS 4      /* chunks per thread kept in registers, at most */
/* Chunks per thread of the register shape with G threads per row: two up to G = 16 (rows of at most 32
 * chunks: 256 elements of f16/bf16, 128 of f32), so that short rows get twice the threads, half the work
 * and registers a thread, and more rows resident; four from G = 32. Rows of 33 .. 64 chunks then hold two
 * zero chunks of four on G = 32 where a family has no pair shape for them: a second, two-chunk path in the
 * same kernel (a branch on dim) spills the four-chunk one. docs/performance.md, "Row shapes (params.h)",
 * has the figures. */
#define TN_KERNEL_TWO_CHUNKS_MAX_GROUP 16
#define TN_KERNEL_CHUNKS_OF(G) ((G) <= TN_KERNEL_TWO_CHUNKS_MAX_GROUP ? 2 : TN_KERNEL_REG_CHUNKS)
/* The pair shapes: G = TN_KERNEL_PAIR_MIN_GROUP .. TN_KERNEL_MAX_GROUP threads per row holding two chunks
 * each, beside the register shapes of the same G (four a thread from G = 32). A family that has the pair
 * shape of G (registry.c) takes it for rows of G + 1 .. 2 G chunks: twice the threads of the register shape
 * a row would take, each with half the work and registers. Which families have which, and why, each
 * family's source says. */
#define TN_KERNEL_PAIR_CHUNKS 2
#define TN_KERNEL_PAIR_MIN_GROUP 32
/* The pair shapes add_rms_norm's families have beyond rms_norm's: G = this .. TN_KERNEL_MAX_GROUP (rows of
 * 257 .. 2048 chunks), which its own calls take (registry.c) and which fetch rows ahead (add_rms_norm.cu). */
#define TN_KERNEL_ADD_PAIR_MIN_GROUP 256
#define TN_KERNEL_MAX_GROUP 1024    /* threads per row, at most */
#define TN_KERNEL_MIN_BLOCK 128     /* threads per block when G <= 32 (several rows per block); else G */
/* Threads per block of a row kernel with G threads per row: one row per block above one warp (the group's
 * barrier and shared partial sums belong to the block). */
#define TN_KERNEL_BLOCK_OF(G) ((G) > 32 ? (G) : TN_KERNEL_MIN_BLOCK)
/* The few-rows form of the register shapes with G = 64 .. 512 (row.cuh's tn_rows_wide): one row per block
 * of 4 G threads (at most 1024), one chunk per thread, the same G-thread reduction. */
#define TN_KERNEL_WIDE_MIN_GROUP 64
#define TN_KERNEL_WIDE_MAX_GROUP 512
#define TN_KERNEL_WIDE_BLOCK_OF(G) (4 * (G) < 1024 ? 4 * (G) : 1024)

/* Access modes: how a kernel touches memory. A call whose every pointer and pitch allows 16-byte accesses
 * takes WHOLE when its rows have no partial chunk, else VECTORS: WHOLE kernels leave out the tests of a
 * chunk against the row's end and the element-by-element path, which the hottest loops otherwise carry. */
#define TN_KERNEL_MODE_BYTES 0    /* pointers not aligned to their elements */
#define TN_KERNEL_MODE_ELEMENTS 1 /* one element per access */
#define TN_KERNEL_MODE_VECTORS 2  /* 16-byte accesses (a partial last chunk goes element by element) */
#define TN_KERNEL_MODE_WHOLE 3    /* 16-byte accesses, every chunk whole (dim a multiple of a chunk's elements) */
#define TN_KERNEL_MODE_COUNT 4

/* The elementwise kernels: their op, and their block size. */
#define TN_KERNEL_ELEMENTWISE_ADD 0
#define TN_KERNEL_ELEMENTWISE_MUL 1
#define TN_KERNEL_ELEMENTWISE_SCALE 2
#define TN_KERNEL_ELEMENTWISE_COUNT 3
#define TN_KERNEL_ELEMENTWISE_BLOCK 256

/* Where a long row waits between its reduction and its output. */
#define TN_KERNEL_STAGE_REGISTERS 0 /* rows of at most G * TN_KERNEL_CHUNKS_OF(G) chunks */
#define TN_KERNEL_STAGE_SHARED 1    /* one row per block, in dynamic shared memory */
#define TN_KERNEL_STAGE_REREAD 2    /* one row per block, read again (from L2) for the output */

#endif
