#include <stdatomic.h>
#include <stdlib.h>
#include <unistd.h>

#include "backend.h"
#include "context.h"

/* The CPUs online, at most TN_MAX_THREADS, counted once per process: glibc's sysconf reads it from
 * /sys on every call, which a one-row call would otherwise pay each time (docs/performance.md, "CPU
 * backend"). Racing first calls store the same value. */
static int online_cpus(void) {
  static _Atomic int cached = 0;
  int n = atomic_load_explicit(&cached, memory_order_relaxed);
  if (n == 0) {
    long online = sysconf(_SC_NPROCESSORS_ONLN);
    n = online > 0 ? (int)(online > TN_MAX_THREADS ? TN_MAX_THREADS : online) : 1;
    atomic_store_explicit(&cached, n, memory_order_relaxed);
  }
  return n;
}

int tn_threads_wanted(const tn_context *ctx) {
  if (ctx != NULL && ctx->num_threads_requested > 0) return ctx->num_threads_requested;
  const char *env = getenv("TNORM_NUM_THREADS");
  if (env != NULL && *env != '\0') {
    char *end;
    long n = strtol(env, &end, 10);
    if (*end == '\0' && n > 0 && n <= TN_MAX_THREADS) return (int)n;
  }
  return online_cpus();
}

tn_status tn_context_enter(tn_context *ctx) {
  return atomic_exchange_explicit(&ctx->in_call, 1, memory_order_acquire) ? TN_ERR_BUSY : TN_OK;
}

void tn_context_leave(tn_context *ctx) { atomic_store_explicit(&ctx->in_call, 0, memory_order_release); }
