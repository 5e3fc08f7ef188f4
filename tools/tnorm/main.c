/* tnorm: run one op on tensor files, check every op against a float64 reference, or benchmark. */
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "cli.h"

static const char usage_text[] =
    "usage: tnorm run OP --x PATH --out PATH [options]   run one op on tensor files\n"
    "       tnorm check [--device cpu|cuda|auto] [--seed N]\n"
    "                                                   every op, dtype and a spread of shapes against a\n"
    "                                                   float64 reference on fresh random data\n"
    "       tnorm bench [--device cpu|cuda|auto] [--csv FILE] [--shapes RxD|TxHxD,...] [--ops LIST]\n"
    "                   [--dtypes LIST] [--iters N]      time, GB/s and % of the memory-copy ceiling\n"
    "                                                   (ops: the library's, rms_norm_rope and\n"
    "                                                   rms_norm_rope_theta over TxHxD heads, and the\n"
    "                                                   quantized outputs: rms_norm+fp8_token,\n"
    "                                                   rms_norm+fp8_tensor, rms_norm+fp8_group128,\n"
    "                                                   rms_norm+int8_token, rms_norm+mxfp8, rms_norm+nvfp4,\n"
    "                                                   add_rms_norm+fp8_token, add_rms_norm+nvfp4,\n"
    "                                                   quantize+fp8_token, quantize+nvfp4)\n"
    "       tnorm bench-graph [--device D] [--layers 32] [--dim 4096] [--dtype bf16] [--steps 200]\n"
    "                                                   a decode step (add -> rms_norm -> mul per layer,\n"
    "                                                   rows 1, 8, 64): op by op, as a graph, fused\n"
    "       tnorm kernels [--arch N]                    compile every CUDA kernel variant for compute\n"
    "                                                   capability N (default 90) into the disk cache;\n"
    "                                                   needs NVRTC, not a GPU\n"
    "       tnorm --help | --version\n"
    "\n"
    "OP: rms_norm | l2_norm | add_rms_norm | layer_norm | add_layer_norm | quantize (with --quant)\n"
    "run options:\n"
    "  --x PATH             input (required); PATH is FILE.npy (f32/f16, 1-D or 2-D) or\n"
    "                       FILE.safetensors:TENSOR (F32, F16, BF16)\n"
    "  --weight PATH        weight of dim elements, x's dtype or f32 (not l2_norm)\n"
    "  --bias PATH          bias of dim elements, x's dtype or f32 (layer_norm, add_layer_norm)\n"
    "  --mul PATH           multiplicand, shape of x (rms_norm, add_rms_norm)\n"
    "  --residual PATH      residual, shape of x, x's dtype or f32 (add_rms_norm, add_layer_norm: required)\n"
    "  --eps E              default 1e-6 (layer_norm, add_layer_norm: 1e-5)\n"
    "  --casting C          exact (default: one rounding, as HF Gemma3RMSNorm) or llama (the normalised\n"
    "                       x rounded to x's dtype before the weight, as HF LlamaRMSNorm/Qwen3RMSNorm)\n"
    "  --residual-mode M    stored (default: normalise the sum as stored, as HF) or f32 (the float32 sum)\n"
    "  --l2-mode M          rsqrt_eps (default: x * rsqrt(sum + eps)) or max_norm_eps (x / max(norm, eps))\n"
    "  --scale S            l2_norm scale, default 1 (with --quant: a file, below)\n"
    "  --weight-offset O    added to the weight (1 for Gemma), default 0\n"
    "  --device D           cpu | cuda | auto (default auto: the GPU when there is one and it runs the op)\n"
    "  --out PATH           output (required): FILE.npy (f32/f16/i8/u8) or FILE.safetensors[:NAME]\n"
    "  --residual-out PATH  add_rms_norm, add_layer_norm: where to write x + residual\n"
    "quantized output (rms_norm, add_rms_norm, layer_norm, add_layer_norm, quantize; CPU only for now):\n"
    "  --quant F            fp8_e4m3 | fp8_e5m2 | int8 | mxfp8 | nvfp4: --out receives q (FP8 as\n"
    "                       .safetensors only; nvfp4 as U8 [rows, dim/2], two E2M1 a byte, low nibble first)\n"
    "  --scales S           tensor | token (default) | group32 | group64 | group128 (mxfp8 and nvfp4\n"
    "                       have their own blocks of 32 and 16)\n"
    "  --scale FILE         one f32 (shape (), (1,) or (1, 1)): the static scale (--scales tensor) or\n"
    "                       nvfp4's global scale; beside --quant, --scale names this file\n"
    "  --scales-out PATH    the dynamic scales: f32, or U8 UE8M0 exponents with --pow2-scales and for\n"
    "                       mxfp8, or F8_E4M3 for nvfp4 (safetensors metadata says which)\n"
    "  --scales-layout L    row (default: rows x groups) | column (groups x rows) | swizzled (mxfp8 and\n"
    "                       nvfp4: the 128x4 tiles of block-scaled GEMMs)\n"
    "  --pow2-scales        dynamic scales rounded up to powers of two, stored as UE8M0 bytes\n"
    "  --quant-source S     rounded (default: q quantizes y as written) or f32 (the float32 result)\n"
    "  --y-out PATH         also write the unquantized y (else it is not written)\n"
    "Errors: one line on stderr, exit 1 (2 for a usage error); outputs are written in full to temporary\n"
    "files and then renamed into place, all or none, so an existing output is never left half-written\n"
    "or replaced by a failed call.\n"
    "Memory: run reads its inputs whole, so it needs about the size of its input files plus its outputs\n"
    "(a 2 GiB x, even a sparse file, takes 2 GiB to read and 2 GiB for y).\n";

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

/* tnorm kernels [--arch N]: every kernel variant compiled (or found in the disk cache), timed. */
int cli_kernels_main(int argc, char **argv) {
  long long arch = 90;
  for (int i = 1; i < argc; i++) {
    if (strcmp(argv[i], "--arch") == 0 && i + 1 < argc) {
      if (cli_parse_count(argv[++i], &arch) != 0 || arch > 1000)
        return cli_usage("--arch: '%s' is not a compute capability such as 90", argv[i]);
    } else {
      return cli_usage("kernels: unexpected argument '%s'", argv[i]);
    }
  }
  tn_context *ctx = NULL;
  if (tn_context_create(&ctx) != TN_OK) return cli_fail("out of memory");
  struct timespec t0, t1;
  clock_gettime(CLOCK_MONOTONIC, &t0);
  int count = 0;
  tn_status st = tn_cuda_build_kernels(ctx, (int)arch, &count);
  clock_gettime(CLOCK_MONOTONIC, &t1);
  int rc = CLI_OK;
  if (st != TN_OK) {
    rc = cli_fail("%s", tn_context_last_error(ctx));
  } else {
    tn_kernel_cache_stats s;
    tn_kernel_cache_stats_get(&s);
    printf("%d kernel variants for sm_%lld in %.2f s: %llu compiled (%.2f s in NVRTC), %llu from the disk cache, "
           "%llu damaged entries rebuilt\n",
           count, arch, (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) * 1e-9,
           (unsigned long long)s.compiled, s.compile_seconds, (unsigned long long)s.loaded_from_disk,
           (unsigned long long)s.disk_rejected);
  }
  tn_context_destroy(ctx);
  return rc;
}

/* Started with a standard stream closed, the command would get that descriptor for the first file it
 * opens (an output's temporary, a CSV) and then print into the file: each closed one is opened on
 * /dev/null first, in order, so that it takes its own number. */
static void keep_standard_streams_open(void) {
  for (int fd = 0; fd <= 2; fd++) {
    if (fcntl(fd, F_GETFD) != -1 || errno != EBADF) continue;
    const int opened = open("/dev/null", fd == 0 ? O_RDONLY : O_WRONLY);
    if (opened >= 0 && opened != fd) close(opened);
  }
}

int main(int argc, char **argv) {
  keep_standard_streams_open();
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
  if (strcmp(cmd, "kernels") == 0) return cli_kernels_main(argc - 1, argv + 1);
  if (strcmp(cmd, "bench-graph") == 0) return cli_bench_graph_main(argc - 1, argv + 1);
  return cli_usage("unknown command '%s' (run, check, bench, bench-graph, kernels; see tnorm --help)", cmd);
}
