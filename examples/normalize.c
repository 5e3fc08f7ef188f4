/* Normalise a small bf16-free f32 batch with tnorm's public API: rms_norm with a weight, in place.
 * Build against an installed tnorm:  cc normalize.c $(pkg-config --cflags --libs tnorm) -o normalize */
#include <math.h>
#include <stdio.h>
#include <tnorm.h>

int main(void) {
  enum { ROWS = 2, DIM = 8 };
  float x[ROWS][DIM], weight[DIM];
  for (int i = 0; i < DIM; i++) {
    x[0][i] = (float)(i + 1);
    x[1][i] = (float)(i % 2 ? -3 : 3);
    weight[i] = 1.0f + 0.1f * (float)i;
  }

  tn_context *ctx;
  if (tn_context_create(&ctx) != TN_OK) return 1;
  tn_tensor xt = tn_tensor_2d(x, TN_F32, ROWS, DIM);
  tn_tensor wt = tn_tensor_vector(weight, TN_F32, DIM);
  tn_status st = tn_rms_norm(ctx, &xt, &wt, 0.0f, 1e-6f, &xt); /* y is x: in place */
  if (st != TN_OK) {
    fprintf(stderr, "rms_norm failed: %s: %s\n", tn_status_name(st), tn_context_last_error(ctx));
    tn_context_destroy(ctx);
    return 1;
  }

  /* A wrong call: the error names the problem with its numbers, and nothing is written. */
  tn_tensor short_weight = tn_tensor_vector(weight, TN_F32, DIM - 1);
  st = tn_rms_norm(ctx, &xt, &short_weight, 0.0f, 1e-6f, &xt);
  printf("expected error: %s: %s\n", tn_status_name(st), tn_context_last_error(ctx));
  tn_context_destroy(ctx);

  /* Row 1 is +-3 everywhere: its rms is 3, so y = sign * weight. */
  for (int i = 0; i < DIM; i++) {
    float expect = (i % 2 ? -1.0f : 1.0f) * weight[i];
    if (fabsf(x[1][i] - expect) > 1e-6f) {
      fprintf(stderr, "row 1 element %d: %g, expected %g\n", i, (double)x[1][i], (double)expect);
      return 1;
    }
  }
  printf("tnorm %s: row 0 -> %.4f %.4f ... %.4f\n", tn_version(), (double)x[0][0], (double)x[0][1],
         (double)x[0][DIM - 1]);
  return st == TN_ERR_SHAPE ? 0 : 1;
}
