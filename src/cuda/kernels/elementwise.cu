/* add, mul and scale: y = round(x + b), round(x * b), round(x * scale), with b either rows x dim or one
 * row applied to every row (passed with a row stride of 0). Each thread takes 16-byte chunks of the
 * rows x chunks grid in turn; the index is 64-bit and strides over the whole grid. */
#include "row.cuh"

template <int DT, int OP, int MODE>
__global__ void __launch_bounds__(TN_KERNEL_ELEMENTWISE_BLOCK) tn_elementwise(const tn_kernel_params p) {
  constexpr int V = tn_dt<DT>::per_chunk, S = tn_dt<DT>::size;
  tn_pdl_wait();
  const tn_i64 chunks = (p.dim + V - 1) / V, total = chunks * p.rows;
  for (tn_i64 i = (tn_i64)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (tn_i64)gridDim.x * blockDim.x) {
    const tn_i64 row = i / chunks, c = i - row * chunks;
    float f[V], b[V];
    tn_chunk_to_f32<DT>(tn_load_chunk<DT, MODE>(tn_row(p.x, row, p.x_stride, S), c, p.dim), f);
    if (OP != TN_KERNEL_ELEMENTWISE_SCALE)
      tn_chunk_to_f32<DT>(tn_load_chunk<DT, MODE>(tn_row(p.residual, row, p.residual_stride, S), c, p.dim), b);
#pragma unroll
    for (int j = 0; j < V; j++)
      f[j] = OP == TN_KERNEL_ELEMENTWISE_ADD ? f[j] + b[j] : OP == TN_KERNEL_ELEMENTWISE_MUL ? f[j] * b[j] : f[j] * p.scale;
    tn_store_chunk<DT, MODE>((char *)tn_row(p.y, row, p.y_stride, S), c, p.dim, tn_chunk_from_f32<DT>(f));
  }
  tn_pdl_launch_dependents();
}
