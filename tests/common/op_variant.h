// One op call's shape of arguments, shared by the CPU and GPU op tests: which op, which weight, which
// scalars and whether the fused multiplicand is there. Each suite lists the variants it sweeps.
#ifndef TNORM_TESTS_OP_VARIANT_H
#define TNORM_TESTS_OP_VARIANT_H

#include "tnorm.h"

enum WeightKind { kNoWeight, kWeightXDtype, kWeightF32 };

struct Variant {
  const char *name;
  tn_op op;
  WeightKind weight;
  float weight_offset;
  bool mul;
  float scale;
};

#endif
