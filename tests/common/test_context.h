// A tn_context owned by a scope: created (and checked) on construction, destroyed on exit.
#ifndef TNORM_TESTS_TEST_CONTEXT_H
#define TNORM_TESTS_TEST_CONTEXT_H

#include <gtest/gtest.h>

#include "tnorm.h"

namespace tnorm_test {

struct Context {
  tn_context *ctx = nullptr;
  Context() { EXPECT_EQ(tn_context_create(&ctx), TN_OK); }
  ~Context() { tn_context_destroy(ctx); }
  Context(const Context &) = delete;
  Context &operator=(const Context &) = delete;
};

}  // namespace tnorm_test

#endif
