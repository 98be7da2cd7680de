// Unpermute (combine) and its backward, with moerail-core's permute.rs semantics:
// out[t] = sum over the rows r with sorted_indices[r] == t, in ascending r, of x[r] * w[r]
// (or x[r]), accumulated in f32 (f64 for f64) starting from +0 and rounded once.
//
// Deterministic without float atomics: the rows of each token are gathered into a CSR (integer
// atomics place them in some order, then each token's list is sorted, so the lists are the same
// on every run) and each output element sums its token's rows in ascending order.
#include "common.cuh"

// cnt[t] = rows of token t (cnt zeroed).
extern "C" __global__ void moerail_csr_count(const i64* __restrict__ si, i64 n_rows, i64 n_tok, int* cnt) {
  for (i64 r = (i64)blockIdx.x * blockDim.x + threadIdx.x; r < n_rows; r += (i64)gridDim.x * blockDim.x) {
    const i64 t = si[r];
    if (t >= 0 && t < n_tok) atomicAdd(&cnt[t], 1);
  }
}

// start[0..n_tok] = exclusive prefix of cnt. One block.
extern "C" __global__ void moerail_csr_scan(const int* __restrict__ cnt, i64 n_tok, i64* __restrict__ start) {
  MR_DYN_SMEM(i64, smem);
  block_exclusive_scan(n_tok, [&](i64 t) { return (i64)cnt[t]; }, start, smem);
}

// rows[start[t] ..] = the rows of token t, in some order (cur zeroed).
extern "C" __global__ void moerail_csr_fill(const i64* __restrict__ si, i64 n_rows, i64 n_tok,
                                           const i64* __restrict__ start, int* cur, int* __restrict__ rows) {
  for (i64 r = (i64)blockIdx.x * blockDim.x + threadIdx.x; r < n_rows; r += (i64)gridDim.x * blockDim.x) {
    const i64 t = si[r];
    if (t >= 0 && t < n_tok) {
      const int pos = atomicAdd(&cur[t], 1);
      rows[start[t] + pos] = (int)r;
    }
  }
}

// Each token's rows in ascending order (insertion sort: a token has a handful of rows).
extern "C" __global__ void moerail_csr_sort(const i64* __restrict__ start, i64 n_tok, int* __restrict__ rows) {
  for (i64 t = (i64)blockIdx.x * blockDim.x + threadIdx.x; t < n_tok; t += (i64)gridDim.x * blockDim.x) {
    const i64 lo = start[t], hi = start[t + 1];
    for (i64 i = lo + 1; i < hi; ++i) {
      const int v = rows[i];
      i64 j = i - 1;
      while (j >= lo && rows[j] > v) {
        rows[j + 1] = rows[j];
        --j;
      }
      rows[j + 1] = v;
    }
  }
}

// V consecutive elements, loaded and stored as one word when V > 1.
template <class T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

template <class T, int V>
MR_DEVICE void unpermute(const T* __restrict__ x, i64 H, const i64* __restrict__ start, const int* __restrict__ rows,
                         const typename Elem<T>::Acc* __restrict__ w, i64 n_tok, T* __restrict__ out) {
  typedef typename Elem<T>::Acc A;
  typedef Pack<T, V> P;
  const i64 chunks = H / V;
  const P* xp = reinterpret_cast<const P*>(x);
  P* op = reinterpret_cast<P*>(out);
  for (i64 t = blockIdx.x; t < n_tok; t += gridDim.x) {
    const i64 r0 = start[t], r1 = start[t + 1];
    for (i64 c = threadIdx.x; c < chunks; c += blockDim.x) {
      A acc[V];
      for (int i = 0; i < V; ++i) acc[i] = A(0);
      for (i64 q = r0; q < r1; ++q) {
        const i64 r = rows[q];
        const P p = xp[r * chunks + c];
        if (w) {
          const A wr = w[r];
          for (int i = 0; i < V; ++i) acc[i] = acc[i] + Elem<T>::load(p.v[i]) * wr;
        } else {
          for (int i = 0; i < V; ++i) acc[i] = acc[i] + Elem<T>::load(p.v[i]);
        }
      }
      P o;
      for (int i = 0; i < V; ++i) o.v[i] = Elem<T>::store(acc[i]);
      op[t * chunks + c] = o;
    }
  }
}

// grad_x[r] = grad_out[si[r]] * w[r] (rounded once) or a copy without weights; zeros for -1.
template <class T, int V>
MR_DEVICE void unpermute_bwd_gx(const T* __restrict__ g, i64 H, const i64* __restrict__ si, i64 n_rows, i64 n_tok,
                                const typename Elem<T>::Acc* __restrict__ w, T* __restrict__ gx) {
  typedef typename Elem<T>::Acc A;
  typedef Pack<T, V> P;
  const i64 chunks = H / V;
  const P* gp = reinterpret_cast<const P*>(g);
  P* op = reinterpret_cast<P*>(gx);
  for (i64 r = blockIdx.x; r < n_rows; r += gridDim.x) {
    const i64 t = si[r];
    const bool ok = t >= 0 && t < n_tok;
    const A wr = (ok && w) ? w[r] : A(0);
    for (i64 c = threadIdx.x; c < chunks; c += blockDim.x) {
      P o;
      if (!ok) {
        for (int i = 0; i < V; ++i) o.v[i] = Elem<T>::store(A(0));
      } else if (w) {
        const P p = gp[t * chunks + c];
        for (int i = 0; i < V; ++i) o.v[i] = Elem<T>::store(Elem<T>::load(p.v[i]) * wr);
      } else {
        o = gp[t * chunks + c];
      }
      op[r * chunks + c] = o;
    }
  }
}

// Both gradients when the weights need one: grad_x as above and grad_w[r] = <grad_out[si[r]], x[r]>
// in the CPU's dot_lanes order (8 lanes, lane l summing the elements l, l+8, ...). Four rows per
// warp, eight lanes each.
template <class T>
MR_DEVICE void unpermute_bwd_gw(const T* __restrict__ g, const T* __restrict__ x, i64 H, const i64* __restrict__ si,
                                i64 n_rows, i64 n_tok, const typename Elem<T>::Acc* __restrict__ w,
                                T* __restrict__ gx, typename Elem<T>::Acc* __restrict__ gw) {
  typedef typename Elem<T>::Acc A;
  const int lane = threadIdx.x & 31, l = lane & 7, grp = lane >> 3;
  const i64 warps = (i64)gridDim.x * (blockDim.x >> 5);
  const i64 gwarp = (i64)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  for (i64 r0 = gwarp * 4; r0 < n_rows; r0 += warps * 4) {
    const i64 r = r0 + grp;
    const bool in = r < n_rows;
    const i64 t = in ? si[r] : -1;
    const bool ok = t >= 0 && t < n_tok;
    A acc = A(0);
    if (in) {
      const A wr = (ok && w) ? w[r] : A(0);
      for (i64 i = l; i < H; i += 8) {
        if (!ok) {
          gx[r * H + i] = Elem<T>::store(A(0));
          continue;
        }
        const T gv = g[t * H + i];
        const A ga = Elem<T>::load(gv);
        acc = acc + ga * Elem<T>::load(x[r * H + i]);
        gx[r * H + i] = w ? Elem<T>::store(ga * wr) : gv;
      }
    }
    const A sum = group8_combine(acc);
    if (in && l == 0) gw[r] = ok ? sum : A(0);
  }
}

#define MR_UNPERMUTE(T, SUF, VW)                                                                               \
  extern "C" __global__ void moerail_unpermute_##SUF##_v1(const T* x, i64 H, const i64* start, const int* rows, \
                                                          const typename Elem<T>::Acc* w, i64 n_tok, T* out) {  \
    unpermute<T, 1>(x, H, start, rows, w, n_tok, out);                                                          \
  }                                                                                                             \
  extern "C" __global__ void moerail_unpermute_##SUF##_vw(const T* x, i64 H, const i64* start, const int* rows, \
                                                          const typename Elem<T>::Acc* w, i64 n_tok, T* out) {  \
    unpermute<T, VW>(x, H, start, rows, w, n_tok, out);                                                         \
  }                                                                                                             \
  extern "C" __global__ void moerail_unpermute_bwd_gx_##SUF##_v1(const T* g, i64 H, const i64* si, i64 n_rows,  \
                                                                 i64 n_tok, const typename Elem<T>::Acc* w,     \
                                                                 T* gx) {                                       \
    unpermute_bwd_gx<T, 1>(g, H, si, n_rows, n_tok, w, gx);                                                     \
  }                                                                                                             \
  extern "C" __global__ void moerail_unpermute_bwd_gx_##SUF##_vw(const T* g, i64 H, const i64* si, i64 n_rows,  \
                                                                 i64 n_tok, const typename Elem<T>::Acc* w,     \
                                                                 T* gx) {                                       \
    unpermute_bwd_gx<T, VW>(g, H, si, n_rows, n_tok, w, gx);                                                    \
  }                                                                                                             \
  extern "C" __global__ void moerail_unpermute_bwd_gw_##SUF(const T* g, const T* x, i64 H, const i64* si,        \
                                                            i64 n_rows, i64 n_tok,                              \
                                                            const typename Elem<T>::Acc* w, T* gx,              \
                                                            typename Elem<T>::Acc* gw) {                        \
    unpermute_bwd_gw<T>(g, x, H, si, n_rows, n_tok, w, gx, gw);                                                 \
  }

// "vw" is the 16-byte form: 4 f32, 2 f64, 8 bf16/f16 per load.
MR_UNPERMUTE(float, f32, 4)
MR_UNPERMUTE(double, f64, 2)
MR_UNPERMUTE(bf16_t, bf16, 8)
MR_UNPERMUTE(f16_t, f16, 8)
