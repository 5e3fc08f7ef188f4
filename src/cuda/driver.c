/* Loading the driver and NVRTC with dlopen, once per process. Driver entry points are resolved with
 * cuGetProcAddress for the CUDA version of the headers we were built against, so each pointer has the
 * signature cuda.h declares (the _v2 variants and so on) whatever driver is installed. */
#include "driver.h"

#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../core/error.h"

#define TN_STRINGIFY2_(x) #x
#define TN_STRINGIFY(x) TN_STRINGIFY2_(x)
#ifndef TNORM_CUDA_MAJOR
#define TNORM_CUDA_MAJOR 13
#endif
#ifndef TNORM_NVRTC_FALLBACK
#define TNORM_NVRTC_FALLBACK NULL
#endif

static pthread_once_t driver_once = PTHREAD_ONCE_INIT;
static tn_cuda_driver driver;
static int driver_ok;
static char driver_reason[TN_CUDA_REASON_CAPACITY];

typedef CUresult (*get_proc_fn)(const char *, void **, int, cuuint64_t, CUdriverProcAddressQueryResult *);

static int resolve(get_proc_fn get_proc, const char *name, void **out) {
  CUdriverProcAddressQueryResult found = CU_GET_PROC_ADDRESS_SYMBOL_NOT_FOUND;
  *out = NULL;
  CUresult r = get_proc(name, out, CUDA_VERSION, CU_GET_PROC_ADDRESS_DEFAULT, &found);
  if (r != CUDA_SUCCESS || found != CU_GET_PROC_ADDRESS_SUCCESS || *out == NULL) {
    snprintf(driver_reason, sizeof driver_reason, "the NVIDIA driver has no %s (driver older than CUDA %d.%d?)", name,
             CUDA_VERSION / 1000, CUDA_VERSION % 1000 / 10);
    return 0;
  }
  return 1;
}

static void load_driver(void) {
  void *lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
  if (lib == NULL) {
    const char *e = dlerror();
    snprintf(driver_reason, sizeof driver_reason, "no NVIDIA driver: %s", e != NULL ? e : "libcuda.so.1 not found");
    return;
  }
  get_proc_fn get_proc = (get_proc_fn)dlsym(lib, "cuGetProcAddress_v2");
  if (get_proc == NULL) {
    snprintf(driver_reason, sizeof driver_reason, "the NVIDIA driver is too old: it has no cuGetProcAddress_v2");
    return;
  }
#define TN_RESOLVE(field, name) \
  if (!resolve(get_proc, name, (void **)&driver.field)) return;
  TN_RESOLVE(Init, "cuInit")
  TN_RESOLVE(DriverGetVersion, "cuDriverGetVersion")
  TN_RESOLVE(DeviceGetCount, "cuDeviceGetCount")
  TN_RESOLVE(DeviceGet, "cuDeviceGet")
  TN_RESOLVE(DeviceGetAttribute, "cuDeviceGetAttribute")
  TN_RESOLVE(DeviceGetName, "cuDeviceGetName")
  TN_RESOLVE(DevicePrimaryCtxRetain, "cuDevicePrimaryCtxRetain")
  TN_RESOLVE(CtxPushCurrent, "cuCtxPushCurrent")
  TN_RESOLVE(CtxPopCurrent, "cuCtxPopCurrent")
  TN_RESOLVE(ModuleLoadData, "cuModuleLoadData")
  TN_RESOLVE(ModuleGetFunction, "cuModuleGetFunction")
  TN_RESOLVE(FuncGetAttribute, "cuFuncGetAttribute")
  TN_RESOLVE(FuncSetAttribute, "cuFuncSetAttribute")
  TN_RESOLVE(OccupancyMaxActiveBlocksPerMultiprocessor, "cuOccupancyMaxActiveBlocksPerMultiprocessor")
  TN_RESOLVE(LaunchKernelEx, "cuLaunchKernelEx")
  TN_RESOLVE(MemAlloc, "cuMemAlloc")
  TN_RESOLVE(MemFree, "cuMemFree")
  TN_RESOLVE(MemcpyAsync, "cuMemcpyAsync")
  TN_RESOLVE(StreamSynchronize, "cuStreamSynchronize")
  TN_RESOLVE(EventCreate, "cuEventCreate")
  TN_RESOLVE(EventRecord, "cuEventRecord")
  TN_RESOLVE(EventSynchronize, "cuEventSynchronize")
  TN_RESOLVE(EventElapsedTime, "cuEventElapsedTime")
  TN_RESOLVE(EventDestroy, "cuEventDestroy")
  TN_RESOLVE(StreamCreate, "cuStreamCreate")
  TN_RESOLVE(StreamDestroy, "cuStreamDestroy")
  TN_RESOLVE(StreamBeginCapture, "cuStreamBeginCapture")
  TN_RESOLVE(StreamEndCapture, "cuStreamEndCapture")
  TN_RESOLVE(GraphInstantiate, "cuGraphInstantiateWithFlags") /* "cuGraphInstantiate" resolves to the 5-argument form */
  TN_RESOLVE(GraphExecUpdate, "cuGraphExecUpdate")
  TN_RESOLVE(GraphLaunch, "cuGraphLaunch")
  TN_RESOLVE(GraphExecDestroy, "cuGraphExecDestroy")
  TN_RESOLVE(GraphDestroy, "cuGraphDestroy")
  TN_RESOLVE(GetErrorName, "cuGetErrorName")
  TN_RESOLVE(GetErrorString, "cuGetErrorString")
#undef TN_RESOLVE
  CUresult r = driver.Init(0);
  if (r != CUDA_SUCCESS) {
    const char *name = NULL, *text = NULL;
    driver.GetErrorName(r, &name);
    driver.GetErrorString(r, &text);
    snprintf(driver_reason, sizeof driver_reason, "the NVIDIA driver did not initialise: %s: %s",
             name != NULL ? name : "?", text != NULL ? text : "?");
    return;
  }
  driver_ok = 1; /* the library stays loaded for the life of the process, as the CUDA runtime's does */
}

const tn_cuda_driver *tn_cuda_driver_get(const char **reason) {
  pthread_once(&driver_once, load_driver);
  if (!driver_ok) {
    if (reason != NULL) *reason = driver_reason;
    return NULL;
  }
  return &driver;
}

static pthread_once_t nvrtc_once = PTHREAD_ONCE_INIT;
static tn_nvrtc nvrtc;
static int nvrtc_ok;
static char nvrtc_reason[TN_CUDA_REASON_CAPACITY];

static void load_nvrtc(void) {
  const char *forced = getenv("TNORM_NVRTC_LIBRARY");
  const char *names[] = {forced, "libnvrtc.so." TN_STRINGIFY(TNORM_CUDA_MAJOR), "libnvrtc.so", TNORM_NVRTC_FALLBACK};
  void *lib = NULL;
  const char *err = NULL;
  for (size_t i = 0; i < sizeof names / sizeof names[0] && lib == NULL; i++) {
    if (names[i] == NULL || names[i][0] == '\0') continue;
    lib = dlopen(names[i], RTLD_NOW | RTLD_LOCAL);
    if (lib == NULL && err == NULL) err = dlerror();
    if (forced != NULL && forced[0] != '\0') break; /* a named library is the only one tried */
  }
  if (lib == NULL) {
    snprintf(nvrtc_reason, sizeof nvrtc_reason, "NVRTC cannot be loaded: %s", err != NULL ? err : "not found");
    return;
  }
#define TN_NVRTC_SYM(field, name)                                                                      \
  if ((*(void **)&nvrtc.field = dlsym(lib, name)) == NULL) {                                           \
    snprintf(nvrtc_reason, sizeof nvrtc_reason, "NVRTC library has no %s", name);                      \
    return;                                                                                            \
  }
  TN_NVRTC_SYM(Version, "nvrtcVersion")
  TN_NVRTC_SYM(GetErrorString, "nvrtcGetErrorString")
  TN_NVRTC_SYM(CreateProgram, "nvrtcCreateProgram")
  TN_NVRTC_SYM(DestroyProgram, "nvrtcDestroyProgram")
  TN_NVRTC_SYM(AddNameExpression, "nvrtcAddNameExpression")
  TN_NVRTC_SYM(CompileProgram, "nvrtcCompileProgram")
  TN_NVRTC_SYM(GetLoweredName, "nvrtcGetLoweredName")
  TN_NVRTC_SYM(GetProgramLogSize, "nvrtcGetProgramLogSize")
  TN_NVRTC_SYM(GetProgramLog, "nvrtcGetProgramLog")
  TN_NVRTC_SYM(GetCUBINSize, "nvrtcGetCUBINSize")
  TN_NVRTC_SYM(GetCUBIN, "nvrtcGetCUBIN")
#undef TN_NVRTC_SYM
  if (nvrtc.Version(&nvrtc.major, &nvrtc.minor) != NVRTC_SUCCESS) {
    snprintf(nvrtc_reason, sizeof nvrtc_reason, "NVRTC does not report its version");
    return;
  }
  nvrtc_ok = 1;
}

const tn_nvrtc *tn_nvrtc_get(const char **reason) {
  pthread_once(&nvrtc_once, load_nvrtc);
  if (!nvrtc_ok) {
    if (reason != NULL) *reason = nvrtc_reason;
    return NULL;
  }
  return &nvrtc;
}

tn_status tn_cuda_error(tn_context *ctx, CUresult r, const char *what) {
  const char *name = NULL, *text = NULL;
  if (driver_ok) {
    driver.GetErrorName(r, &name);
    driver.GetErrorString(r, &text);
  }
  return tn_error(ctx, r == CUDA_ERROR_OUT_OF_MEMORY ? TN_ERR_NO_MEMORY : TN_ERR_BACKEND, "cuda: %s: %s: %s", what,
                  name != NULL ? name : "CUDA error", text != NULL ? text : "(no description)");
}
