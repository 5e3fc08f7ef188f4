/* The context's layout, shared by core and the backend registry (backends only see their own state). */
#ifndef TN_CORE_CONTEXT_H
#define TN_CORE_CONTEXT_H

#include <stdatomic.h>

#include "tnorm.h"

#define TN_ERROR_CAPACITY 512

struct tn_context {
  atomic_int in_call; /* 1 while a public entry point runs on this context (tn_context_enter) */
  char last_error[TN_ERROR_CAPACITY];
  int num_threads_requested; /* <= 0: automatic */
  /* Per device kind: the backend's state once opened, or the status it failed to open with. */
  void *backend_state[TN_DEVICE_KIND_COUNT];
  int backend_tried[TN_DEVICE_KIND_COUNT];
  tn_status backend_status[TN_DEVICE_KIND_COUNT];
  char backend_reason[TN_DEVICE_KIND_COUNT][TN_ERROR_CAPACITY];
  struct tn_graph *recording; /* ops go here instead of running, between tn_graph_begin and _end */
};

/* Claims ctx for the calling thread for the length of one public call: TN_ERR_BUSY, touching nothing
 * else, when another call holds it. Two threads sharing a context would otherwise interleave writes to
 * its message, thread pool and scratch rows. */
tn_status tn_context_enter(tn_context *ctx);
void tn_context_leave(tn_context *ctx);

#endif
