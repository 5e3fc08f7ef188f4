// A C entry point for each FlashInfer norm the benchmarks compare with, built on the GPU machine from
// FlashInfer's public headers (bench/peers/build_flashinfer.sh); the headers are never part of this tree.
// dtype: 0 = float32, 1 = bfloat16, 2 = float16. Each returns the cudaError_t of its launch.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <flashinfer/norm.cuh>

namespace {

template <typename F>
int by_dtype(int dtype, F &&f) {
  switch (dtype) {
    case 0: return (int)f(float{});
    case 1: return (int)f(__nv_bfloat16{});
    case 2: return (int)f(half{});
    default: return (int)cudaErrorInvalidValue;
  }
}

}  // namespace

extern "C" int fi_rms_norm(int dtype, void *x, void *w, void *y, unsigned rows, unsigned dim, float eps,
                           int pdl, void *stream) {
  return by_dtype(dtype, [&](auto t) {
    using T = decltype(t);
    return flashinfer::norm::RMSNorm<T>((T *)x, (T *)w, (T *)y, rows, dim, dim, dim, eps, pdl != 0,
                                        (cudaStream_t)stream);
  });
}

// In place, as FlashInfer defines it: residual += x, then x = rms_norm(residual) * w.
extern "C" int fi_fused_add_rms_norm(int dtype, void *x, void *residual, void *w, unsigned rows, unsigned dim,
                                     float eps, int pdl, void *stream) {
  return by_dtype(dtype, [&](auto t) {
    using T = decltype(t);
    return flashinfer::norm::FusedAddRMSNorm<T>((T *)x, (T *)residual, (T *)w, rows, dim, dim, dim, eps,
                                                pdl != 0, (cudaStream_t)stream);
  });
}

// y = fp8_e4m3(rms_norm(x) * w / scale[0]), scale a float32 in device memory.
extern "C" int fi_rms_norm_quant(int dtype, void *x, void *w, void *q, const float *scale, unsigned rows,
                                 unsigned dim, float eps, int pdl, void *stream) {
  return by_dtype(dtype, [&](auto t) {
    using T = decltype(t);
    return flashinfer::norm::RMSNormQuant<T, __nv_fp8_e4m3>((T *)x, (T *)w, (__nv_fp8_e4m3 *)q, rows, dim, dim,
                                                            dim, (float *)scale, eps, pdl != 0,
                                                            (cudaStream_t)stream);
  });
}

extern "C" int fi_fused_add_rms_norm_quant(int dtype, void *x, void *residual, void *w, void *q,
                                           const float *scale, unsigned rows, unsigned dim, float eps, int pdl,
                                           void *stream) {
  return by_dtype(dtype, [&](auto t) {
    using T = decltype(t);
    return flashinfer::norm::FusedAddRMSNormQuant<T, __nv_fp8_e4m3>(
        (T *)x, (T *)residual, (T *)w, (__nv_fp8_e4m3 *)q, rows, dim, dim, dim, dim, (float *)scale, eps,
        pdl != 0, (cudaStream_t)stream);
  });
}
