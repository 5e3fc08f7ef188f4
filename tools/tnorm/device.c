/* The command's tensors live in host memory; to run on a GPU, an op's operands are copied to the device
 * and its outputs back. Each operand's whole extent is copied (gaps of strided views included, with the
 * same offset modulo 16 as on the host), so the device sees the same layout, alignment and aliasing. */
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "cli.h"

int cli_pick_device(tn_context *ctx, cli_device choice, tn_device *out) {
  *out = tn_cpu_device();
  if (choice == CLI_DEVICE_CPU) return CLI_OK;
  int available = tn_device_available(ctx, TN_DEVICE_CUDA) == TN_OK;
  if (choice == CLI_DEVICE_CUDA && !available) return cli_fail("--device cuda: %s", tn_context_last_error(ctx));
  if (available) *out = tn_cuda_device(0);
  return CLI_OK;
}

/* Bytes from a view's first element to the end of its last row (of its last head, for a 3-D view). */
static size_t extent_bytes(const tn_tensor *t) {
  if (t->rows == 0) return 0;
  const int64_t span = t->heads > 1 ? (t->heads - 1) * t->head_stride + t->dim : t->dim;
  return (size_t)((t->rows - 1) * t->row_stride + span) * tn_dtype_size(t->dtype);
}

typedef struct mirror {
  const tn_tensor *host;
  tn_tensor view;  /* the device view */
  void *block;     /* the allocation (view.data is inside it) */
  int owner;       /* 0 when it shares an earlier operand's buffer (exact aliasing) */
} mirror;

/* The operands, inputs first (the rope's table and a quantized output's scale among them), then the
 * outputs (a quantized output's q and scales among them). */
#define OPERAND_SLOTS 11
#define FIRST_OUTPUT_SLOT 7
static void operand_slots(tn_op_args *a, const tn_tensor **slots[OPERAND_SLOTS]) {
  const tn_tensor **s[OPERAND_SLOTS] = {&a->x,    &a->weight,         &a->mul,         &a->residual,
                                        &a->bias, &a->rope.cos_sin,   &a->quant.scale, &a->y,
                                        &a->residual_out, &a->quant.q, &a->quant.scales};
  memcpy(slots, s, sizeof s);
}

tn_status cli_op_on_device(tn_context *ctx, tn_device device, const tn_op_args *host) {
  if (device.kind == TN_DEVICE_CPU) return tn_op_run(ctx, host);
  mirror m[OPERAND_SLOTS];
  memset(m, 0, sizeof m);
  tn_op_args d = *host;
  const tn_tensor **slots[OPERAND_SLOTS];
  operand_slots(&d, slots);
  tn_status st = TN_OK;
  /* The rope's positions: one int32 or int64 per row of x. */
  void *positions = NULL;
  if (host->rope.style != TN_ROPE_NONE && host->rope.positions != NULL && host->x->rows > 0) {
    const size_t bytes = (size_t)host->x->rows * (host->rope.positions_i64 ? 8u : 4u);
    st = tn_malloc(ctx, device, bytes, &positions);
    if (st == TN_OK) st = tn_memcpy(ctx, positions, device, host->rope.positions, tn_cpu_device(), bytes);
    d.rope.positions = positions;
  }
  for (int k = 0; k < OPERAND_SLOTS && st == TN_OK; k++) {
    const tn_tensor *t = *slots[k];
    if (t == NULL) continue;
    m[k].host = t;
    m[k].view = *t;
    m[k].view.device = device;
    for (int j = 0; j < k; j++) {
      if (m[j].host != NULL && m[j].host->data == t->data) { /* the same buffer: share it */
        m[k].view.data = m[j].view.data;
        m[k].block = m[j].block;
        break;
      }
    }
    if (m[k].block != NULL) continue;
    const size_t bytes = extent_bytes(t), misalign = (uintptr_t)t->data & 15u;
    st = tn_malloc(ctx, device, bytes + 16, &m[k].block);
    if (st != TN_OK) break;
    m[k].owner = 1;
    m[k].view.data = (char *)m[k].block + misalign;
    st = tn_memcpy(ctx, m[k].view.data, device, t->data, tn_cpu_device(), bytes);
  }
  if (st == TN_OK) {
    for (int k = 0; k < OPERAND_SLOTS; k++)
      if (m[k].host != NULL) *slots[k] = &m[k].view;
    st = tn_op_run(ctx, &d);
    if (st == TN_OK) st = tn_synchronize(ctx, device);
    for (int k = FIRST_OUTPUT_SLOT; k < OPERAND_SLOTS && st == TN_OK; k++)
      if (m[k].host != NULL)
        st = tn_memcpy(ctx, m[k].host->data, tn_cpu_device(), m[k].view.data, device, extent_bytes(m[k].host));
  }
  for (int k = 0; k < OPERAND_SLOTS; k++)
    if (m[k].owner) {
      if (st == TN_OK) st = tn_free(ctx, device, m[k].block);
      else cli_free_quietly(device, m[k].block);
    }
  if (st == TN_OK) st = tn_free(ctx, device, positions);
  else cli_free_quietly(device, positions);
  return st;
}

void cli_free_quietly(tn_device device, void *ptr) {
  tn_context *quiet = NULL;
  if (ptr == NULL || tn_context_create(&quiet) != TN_OK) return;
  tn_free(quiet, device, ptr);
  tn_context_destroy(quiet);
}

const char *cli_device_name(tn_device device) { return device.kind == TN_DEVICE_CPU ? "cpu" : "cuda"; }
