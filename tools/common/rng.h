/* A small seeded generator (splitmix64) for test data: reproducible from the printed seed. */
#ifndef TN_TOOLS_RNG_H
#define TN_TOOLS_RNG_H

#include <math.h>
#include <stdint.h>

typedef struct tn_rng {
  uint64_t state;
} tn_rng;

static inline uint64_t tn_rng_next(tn_rng *r) {
  uint64_t z = (r->state += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

/* Uniform in (0, 1). */
static inline double tn_rng_uniform(tn_rng *r) { return ((double)(tn_rng_next(r) >> 11) + 0.5) * 0x1p-53; }

/* Standard normal (Box-Muller). */
static inline double tn_rng_normal(tn_rng *r) {
  double u = tn_rng_uniform(r), v = tn_rng_uniform(r);
  return sqrt(-2.0 * log(u)) * cos(6.283185307179586 * v);
}

#endif
