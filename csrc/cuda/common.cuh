// Shared by every moerail CUDA kernel file. No host code and no includes: NVRTC compiles these
// sources at run time (the header is handed to NVRTC by name), and the tests compile the same
// sources for the CPU with `-DMOERAIL_EMULATE` against tests/cuda_emu/emulator.h.
//
// Numerics follow moerail-core (rust/moerail-core/src/elem.rs, fastmath.rs, router.rs):
// half types compute in f32, f64 in f64; every sum runs in the order the CPU path uses, and the
// sources are compiled with --fmad=false, so products and sums round exactly as on the CPU.
#pragma once

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef int i32;
typedef unsigned long long u64;
typedef long long i64;

#if defined(MOERAIL_EMULATE)
#include "emulator.h"
#else
#define MR_DEVICE __device__ __forceinline__
// Keeps a loop rolled: the per-element loops around exp/log would otherwise be unrolled into
// many copies of the same math (slow NVRTC compiles, big modules) for no measurable gain.
#define MR_NO_UNROLL _Pragma("unroll 1")
// For the long math (libdevice log1p/exp in f64): one copy per kernel instead of one per call.
#define MR_NOINLINE __device__ __noinline__
// Dynamic shared memory of the launch, as an array of T.
#define MR_DYN_SMEM(T, name)                                                                \
  extern __shared__ __align__(16) unsigned char moerail_dyn_smem_[];                       \
  T* name = reinterpret_cast<T*>(moerail_dyn_smem_)
#endif

#define MR_FULL_MASK 0xffffffffu

// Status bits a kernel may OR into an optional `int* status` (value checks that the CPU path
// turns into ValueError; on CUDA they are only read where the op synchronises anyway).
#define MR_ST_NONFINITE 1
#define MR_ST_BAD_INDEX 2
#define MR_ST_DUPLICATE 4

template <class A>
MR_DEVICE A mr_min(A a, A b) { return b < a ? b : a; }
template <class A>
MR_DEVICE A mr_max(A a, A b) { return a < b ? b : a; }

MR_DEVICE float mr_inf_f() { return __int_as_float(0x7f800000); }
MR_DEVICE double mr_inf_d() { return __longlong_as_double(0x7ff0000000000000LL); }
MR_DEVICE bool mr_isfinite(float v) { return (__float_as_uint(v) & 0x7f800000u) != 0x7f800000u; }
MR_DEVICE bool mr_isfinite(double v) {
  return (((u64)__double_as_longlong(v)) & 0x7ff0000000000000ULL) != 0x7ff0000000000000ULL;
}

// ------------------------------------------------------------------------------------------
// Element types. bf16 and f16 travel as their 16 bits; conversions are torch's.
// ------------------------------------------------------------------------------------------

struct bf16_t {
  u16 bits;
};
struct f16_t {
  u16 bits;
};

#if defined(MOERAIL_EMULATE)
// IEEE binary16 <-> binary32 in software, rounding to nearest even (the `half` crate's rules).
MR_DEVICE float mr_half_to_float(u16 h) {
  u32 sign = ((u32)(h & 0x8000u)) << 16;
  u32 exp = (h >> 10) & 0x1fu;
  u32 man = h & 0x3ffu;
  if (exp == 0x1fu) return __uint_as_float(sign | 0x7f800000u | (man << 13));
  if (exp == 0) {
    float v = (float)man * 5.9604644775390625e-8f;  // man * 2^-24, exact
    return sign ? -v : v;
  }
  return __uint_as_float(sign | ((exp + 112u) << 23) | (man << 13));
}
MR_DEVICE u16 mr_float_to_half(float f) {
  u32 x = __float_as_uint(f);
  u32 sign = (x & 0x80000000u) >> 16;
  u32 exp = x & 0x7f800000u;
  u32 man = x & 0x007fffffu;
  if (exp == 0x7f800000u) {
    if (man == 0) return (u16)(sign | 0x7c00u);
    return (u16)(sign | 0x7c00u | 0x0200u | (man >> 13));
  }
  int half_exp = (int)(exp >> 23) - 127 + 15;
  if (half_exp >= 0x1f) return (u16)(sign | 0x7c00u);
  if (half_exp <= 0) {
    if (14 - half_exp > 24) return (u16)sign;
    u32 m = man | 0x00800000u;
    u32 half_man = m >> (14 - half_exp);
    u32 round_bit = 1u << (13 - half_exp);
    if ((m & round_bit) != 0 && (m & (3u * round_bit - 1u)) != 0) half_man += 1;
    return (u16)(sign | half_man);
  }
  u32 he = ((u32)half_exp) << 10;
  u32 hm = man >> 13;
  u32 round_bit = 0x00001000u;
  if ((man & round_bit) != 0 && (man & (3u * round_bit - 1u)) != 0) return (u16)((sign | he | hm) + 1u);
  return (u16)(sign | he | hm);
}
#else
MR_DEVICE float mr_half_to_float(u16 h) {
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
  return f;
}
MR_DEVICE u16 mr_float_to_half(float f) {
  u16 h;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
  return h;
}
#endif

template <class T>
struct Elem;

template <>
struct Elem<float> {
  typedef float Acc;
  MR_DEVICE static float load(float v) { return v; }
  MR_DEVICE static float store(float a) { return a; }
};

template <>
struct Elem<double> {
  typedef double Acc;
  MR_DEVICE static double load(double v) { return v; }
  MR_DEVICE static double store(double a) { return a; }
};

template <>
struct Elem<bf16_t> {
  typedef float Acc;
  MR_DEVICE static float load(bf16_t v) { return __uint_as_float(((u32)v.bits) << 16); }
  // torch's c10::BFloat16 rounding: nearest even, NaN -> 0x7FC0.
  MR_DEVICE static bf16_t store(float a) {
    bf16_t r;
    if (a != a) {
      r.bits = 0x7fc0;
      return r;
    }
    u32 u = __float_as_uint(a);
    u32 bias = 0x7fffu + ((u >> 16) & 1u);
    r.bits = (u16)((u + bias) >> 16);
    return r;
  }
};

template <>
struct Elem<f16_t> {
  typedef float Acc;
  MR_DEVICE static float load(f16_t v) { return mr_half_to_float(v.bits); }
  MR_DEVICE static f16_t store(float a) {
    f16_t r;
    r.bits = mr_float_to_half(a);
    return r;
  }
};

// ------------------------------------------------------------------------------------------
// exp, as moerail-core/src/fastmath.rs computes it (Cephes expf as straight-line arithmetic):
// with --fmad=false these are the same IEEE operations in the same order, so the same bits.
// ------------------------------------------------------------------------------------------

MR_DEVICE float mr_expf(float x) {
  const float LOG2E = 1.44269504088896340736f;
  const float LN2_HI = 0.6933594f;
  const float LN2_LO = -2.1219444e-4f;
  const float ROUND = 12582912.0f;
  const float MAX_X = 88.72283f;
  const float MIN_X = -87.33655f;
  float xc = x < MIN_X ? MIN_X : (x > MAX_X ? MAX_X : x);
  float n = (xc * LOG2E + ROUND) - ROUND;
  float r = (xc - n * LN2_HI) - n * LN2_LO;
  float p = 1.9875691e-4f;
  p = p * r + 1.3981999e-3f;
  p = p * r + 8.333452e-3f;
  p = p * r + 4.1665796e-2f;
  p = p * r + 1.6666665e-1f;
  p = p * r + 0.5f;
  float y = (p * (r * r) + r) + 1.0f;
  int ni = (int)n;
  int half = ni >> 1;
  float s1 = __int_as_float((half + 127) << 23);
  float s2 = __int_as_float((ni - half + 127) << 23);
  float v = (y * s1) * s2;
  v = x < MIN_X ? 0.0f : v;
  return x > MAX_X ? mr_inf_f() : v;
}

// The accumulation type's math: `exp_vec` is the CPU's `Real::exp_in_place` (our expf for f32,
// libm for f64), `exp_libm` its `Float::exp`; log1p/exp of libm are evaluated in f64 and rounded
// once, which is within an ulp of glibc's f32 functions (see the crate docs).
template <class A>
struct Math;

template <>
struct Math<float> {
  MR_DEVICE static float exp_vec(float x) { return mr_expf(x); }
  MR_DEVICE static float exp_libm(float x) { return (float)exp((double)x); }
  MR_DEVICE static float log1p_(float x) { return (float)log1p((double)x); }
  MR_DEVICE static float sqrt_(float x) { return sqrtf(x); }
  MR_DEVICE static float ninf() { return -mr_inf_f(); }
};

template <>
struct Math<double> {
  MR_DEVICE static double exp_vec(double x) { return exp(x); }
  MR_DEVICE static double exp_libm(double x) { return exp(x); }
  MR_DEVICE static double log1p_(double x) { return log1p(x); }
  MR_DEVICE static double sqrt_(double x) { return sqrt(x); }
  MR_DEVICE static double ninf() { return -mr_inf_d(); }
};

// ------------------------------------------------------------------------------------------
// Sums in the CPU's order. `Real::sum_lanes` keeps 8 lanes, lane l summing the elements
// l, l+8, l+16, ... from +0 in order, then combines ((l0+l4)+(l1+l5))+((l2+l6)+(l3+l7)).
// ------------------------------------------------------------------------------------------

// One thread, n small (k-sized arrays).
template <class A>
MR_DEVICE A seq_lane(const A* v, int n, int l) {
  A acc = A(0);
  MR_NO_UNROLL
  for (int i = l; i < n; i += 8) acc = acc + v[i];
  return acc;
}
template <class A>
MR_DEVICE A seq_sum_lanes(const A* v, int n) {
  return ((seq_lane(v, n, 0) + seq_lane(v, n, 4)) + (seq_lane(v, n, 1) + seq_lane(v, n, 5))) +
         ((seq_lane(v, n, 2) + seq_lane(v, n, 6)) + (seq_lane(v, n, 3) + seq_lane(v, n, 7)));
}

// Lanes 0..7 of an 8-lane group hold the lane sums; returns the combined sum in lane 0 of the
// group (the other lanes hold partial values). All 32 lanes of the warp must call it.
template <class A>
MR_DEVICE A group8_combine(A acc) {
  A s = acc + __shfl_down_sync(MR_FULL_MASK, acc, 4);
  A t = s + __shfl_down_sync(MR_FULL_MASK, s, 1);
  return t + __shfl_down_sync(MR_FULL_MASK, t, 2);
}

// sum_lanes(v[0..n)) for a warp (v in shared memory, written before a __syncwarp); every lane
// gets the result.
template <class A>
MR_DEVICE A warp_sum_lanes(const A* v, int n) {
  const int lane = threadIdx.x & 31;
  A acc = A(0);
  if (lane < 8)
    for (int i = lane; i < n; i += 8) acc = acc + v[i];
  A r = group8_combine(acc);
  return __shfl_sync(MR_FULL_MASK, r, 0);
}

// dot_lanes(a, b) = lanes of a[i] * b[i] (each product rounded, then added), for a warp.
template <class A>
MR_DEVICE A warp_dot_lanes(const A* a, const A* b, int n) {
  const int lane = threadIdx.x & 31;
  A acc = A(0);
  if (lane < 8)
    for (int i = lane; i < n; i += 8) acc = acc + a[i] * b[i];
  A r = group8_combine(acc);
  return __shfl_sync(MR_FULL_MASK, r, 0);
}

template <class A>
MR_DEVICE A warp_max(A v) {
  for (int o = 16; o > 0; o >>= 1) {
    A w = __shfl_xor_sync(MR_FULL_MASK, v, o);
    v = w > v ? w : v;
  }
  return v;
}

// The best (value, index) over the warp: larger value, ties to the lower index; `i < 0` marks a
// lane with no candidate. Every lane ends with the same pair.
template <class A>
MR_DEVICE void warp_argmax(A& v, int& i) {
  for (int o = 16; o > 0; o >>= 1) {
    A v2 = __shfl_xor_sync(MR_FULL_MASK, v, o);
    int i2 = __shfl_xor_sync(MR_FULL_MASK, i, o);
    bool take = i2 >= 0 && (i < 0 || v2 > v || (v2 == v && i2 < i));
    if (take) {
      v = v2;
      i = i2;
    }
  }
}

// softmax(x[0..n)) into out, for a warp, as the CPU's softmax_into: max, exp(x - max), the lane
// sum, one division each.
template <class A>
MR_DEVICE void warp_softmax(const A* x, A* out, int n) {
  const int lane = threadIdx.x & 31;
  A m = Math<A>::ninf();
  for (int e = lane; e < n; e += 32) m = x[e] > m ? x[e] : m;
  m = warp_max(m);
  MR_NO_UNROLL
  for (int e = lane; e < n; e += 32) out[e] = Math<A>::exp_vec(x[e] - m);
  __syncwarp();
  A sum = warp_sum_lanes(out, n);
  __syncwarp();
  for (int e = lane; e < n; e += 32) out[e] = out[e] / sum;
  __syncwarp();
}

// The same for one thread over a short array.
template <class A>
MR_DEVICE void seq_softmax(const A* x, A* out, int n) {
  if (n <= 0) return;
  A m = x[0];
  for (int i = 1; i < n; ++i) m = x[i] > m ? x[i] : m;
  MR_NO_UNROLL
  for (int i = 0; i < n; ++i) out[i] = Math<A>::exp_vec(x[i] - m);
  A sum = seq_sum_lanes(out, n);
  for (int i = 0; i < n; ++i) out[i] = out[i] / sum;
}

// ------------------------------------------------------------------------------------------
// Block-wide helpers (one block; blockDim.x a multiple of 32, at most 1024).
// ------------------------------------------------------------------------------------------

// out[i] = sum of get(j) for j < i, out[n] = the total. `smem` holds blockDim.x i64.
// `get(i)` may read what out[i] overwrites (each thread reads and writes its own range).
template <class F>
MR_DEVICE void block_exclusive_scan(i64 n, F get, i64* out, i64* smem) {
  const i64 nt = blockDim.x;
  const i64 tid = threadIdx.x;
  const i64 per = (n + nt - 1) / nt;
  const i64 lo = mr_min(n, tid * per);
  const i64 hi = mr_min(n, lo + per);
  i64 s = 0;
  for (i64 i = lo; i < hi; ++i) s += get(i);
  smem[tid] = s;
  __syncthreads();
  for (i64 off = 1; off < nt; off <<= 1) {
    i64 v = tid >= off ? smem[tid - off] : 0;
    __syncthreads();
    smem[tid] += v;
    __syncthreads();
  }
  i64 run = smem[tid] - s;
  const i64 total = smem[nt - 1];
  __syncthreads();
  for (i64 i = lo; i < hi; ++i) {
    i64 v = get(i);
    out[i] = run;
    run += v;
  }
  if (tid == 0) out[n] = total;
  __syncthreads();
}

// Index p with off[p] <= r < off[p + 1] (off non-decreasing, n + 1 entries); n if r >= off[n],
// -1 if r < off[0].
MR_DEVICE i64 upper_segment(const i64* off, i64 n, i64 r) {
  i64 lo = 0, hi = n + 1;  // first index with off[i] > r, in [0, n + 1]
  while (lo < hi) {
    i64 mid = (lo + hi) >> 1;
    if (off[mid] <= r)
      lo = mid + 1;
    else
      hi = mid;
  }
  return lo - 1;
}

// A 16-byte vector for wide row copies.
struct __align__(16) mr_vec16 {
  u32 v[4];
};

// Copies `bytes` (0, 2, 4 or 8) from src[i] to dst[j] for element arrays of that size.
MR_DEVICE void copy_elem(const void* src, i64 i, void* dst, i64 j, int bytes) {
  if (bytes == 2)
    ((u16*)dst)[j] = ((const u16*)src)[i];
  else if (bytes == 4)
    ((u32*)dst)[j] = ((const u32*)src)[i];
  else if (bytes == 8)
    ((u64*)dst)[j] = ((const u64*)src)[i];
  else if (bytes == 1)
    ((u8*)dst)[j] = ((const u8*)src)[i];
}

MR_DEVICE void zero_elem(void* dst, i64 j, int bytes) {
  if (bytes == 2)
    ((u16*)dst)[j] = 0;
  else if (bytes == 4)
    ((u32*)dst)[j] = 0;
  else if (bytes == 8)
    ((u64*)dst)[j] = 0;
  else if (bytes == 1)
    ((u8*)dst)[j] = 0;
}
