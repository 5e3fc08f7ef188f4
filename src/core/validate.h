/* Validation, written once for every op and every backend (driven by the op table). */
#ifndef TN_CORE_VALIDATE_H
#define TN_CORE_VALIDATE_H

#include "tnorm.h"

/* TN_OK when args satisfy every rule of tnorm.h; otherwise the status, with the message set on ctx. */
tn_status tn_validate(tn_context *ctx, const tn_op_args *args);

#endif
