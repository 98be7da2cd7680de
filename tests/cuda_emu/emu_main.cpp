// The emulator's launcher and the C entry points the Rust backend (moerail-device's
// EmulatorBackend) loads: every kernel of csrc/cuda/kernels.def, launched by name with the
// kernel-parameter array cuLaunchKernel takes. Built by the tests (tests/cuda_emu.py) with
//   g++ -std=c++17 -O1 -shared -fPIC -ffp-contract=off -DMOERAIL_EMULATE -I csrc/cuda -I tests/cuda_emu
#include "emulator.h"

#include <mutex>
#include <string>
#include <utility>

#include "permute.cu"
#include "router.cu"
#include "sort_chunks.cu"
#include "unpermute.cu"

namespace emu {

Block* B = nullptr;

namespace {

constexpr size_t kStack = 256 * 1024;
std::vector<void*> g_stacks;
std::string g_error;
std::mutex g_mutex;

void* stack_for(size_t i) {
  while (g_stacks.size() <= i) {
    void* p = mmap(nullptr, kStack, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
      std::fprintf(stderr, "moerail CUDA emulator: out of memory for fiber stacks\n");
      std::abort();
    }
    g_stacks.push_back(p);
  }
  return g_stacks[i];
}

void fiber_main() {
  B->body(B->body_arg);
  me().state = DONE;
}

const char* state_name(int s) {
  switch (s) {
    case RUN: return "running";
    case AT_BLOCK: return "__syncthreads";
    case AT_WARP: return "warp sync";
    default: return "exited";
  }
}

[[noreturn]] void deadlock() {
  std::string msg = "deadlock: a barrier can never release; thread states:";
  int prev = -1, from = 0;
  const int n = (int)B->fibers.size();
  for (int i = 0; i <= n; ++i) {
    int s = i < n ? B->fibers[i].state : -2;
    if (s != prev) {
      if (prev != -1) msg += " [" + std::to_string(from) + ".." + std::to_string(i - 1) + "] " + state_name(prev) + ";";
      prev = s;
      from = i;
    }
  }
  std::fprintf(stderr, "moerail CUDA emulator: %s (block %u)\n", msg.c_str(), B->bid.x);
  std::abort();
}

void run_block() {
  Block& b = *B;
  const int n = (int)b.fibers.size();
  for (int i = 0; i < n; ++i) {
    Fiber& f = b.fibers[i];
    f.state = RUN;
    f.tid = dim3{(unsigned)i, 0, 0};
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack;
    f.ctx.uc_stack.ss_size = kStack;
    f.ctx.uc_link = &b.sched;
    makecontext(&f.ctx, fiber_main, 0);
  }
  for (;;) {
    bool ran = false;
    for (int i = 0; i < n; ++i) {
      if (b.fibers[i].state == RUN) {
        ran = true;
        b.cur = i;
        swapcontext(&b.sched, &b.fibers[i].ctx);
      }
    }
    if (ran) continue;
    int live = 0;
    bool all_block = true;
    for (auto& f : b.fibers)
      if (f.state != DONE) {
        ++live;
        all_block = all_block && f.state == AT_BLOCK;
      }
    if (live == 0) return;
    bool released = false;
    for (int w = 0; w < n / 32; ++w) {
      bool all = true;
      for (int l = 0; l < 32; ++l) all = all && b.fibers[w * 32 + l].state == AT_WARP;
      if (all) {
        for (int l = 0; l < 32; ++l) b.fibers[w * 32 + l].state = RUN;
        released = true;
      }
    }
    if (!released && all_block) {
      for (auto& f : b.fibers)
        if (f.state == AT_BLOCK) f.state = RUN;
      released = true;
    }
    if (!released) deadlock();
  }
}

}  // namespace

void launch(void (*body)(void*), void* arg, unsigned grid, unsigned block, unsigned smem) {
  Block* b = new Block();
  B = b;
  b->fibers.resize(block);
  for (unsigned i = 0; i < block; ++i) b->fibers[i].stack = stack_for(i);
  b->bdim = dim3{block, 1, 1};
  b->gdim = dim3{grid, 1, 1};
  b->body = body;
  b->body_arg = arg;
  std::vector<uint64_t> dyn((smem + 7) / 8 + 2);
  // Shared memory starts as garbage on a GPU: a pattern makes reads before writes show.
  std::memset(dyn.data(), 0xA5, dyn.size() * 8);
  b->dyn_smem = reinterpret_cast<unsigned char*>(dyn.data());
  for (unsigned x = 0; x < grid; ++x) {
    b->bid = dim3{x, 0, 0};
    run_block();
  }
  B = nullptr;
  delete b;
}

template <auto F>
struct Kernel;

template <class... A, void (*F)(A...)>
struct Kernel<F> {
  template <size_t... I>
  static void call(void** a, std::index_sequence<I...>) {
    F(*static_cast<A*>(a[I])...);
  }
  static void run(void* a) { call(static_cast<void**>(a), std::index_sequence_for<A...>{}); }
};

struct Entry {
  const char* name;
  void (*run)(void*);
};

#define MOERAIL_KERNEL(file, name) {#name, &Kernel<&name>::run},
const Entry kTable[] = {
#include "kernels.def"
};
#undef MOERAIL_KERNEL

}  // namespace emu

extern "C" {

int moerail_emu_kernel_count() { return (int)(sizeof(emu::kTable) / sizeof(emu::kTable[0])); }

const char* moerail_emu_kernel_name(int i) { return emu::kTable[i].name; }

const char* moerail_emu_last_error() { return emu::g_error.c_str(); }

// 0 on success; else see moerail_emu_last_error().
int moerail_emu_launch(const char* name, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                       unsigned bz, unsigned smem, void** args) {
  std::lock_guard<std::mutex> lock(emu::g_mutex);
  for (const auto& e : emu::kTable) {
    if (std::strcmp(e.name, name) != 0) continue;
    if (gy != 1 || gz != 1 || by != 1 || bz != 1) {
      emu::g_error = std::string(name) + ": the emulator runs 1-D grids and blocks only";
      return 1;
    }
    if (bx == 0 || bx > 1024 || bx % 32 != 0) {
      emu::g_error = std::string(name) + ": block size " + std::to_string(bx) + " is not a multiple of 32 in [32, 1024]";
      return 1;
    }
    if (smem > 227 * 1024) {
      emu::g_error = std::string(name) + ": " + std::to_string(smem) + " bytes of shared memory exceed a GPU's";
      return 1;
    }
    if (gx == 0) return 0;
    emu::launch(e.run, args, gx, bx, smem);
    return 0;
  }
  emu::g_error = std::string("no kernel named ") + name;
  return 2;
}
}
