// The CUDA features tnorm's kernels use, for compiling them as host C++ (run.sh): execution-space
// keywords vanish, __shared__ variables are statics (the blocks of a launch run one after another, so a
// static is the running block's), and every thread of a block is a fiber of runtime.cc, which implements
// __syncthreads, __syncwarp and __shfl_xor_sync between them. The kernels' few PTX conversions are
// replaced by run.sh with the library's own host conversions.
#pragma once
#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>

#include "core/dtype.h"

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)
#define __align__(n) alignas(n)

struct emu_dim3 {
  unsigned x, y, z;
};
struct EmuFiber {
  ucontext_t ctx;
  unsigned tid;
  bool done;
};
extern EmuFiber *g_emu_current;
extern emu_dim3 g_emu_block_index, g_emu_block_dim, g_emu_grid_dim;
#define threadIdx (emu_dim3{g_emu_current->tid, 0, 0})
#define blockIdx g_emu_block_index
#define blockDim g_emu_block_dim
#define gridDim g_emu_grid_dim

// The block's dynamic shared memory (row.cuh's tn_dynamic_smem, renamed by run.sh).
extern unsigned char *tn_dynamic_smem_emu;

void __syncthreads();
void __syncwarp(unsigned mask = 0xffffffffu);
float __shfl_xor_sync(unsigned mask, float v, int lane_mask);
inline float __uint_as_float(unsigned u) {
  float f;
  memcpy(&f, &u, 4);
  return f;
}
inline float __int_as_float(int i) {
  float f;
  memcpy(&f, &i, 4);
  return f;
}
inline unsigned __float_as_uint(float f) {
  unsigned u;
  memcpy(&u, &f, 4);
  return u;
}
inline float emu_f16_to_f32(unsigned short h) { return tn_f16_to_f32(h); }
inline unsigned short emu_f32_to_f16(float f) { return tn_f32_to_f16(f); }

// Runs `kernel` as a launch of grid x block threads with `smem` bytes of dynamic shared memory; aborts on a
// write past the dynamic shared memory or on threads that wait on a barrier the others never reach.
void emu_launch(unsigned grid, unsigned block, size_t smem, const std::function<void()> &kernel);
