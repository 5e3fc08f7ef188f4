/* The CPU copy ceiling: see copy_ceiling.h. */
#include "copy_ceiling.h"

#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#define PREFETCH_AHEAD 2048 /* bytes: a few rows of the hardware's prefetch reach, measured as best */

/* A copy with non-temporal stores: what an out-of-cache copy can reach when it skips the reads for
 * ownership (the library's kernels stream their large outputs the same way), with the source
 * prefetched ahead so each core keeps as many misses in flight as it can (the library's kernels
 * prefetch their next row). 32-byte accesses where the machine has AVX. */
#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("avx"))) static size_t stream_copy_avx(unsigned char *dst, const unsigned char *src,
                                                             size_t bytes) {
  size_t i = 0;
  for (; i + 128 <= bytes; i += 128) {
    _mm_prefetch((const char *)src + i + PREFETCH_AHEAD, _MM_HINT_T0);
    _mm_prefetch((const char *)src + i + PREFETCH_AHEAD + 64, _MM_HINT_T0);
    __m256i a = _mm256_loadu_si256((const __m256i *)(const void *)(src + i));
    __m256i b = _mm256_loadu_si256((const __m256i *)(const void *)(src + i + 32));
    __m256i c = _mm256_loadu_si256((const __m256i *)(const void *)(src + i + 64));
    __m256i d = _mm256_loadu_si256((const __m256i *)(const void *)(src + i + 96));
    _mm256_stream_si256((__m256i *)(void *)(dst + i), a);
    _mm256_stream_si256((__m256i *)(void *)(dst + i + 32), b);
    _mm256_stream_si256((__m256i *)(void *)(dst + i + 64), c);
    _mm256_stream_si256((__m256i *)(void *)(dst + i + 96), d);
  }
  return i;
}
#endif

static void stream_copy(unsigned char *dst, const unsigned char *src, size_t bytes) {
#if defined(__x86_64__)
  size_t head = (size_t)(-(uintptr_t)dst & 31u);
  if (head > bytes) head = bytes;
  memcpy(dst, src, head);
  dst += head, src += head, bytes -= head;
  size_t i = 0;
#if defined(__GNUC__)
  if (__builtin_cpu_supports("avx")) i = stream_copy_avx(dst, src, bytes);
#endif
  for (; i + 64 <= bytes; i += 64) {
    _mm_prefetch((const char *)src + i + PREFETCH_AHEAD, _MM_HINT_T0);
    __m128i a = _mm_loadu_si128((const __m128i *)(const void *)(src + i));
    __m128i b = _mm_loadu_si128((const __m128i *)(const void *)(src + i + 16));
    __m128i c = _mm_loadu_si128((const __m128i *)(const void *)(src + i + 32));
    __m128i d = _mm_loadu_si128((const __m128i *)(const void *)(src + i + 48));
    _mm_stream_si128((__m128i *)(void *)(dst + i), a);
    _mm_stream_si128((__m128i *)(void *)(dst + i + 16), b);
    _mm_stream_si128((__m128i *)(void *)(dst + i + 32), c);
    _mm_stream_si128((__m128i *)(void *)(dst + i + 48), d);
  }
  memcpy(dst + i, src + i, bytes - i);
  _mm_sfence();
#else
  memcpy(dst, src, bytes);
#endif
}

typedef struct copy_task {
  unsigned char *dst;
  const unsigned char *src;
  size_t bytes;
  int streaming;
  int quit;
} copy_task;

typedef struct copy_worker {
  cpu_copier *owner;
  int index;
  pthread_t tid;
} copy_worker;

struct cpu_copier {
  int threads;
  copy_task task; /* written by the caller before the start barrier, read by the workers after it */
  pthread_barrier_t start, done;
  copy_worker *workers;
};

static void *worker_main(void *p) {
  copy_worker *w = p;
  cpu_copier *c = w->owner;
  for (;;) {
    pthread_barrier_wait(&c->start);
    const copy_task t = c->task;
    if (t.quit) return NULL;
    size_t begin = t.bytes * (size_t)w->index / (size_t)c->threads;
    size_t end = t.bytes * (size_t)(w->index + 1) / (size_t)c->threads;
    if (t.streaming) stream_copy(t.dst + begin, t.src + begin, end - begin);
    else memcpy(t.dst + begin, t.src + begin, end - begin);
    pthread_barrier_wait(&c->done);
  }
}

cpu_copier *cpu_copier_start(int threads) {
  if (threads < 1) return NULL;
  cpu_copier *c = calloc(1, sizeof *c);
  if (c == NULL) return NULL;
  c->threads = threads;
  c->workers = calloc((size_t)threads, sizeof *c->workers);
  if (c->workers == NULL) {
    free(c);
    return NULL;
  }
  pthread_barrier_init(&c->start, NULL, (unsigned)threads + 1);
  pthread_barrier_init(&c->done, NULL, (unsigned)threads + 1);
  int started = 0;
  for (; started < threads; started++) {
    c->workers[started] = (copy_worker){c, started, 0};
    if (pthread_create(&c->workers[started].tid, NULL, worker_main, &c->workers[started]) != 0) break;
  }
  if (started < threads) { /* the start barrier would never complete: stop the ones that started */
    for (int i = 0; i < started; i++) pthread_cancel(c->workers[i].tid);
    for (int i = 0; i < started; i++) pthread_join(c->workers[i].tid, NULL);
    pthread_barrier_destroy(&c->start);
    pthread_barrier_destroy(&c->done);
    free(c->workers);
    free(c);
    return NULL;
  }
  return c;
}

void cpu_copier_run(cpu_copier *c, void *dst, const void *src, size_t bytes, int streaming) {
  c->task = (copy_task){dst, src, bytes, streaming, 0};
  pthread_barrier_wait(&c->start);
  pthread_barrier_wait(&c->done);
}

void cpu_copier_stop(cpu_copier *c) {
  if (c == NULL) return;
  c->task.quit = 1;
  pthread_barrier_wait(&c->start);
  for (int i = 0; i < c->threads; i++) pthread_join(c->workers[i].tid, NULL);
  pthread_barrier_destroy(&c->start);
  pthread_barrier_destroy(&c->done);
  free(c->workers);
  free(c);
}
