/* tnorm run OP: loads the operands from tensor files, runs the op, writes the outputs atomically. */
#include <float.h>
#include <inttypes.h>
#include <getopt.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cli.h"
#include "tensor_file.h"

/* The quantized output's flags; format TN_QUANT_NONE without --quant. */
typedef struct quant_options {
  tn_quant_format format;
  tn_quant_scaling scaling;
  int64_t group_size;
  tn_quant_source source;
  int pow2_scales;
  tn_scale_layout layout;
  int scales_given, source_given, layout_given;
  const char *scale_file, *scales_out, *y_out;
} quant_options;

typedef struct run_options {
  tn_op op;
  const char *x, *weight, *bias, *mul, *residual, *out, *residual_out;
  double eps, scale, weight_offset;
  const char *scale_arg; /* l2_norm's number, or with --quant the file of the static (or NVFP4's global) scale */
  int scale_given, weight_offset_given, eps_given, casting_given;
  tn_casting casting;
  tn_residual_mode residual_mode;
  tn_l2_mode l2_mode;
  int residual_mode_given, l2_mode_given;
  cli_device device;
  quant_options quant;
} run_options;

enum { OPT_X = 256, OPT_WEIGHT, OPT_MUL, OPT_RESIDUAL, OPT_EPS, OPT_SCALE, OPT_WEIGHT_OFFSET, OPT_DEVICE, OPT_OUT,
       OPT_RESIDUAL_OUT, OPT_BIAS, OPT_CASTING, OPT_RESIDUAL_MODE, OPT_L2_MODE, OPT_QUANT, OPT_SCALES,
       OPT_QUANT_SOURCE, OPT_POW2_SCALES, OPT_SCALES_LAYOUT, OPT_SCALES_OUT, OPT_Y_OUT };

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
    {"quant", required_argument, NULL, OPT_QUANT},
    {"scales", required_argument, NULL, OPT_SCALES},
    {"quant-source", required_argument, NULL, OPT_QUANT_SOURCE},
    {"pow2-scales", no_argument, NULL, OPT_POW2_SCALES},
    {"scales-layout", required_argument, NULL, OPT_SCALES_LAYOUT},
    {"scales-out", required_argument, NULL, OPT_SCALES_OUT},
    {"y-out", required_argument, NULL, OPT_Y_OUT},
    {NULL, 0, NULL, 0},
};

#define RUN_OPS "rms_norm, l2_norm, add_rms_norm, layer_norm, add_layer_norm or quantize"
#define QUANT_OPS "rms_norm, add_rms_norm, layer_norm, add_layer_norm and quantize"

static int is_run_op(tn_op op) {
  return op == TN_OP_RMS_NORM || op == TN_OP_L2_NORM || op == TN_OP_ADD_RMS_NORM || op == TN_OP_LAYER_NORM ||
         op == TN_OP_ADD_LAYER_NORM || op == TN_OP_QUANTIZE;
}

static int takes_quant(tn_op op) { return is_run_op(op) && op != TN_OP_L2_NORM; }

static int tn_op_adds_residual_cli(tn_op op) { return op == TN_OP_ADD_RMS_NORM || op == TN_OP_ADD_LAYER_NORM; }

/* The names of each mode's enumerators, in enum order. */
static const char *const casting_names[] = {"exact", "llama"};
static const char *const residual_mode_names[] = {"stored", "f32"};
static const char *const l2_mode_names[] = {"rsqrt_eps", "max_norm_eps"};
static const char *const quant_source_names[] = {"rounded", "f32"};
static const char *const scales_layout_names[] = {"row", "column", "swizzled"};
/* --scales: the scaling and group size of each name. */
static const char *const scales_names[] = {"tensor", "token", "group32", "group64", "group128"};
static const struct {
  tn_quant_scaling scaling;
  int64_t group_size;
} scales_kinds[] = {{TN_QUANT_SCALE_TENSOR, 0}, {TN_QUANT_SCALE_TOKEN, 0}, {TN_QUANT_SCALE_GROUP, 32},
                    {TN_QUANT_SCALE_GROUP, 64}, {TN_QUANT_SCALE_GROUP, 128}};
#define COUNT_OF(a) ((int)(sizeof(a) / sizeof((a)[0])))

static int parse_choice(const char *flag, const char *value, const char *const *names, int count, int *out) {
  char list[256] = "";
  for (int i = 0; i < count; i++) {
    if (strcmp(value, names[i]) == 0) {
      *out = i;
      return CLI_OK;
    }
  }
  for (int i = 0; i < count; i++) {
    const size_t used = strlen(list);
    snprintf(list + used, sizeof list - used, "%s%s", i == 0 ? "" : i + 1 == count ? " or " : ", ", names[i]);
  }
  return cli_usage("--%s: unknown value '%s' (%s)", flag, value, list);
}

/* --quant's formats, named as the library names them (tn_quant_format_name). */
static int parse_quant_format(const char *value, tn_quant_format *out) {
  const char *names[TN_QUANT_NVFP4];
  int index;
  for (int f = TN_QUANT_FP8_E4M3; f <= TN_QUANT_NVFP4; f++) names[f - 1] = tn_quant_format_name((tn_quant_format)f);
  int rc = parse_choice("quant", value, names, TN_QUANT_NVFP4, &index);
  if (rc == CLI_OK) *out = (tn_quant_format)(index + 1);
  return rc;
}

static int is_block_format(tn_quant_format f) { return f == TN_QUANT_MXFP8 || f == TN_QUANT_NVFP4; }

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

/* A flag of the quantized output given without --quant, or NULL. */
static const char *stray_quant_flag(const quant_options *q) {
  if (q->scales_given) return "--scales";
  if (q->source_given) return "--quant-source";
  if (q->pow2_scales) return "--pow2-scales";
  if (q->layout_given) return "--scales-layout";
  if (q->scales_out != NULL) return "--scales-out";
  if (q->y_out != NULL) return "--y-out";
  return NULL;
}

/* Which quantized-output flags go together, as check_flags_for_op does for the op's own. */
static int check_quant_flags(const run_options *o) {
  const char *op = tn_op_name(o->op);
  const quant_options *q = &o->quant;
  if (q->format == TN_QUANT_NONE) {
    const char *stray = stray_quant_flag(q);
    return stray != NULL ? cli_fail("%s: %s applies to a quantized output; give --quant too", op, stray) : CLI_OK;
  }
  const char *format = tn_quant_format_name(q->format);
  if (!takes_quant(o->op)) return cli_fail("%s: takes no --quant (" QUANT_OPS " do)", op);
  if (is_block_format(q->format) && q->scales_given)
    return cli_fail("%s: %s has scales of its own (%s); leave out --scales", op, format,
                    q->format == TN_QUANT_MXFP8 ? "a UE8M0 per 32 elements" : "an E4M3 per 16 elements");
  const int dynamic = q->scaling != TN_QUANT_SCALE_TENSOR, nvfp4 = q->format == TN_QUANT_NVFP4;
  if ((!dynamic || nvfp4) && q->scale_file == NULL)
    return cli_usage("%s: --scale FILE is required with %s (%s)", op, nvfp4 ? "nvfp4" : "--scales tensor",
                     nvfp4 ? "the f32 global scale" : "the f32 static scale");
  if (dynamic && !nvfp4 && q->scale_file != NULL)
    return cli_fail("%s: takes no --scale with dynamic %s scales (--scales tensor and nvfp4 take one)", op, format);
  if (dynamic && q->scales_out == NULL) return cli_usage("%s: --scales-out is required with dynamic scales", op);
  if (!dynamic && q->scales_out != NULL)
    return cli_fail("%s: a static scale writes no scales; leave out --scales-out", op);
  if (q->pow2_scales && (!dynamic || nvfp4))
    return cli_fail("%s: --pow2-scales applies to dynamic fp8_e4m3, fp8_e5m2, int8 and mxfp8 scales", op);
  if (q->layout_given && !dynamic) return cli_fail("%s: --scales-layout applies to dynamic scales", op);
  if (q->layout == TN_SCALES_SWIZZLED && !is_block_format(q->format))
    return cli_fail("%s: --scales-layout swizzled is mxfp8's and nvfp4's (the block-scaled GEMMs' tiles)", op);
  if (o->op == TN_OP_QUANTIZE && q->y_out != NULL) return cli_fail("quantize: takes no --y-out (its input is x)");
  if (o->op == TN_OP_QUANTIZE && q->source_given)
    return cli_fail("quantize: takes no --quant-source (it quantizes x as it is)");
  return CLI_OK;
}

/* Which flags each op takes beyond --x, --out, --eps and --device. A missing required flag is a usage
 * error (2); a flag the op does not take is a well-formed request that cannot be carried out (1). */
static int check_flags_for_op(const run_options *o) {
  const char *op = tn_op_name(o->op);
  int is_l2 = o->op == TN_OP_L2_NORM, is_add = tn_op_adds_residual_cli(o->op);
  int takes_mul = o->op == TN_OP_RMS_NORM || o->op == TN_OP_ADD_RMS_NORM;
  int is_layer = o->op == TN_OP_LAYER_NORM || o->op == TN_OP_ADD_LAYER_NORM;
  int is_quantize = o->op == TN_OP_QUANTIZE;
  if (o->x == NULL) return cli_usage("%s: --x is required", op);
  if (o->out == NULL) return cli_usage("%s: --out is required", op);
  if (is_quantize && o->quant.format == TN_QUANT_NONE) return cli_usage("quantize: --quant is required");
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
  if ((is_l2 || is_quantize) && o->weight_offset_given) return cli_fail("%s: takes no --weight-offset", op);
  if (is_quantize && o->weight != NULL) return cli_fail("quantize: takes no --weight (it quantizes x as it is)");
  if (is_quantize && o->eps_given) return cli_fail("quantize: takes no --eps");
  if (is_quantize && o->casting_given) return cli_fail("quantize: takes no --casting (the norms do)");
  if (!is_l2 && o->scale_given && o->quant.format == TN_QUANT_NONE)
    return cli_fail("%s: takes no --scale (l2_norm does; with --quant it names the static scale's file)", op);
  return check_quant_flags(o);
}

static int parse_run_options(int argc, char **argv, run_options *o) {
  if (argc < 2 || argv[1][0] == '-') return cli_usage("run: missing OP (" RUN_OPS ")");
  /* run's contract covers the norms and quantize; the elementwise ops are reached through the library. */
  if (cli_parse_op(argv[1], &o->op) != 0 || !is_run_op(o->op))
    return cli_usage("run: unknown op '%s' (" RUN_OPS ")", argv[1]);
  o->eps = 1e-6;
  o->scale = 1.0;
  o->device = CLI_DEVICE_AUTO;
  o->quant.scaling = TN_QUANT_SCALE_TOKEN;
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
      case OPT_CASTING:
        rc = parse_choice("casting", optarg, casting_names, 2, (int *)&o->casting);
        o->casting_given = 1;
        break;
      case OPT_RESIDUAL_MODE:
        rc = parse_choice("residual-mode", optarg, residual_mode_names, 2, (int *)&o->residual_mode);
        o->residual_mode_given = 1;
        break;
      case OPT_L2_MODE:
        rc = parse_choice("l2-mode", optarg, l2_mode_names, 2, (int *)&o->l2_mode);
        o->l2_mode_given = 1;
        break;
      case OPT_SCALE: o->scale_arg = optarg; o->scale_given = 1; break;
      case OPT_QUANT: rc = parse_quant_format(optarg, &o->quant.format); break;
      case OPT_SCALES: {
        int k = 0;
        rc = parse_choice("scales", optarg, scales_names, COUNT_OF(scales_names), &k);
        o->quant.scaling = scales_kinds[k].scaling;
        o->quant.group_size = scales_kinds[k].group_size;
        o->quant.scales_given = 1;
        break;
      }
      case OPT_QUANT_SOURCE:
        rc = parse_choice("quant-source", optarg, quant_source_names, 2, (int *)&o->quant.source);
        o->quant.source_given = 1;
        break;
      case OPT_POW2_SCALES: o->quant.pow2_scales = 1; break;
      case OPT_SCALES_LAYOUT:
        rc = parse_choice("scales-layout", optarg, scales_layout_names, 3, (int *)&o->quant.layout);
        o->quant.layout_given = 1;
        break;
      case OPT_SCALES_OUT: o->quant.scales_out = optarg; break;
      case OPT_Y_OUT: o->quant.y_out = optarg; break;
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
  /* --scale is l2_norm's number, or beside --quant the file of a scale: which, only the whole line says. */
  if (o->quant.format != TN_QUANT_NONE) {
    o->quant.scale_file = o->scale_arg;
    if (is_block_format(o->quant.format)) o->quant.scaling = TN_QUANT_SCALE_GROUP;
  } else if (o->scale_given) {
    int rc = parse_number("scale", o->scale_arg, &o->scale);
    if (rc != CLI_OK) return rc;
  }
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
  tn_file_tensor x, weight, bias, mul, residual, scale;
} run_files;

static int load(const char *flag, const char *spec, tn_file_tensor *t) {
  char err[512];
  if (spec == NULL) return CLI_OK;
  if (tn_file_load(spec, t, err, sizeof err) != 0) return cli_fail("--%s: %s", flag, err);
  return CLI_OK;
}

/* The outputs a run may write: --out (y, or q with --quant), --residual-out, and with --quant
 * --scales-out and --y-out. */
enum { OUT_MAIN, OUT_RESIDUAL, OUT_SCALES, OUT_Y, OUT_COUNT };

typedef struct run_output {
  const char *flag, *spec, *name; /* spec NULL: not written */
  tn_file_tensor t;               /* its data malloc'd here */
} run_output;

static void outputs_init(const run_options *o, run_output outs[OUT_COUNT]) {
  const int quant = o->quant.format != TN_QUANT_NONE;
  memset(outs, 0, OUT_COUNT * sizeof *outs);
  outs[OUT_MAIN] = (run_output){.flag = "out", .spec = o->out, .name = quant ? "q" : "y"};
  outs[OUT_RESIDUAL] = (run_output){.flag = "residual-out", .spec = o->residual_out, .name = "residual_out"};
  outs[OUT_SCALES] = (run_output){.flag = "scales-out", .spec = o->quant.scales_out, .name = "scales"};
  outs[OUT_Y] = (run_output){.flag = "y-out", .spec = o->quant.y_out, .name = "y"};
}

static void outputs_free(run_output outs[OUT_COUNT]) {
  for (int k = 0; k < OUT_COUNT; k++) free(outs[k].t.data);
}

/* Two outputs that are one file would leave only the second. A malformed spec is reported later. */
static int check_distinct_outputs(const run_output outs[OUT_COUNT]) {
  char err[512];
  for (int a = 0; a < OUT_COUNT; a++)
    for (int b = a + 1; b < OUT_COUNT; b++)
      if (outs[a].spec != NULL && outs[b].spec != NULL &&
          tn_file_same_target(outs[a].spec, outs[b].spec, err, sizeof err) == 1)
        return cli_fail("--%s and --%s: %s", outs[a].flag, outs[b].flag, err);
  return CLI_OK;
}

/* Every output or none: each is written in full to a temporary first, then all are renamed into place,
 * and those already renamed are put back if one cannot be. */
static int save_outputs(const run_output outs[OUT_COUNT]) {
  tn_file_pending saves[OUT_COUNT];
  int which[OUT_COUNT];
  size_t count = 0, failed = 0;
  char err[512];
  memset(saves, 0, sizeof saves);
  for (int k = 0; k < OUT_COUNT; k++) {
    if (outs[k].spec == NULL) continue;
    if (tn_file_prepare(outs[k].spec, &outs[k].t, outs[k].name, &saves[count], err, sizeof err) != 0) {
      for (size_t j = 0; j < count; j++) tn_file_discard(&saves[j]);
      return cli_fail("--%s: %s", outs[k].flag, err);
    }
    which[count++] = k;
  }
  if (tn_file_commit(saves, count, &failed, err, sizeof err) != 0)
    return failed < count ? cli_fail("--%s: %s", outs[which[failed]].flag, err) : cli_fail("%s", err);
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

/* The tn_quant of the flags, tensors not yet attached. */
static tn_quant quant_of(const quant_options *q) {
  tn_quant quant = tn_quant_init(q->format);
  quant.scaling = q->scaling;
  quant.group_size = q->group_size;
  quant.source = q->source;
  quant.pow2_scales = q->pow2_scales;
  quant.layout = q->layout;
  return quant;
}

/* --scale: one f32, finite and > 0. The CPU backend refuses any other value too, but a GPU kernel cannot
 * and would quantize with it as it is. */
static int check_scale_file(const char *spec, const tn_file_tensor *t) {
  if (t->dtype != TN_F32) return cli_fail("--scale: %s is %s; the scale must be f32", spec, tn_dtype_name(t->dtype));
  if (t->rows != 1 || t->dim != 1)
    return cli_fail("--scale: %s holds %" PRId64 " x %" PRId64 " elements; the scale must be one f32 (shape (), (1,) "
                    "or (1, 1))", spec, t->rows, t->dim);
  float v;
  memcpy(&v, t->data, sizeof v);
  if (!(isfinite(v) && v > 0.0f)) return cli_fail("--scale: %s holds %g; the scale must be finite and > 0", spec, (double)v);
  return CLI_OK;
}

/* dim must split into whole groups; the library would refuse it too, but only after an output of no
 * groups had been refused for its shape. */
static int check_groups(const run_options *o, const tn_quant *quant, int64_t dim) {
  const int64_t group = cli_quant_group(quant, dim);
  if (dim % group == 0) return CLI_OK;
  const int block = is_block_format(quant->format);
  return cli_fail("%s: dim %" PRId64 " is not a multiple of %s's group of %" PRId64 " elements (%s%s)",
                  tn_op_name(o->op), dim, tn_quant_format_name(quant->format), group, block ? "its blocks" : "--scales ",
                  block ? "" : scales_names[group == 32 ? 2 : group == 64 ? 3 : 4]);
}

/* Allocates an output of rows x dim; 0 when out of memory. */
static int output_alloc(run_output *out, tn_dtype dtype, int ndim, int64_t rows, int64_t dim) {
  const size_t bytes = (size_t)rows * (size_t)dim * tn_dtype_size(dtype);
  out->t.dtype = dtype;
  out->t.ndim = ndim;
  out->t.rows = rows;
  out->t.dim = dim;
  /* Zeroed: the swizzled scales' padding is zeros whatever the device leaves there. */
  out->t.data = bytes ? calloc(1, bytes) : NULL;
  return bytes == 0 || out->t.data != NULL;
}

/* The quantized output's tensors (q into --out, the scales into --scales-out) attached to quant. */
static int quant_outputs(const tn_file_tensor *x, tn_quant *quant, run_output outs[OUT_COUNT], tn_tensor *qt,
                         tn_tensor *st, cli_quant_meta *meta) {
  cli_quant_shapes sh;
  cli_quant_shapes_of(quant, x->rows, x->dim, &sh);
  cli_quant_metadata(quant, x->dim, meta);
  if (!output_alloc(&outs[OUT_MAIN], sh.q_dtype, x->ndim, x->rows, sh.q_dim)) return 0;
  memcpy(outs[OUT_MAIN].t.meta, meta->q, sizeof meta->q);
  *qt = view_of(&outs[OUT_MAIN].t);
  quant->q = qt;
  if (outs[OUT_SCALES].spec == NULL) return 1;
  if (!output_alloc(&outs[OUT_SCALES], sh.scales_dtype, 2, sh.scales_rows, sh.scales_dim)) return 0;
  memcpy(outs[OUT_SCALES].t.meta, meta->scales, sizeof meta->scales);
  *st = view_of(&outs[OUT_SCALES].t);
  quant->scales = st;
  return 1;
}

/* --device auto takes the GPU where the op runs there: quantized outputs, which only the CPU backend
 * implements for now, fall back to the CPU. */
static tn_status run_op(tn_context *ctx, cli_device choice, tn_device device, const tn_op_args *args) {
  tn_status st = cli_op_on_device(ctx, device, args);
  if (st == TN_ERR_UNAVAILABLE && choice == CLI_DEVICE_AUTO && device.kind != TN_DEVICE_CPU)
    st = cli_op_on_device(ctx, tn_cpu_device(), args);
  return st;
}

static int execute(const run_options *o, run_files *files, run_output outs[OUT_COUNT]) {
  int rc;
  const int is_add = tn_op_adds_residual_cli(o->op), quantized = o->quant.format != TN_QUANT_NONE;
  tn_quant quant = quant_of(&o->quant);
  cli_quant_shapes sh;
  if ((rc = check_distinct_outputs(outs)) != CLI_OK) return rc;
  if ((rc = load("x", o->x, &files->x)) != CLI_OK) return rc;
  if ((rc = load("residual", o->residual, &files->residual)) != CLI_OK) return rc;
  const tn_dtype dtype = files->x.dtype;
  /* The residual stream keeps its own dtype (f32 beside f16/bf16 activations). */
  const tn_dtype sum_dtype = is_add ? files->residual.dtype : dtype;
  cli_quant_shapes_of(&quant, 0, 1, &sh); /* the dtypes only */
  const tn_dtype dtypes[OUT_COUNT] = {quantized ? sh.q_dtype : dtype, sum_dtype, sh.scales_dtype, dtype};
  for (int k = 0; k < OUT_COUNT; k++)
    if (outs[k].spec != NULL && (rc = check_output_target(outs[k].flag, outs[k].spec, dtypes[k])) != CLI_OK) return rc;
  if ((rc = load("weight", o->weight, &files->weight)) != CLI_OK) return rc;
  if ((rc = load("bias", o->bias, &files->bias)) != CLI_OK) return rc;
  if ((rc = load("mul", o->mul, &files->mul)) != CLI_OK) return rc;
  if (o->quant.scale_file != NULL) {
    char err[512];
    double number;
    if (cli_parse_double(o->quant.scale_file, &number) == 0)
      return cli_fail("--scale: '%s' is a number; beside --quant, --scale names the file of the scale (an f32 .npy "
                      "or FILE.safetensors:TENSOR of one element)", o->quant.scale_file);
    if (tn_file_load_scalar(o->quant.scale_file, &files->scale, err, sizeof err) != 0)
      return cli_fail("--scale: %s", err);
    if ((rc = check_scale_file(o->quant.scale_file, &files->scale)) != CLI_OK) return rc;
  }
  if (files->x.ndim == 2 && files->x.dim == 0) return cli_fail("--x: %s has dim 0; nothing to normalise over", o->x);
  if (quantized && (rc = check_groups(o, &quant, files->x.dim)) != CLI_OK) return rc;

  tn_context *ctx = NULL;
  if (tn_context_create(&ctx) != TN_OK) return cli_fail("out of memory");
  tn_device device;
  if ((rc = cli_pick_device(ctx, o->device, &device)) != CLI_OK) goto done;

  /* y is written to --out, or with --quant to --y-out when given (else the op writes none). */
  run_output *y_out = quantized ? (outs[OUT_Y].spec != NULL ? &outs[OUT_Y] : NULL) : &outs[OUT_MAIN];
  const tn_file_tensor *x_file = &files->x;
  tn_tensor qt, st, yt, rot, scale_t = view_of(&files->scale);
  cli_quant_meta meta;
  int allocated = (y_out == NULL || output_alloc(y_out, dtype, x_file->ndim, x_file->rows, x_file->dim)) &&
                  (!is_add || output_alloc(&outs[OUT_RESIDUAL], sum_dtype, x_file->ndim, x_file->rows, x_file->dim)) &&
                  (!quantized || quant_outputs(x_file, &quant, outs, &qt, &st, &meta));
  if (!allocated) {
    rc = cli_fail("out of memory for the outputs of %" PRId64 " x %" PRId64 " elements", x_file->rows, x_file->dim);
    goto done;
  }
  if (y_out != NULL) yt = view_of(&y_out->t);
  if (is_add) rot = view_of(&outs[OUT_RESIDUAL].t);
  if (o->quant.scale_file != NULL) quant.scale = &scale_t;

  tn_tensor x = view_of(&files->x), w = view_of(&files->weight), m = view_of(&files->mul);
  tn_tensor b = view_of(&files->bias), r = view_of(&files->residual);
  tn_op_args args = tn_op_args_init(o->op);
  args.x = &x;
  args.weight = o->weight ? &w : NULL;
  args.bias = o->bias ? &b : NULL;
  args.mul = o->mul ? &m : NULL;
  args.residual = o->residual ? &r : NULL;
  args.y = y_out != NULL ? &yt : NULL;
  args.residual_out = is_add ? &rot : NULL;
  args.eps = (float)o->eps;
  args.scale = (float)o->scale;
  args.weight_offset = (float)o->weight_offset;
  args.casting = o->casting;
  args.residual_mode = o->residual_mode;
  args.l2_mode = o->l2_mode;
  if (quantized) args.quant = quant;
  if (run_op(ctx, o->device, device, &args) != TN_OK) {
    rc = cli_fail("%s", tn_context_last_error(ctx));
    goto done;
  }
  rc = save_outputs(outs);

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
  run_output outs[OUT_COUNT];
  outputs_init(&o, outs);
  rc = execute(&o, &files, outs);
  outputs_free(outs);
  tn_file_tensor_free(&files.scale);
  tn_file_tensor_free(&files.x);
  tn_file_tensor_free(&files.weight);
  tn_file_tensor_free(&files.bias);
  tn_file_tensor_free(&files.mul);
  tn_file_tensor_free(&files.residual);
  return rc;
}
