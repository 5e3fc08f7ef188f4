/* tnorm: run one op on tensor files, check every op against a float64 reference, or benchmark. */
#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"

static const char usage_text[] =
    "usage: tnorm run OP --x PATH --out PATH [options]   run one op on tensor files\n"
    "       tnorm check [--device cpu|cuda|auto] [--seed N]\n"
    "                                                   every op, dtype and a spread of shapes against a\n"
    "                                                   float64 reference on fresh random data\n"
    "       tnorm bench [--device cpu|cuda|auto] [--csv FILE] [--shapes RxD,...] [--ops LIST]\n"
    "                   [--dtypes LIST] [--iters N]      time, GB/s and % of the memory-copy ceiling\n"
    "       tnorm --help | --version\n"
    "\n"
    "OP: rms_norm | l2_norm | add_rms_norm\n"
    "run options:\n"
    "  --x PATH             input (required); PATH is FILE.npy (f32/f16, 1-D or 2-D) or\n"
    "                       FILE.safetensors:TENSOR (F32, F16, BF16)\n"
    "  --weight PATH        weight of dim elements, x's dtype or f32 (rms_norm, add_rms_norm)\n"
    "  --mul PATH           multiplicand, shape of x (rms_norm)\n"
    "  --residual PATH      residual, shape of x (add_rms_norm, required)\n"
    "  --eps E              default 1e-6\n"
    "  --scale S            l2_norm scale, default 1\n"
    "  --weight-offset O    added to the weight (1 for Gemma), default 0\n"
    "  --device D           cpu | cuda | auto (default auto; this build runs the command on the CPU)\n"
    "  --out PATH           output (required): FILE.npy (f32/f16) or FILE.safetensors[:NAME]\n"
    "  --residual-out PATH  add_rms_norm: where to write x + residual\n"
    "Errors: one line on stderr, exit 1 (2 for a usage error); an existing output is never left\n"
    "half-written.\n";

static int vreport(int code, const char *fmt, va_list ap) {
  char msg[1024];
  vsnprintf(msg, sizeof msg, fmt, ap);
  /* Keep the promise of one line whatever a message carries (file names, library text). */
  for (char *p = msg; *p; p++)
    if (*p == '\n' || *p == '\r') *p = ' ';
  fprintf(stderr, "tnorm: error: %s\n", msg);
  return code;
}

int cli_fail(const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  int code = vreport(CLI_FAIL, fmt, ap);
  va_end(ap);
  return code;
}

int cli_usage(const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  int code = vreport(CLI_USAGE, fmt, ap);
  va_end(ap);
  return code;
}

int cli_parse_double(const char *s, double *out) {
  if (s == NULL || *s == '\0' || isspace((unsigned char)*s)) return -1;
  char *end;
  errno = 0;
  double v = strtod(s, &end);
  if (*end != '\0') return -1;
  if (errno == ERANGE && isinf(v)) return -1; /* "1e999": not a usable number */
  *out = v;
  return 0;
}

int cli_parse_count(const char *s, long long *out) {
  if (s == NULL || !isdigit((unsigned char)*s)) return -1;
  char *end;
  errno = 0;
  long long v = strtoll(s, &end, 10);
  if (*end != '\0' || errno != 0 || v <= 0 || v > (1ll << 62)) return -1;
  *out = v;
  return 0;
}

int cli_parse_device(const char *s, cli_device *out) {
  if (strcmp(s, "cpu") == 0) *out = CLI_DEVICE_CPU;
  else if (strcmp(s, "cuda") == 0) *out = CLI_DEVICE_CUDA;
  else if (strcmp(s, "auto") == 0) *out = CLI_DEVICE_AUTO;
  else return -1;
  return 0;
}

int cli_parse_dtype(const char *s, tn_dtype *out) {
  for (int d = 0; d < TN_DTYPE_COUNT; d++) {
    if (strcmp(s, tn_dtype_name((tn_dtype)d)) == 0) {
      *out = (tn_dtype)d;
      return 0;
    }
  }
  return -1;
}

int cli_parse_op(const char *s, tn_op *out) {
  for (int op = 0; op < TN_OP_COUNT; op++) {
    if (strcmp(s, tn_op_name((tn_op)op)) == 0) {
      *out = (tn_op)op;
      return 0;
    }
  }
  return -1;
}

int cli_device_unusable(tn_context *ctx, tn_device_kind kind, char *reason, size_t size) {
  if (kind == TN_DEVICE_CPU) return 0;
  if (tn_device_available(ctx, kind) != TN_OK) snprintf(reason, size, "%s", tn_context_last_error(ctx));
  else snprintf(reason, size, "the tnorm command keeps tensors in host memory in this build");
  return 1;
}

int cli_resolve_device(tn_context *ctx, cli_device choice) {
  char reason[512];
  if (choice == CLI_DEVICE_CUDA && cli_device_unusable(ctx, TN_DEVICE_CUDA, reason, sizeof reason))
    return cli_fail("--device cuda: %s", reason);
  return CLI_OK;
}

int main(int argc, char **argv) {
  if (argc < 2) return cli_usage("no command given (run, check or bench; see tnorm --help)");
  const char *cmd = argv[1];
  if (strcmp(cmd, "--help") == 0 || strcmp(cmd, "-h") == 0 || strcmp(cmd, "help") == 0) {
    fputs(usage_text, stdout);
    return CLI_OK;
  }
  if (strcmp(cmd, "--version") == 0) {
    printf("tnorm %s\n", tn_version());
    return CLI_OK;
  }
  if (strcmp(cmd, "run") == 0) return cli_run_main(argc - 1, argv + 1);
  if (strcmp(cmd, "check") == 0) return cli_check_main(argc - 1, argv + 1);
  if (strcmp(cmd, "bench") == 0) return cli_bench_main(argc - 1, argv + 1);
  return cli_usage("unknown command '%s' (run, check, bench; see tnorm --help)", cmd);
}
