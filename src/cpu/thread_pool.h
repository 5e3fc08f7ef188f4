/* A small fixed pool of worker threads that run one parallel loop at a time; the caller joins in. */
#ifndef TN_CPU_THREAD_POOL_H
#define TN_CPU_THREAD_POOL_H

#include <stdint.h>

typedef struct tn_thread_pool tn_thread_pool;

/* A pool of `threads` threads in all, the caller included (threads - 1 workers). NULL when out of
 * memory or threads cannot be started. */
tn_thread_pool *tn_thread_pool_create(int threads);
void tn_thread_pool_destroy(tn_thread_pool *pool);
int tn_thread_pool_size(const tn_thread_pool *pool);

/* Calls task(arg, i) for every i in [0, n), spread over the pool; returns when all calls returned. */
void tn_thread_pool_run(tn_thread_pool *pool, int64_t n, void (*task)(void *arg, int64_t i), void *arg);

#endif
