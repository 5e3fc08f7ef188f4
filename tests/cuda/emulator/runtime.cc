// Threads of an emulated block as fibers (ucontext), run in turn on one host thread: a fiber runs until it
// waits on a barrier (__syncthreads, __syncwarp, either half of a shuffle) or ends. Deterministic, and
// strict: a shuffle or __syncwarp naming a lane outside its mask, or a barrier some threads never reach,
// aborts with a message.
#include <map>
#include <utility>
#include <vector>

#include "shim.h"

EmuFiber *g_emu_current;
emu_dim3 g_emu_block_index, g_emu_block_dim, g_emu_grid_dim;
unsigned char *tn_dynamic_smem_emu;

static ucontext_t scheduler;
static unsigned live, arrived, generation;  // the block barrier
struct WarpBarrier {
  unsigned arrived = 0, generation = 0;
};
static std::map<std::pair<unsigned, unsigned>, WarpBarrier> warp_barriers;  // (warp, mask)
static float shuffle_slots[32][32];                                           // [warp][lane]
static std::vector<char *> stacks;                                           // one per thread, kept
static const size_t kStackBytes = 1 << 20;
static std::function<void()> body;

static void yield() { swapcontext(&g_emu_current->ctx, &scheduler); }

void __syncthreads() {
  const unsigned gen = generation;
  if (++arrived == live) {
    arrived = 0;
    generation++;
    return;
  }
  while (gen == generation) yield();
}

void __syncwarp(unsigned mask) {
  const unsigned lane = g_emu_current->tid & 31, warp = g_emu_current->tid >> 5;
  if (!(mask >> lane & 1)) {
    fprintf(stderr, "emulator: __syncwarp by lane %u outside its mask %08x\n", lane, mask);
    abort();
  }
  WarpBarrier &b = warp_barriers[{warp, mask}];
  const unsigned gen = b.generation;
  b.arrived |= 1u << lane;
  if (b.arrived == mask) {
    b.arrived = 0;
    b.generation++;
    return;
  }
  while (gen == b.generation) yield();
}

float __shfl_xor_sync(unsigned mask, float v, int lane_mask) {
  const unsigned lane = g_emu_current->tid & 31, warp = g_emu_current->tid >> 5, source = lane ^ (unsigned)lane_mask;
  if (!(mask >> source & 1)) {
    fprintf(stderr, "emulator: shuffle from lane %u outside the mask %08x\n", source, mask);
    abort();
  }
  shuffle_slots[warp][lane] = v;
  __syncwarp(mask);  // every value written
  const float r = shuffle_slots[warp][source];
  __syncwarp(mask);  // every value read before the next shuffle writes
  return r;
}

static void fiber_main() {
  body();
  g_emu_current->done = true;
  live--;
  if (live > 0 && arrived == live) {  // the threads still waiting at a barrier are now all of them
    arrived = 0;
    generation++;
  }
  swapcontext(&g_emu_current->ctx, &scheduler);
}

void emu_launch(unsigned grid, unsigned block, size_t smem, const std::function<void()> &kernel) {
  const size_t guard = 4096;
  std::vector<unsigned char> dynamic(smem + guard, 0xCD);
  std::vector<EmuFiber> fibers(block);
  while (stacks.size() < block) stacks.push_back(new char[kStackBytes]);
  body = kernel;
  g_emu_grid_dim = {grid, 1, 1};
  g_emu_block_dim = {block, 1, 1};
  for (unsigned b = 0; b < grid; b++) {
    g_emu_block_index = {b, 0, 0};
    memset(dynamic.data(), 0xA5, smem);  // shared memory starts as garbage
    tn_dynamic_smem_emu = dynamic.data();
    live = block;
    arrived = generation = 0;
    warp_barriers.clear();
    for (unsigned t = 0; t < block; t++) {
      EmuFiber &f = fibers[t];
      f.tid = t;
      f.done = false;
      getcontext(&f.ctx);
      f.ctx.uc_stack.ss_sp = stacks[t];
      f.ctx.uc_stack.ss_size = kStackBytes;
      f.ctx.uc_link = &scheduler;
      makecontext(&f.ctx, fiber_main, 0);
    }
    for (unsigned left = block, rounds = 0; left > 0; rounds++) {
      const unsigned before = left;
      left = 0;
      for (unsigned t = 0; t < block; t++) {
        if (fibers[t].done) continue;
        g_emu_current = &fibers[t];
        swapcontext(&scheduler, &fibers[t].ctx);
        if (!fibers[t].done) left++;
      }
      // Threads that only wait, round after round, wait on a barrier the others never reach.
      if (left == before && rounds > 100000) {
        fprintf(stderr, "emulator: block %u of %u: %u threads wait forever\n", b, grid, left);
        abort();
      }
    }
    for (size_t i = smem; i < dynamic.size(); i++)
      if (dynamic[i] != 0xCD) {
        fprintf(stderr, "emulator: a write past the %zu bytes of dynamic shared memory (byte %zu)\n", smem, i);
        abort();
      }
  }
}
