// A CPU emulator for moerail's CUDA kernels, for the tests only: csrc/cuda/*.cu compiled with g++
// (-DMOERAIL_EMULATE) run here with CUDA's execution model, so the kernels' results can be
// compared with the CPU path on a machine without a GPU.
//
// Each block runs as blockDim.x cooperative fibers (ucontext) on the calling thread: a fiber
// runs until it reaches __syncthreads() or a warp-synchronous operation (__syncwarp, shuffles,
// ballots), and a barrier releases once every fiber that has to reach it has. Blocks run one
// after another, so `__shared__` variables become statics. A barrier that can never release —
// __syncthreads() in divergent code, a warp operation some lanes of the warp do not reach —
// aborts with a message (on a GPU that would hang or be undefined). Atomics are plain updates
// (there is one OS thread). Nothing here runs on a GPU.
#pragma once

#include <sys/mman.h>
#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

using std::exp;
using std::log1p;
using std::sqrt;

struct dim3 {
  unsigned x, y, z;
};

namespace emu {

enum State { RUN = 0, AT_BLOCK = 1, AT_WARP = 2, DONE = 3 };

struct Fiber {
  ucontext_t ctx;
  void* stack = nullptr;
  dim3 tid;
  int state = RUN;
};

struct Block {
  std::vector<Fiber> fibers;
  ucontext_t sched;
  int cur = 0;
  dim3 bid, bdim, gdim;
  void (*body)(void*) = nullptr;
  void* body_arg = nullptr;
  unsigned char* dyn_smem = nullptr;
  uint64_t xchg[1024];
};

extern Block* B;

inline Fiber& me() { return B->fibers[B->cur]; }
inline int lane() { return (int)(me().tid.x & 31); }

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "moerail CUDA emulator: %s (block %u, thread %u)\n", what, B->bid.x, me().tid.x);
  std::abort();
}

inline void yield_as(int state) {
  Fiber& f = me();
  f.state = state;
  swapcontext(&f.ctx, &B->sched);
}

inline void syncthreads() { yield_as(AT_BLOCK); }
inline void syncwarp() { yield_as(AT_WARP); }

template <class V>
inline uint64_t to_bits(V v) {
  static_assert(sizeof(V) <= 8, "shuffles move at most 8 bytes");
  uint64_t u = 0;
  std::memcpy(&u, &v, sizeof(V));
  return u;
}
template <class V>
inline V from_bits(uint64_t u) {
  V v;
  std::memcpy(&v, &u, sizeof(V));
  return v;
}

// Lane `src` of this warp's value (every lane deposits, then reads).
template <class V>
inline V shfl_from(V v, int src, bool valid) {
  const unsigned me_t = me().tid.x;
  const unsigned base = me_t & ~31u;
  B->xchg[me_t] = to_bits(v);
  syncwarp();
  V r = valid ? from_bits<V>(B->xchg[base + (unsigned)src]) : v;
  syncwarp();
  return r;
}

}  // namespace emu

#define __global__
#define __device__
#define __forceinline__ inline
#define __noinline__
#define __restrict__ __restrict
#define __align__(n) alignas(n)
#define __shared__ static
#define MR_DEVICE inline
#define MR_NOINLINE inline
#define MR_NO_UNROLL
#define MR_DYN_SMEM(T, name) T* name = reinterpret_cast<T*>(emu::B->dyn_smem)

#define threadIdx (emu::me().tid)
#define blockIdx (emu::B->bid)
#define blockDim (emu::B->bdim)
#define gridDim (emu::B->gdim)

inline void __syncthreads() { emu::syncthreads(); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu::syncwarp(); }

template <class V>
inline V __shfl_sync(unsigned, V v, int src) {
  return emu::shfl_from(v, src & 31, true);
}
template <class V>
inline V __shfl_xor_sync(unsigned, V v, int m) {
  return emu::shfl_from(v, emu::lane() ^ m, true);
}
template <class V>
inline V __shfl_down_sync(unsigned, V v, unsigned d) {
  int src = emu::lane() + (int)d;
  return emu::shfl_from(v, src, src < 32);
}
inline unsigned __ballot_sync(unsigned, int pred) {
  const unsigned me_t = emu::me().tid.x;
  const unsigned base = me_t & ~31u;
  emu::B->xchg[me_t] = pred ? 1 : 0;
  emu::syncwarp();
  unsigned m = 0;
  for (unsigned l = 0; l < 32; ++l)
    if (emu::B->xchg[base + l]) m |= 1u << l;
  emu::syncwarp();
  return m;
}
inline int __popc(unsigned v) { return __builtin_popcount(v); }

inline int atomicAdd(int* p, int v) {
  int o = *p;
  *p = o + v;
  return o;
}
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
  unsigned long long o = *p;
  *p = o + v;
  return o;
}
inline int atomicOr(int* p, int v) {
  int o = *p;
  *p = o | v;
  return o;
}

inline float __int_as_float(int v) { return emu::from_bits<float>((uint32_t)v); }
inline float __uint_as_float(unsigned v) { return emu::from_bits<float>(v); }
inline unsigned __float_as_uint(float v) { return (unsigned)emu::to_bits(v); }
inline int __float_as_int(float v) { return (int)(unsigned)emu::to_bits(v); }
inline double __longlong_as_double(long long v) { return emu::from_bits<double>((uint64_t)v); }
inline long long __double_as_longlong(double v) { return (long long)emu::to_bits(v); }

namespace emu {

// Runs `body(arg)` as a kernel over grid x block (x only), `smem` bytes of dynamic shared memory.
void launch(void (*body)(void*), void* arg, unsigned grid, unsigned block, unsigned smem);

}  // namespace emu
