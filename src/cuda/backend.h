#ifndef TN_CUDA_BACKEND_H
#define TN_CUDA_BACKEND_H

#include "../core/backend.h"

extern const tn_backend tn_cuda_backend;

/* tn_cuda_build_kernels: every variant for compute capability arch, into the disk cache. */
tn_status tn_cuda_build_all(tn_context *ctx, int arch, int *count);

#endif
