/* Ops on the CPU run on the calling thread's time line, so the CPU "stream" is the caller itself:
 * synchronising waits for nothing and a timing mark reads the monotonic clock. */
#include "device.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "../core/error.h"

int tn_cpu_device_count(void *state) {
  (void)state;
  return 1;
}

tn_status tn_cpu_alloc(void *state, tn_context *ctx, int index, size_t bytes, void **ptr) {
  (void)state;
  (void)index;
  if (bytes == 0) {
    *ptr = NULL;
    return TN_OK;
  }
  /* 64-byte aligned, like device memory is (and every kernel's fast path wants); aligned_alloc wants a
   * multiple of the alignment, and the rounding up must not wrap. */
  TN_RETURN_ERROR_IF(bytes > SIZE_MAX - 63, ctx, TN_ERR_OVERFLOW,
                     "malloc: %zu bytes of host memory is more than the address space holds", bytes);
  void *p = aligned_alloc(64, (bytes + 63) / 64 * 64);
  TN_RETURN_ERROR_IF(p == NULL, ctx, TN_ERR_NO_MEMORY, "malloc: out of memory for %zu bytes of host memory", bytes);
  *ptr = p;
  return TN_OK;
}

tn_status tn_cpu_release(void *state, tn_context *ctx, int index, void *ptr) {
  (void)state;
  (void)ctx;
  (void)index;
  free(ptr);
  return TN_OK;
}

tn_status tn_cpu_copy(void *state, tn_context *ctx, void *dst, tn_device dst_device, const void *src,
                      tn_device src_device, size_t bytes) {
  (void)state;
  (void)ctx;
  (void)dst_device;
  (void)src_device;
  if (bytes > 0) memmove(dst, src, bytes);
  return TN_OK;
}

tn_status tn_cpu_synchronize(void *state, tn_context *ctx, int index) {
  (void)state;
  (void)ctx;
  (void)index;
  return TN_OK;
}

tn_status tn_cpu_set_stream(void *state, tn_context *ctx, void *stream) {
  (void)state;
  TN_RETURN_ERROR_IF(stream != NULL, ctx, TN_ERR_VALUE, "set_stream: the CPU has no streams; pass NULL");
  return TN_OK;
}

tn_status tn_cpu_event_create(void *state, tn_context *ctx, int index, void **event) {
  (void)state;
  (void)index;
  double *t = calloc(1, sizeof *t);
  TN_RETURN_ERROR_IF(t == NULL, ctx, TN_ERR_NO_MEMORY, "event_create: out of memory");
  *t = -1.0; /* not recorded yet */
  *event = t;
  return TN_OK;
}

tn_status tn_cpu_event_record(void *state, tn_context *ctx, void *event) {
  (void)state;
  (void)ctx;
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  *(double *)event = (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec * 1e-6;
  return TN_OK;
}

tn_status tn_cpu_event_elapsed_ms(void *state, tn_context *ctx, void *start, void *end, double *ms) {
  (void)state;
  const double a = *(const double *)start, b = *(const double *)end;
  TN_RETURN_ERROR_IF(a < 0 || b < 0, ctx, TN_ERR_VALUE, "event_elapsed_ms: an event was never recorded");
  *ms = b - a;
  return TN_OK;
}

void tn_cpu_event_destroy(void *event) { free(event); }
