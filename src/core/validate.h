/* Validation, written once for every op and every backend (driven by the op table). */
#ifndef TN_CORE_VALIDATE_H
#define TN_CORE_VALIDATE_H

#include "tnorm.h"

/* TN_OK when args satisfy every rule of tnorm.h; otherwise the status, with the message set on ctx. */
tn_status tn_validate(tn_context *ctx, const tn_op_args *args);

/* A quantized output's settings against each other and x's rows x dim (format, scaling, group, source,
 * scales kind and layout, the bounds of dynamic scales), and the shapes of its tensors; op names the caller
 * in the message. */
tn_status tn_quant_shapes_check(tn_context *ctx, const char *op, const tn_quant *q, int64_t rows, int64_t dim,
                                tn_quant_shapes *out);

#endif
