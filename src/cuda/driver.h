/* The CUDA driver and NVRTC, loaded at run time (never linked): the same library starts on a machine
 * without an NVIDIA driver or toolkit and then says why the GPU is unavailable. cuda.h and nvrtc.h are
 * used for their types only. */
#ifndef TN_CUDA_DRIVER_H
#define TN_CUDA_DRIVER_H

#include <cuda.h>
#include <nvrtc.h>

#include "tnorm.h"

#define TN_CUDA_REASON_CAPACITY 384

typedef struct tn_cuda_driver {
  CUresult (*Init)(unsigned);
  CUresult (*DriverGetVersion)(int *);
  CUresult (*DeviceGetCount)(int *);
  CUresult (*DeviceGet)(CUdevice *, int);
  CUresult (*DeviceGetAttribute)(int *, CUdevice_attribute, CUdevice);
  CUresult (*DeviceGetName)(char *, int, CUdevice);
  CUresult (*DevicePrimaryCtxRetain)(CUcontext *, CUdevice);
  CUresult (*CtxPushCurrent)(CUcontext);
  CUresult (*CtxPopCurrent)(CUcontext *);
  CUresult (*ModuleLoadData)(CUmodule *, const void *);
  CUresult (*ModuleGetFunction)(CUfunction *, CUmodule, const char *);
  CUresult (*FuncGetAttribute)(int *, CUfunction_attribute, CUfunction);
  CUresult (*FuncSetAttribute)(CUfunction, CUfunction_attribute, int);
  CUresult (*OccupancyMaxActiveBlocksPerMultiprocessor)(int *, CUfunction, int, size_t);
  CUresult (*LaunchKernelEx)(const CUlaunchConfig *, CUfunction, void **, void **);
  CUresult (*MemAlloc)(CUdeviceptr *, size_t);
  CUresult (*MemFree)(CUdeviceptr);
  CUresult (*MemcpyAsync)(CUdeviceptr, CUdeviceptr, size_t, CUstream);
  CUresult (*StreamSynchronize)(CUstream);
  CUresult (*EventCreate)(CUevent *, unsigned);
  CUresult (*EventRecord)(CUevent, CUstream);
  CUresult (*EventSynchronize)(CUevent);
  CUresult (*EventElapsedTime)(float *, CUevent, CUevent);
  CUresult (*EventDestroy)(CUevent);
  CUresult (*StreamCreate)(CUstream *, unsigned);
  CUresult (*StreamDestroy)(CUstream);
  CUresult (*StreamBeginCapture)(CUstream, CUstreamCaptureMode);
  CUresult (*StreamEndCapture)(CUstream, CUgraph *);
  CUresult (*GraphInstantiate)(CUgraphExec *, CUgraph, unsigned long long);
  CUresult (*GraphExecUpdate)(CUgraphExec, CUgraph, CUgraphExecUpdateResultInfo *);
  CUresult (*GraphLaunch)(CUgraphExec, CUstream);
  CUresult (*GraphExecDestroy)(CUgraphExec);
  CUresult (*GraphDestroy)(CUgraph);
  CUresult (*GetErrorName)(CUresult, const char **);
  CUresult (*GetErrorString)(CUresult, const char **);
} tn_cuda_driver;

typedef struct tn_nvrtc {
  int major, minor;
  nvrtcResult (*Version)(int *, int *);
  const char *(*GetErrorString)(nvrtcResult);
  nvrtcResult (*CreateProgram)(nvrtcProgram *, const char *, const char *, int, const char *const *,
                               const char *const *);
  nvrtcResult (*DestroyProgram)(nvrtcProgram *);
  nvrtcResult (*AddNameExpression)(nvrtcProgram, const char *);
  nvrtcResult (*CompileProgram)(nvrtcProgram, int, const char *const *);
  nvrtcResult (*GetLoweredName)(nvrtcProgram, const char *, const char **);
  nvrtcResult (*GetProgramLogSize)(nvrtcProgram, size_t *);
  nvrtcResult (*GetProgramLog)(nvrtcProgram, char *);
  nvrtcResult (*GetCUBINSize)(nvrtcProgram, size_t *);
  nvrtcResult (*GetCUBIN)(nvrtcProgram, char *);
} tn_nvrtc;

/* The driver, loaded and initialised once per process; NULL with the reason ("no NVIDIA driver:
 * libcuda.so.1: cannot open shared object file") when it cannot be. */
const tn_cuda_driver *tn_cuda_driver_get(const char **reason);

/* NVRTC, loaded once per process (TNORM_NVRTC_LIBRARY names the library to load, else the usual
 * sonames); NULL with the reason when it cannot be. Needs no GPU. */
const tn_nvrtc *tn_nvrtc_get(const char **reason);

/* Sets ctx's message to "cuda: WHAT: CUDA_ERROR_X: description" and returns TN_ERR_BACKEND (or
 * TN_ERR_NO_MEMORY for CUDA_ERROR_OUT_OF_MEMORY). */
tn_status tn_cuda_error(tn_context *ctx, CUresult r, const char *what);

#define TN_CUDA_CALL(ctx, call, what)                       \
  do {                                                      \
    CUresult tn_cuda_r_ = (call);                           \
    if (tn_cuda_r_ != CUDA_SUCCESS) return tn_cuda_error((ctx), tn_cuda_r_, (what)); \
  } while (0)

#endif
