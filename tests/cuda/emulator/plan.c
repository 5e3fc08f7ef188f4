/* The CUDA backend's own choice of kernel and launch (key_for, plan_launch in src/cuda/backend.c) for the
 * emulated device: an H100's 132 SMs and 227 KB of shared memory a block. backend.c is compiled here as C,
 * its two exported names renamed: backend.cc defines the emulated backend in their place. */
#define tn_cuda_backend tn_cuda_backend_of_the_driver
#define tn_cuda_build_all tn_cuda_build_all_of_the_driver
#include "cuda/backend.c"

tn_status emu_plan(tn_context *ctx, const tn_op_args *a, const tn_run_options *o, tn_kernel_key *key,
                   tn_kernel_params *p, int *block, int64_t *blocks, unsigned *smem) {
  static device_info d;
  d.sms = 132;
  d.max_block_smem = 227 * 1024;
  d.arch = 90;
  *key = key_for(&d, a, o);
  launch_plan plan;
  TN_FORWARD_IF_ERROR(plan_launch(ctx, &d, a, *key, 1, o, &plan));
  *p = plan.p;
  *block = plan.block;
  *blocks = plan.blocks;
  *smem = plan.dynamic_smem;
  return TN_OK;
}
