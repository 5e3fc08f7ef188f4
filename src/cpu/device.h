/* The CPU as a device: host memory, memcpy, and host-clock timing marks. */
#ifndef TN_CPU_DEVICE_H
#define TN_CPU_DEVICE_H

#include "../core/backend.h"

int tn_cpu_device_count(void *state);
tn_status tn_cpu_alloc(void *state, tn_context *ctx, int index, size_t bytes, void **ptr);
tn_status tn_cpu_release(void *state, tn_context *ctx, int index, void *ptr);
tn_status tn_cpu_copy(void *state, tn_context *ctx, void *dst, tn_device dst_device, const void *src,
                      tn_device src_device, size_t bytes);
tn_status tn_cpu_synchronize(void *state, tn_context *ctx, int index);
tn_status tn_cpu_set_stream(void *state, tn_context *ctx, void *stream);
tn_status tn_cpu_event_create(void *state, tn_context *ctx, int index, void **event);
tn_status tn_cpu_event_record(void *state, tn_context *ctx, void *event);
tn_status tn_cpu_event_elapsed_ms(void *state, tn_context *ctx, void *start, void *end, double *ms);
void tn_cpu_event_destroy(void *event);

#endif
