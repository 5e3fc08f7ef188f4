/* The backend interface: a table of function pointers per device kind (in the manner of ggml-backend).
 * Core defines it; the registry (src/registry.c) lists the backends; backends never see each other. */
#ifndef TN_CORE_BACKEND_H
#define TN_CORE_BACKEND_H

#include "tnorm.h"

typedef struct tn_backend {
  const char *name;
  tn_device_kind kind;
  /* Opens the backend for one context. On failure returns TN_ERR_UNAVAILABLE (or TN_ERR_NO_MEMORY) with
   * the reason set on ctx; it is then not retried for that context. */
  tn_status (*open)(tn_context *ctx, void **state);
  void (*close)(void *state);
  /* Runs an op whose arguments passed validation and that has rows > 0. Writes nothing on failure. */
  tn_status (*run)(void *state, tn_context *ctx, const tn_op_args *args);
} tn_backend;

/* The most CPU threads a context uses (the environment variable and tn_context_set_num_threads). */
#define TN_MAX_THREADS 1024

/* Threads the CPU backend should use for ctx: the context's setting, else TNORM_NUM_THREADS, else the
 * number of online processors. Always >= 1. */
int tn_threads_wanted(const tn_context *ctx);

#endif
