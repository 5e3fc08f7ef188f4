/* The `tnorm` command: shared helpers of its subcommands. Every error is one line on stderr,
 * "tnorm: error: ...", with exit status 1 (2 for a usage error). */
#ifndef TN_CLI_H
#define TN_CLI_H

#include <stddef.h>

#include "tensor_file.h"
#include "tnorm.h"

enum { CLI_OK = 0, CLI_FAIL = 1, CLI_USAGE = 2 };

typedef enum cli_device { CLI_DEVICE_AUTO, CLI_DEVICE_CPU, CLI_DEVICE_CUDA } cli_device;

/* Print "tnorm: error: <message>" and return CLI_FAIL / CLI_USAGE. */
int cli_fail(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
int cli_usage(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* A finite-or-not double filling the whole string: 0, or -1 when s is not a number. */
int cli_parse_double(const char *s, double *out);
/* A positive integer (up to 2^62) filling the whole string: 0, or -1. */
int cli_parse_count(const char *s, long long *out);
/* "cpu", "cuda", "auto": 0, or -1. */
int cli_parse_device(const char *s, cli_device *out);
/* "f32", "f16", "bf16": 0, or -1. */
int cli_parse_dtype(const char *s, tn_dtype *out);
/* An op name (tn_op_name: "rms_norm", ..., "quantize"): 0, or -1. */
int cli_parse_op(const char *s, tn_op *out);

/* The device for a --device choice: cpu; cuda (an error with the library's reason when it is
 * unavailable); auto: the first CUDA device when there is one, else the CPU. Returns CLI_OK or CLI_FAIL
 * (message printed). */
int cli_pick_device(tn_context *ctx, cli_device choice, tn_device *out);

/* Runs an op whose tensors are in host memory on `device`: for a GPU, operands are copied there, the op
 * runs, and the outputs come back (waiting for it). The library's status; its message is on ctx. */
tn_status cli_op_on_device(tn_context *ctx, tn_device device, const tn_op_args *host_args);

/* Frees device memory through a context of its own, so that ctx keeps the message of an earlier error. */
void cli_free_quietly(tn_device device, void *ptr);

/* The tensors of a quantized output for rows x dim x (dim a multiple of the group): q's dtype and dim
 * (NVFP4: two elements a byte), the dynamic scales' dtype and shape in their layout (0 x 0 with a static
 * scale). */
typedef struct cli_quant_shapes {
  tn_dtype q_dtype, scales_dtype;
  int64_t q_dim, scales_rows, scales_dim;
} cli_quant_shapes;

void cli_quant_shapes_of(const tn_quant *quant, int64_t rows, int64_t dim, cli_quant_shapes *out);

/* Elements per scale: the row (static and per-token scales), the group, or the format's own block. */
int64_t cli_quant_group(const tn_quant *quant, int64_t dim);

/* What q's and the scales' safetensors metadata say ("format": "nvfp4", "packing": ..., "format":
 * "ue8m0", "layout": ...); the strings live as long as the struct. */
typedef struct cli_quant_meta {
  tn_file_meta q[TN_FILE_MAX_META], scales[TN_FILE_MAX_META];
  char group_size[24];
} cli_quant_meta;

void cli_quant_metadata(const tn_quant *quant, int64_t dim, cli_quant_meta *meta);

/* "cpu" or "cuda". */
const char *cli_device_name(tn_device device);

int cli_run_main(int argc, char **argv);
int cli_check_main(int argc, char **argv);
int cli_bench_main(int argc, char **argv);
int cli_kernels_main(int argc, char **argv);
int cli_bench_graph_main(int argc, char **argv);

#endif
