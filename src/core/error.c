#include "error.h"

#include <stdarg.h>
#include <stdio.h>

#include "context.h"

tn_status tn_error(tn_context *ctx, tn_status status, const char *fmt, ...) {
  if (ctx != NULL) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(ctx->last_error, sizeof ctx->last_error, fmt, ap);
    va_end(ap);
  }
  return status;
}

void tn_error_clear(tn_context *ctx) {
  if (ctx != NULL) ctx->last_error[0] = '\0';
}

const char *tn_context_last_error(const tn_context *ctx) {
  return ctx != NULL ? ctx->last_error : "tnorm: no context";
}
