/* The backend interface: a table of function pointers per device kind (in the manner of ggml-backend).
 * Core defines it; the registry in src/api.c lists the backends; backends never see each other.
 * Every entry gets arguments that core already checked, sets ctx's message on failure, and writes
 * nothing when it fails. */
#ifndef TN_CORE_BACKEND_H
#define TN_CORE_BACKEND_H

#include <stddef.h>

#include "tnorm.h"

/* What a fused op (src/graph) asks beyond tn_op_args, so that it gives the same bytes as the ops it
 * replaces. round_before_last: the norm's result times the weight is rounded to the dtype before the
 * multiplicand or the scale multiplies it, as when the two ops ran one after the other. as_rms_norm: an
 * add_rms_norm (with a multiplicand or not) fused from an add and an rms_norm reduces its sum as rms_norm
 * reduces a row, where a backend's own add_rms_norm may reduce in another order (the CUDA one does). */
typedef struct tn_run_options {
  int round_before_last;
  int as_rms_norm;
} tn_run_options;

typedef struct tn_backend {
  const char *name;
  tn_device_kind kind;
  /* Opens the backend for one context. On failure returns TN_ERR_UNAVAILABLE (or TN_ERR_NO_MEMORY) with
   * the reason set on ctx; it is then not retried for that context. */
  tn_status (*open)(tn_context *ctx, void **state);
  void (*close)(void *state);
  /* Number of devices of this kind (>= 1 once open succeeded). */
  int (*device_count)(void *state);

  /* Runs an op whose arguments passed validation and that has rows > 0. */
  tn_status (*run)(void *state, tn_context *ctx, const tn_op_args *args, const tn_run_options *options);
  /* Gets everything the op would need ready (kernels compiled and loaded) without running it. */
  tn_status (*prepare)(void *state, tn_context *ctx, const tn_op_args *args, const tn_run_options *options);

  /* Memory on device `index`; copies where at least one side is this backend's device; waiting. */
  tn_status (*alloc)(void *state, tn_context *ctx, int index, size_t bytes, void **ptr);
  tn_status (*release)(void *state, tn_context *ctx, int index, void *ptr);
  tn_status (*copy)(void *state, tn_context *ctx, void *dst, tn_device dst_device, const void *src,
                    tn_device src_device, size_t bytes);
  tn_status (*synchronize)(void *state, tn_context *ctx, int index);
  tn_status (*set_stream)(void *state, tn_context *ctx, void *stream);

  /* Replaying a recorded graph as one submission; NULL entries where the backend replays op by op.
   * Between capture_begin and capture_end, every run on device `index` is captured (on a stream private to
   * the context) instead of launched. capture_end turns the capture into an executable graph: into *exec
   * in place when *exec is not NULL and the update succeeds (*updated = 1), else a new one that replaces
   * *exec (*updated = 0); with `discard` it only ends the capture. exec_launch queues an executable graph
   * on the context's stream; exec_destroy needs no context (a graph may outlive the one that built it). */
  tn_status (*capture_begin)(void *state, tn_context *ctx, int index);
  tn_status (*capture_end)(void *state, tn_context *ctx, int discard, void **exec, int *updated);
  tn_status (*exec_launch)(void *state, tn_context *ctx, void *exec);
  void (*exec_destroy)(void *exec);

  /* Timing marks in the context's stream order. */
  tn_status (*event_create)(void *state, tn_context *ctx, int index, void **event);
  tn_status (*event_record)(void *state, tn_context *ctx, void *event);
  tn_status (*event_elapsed_ms)(void *state, tn_context *ctx, void *start, void *end, double *ms);
  void (*event_destroy)(void *event);
} tn_backend;

/* The most CPU threads a context uses (the environment variable and tn_context_set_num_threads). */
#define TN_MAX_THREADS 1024

/* Threads the CPU backend should use for ctx: the context's setting, else TNORM_NUM_THREADS, else the
 * number of online processors. Always >= 1. */
int tn_threads_wanted(const tn_context *ctx);

#endif
