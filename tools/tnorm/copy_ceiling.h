/* The CPU's memory-copy ceiling for tnorm bench: a copy by a persistent set of threads, each copying its
 * slice, started and finished together, so a timed copy is the machine's, not one thread's. */
#ifndef TNORM_TOOLS_COPY_CEILING_H
#define TNORM_TOOLS_COPY_CEILING_H

#include <stddef.h>

typedef struct cpu_copier cpu_copier;

/* threads worker threads, ready to copy; NULL when they cannot be started. */
cpu_copier *cpu_copier_start(int threads);
/* Copies bytes from src to dst, split over the threads, and returns when all are done. streaming: with
 * non-temporal stores (no read for ownership of the destination), else with memcpy. */
void cpu_copier_run(cpu_copier *c, void *dst, const void *src, size_t bytes, int streaming);
void cpu_copier_stop(cpu_copier *c);

#endif
