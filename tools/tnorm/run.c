/* tnorm run OP: loads the operands from tensor files, runs the op, writes the outputs atomically. */
#include <float.h>
#include <getopt.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cli.h"
#include "tensor_file.h"

typedef struct run_options {
  tn_op op;
  const char *x, *weight, *bias, *mul, *residual, *out, *residual_out;
  double eps, scale, weight_offset;
  int scale_given, weight_offset_given, eps_given;
  tn_casting casting;
  tn_residual_mode residual_mode;
  tn_l2_mode l2_mode;
  int residual_mode_given, l2_mode_given;
  cli_device device;
} run_options;

enum { OPT_X = 256, OPT_WEIGHT, OPT_MUL, OPT_RESIDUAL, OPT_EPS, OPT_SCALE, OPT_WEIGHT_OFFSET, OPT_DEVICE, OPT_OUT,
       OPT_RESIDUAL_OUT, OPT_BIAS, OPT_CASTING, OPT_RESIDUAL_MODE, OPT_L2_MODE };

static const struct option run_long_options[] = {
    {"x", required_argument, NULL, OPT_X},
    {"weight", required_argument, NULL, OPT_WEIGHT},
    {"mul", required_argument, NULL, OPT_MUL},
    {"residual", required_argument, NULL, OPT_RESIDUAL},
    {"eps", required_argument, NULL, OPT_EPS},
    {"scale", required_argument, NULL, OPT_SCALE},
    {"weight-offset", required_argument, NULL, OPT_WEIGHT_OFFSET},
    {"device", required_argument, NULL, OPT_DEVICE},
    {"out", required_argument, NULL, OPT_OUT},
    {"residual-out", required_argument, NULL, OPT_RESIDUAL_OUT},
    {"bias", required_argument, NULL, OPT_BIAS},
    {"casting", required_argument, NULL, OPT_CASTING},
    {"residual-mode", required_argument, NULL, OPT_RESIDUAL_MODE},
    {"l2-mode", required_argument, NULL, OPT_L2_MODE},
    {NULL, 0, NULL, 0},
};

#define RUN_OPS "rms_norm, l2_norm, add_rms_norm, layer_norm or add_layer_norm"

static int is_run_op(tn_op op) {
  return op == TN_OP_RMS_NORM || op == TN_OP_L2_NORM || op == TN_OP_ADD_RMS_NORM || op == TN_OP_LAYER_NORM ||
         op == TN_OP_ADD_LAYER_NORM;
}

static int tn_op_adds_residual_cli(tn_op op) { return op == TN_OP_ADD_RMS_NORM || op == TN_OP_ADD_LAYER_NORM; }

/* The names of each mode's enumerators, in enum order. */
static const char *const casting_names[] = {"exact", "llama"};
static const char *const residual_mode_names[] = {"stored", "f32"};
static const char *const l2_mode_names[] = {"rsqrt_eps", "max_norm_eps"};

static int parse_choice(const char *flag, const char *value, const char *const *names, int count, int *out) {
  for (int i = 0; i < count; i++) {
    if (strcmp(value, names[i]) == 0) {
      *out = i;
      return CLI_OK;
    }
  }
  return cli_usage("--%s: unknown value '%s' (%s or %s)", flag, value, names[0], names[1]);
}

/* The library takes float: a value that float32 rounds to 0, to a subnormal or to infinity would be
 * used as something else without a word, so it is refused. NaN is left for the op to refuse. */
static int parse_number(const char *flag, const char *value, double *out) {
  if (cli_parse_double(value, out) != 0) return cli_usage("--%s: '%s' is not a number", flag, value);
  const float f = (float)*out;
  if (isinf(f))
    return cli_usage("--%s: %s is beyond the range of float32, which the library takes (largest %g)", flag, value,
                     (double)FLT_MAX);
  if (f == 0 && *out != 0)
    return cli_usage("--%s: %s is too small for float32, which the library takes: it would become 0", flag, value);
  if (fpclassify(f) == FP_SUBNORMAL)
    return cli_usage("--%s: %s is subnormal in float32, which the library takes (smallest normal %g)", flag, value,
                     (double)FLT_MIN);
  return CLI_OK;
}

/* Which flags each op takes beyond --x, --out, --eps and --device. A missing required flag is a usage
 * error (2); a flag the op does not take is a well-formed request that cannot be carried out (1). */
static int check_flags_for_op(const run_options *o) {
  const char *op = tn_op_name(o->op);
  int is_l2 = o->op == TN_OP_L2_NORM, is_add = tn_op_adds_residual_cli(o->op);
  int takes_mul = o->op == TN_OP_RMS_NORM || o->op == TN_OP_ADD_RMS_NORM;
  int is_layer = o->op == TN_OP_LAYER_NORM || o->op == TN_OP_ADD_LAYER_NORM;
  if (o->x == NULL) return cli_usage("%s: --x is required", op);
  if (o->out == NULL) return cli_usage("%s: --out is required", op);
  if (is_add && o->residual == NULL) return cli_usage("%s: --residual is required", op);
  if (!is_add && o->residual != NULL)
    return cli_fail("%s: takes no --residual (add_rms_norm and add_layer_norm do)", op);
  if (!is_add && o->residual_out != NULL)
    return cli_fail("%s: takes no --residual-out (add_rms_norm and add_layer_norm do)", op);
  if (!is_add && o->residual_mode_given)
    return cli_fail("%s: takes no --residual-mode (add_rms_norm and add_layer_norm do)", op);
  if (!takes_mul && o->mul != NULL) return cli_fail("%s: takes no --mul (rms_norm and add_rms_norm do)", op);
  if (!is_layer && o->bias != NULL) return cli_fail("%s: takes no --bias (layer_norm and add_layer_norm do)", op);
  if (!is_l2 && o->l2_mode_given) return cli_fail("%s: takes no --l2-mode (l2_norm does)", op);
  if (is_l2 && o->weight != NULL) return cli_fail("%s: takes no --weight (use --scale)", op);
  if (is_l2 && o->weight_offset_given) return cli_fail("%s: takes no --weight-offset", op);
  if (!is_l2 && o->scale_given) return cli_fail("%s: takes no --scale (l2_norm does)", op);
  return CLI_OK;
}

static int parse_run_options(int argc, char **argv, run_options *o) {
  if (argc < 2 || argv[1][0] == '-') return cli_usage("run: missing OP (" RUN_OPS ")");
  /* run's contract covers the norms; the elementwise ops are reached through the library. */
  if (cli_parse_op(argv[1], &o->op) != 0 || !is_run_op(o->op))
    return cli_usage("run: unknown op '%s' (" RUN_OPS ")", argv[1]);
  o->eps = 1e-6;
  o->scale = 1.0;
  o->device = CLI_DEVICE_AUTO;
  opterr = 0;
  optind = 2;
  int c;
  while ((c = getopt_long(argc, argv, ":", run_long_options, NULL)) != -1) {
    int rc = CLI_OK;
    switch (c) {
      case OPT_X: o->x = optarg; break;
      case OPT_WEIGHT: o->weight = optarg; break;
      case OPT_MUL: o->mul = optarg; break;
      case OPT_RESIDUAL: o->residual = optarg; break;
      case OPT_OUT: o->out = optarg; break;
      case OPT_RESIDUAL_OUT: o->residual_out = optarg; break;
      case OPT_EPS: rc = parse_number("eps", optarg, &o->eps); o->eps_given = 1; break;
      case OPT_BIAS: o->bias = optarg; break;
      case OPT_CASTING: rc = parse_choice("casting", optarg, casting_names, 2, (int *)&o->casting); break;
      case OPT_RESIDUAL_MODE:
        rc = parse_choice("residual-mode", optarg, residual_mode_names, 2, (int *)&o->residual_mode);
        o->residual_mode_given = 1;
        break;
      case OPT_L2_MODE:
        rc = parse_choice("l2-mode", optarg, l2_mode_names, 2, (int *)&o->l2_mode);
        o->l2_mode_given = 1;
        break;
      case OPT_SCALE: rc = parse_number("scale", optarg, &o->scale); o->scale_given = 1; break;
      case OPT_WEIGHT_OFFSET:
        rc = parse_number("weight-offset", optarg, &o->weight_offset);
        o->weight_offset_given = 1;
        break;
      case OPT_DEVICE:
        if (cli_parse_device(optarg, &o->device) != 0)
          rc = cli_usage("--device: unknown device '%s' (cpu, cuda or auto)", optarg);
        break;
      case ':': return cli_usage("run: %s needs a value", argv[optind - 1]);
      default: return cli_usage("run: unknown option '%s'", argv[optind - 1]);
    }
    if (rc != CLI_OK) return rc;
  }
  if (optind < argc) return cli_usage("run: unexpected argument '%s'", argv[optind]);
  /* layer_norm's customary eps (torch's nn.LayerNorm) differs from the RMSNorm family's. */
  if (!o->eps_given && (o->op == TN_OP_LAYER_NORM || o->op == TN_OP_ADD_LAYER_NORM)) o->eps = 1e-5;
  return check_flags_for_op(o);
}

/* The output's directory must exist and be writable before anything is computed or written, so a
 * failure never leaves one output written and the other not. */
static int check_output_target(const char *flag, const char *spec, tn_dtype dtype) {
  char err[512];
  if (tn_file_check_save(spec, dtype, err, sizeof err) != 0 || tn_file_check_directory(spec, err, sizeof err) != 0)
    return cli_fail("--%s: %s", flag, err);
  return CLI_OK;
}

typedef struct run_files {
  tn_file_tensor x, weight, bias, mul, residual;
} run_files;

static int load(const char *flag, const char *spec, tn_file_tensor *t) {
  char err[512];
  if (spec == NULL) return CLI_OK;
  if (tn_file_load(spec, t, err, sizeof err) != 0) return cli_fail("--%s: %s", flag, err);
  return CLI_OK;
}

/* Both outputs or neither: each is written in full to a temporary first, then both are renamed into
 * place, and the first is put back if the second cannot be. */
static int save_outputs(const run_options *o, const tn_file_tensor *y, const tn_file_tensor *ro) {
  static const char *const flags[] = {"out", "residual-out"};
  tn_file_pending saves[2] = {{0}, {0}};
  size_t count = o->residual_out != NULL ? 2 : 1, failed = 0;
  char err[512];
  if (tn_file_prepare(o->out, y, "y", &saves[0], err, sizeof err) != 0) return cli_fail("--out: %s", err);
  if (count == 2 && tn_file_prepare(o->residual_out, ro, "residual_out", &saves[1], err, sizeof err) != 0) {
    tn_file_discard(&saves[0]);
    return cli_fail("--residual-out: %s", err);
  }
  if (tn_file_commit(saves, count, &failed, err, sizeof err) != 0)
    return failed < count ? cli_fail("--%s: %s", flags[failed], err) : cli_fail("%s", err);
  return CLI_OK;
}

/* A fatal signal while an output is written would leave its temporary, as big as the output, beside
 * it: the handler removes the pending saves' files, then dies of the signal as it would have. */
static void die_of_signal(int sig) {
  sigset_t set;
  tn_file_remove_pending();
  sigemptyset(&set);
  sigaddset(&set, sig);
  sigprocmask(SIG_UNBLOCK, &set, NULL);
  raise(sig); /* SA_RESETHAND has restored the default action */
}

static void remove_temporaries_on_signals(void) {
  static const int fatal[] = {SIGHUP, SIGINT, SIGQUIT, SIGTERM, SIGPIPE, SIGALRM, SIGUSR1, SIGUSR2, SIGXCPU};
  const size_t count = sizeof fatal / sizeof fatal[0];
  struct sigaction sa, old;
  memset(&sa, 0, sizeof sa);
  sa.sa_handler = die_of_signal;
  sa.sa_flags = SA_RESETHAND;
  sigemptyset(&sa.sa_mask);
  for (size_t i = 0; i < count; i++) sigaddset(&sa.sa_mask, fatal[i]);
  for (size_t i = 0; i < count; i++) {
    /* A signal ignored by whoever started the command (nohup, a background job) stays ignored. */
    if (sigaction(fatal[i], NULL, &old) == 0 && old.sa_handler == SIG_IGN) continue;
    sigaction(fatal[i], &sa, NULL);
  }
  /* Past the file size limit a write then fails with EFBIG, reported and cleaned up like any failed
   * write, instead of the signal killing the command mid-file. */
  signal(SIGXFSZ, SIG_IGN);
}

static tn_tensor view_of(const tn_file_tensor *f) { return tn_tensor_2d(f->data, f->dtype, f->rows, f->dim); }

static int execute(const run_options *o, run_files *files) {
  int rc;
  char err[512];
  /* Two outputs that are one file would leave only the second. A malformed spec is reported below. */
  if (o->residual_out != NULL && tn_file_same_target(o->out, o->residual_out, err, sizeof err) == 1)
    return cli_fail("--out and --residual-out: %s", err);
  if ((rc = load("x", o->x, &files->x)) != CLI_OK) return rc;
  if ((rc = load("residual", o->residual, &files->residual)) != CLI_OK) return rc;
  tn_dtype dtype = files->x.dtype;
  /* The residual stream keeps its own dtype (f32 beside f16/bf16 activations). */
  const int is_add = tn_op_adds_residual_cli(o->op);
  tn_dtype sum_dtype = is_add ? files->residual.dtype : dtype;
  if ((rc = check_output_target("out", o->out, dtype)) != CLI_OK) return rc;
  if (o->residual_out != NULL && (rc = check_output_target("residual-out", o->residual_out, sum_dtype)) != CLI_OK)
    return rc;
  if ((rc = load("weight", o->weight, &files->weight)) != CLI_OK) return rc;
  if ((rc = load("bias", o->bias, &files->bias)) != CLI_OK) return rc;
  if ((rc = load("mul", o->mul, &files->mul)) != CLI_OK) return rc;
  if (files->x.ndim == 2 && files->x.dim == 0) return cli_fail("--x: %s has dim 0; nothing to normalise over", o->x);

  tn_context *ctx = NULL;
  if (tn_context_create(&ctx) != TN_OK) return cli_fail("out of memory");
  tn_device device;
  if ((rc = cli_pick_device(ctx, o->device, &device)) != CLI_OK) goto done;

  size_t elems = (size_t)files->x.rows * (size_t)files->x.dim;
  size_t bytes = elems * tn_dtype_size(dtype), sum_bytes = elems * tn_dtype_size(sum_dtype);
  tn_file_tensor y = files->x, ro = files->x;
  ro.dtype = sum_dtype;
  y.data = elems ? malloc(bytes) : NULL;
  ro.data = elems && is_add ? malloc(sum_bytes) : NULL;
  if (elems && (y.data == NULL || (is_add && ro.data == NULL))) {
    rc = cli_fail("out of memory for %zu bytes of output", bytes + sum_bytes);
    goto free_outputs;
  }

  tn_tensor x = view_of(&files->x), w = view_of(&files->weight), m = view_of(&files->mul);
  tn_tensor b = view_of(&files->bias), r = view_of(&files->residual), yt = view_of(&y), rot = view_of(&ro);
  tn_op_args args = tn_op_args_init(o->op);
  args.x = &x;
  args.weight = o->weight ? &w : NULL;
  args.bias = o->bias ? &b : NULL;
  args.mul = o->mul ? &m : NULL;
  args.residual = o->residual ? &r : NULL;
  args.y = &yt;
  args.residual_out = is_add ? &rot : NULL;
  args.eps = (float)o->eps;
  args.scale = (float)o->scale;
  args.weight_offset = (float)o->weight_offset;
  args.casting = o->casting;
  args.residual_mode = o->residual_mode;
  args.l2_mode = o->l2_mode;
  if (cli_op_on_device(ctx, device, &args) != TN_OK) {
    rc = cli_fail("%s", tn_context_last_error(ctx));
    goto free_outputs;
  }

  rc = save_outputs(o, &y, &ro);

free_outputs:
  free(y.data);
  free(ro.data);
done:
  tn_context_destroy(ctx);
  return rc;
}

int cli_run_main(int argc, char **argv) {
  run_options o = {0};
  int rc = parse_run_options(argc, argv, &o);
  if (rc != CLI_OK) return rc;
  remove_temporaries_on_signals();
  run_files files = {0};
  rc = execute(&o, &files);
  tn_file_tensor_free(&files.x);
  tn_file_tensor_free(&files.weight);
  tn_file_tensor_free(&files.bias);
  tn_file_tensor_free(&files.mul);
  tn_file_tensor_free(&files.residual);
  return rc;
}
