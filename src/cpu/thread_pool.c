#include "thread_pool.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>

struct tn_thread_pool {
  int size;
  pthread_t *workers;
  int started;
  pthread_mutex_t lock;
  pthread_cond_t work_ready;
  pthread_cond_t work_done;
  uint64_t generation; /* bumped for each parallel loop; workers wait for a new one */
  int busy;            /* workers still inside the current loop */
  int stopping;
  /* The current loop. */
  void (*task)(void *arg, int64_t i);
  void *arg;
  int64_t count;
  atomic_int_fast64_t next;
};

/* Takes indices until none are left; dynamic so that uneven rows still balance. */
static void drain(tn_thread_pool *pool) {
  for (;;) {
    int64_t i = atomic_fetch_add(&pool->next, 1);
    if (i >= pool->count) return;
    pool->task(pool->arg, i);
  }
}

static void *worker_main(void *p) {
  tn_thread_pool *pool = p;
  uint64_t seen = 0;
  pthread_mutex_lock(&pool->lock);
  for (;;) {
    while (pool->generation == seen && !pool->stopping) pthread_cond_wait(&pool->work_ready, &pool->lock);
    if (pool->stopping) break;
    seen = pool->generation;
    pthread_mutex_unlock(&pool->lock);
    drain(pool);
    pthread_mutex_lock(&pool->lock);
    if (--pool->busy == 0) pthread_cond_signal(&pool->work_done);
  }
  pthread_mutex_unlock(&pool->lock);
  return NULL;
}

tn_thread_pool *tn_thread_pool_create(int threads) {
  if (threads < 1) threads = 1;
  tn_thread_pool *pool = calloc(1, sizeof *pool);
  if (pool == NULL) return NULL;
  pool->size = threads;
  atomic_init(&pool->next, 0);
  if (pthread_mutex_init(&pool->lock, NULL) != 0) {
    free(pool);
    return NULL;
  }
  pthread_cond_init(&pool->work_ready, NULL);
  pthread_cond_init(&pool->work_done, NULL);
  if (threads > 1) {
    pool->workers = calloc((size_t)threads - 1, sizeof *pool->workers);
    if (pool->workers == NULL) {
      tn_thread_pool_destroy(pool);
      return NULL;
    }
    for (int i = 0; i < threads - 1; i++) {
      if (pthread_create(&pool->workers[i], NULL, worker_main, pool) != 0) {
        tn_thread_pool_destroy(pool);
        return NULL;
      }
      pool->started++;
    }
  }
  return pool;
}

void tn_thread_pool_destroy(tn_thread_pool *pool) {
  if (pool == NULL) return;
  pthread_mutex_lock(&pool->lock);
  pool->stopping = 1;
  pthread_cond_broadcast(&pool->work_ready);
  pthread_mutex_unlock(&pool->lock);
  for (int i = 0; i < pool->started; i++) pthread_join(pool->workers[i], NULL);
  pthread_cond_destroy(&pool->work_ready);
  pthread_cond_destroy(&pool->work_done);
  pthread_mutex_destroy(&pool->lock);
  free(pool->workers);
  free(pool);
}

int tn_thread_pool_size(const tn_thread_pool *pool) { return pool->started + 1; }

void tn_thread_pool_run(tn_thread_pool *pool, int64_t n, void (*task)(void *arg, int64_t i), void *arg) {
  if (n <= 0) return;
  if (pool->started == 0 || n == 1) {
    for (int64_t i = 0; i < n; i++) task(arg, i);
    return;
  }
  pthread_mutex_lock(&pool->lock);
  pool->task = task;
  pool->arg = arg;
  pool->count = n;
  atomic_store(&pool->next, 0);
  pool->busy = pool->started;
  pool->generation++;
  pthread_cond_broadcast(&pool->work_ready);
  pthread_mutex_unlock(&pool->lock);
  drain(pool);
  pthread_mutex_lock(&pool->lock);
  while (pool->busy > 0) pthread_cond_wait(&pool->work_done, &pool->lock);
  pthread_mutex_unlock(&pool->lock);
}
