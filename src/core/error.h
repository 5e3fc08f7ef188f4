/* Errors: every failing path sets the context's message and returns its status, in one expression.
 * The macros follow zstd's RETURN_ERROR_IF / FORWARD_IF_ERROR. */
#ifndef TN_CORE_ERROR_H
#define TN_CORE_ERROR_H

#include "tnorm.h"

#if defined(__GNUC__)
#define TN_PRINTF_LIKE(fmt_index, first_arg) __attribute__((format(printf, fmt_index, first_arg)))
#else
#define TN_PRINTF_LIKE(fmt_index, first_arg)
#endif

/* Formats the message into ctx's last error (if ctx is not NULL) and returns status. */
tn_status tn_error(tn_context *ctx, tn_status status, const char *fmt, ...) TN_PRINTF_LIKE(3, 4);
/* Clears ctx's last error. */
void tn_error_clear(tn_context *ctx);

#define TN_RETURN_ERROR_IF(cond, ctx, status, ...)    \
  do {                                                \
    if (cond) return tn_error((ctx), (status), __VA_ARGS__); \
  } while (0)

#define TN_FORWARD_IF_ERROR(expr)         \
  do {                                    \
    tn_status tn_forward_st_ = (expr);    \
    if (tn_forward_st_ != TN_OK) return tn_forward_st_; \
  } while (0)

#endif
