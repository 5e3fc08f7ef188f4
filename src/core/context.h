/* The context's layout, shared by core and the backend registry (backends only see their own state). */
#ifndef TN_CORE_CONTEXT_H
#define TN_CORE_CONTEXT_H

#include "tnorm.h"

#define TN_ERROR_CAPACITY 512

struct tn_context {
  char last_error[TN_ERROR_CAPACITY];
  int num_threads_requested; /* <= 0: automatic */
  /* Per device kind: the backend's state once opened, or the status it failed to open with. */
  void *backend_state[TN_DEVICE_KIND_COUNT];
  int backend_tried[TN_DEVICE_KIND_COUNT];
  tn_status backend_status[TN_DEVICE_KIND_COUNT];
  char backend_reason[TN_DEVICE_KIND_COUNT][TN_ERROR_CAPACITY];
  struct tn_graph *recording; /* ops go here instead of running, between tn_graph_begin and _end */
};

#endif
