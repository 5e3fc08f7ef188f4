// Threads: a context per thread gives the bytes one thread gives alone, and one context entered from two
// threads at once answers TN_ERR_BUSY instead of racing. A binary of its own, so that the ThreadSanitizer
// build (scripts/sanitize.sh) compiles only this and the library.
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

#include "test_context.h"
#include "test_seed.h"
#include "tnorm.h"

namespace {

using tnorm_test::Context;
using tnorm_test::GlobalSeed;
using tnorm_test::Rng;

// While one thread is inside a long call, a call on the same context from another thread returns
// TN_ERR_BUSY at once, writes nothing and leaves the first call's message alone; the long call's result
// is intact. The long call is repeated until the other thread has seen it in progress (it almost always
// does the first time).
TEST(Threads, ContextEnteredFromTwoThreadsIsBusy) {
  Context c;
  ASSERT_EQ(tn_context_set_num_threads(c.ctx, 2), TN_OK);
  const int64_t rows = 2048, dim = 4096;
  std::vector<float> x(size_t(rows * dim), 1.5f), y(x.size());
  std::vector<float> small(64, 2.0f), small_y(64);
  tn_tensor tx = tn_tensor_2d(x.data(), TN_F32, rows, dim), ty = tn_tensor_2d(y.data(), TN_F32, rows, dim);
  tn_tensor sx = tn_tensor_2d(small.data(), TN_F32, 1, 64), sy = tn_tensor_2d(small_y.data(), TN_F32, 1, 64);
  int busy_seen = 0;
  for (int attempt = 0; attempt < 50 && busy_seen == 0; attempt++) {
    std::fill(y.begin(), y.end(), -1.0f);
    std::atomic<int> started{0}, finished{0};
    tn_status long_status = TN_ERR_INTERNAL;
    std::thread worker([&] {
      started = 1;
      // The other thread may hold the context for a moment first: wait for it, as a caller would.
      do long_status = tn_rms_norm(c.ctx, &tx, nullptr, 0.0f, 1e-6f, &ty);
      while (long_status == TN_ERR_BUSY);
      finished = 1;
    });
    while (!started) std::this_thread::yield();
    while (!finished) {
      std::fill(small_y.begin(), small_y.end(), -7.0f);
      const tn_status st = tn_rms_norm(c.ctx, &sx, nullptr, 0.0f, 1e-6f, &sy);
      if (st == TN_ERR_BUSY) {
        busy_seen++;
        for (float v : small_y) ASSERT_EQ(v, -7.0f);  // nothing written
        void *p = reinterpret_cast<void *>(0x1234);
        const tn_status m = tn_malloc(c.ctx, tn_cpu_device(), 64, &p);
        if (m == TN_OK) tn_free(c.ctx, tn_cpu_device(), p);
        else EXPECT_EQ(p, reinterpret_cast<void *>(0x1234));
      } else {
        ASSERT_EQ(st, TN_OK);  // it ran before the worker's call or after it
      }
    }
    worker.join();
    ASSERT_EQ(long_status, TN_OK) << tn_context_last_error(c.ctx);
    EXPECT_STREQ(tn_context_last_error(c.ctx), "");
    size_t wrong = 0;
    for (float v : y) wrong += v != y[0];
    EXPECT_EQ(wrong, 0u);
    EXPECT_NEAR(y[0], 1.0f, 1e-5f);
  }
  EXPECT_GT(busy_seen, 0);
  EXPECT_STREQ(tn_status_name(TN_ERR_BUSY), "TN_ERR_BUSY");
  // The context is free again once the call returned.
  EXPECT_EQ(tn_rms_norm(c.ctx, &sx, nullptr, 0.0f, 1e-6f, &sy), TN_OK);
}

// A context per thread: many threads, each with its own context and thread pool, give the bytes one
// thread gives alone.
TEST(Threads, ContextPerThreadGivesTheSameBytes) {
  const int threads = 4, rows = 300, dim = 1000;
  Rng rng(GlobalSeed() ^ 0x7eed);
  std::vector<float> x(size_t(rows * dim)), w(dim), want(x.size());
  for (float &v : x) v = float(rng.Normal());
  for (float &v : w) v = float(rng.Normal());
  {
    Context c;
    tn_tensor tx = tn_tensor_2d(x.data(), TN_F32, rows, dim), tw = tn_tensor_vector(w.data(), TN_F32, dim);
    tn_tensor ty = tn_tensor_2d(want.data(), TN_F32, rows, dim);
    ASSERT_EQ(tn_context_set_num_threads(c.ctx, 1), TN_OK);
    ASSERT_EQ(tn_rms_norm(c.ctx, &tx, &tw, 0.0f, 1e-6f, &ty), TN_OK);
  }
  std::vector<std::thread> pool;
  std::vector<int> mismatches(threads, 0);
  for (int t = 0; t < threads; t++) {
    pool.emplace_back([&, t] {
      Context c;
      tn_context_set_num_threads(c.ctx, 2);
      std::vector<float> y(x.size());
      tn_tensor tx = tn_tensor_2d(x.data(), TN_F32, rows, dim), tw = tn_tensor_vector(w.data(), TN_F32, dim);
      tn_tensor ty = tn_tensor_2d(y.data(), TN_F32, rows, dim);
      for (int it = 0; it < 20; it++) {
        std::fill(y.begin(), y.end(), -1.0f);
        if (tn_rms_norm(c.ctx, &tx, &tw, 0.0f, 1e-6f, &ty) != TN_OK || std::memcmp(y.data(), want.data(), 4 * y.size()))
          mismatches[size_t(t)]++;
      }
    });
  }
  for (std::thread &th : pool) th.join();
  for (int t = 0; t < threads; t++) EXPECT_EQ(mismatches[size_t(t)], 0) << "thread " << t;
}

}  // namespace
