/* Graphs: ops recorded on a context instead of run, fused where the data flow allows it, then replayed.
 * A node keeps its op, copies of its tensors (so the caller's views may go away) and the byte ranges it
 * reads and writes follow from those tensors. */
#ifndef TN_GRAPH_GRAPH_H
#define TN_GRAPH_GRAPH_H

#include "../core/backend.h"
#include "../core/ops.h"
#include "tnorm.h"

typedef struct tn_graph_node {
  tn_op_args args;                     /* operand pointers point into tensors[] */
  tn_tensor tensors[TN_OPERAND_COUNT]; /* one per operand (tn_operand order) */
  tn_run_options options;
} tn_graph_node;

struct tn_graph {
  tn_graph_node *nodes;
  int count, capacity;
  tn_graph_info info;
  char fusions[512]; /* the fusions applied, in order, "; "-separated */
  /* The replay as one submission (src/api.c): the backend's executable graph, NULL until built. */
  void *exec;
  tn_device exec_device; /* the device every node runs on, while exec is not NULL */
  void (*exec_destroy)(void *exec);
};

tn_status tn_graph_new(tn_context *ctx, tn_graph **out);
/* Appends a validated op (copied). */
tn_status tn_graph_append(tn_context *ctx, tn_graph *g, const tn_op_args *args);
/* Makes g's nodes, info and fusions a copy of src's (the replay counters and exec are g's own). */
tn_status tn_graph_copy_nodes(tn_context *ctx, tn_graph *g, const tn_graph *src);
/* Applies the fusion passes (see graph.c); fills g->info. */
void tn_graph_fuse(tn_graph *g);

#endif
