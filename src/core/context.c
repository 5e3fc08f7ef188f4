#include <stdlib.h>
#include <unistd.h>

#include "backend.h"
#include "context.h"

int tn_threads_wanted(const tn_context *ctx) {
  if (ctx != NULL && ctx->num_threads_requested > 0) return ctx->num_threads_requested;
  const char *env = getenv("TNORM_NUM_THREADS");
  if (env != NULL && *env != '\0') {
    char *end;
    long n = strtol(env, &end, 10);
    if (*end == '\0' && n > 0 && n <= TN_MAX_THREADS) return (int)n;
  }
  long online = sysconf(_SC_NPROCESSORS_ONLN);
  return online > 0 ? (int)(online > TN_MAX_THREADS ? TN_MAX_THREADS : online) : 1;
}
