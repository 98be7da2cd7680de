// Router top-k forward/backward and the aux-loss routing scores: one warp per token.
//
// Semantics are moerail-core's router.rs (Megatron-Core's topk_routing_with_score_function):
// scores in the accumulation type, selection in descending score order with ties to the lower
// expert index, group-limited selection by the sum of each group's top (k / group_topk) scores,
// the expert bias changing only the selection, sigmoid/sqrtsoftplus probs normalised by
// (sum + 1e-20) when k > 1, scaling, one rounding to the logits' dtype.
//
// Each warp owns a slice of dynamic shared memory (`warp_bytes`, computed by the launcher in
// rust/moerail-device/src/cuda/ops.rs) for its token's rows.
#include "common.cuh"

#define MR_SOFTMAX 0
#define MR_SIGMOID 1
#define MR_SQRTSOFTPLUS 2

// score(x) for sigmoid / sqrtsoftplus, as ScoreFunction::scores_into.
template <class A>
MR_NOINLINE A score_of(int f, A x) {
  if (f == MR_SIGMOID) {
    A o = Math<A>::exp_vec(-x);
    return A(1) / (A(1) + o);
  }
  A o = Math<A>::exp_vec(x);
  return Math<A>::sqrt_(x > A(20) ? x : Math<A>::log1p_(o));
}

// d score / d x given the score y, as ScoreFunction::elementwise_grad.
template <class A>
MR_NOINLINE A score_grad(int f, A x, A y) {
  if (f == MR_SIGMOID) return (A(1) - y) * y;
  A inner;
  if (x > A(20)) {
    inner = A(1);
  } else {
    A z = Math<A>::exp_libm(x);
    inner = z / (z + A(1));
  }
  return A(1) / (y + y) * inner;
}

// Sum of the top m of v[0..n) in descending order, from +0 (m == 1: the maximum; m == 2: the
// two largest added), one thread — router.rs Selection::select's group score.
template <class A>
MR_NOINLINE A group_score(const A* v, int n, int m) {
  if (m == 1) {
    A a = v[0];
    for (int i = 1; i < n; ++i) a = v[i] > a ? v[i] : a;
    return a;
  }
  if (m == 2) {
    A a = Math<A>::ninf(), b = Math<A>::ninf();
    for (int i = 0; i < n; ++i) {
      A x = v[i];
      if (x > a) {
        b = a;
        a = x;
      } else if (x > b) {
        b = x;
      }
    }
    return a + b;
  }
  A sum = A(0), pv = A(0);
  int pi = -1;
  for (int j = 0; j < m; ++j) {
    A bv = A(0);
    int bi = -1;
    for (int i = 0; i < n; ++i) {
      A x = v[i];
      bool after = pi < 0 || x < pv || (x == pv && i > pi);
      if (after && (bi < 0 || x > bv)) {
        bv = x;
        bi = i;
      }
    }
    if (bi < 0) break;
    sum = sum + bv;
    pv = bv;
    pi = bi;
  }
  return sum;
}

// k rounds of warp argmax over the candidates (flag == 0) of w[0..n): sel[j] in descending order,
// ties to the lower index; picked entries get flag 2.
template <class A>
MR_DEVICE void warp_select(const A* w, u8* flag, int n, int k, int* sel, int* status) {
  const int lane = threadIdx.x & 31;
  for (int j = 0; j < k; ++j) {
    A bv = A(0);
    int bi = -1;
    for (int e = lane; e < n; e += 32)
      if (flag[e] == 0 && (bi < 0 || w[e] > bv)) {
        bv = w[e];
        bi = e;
      }
    warp_argmax(bv, bi);
    if (bi < 0) {
      // Fewer candidates than k: impossible for validated settings; stay in bounds.
      bi = 0;
      if (lane == 0 && status) atomicOr(status, MR_ST_BAD_INDEX);
    }
    if (lane == 0) {
      sel[j] = bi;
      flag[bi] = 2;
    }
    __syncwarp();
  }
}

template <class T>
MR_DEVICE void router_fwd(const T* __restrict__ logits, const float* __restrict__ bias, i64 n_tok, int E, int k,
                          int f, int pre, int G, int GK, float scale, T* __restrict__ probs_k,
                          i64* __restrict__ indices, u64* __restrict__ tpe, T* __restrict__ dense,
                          u8* __restrict__ rmap, int* status, int warp_bytes) {
  typedef typename Elem<T>::Acc A;
  MR_DYN_SMEM(unsigned char, smem);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, wpb = blockDim.x >> 5;
  const bool grouped = G > 0 && GK > 0;
  const int ng = grouped ? G : 0;
  unsigned char* base = smem + (i64)warp * warp_bytes;
  A* x = (A*)base;
  A* s = x + E;
  A* w = s + E;
  A* gs = w + E;
  A* p = gs + ng;
  A* r = p + k;
  int* sel = (int*)(r + k);
  u8* flag = (u8*)(sel + k);
  u8* gflag = flag + E;
  const A sf = A(scale);
  for (i64 t = (i64)blockIdx.x * wpb + warp; t < n_tok; t += (i64)gridDim.x * wpb) {
    const T* row = logits + t * E;
    bool bad = false;
    for (int e = lane; e < E; e += 32) {
      A v = Elem<T>::load(row[e]);
      x[e] = v;
      bad = bad || !mr_isfinite(v);
      flag[e] = 0;
    }
    if (bad && status) atomicOr(status, MR_ST_NONFINITE);
    __syncwarp();
    if (f == MR_SOFTMAX) {
      if (pre) {
        warp_softmax(x, s, E);
        for (int e = lane; e < E; e += 32) w[e] = s[e];
      } else {
        for (int e = lane; e < E; e += 32) w[e] = x[e];
      }
    } else {
      MR_NO_UNROLL
      for (int e = lane; e < E; e += 32) {
        A sv = score_of(f, x[e]);
        s[e] = sv;
        w[e] = bias ? sv + (A)bias[e] : sv;
      }
    }
    __syncwarp();
    if (grouped) {
      const int per = E / G, m = k / GK;
      MR_NO_UNROLL
      for (int g = lane; g < G; g += 32) {
        gs[g] = group_score(w + g * per, per, m);
        gflag[g] = 0;
      }
      __syncwarp();
      for (int j = 0; j < GK; ++j) {
        A bv = A(0);
        int bi = -1;
        for (int g = lane; g < G; g += 32)
          if (gflag[g] == 0 && (bi < 0 || gs[g] > bv)) {
            bv = gs[g];
            bi = g;
          }
        warp_argmax(bv, bi);
        if (lane == 0 && bi >= 0) gflag[bi] = 1;
        __syncwarp();
      }
      // Experts of the groups not chosen are out.
      for (int e = lane; e < E; e += 32) flag[e] = gflag[e / per] ? 0 : 1;
      __syncwarp();
    }
    warp_select(w, flag, E, k, sel, status);
    if (lane == 0) {
      if (f == MR_SOFTMAX && pre) {
        for (int j = 0; j < k; ++j) p[j] = s[sel[j]];
      } else if (f == MR_SOFTMAX) {
        for (int j = 0; j < k; ++j) r[j] = x[sel[j]];
        seq_softmax(r, p, k);
      } else {
        for (int j = 0; j < k; ++j) p[j] = s[sel[j]];
        if (k > 1) {
          A d = A(0);
          for (int j = 0; j < k; ++j) d = d + p[j];
          d = d + A(1e-20);
          for (int j = 0; j < k; ++j) p[j] = p[j] / d;
        }
      }
      if (scale != 0.0f)
        for (int j = 0; j < k; ++j) p[j] = p[j] * sf;
    }
    __syncwarp();
    for (int j = lane; j < k; j += 32) {
      probs_k[t * k + j] = Elem<T>::store(p[j]);
      indices[t * k + j] = sel[j];
      if (tpe) atomicAdd(&tpe[sel[j]], 1ULL);
    }
    if (dense) {
      for (int e = lane; e < E; e += 32) {
        int hit = -1;
        if (flag[e] == 2)
          for (int j = 0; j < k; ++j)
            if (sel[j] == e) hit = j;
        if (hit >= 0) {
          dense[t * E + e] = Elem<T>::store(p[hit]);
        } else {
          T z;
          z = Elem<T>::store(A(0));
          dense[t * E + e] = z;
        }
        rmap[t * E + e] = hit >= 0 ? 1 : 0;
      }
    }
    __syncwarp();
  }
}

template <class T>
MR_DEVICE void router_bwd(const T* __restrict__ grad, int grad_dense, const T* __restrict__ logits,
                          const i64* __restrict__ indices, i64 n_tok, int E, int k, int f, int pre, float scale,
                          T* __restrict__ out, int* status, int warp_bytes) {
  typedef typename Elem<T>::Acc A;
  MR_DYN_SMEM(unsigned char, smem);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, wpb = blockDim.x >> 5;
  const bool full = f == MR_SOFTMAX && pre;
  unsigned char* base = smem + (i64)warp * warp_bytes;
  A* g = (A*)base;
  A* xs = g + k;
  A* v = xs + k;
  A* d = v + k;
  A* x = d + k;          // [E], pre-softmax only
  A* s = x + (full ? E : 0);  // [E], pre-softmax only
  int* sel = (int*)(s + (full ? E : 0));
  const A sc = scale != 0.0f ? A(scale) : A(1);
  for (i64 t = (i64)blockIdx.x * wpb + warp; t < n_tok; t += (i64)gridDim.x * wpb) {
    for (int j = lane; j < k; j += 32) {
      i64 e = indices[t * k + j];
      if (e < 0 || e >= E) {
        if (status) atomicOr(status, MR_ST_BAD_INDEX);
        e = 0;
      }
      sel[j] = (int)e;
      T raw = grad_dense ? grad[t * E + e] : grad[t * k + j];
      g[j] = Elem<T>::load(raw) * sc;
      xs[j] = Elem<T>::load(logits[t * E + e]);
    }
    __syncwarp();
    if (full) {
      for (int e = lane; e < E; e += 32) x[e] = Elem<T>::load(logits[t * E + e]);
      __syncwarp();
      warp_softmax(x, s, E);
      A dot = A(0);
      for (int j = 0; j < k; ++j) dot = dot + s[sel[j]] * g[j];
      for (int e = lane; e < E; e += 32) {
        A val = -(s[e] * dot);
        for (int j = 0; j < k; ++j)
          if (sel[j] == e) val = s[e] * (g[j] - dot);
        out[t * E + e] = Elem<T>::store(val);
      }
    } else {
      if (lane == 0) {
        if (f == MR_SOFTMAX) {
          seq_softmax(xs, v, k);
          A dot = A(0);
          for (int j = 0; j < k; ++j) dot = dot + v[j] * g[j];
          MR_NO_UNROLL
          for (int j = 0; j < k; ++j) d[j] = v[j] * (g[j] - dot);
        } else {
          MR_NO_UNROLL
          for (int j = 0; j < k; ++j) v[j] = score_of(f, xs[j]);
          if (k > 1) {
            A denom = A(0);
            for (int j = 0; j < k; ++j) denom = denom + v[j];
            denom = denom + A(1e-20);
            A dot = A(0);
            for (int j = 0; j < k; ++j) dot = dot + g[j] * (v[j] / denom);
            for (int j = 0; j < k; ++j) d[j] = (g[j] - dot) / denom;
          } else {
            MR_NO_UNROLL
            for (int j = 0; j < k; ++j) d[j] = g[j];
          }
          MR_NO_UNROLL
          for (int j = 0; j < k; ++j) d[j] = d[j] * score_grad(f, xs[j], v[j]);
        }
      }
      __syncwarp();
      for (int e = lane; e < E; e += 32) {
        int hit = -1;
        for (int j = 0; j < k; ++j)
          if (sel[j] == e) hit = j;
        out[t * E + e] = Elem<T>::store(hit >= 0 ? d[hit] : A(0));
      }
    }
    __syncwarp();
  }
}

// Megatron's compute_routing_scores_for_aux_loss: scores over all experts (softmax, or
// sigmoid/sqrtsoftplus normalised by their lane sum + 1e-20) and their top-k map.
template <class T>
MR_DEVICE void aux_scores_fwd(const T* __restrict__ logits, i64 n_tok, int E, int k, int f,
                              typename Elem<T>::Acc* __restrict__ scores, u8* __restrict__ rmap,
                              u64* __restrict__ tpe, int* status, int warp_bytes) {
  typedef typename Elem<T>::Acc A;
  MR_DYN_SMEM(unsigned char, smem);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, wpb = blockDim.x >> 5;
  unsigned char* base = smem + (i64)warp * warp_bytes;
  A* x = (A*)base;
  A* s = x + E;
  int* sel = (int*)(s + E);
  u8* flag = (u8*)(sel + k);
  for (i64 t = (i64)blockIdx.x * wpb + warp; t < n_tok; t += (i64)gridDim.x * wpb) {
    bool bad = false;
    for (int e = lane; e < E; e += 32) {
      A v = Elem<T>::load(logits[t * E + e]);
      x[e] = v;
      bad = bad || !mr_isfinite(v);
      flag[e] = 0;
    }
    if (bad && status) atomicOr(status, MR_ST_NONFINITE);
    __syncwarp();
    if (f == MR_SOFTMAX) {
      warp_softmax(x, s, E);
    } else {
      MR_NO_UNROLL
      for (int e = lane; e < E; e += 32) s[e] = score_of(f, x[e]);
      __syncwarp();
      A denom = warp_sum_lanes(s, E) + A(1e-20);
      __syncwarp();
      for (int e = lane; e < E; e += 32) s[e] = s[e] / denom;
      __syncwarp();
    }
    for (int e = lane; e < E; e += 32) scores[t * E + e] = s[e];
    warp_select(s, flag, E, k, sel, status);
    for (int e = lane; e < E; e += 32) {
      bool on = flag[e] == 2;
      rmap[t * E + e] = on ? 1 : 0;
      if (on && tpe) atomicAdd(&tpe[e], 1ULL);
    }
    __syncwarp();
  }
}

template <class T>
MR_DEVICE void aux_scores_bwd(const typename Elem<T>::Acc* __restrict__ grad, const T* __restrict__ logits,
                              i64 n_tok, int E, int f, T* __restrict__ out, int warp_bytes) {
  typedef typename Elem<T>::Acc A;
  MR_DYN_SMEM(unsigned char, smem);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, wpb = blockDim.x >> 5;
  unsigned char* base = smem + (i64)warp * warp_bytes;
  A* x = (A*)base;
  A* s = x + E;
  for (i64 t = (i64)blockIdx.x * wpb + warp; t < n_tok; t += (i64)gridDim.x * wpb) {
    const A* g = grad + t * E;
    for (int e = lane; e < E; e += 32) x[e] = Elem<T>::load(logits[t * E + e]);
    __syncwarp();
    if (f == MR_SOFTMAX) {
      warp_softmax(x, s, E);
      A dot = warp_dot_lanes(s, g, E);
      MR_NO_UNROLL
      for (int e = lane; e < E; e += 32) out[t * E + e] = Elem<T>::store(s[e] * (g[e] - dot));
    } else {
      MR_NO_UNROLL
      for (int e = lane; e < E; e += 32) s[e] = score_of(f, x[e]);
      __syncwarp();
      A denom = warp_sum_lanes(s, E) + A(1e-20);
      A dot = warp_dot_lanes(g, s, E) / denom;
      MR_NO_UNROLL
      for (int e = lane; e < E; e += 32)
        out[t * E + e] = Elem<T>::store((g[e] - dot) / denom * score_grad(f, x[e], s[e]));
    }
    __syncwarp();
  }
}

#define MR_ROUTER_INSTANTIATE(T, SUF)                                                                         \
  extern "C" __global__ void moerail_router_fwd_##SUF(                                                       \
      const T* logits, const float* bias, i64 n_tok, int E, int k, int f, int pre, int G, int GK, float scale, \
      T* probs_k, i64* indices, u64* tpe, T* dense, u8* rmap, int* status, int warp_bytes) {                  \
    router_fwd<T>(logits, bias, n_tok, E, k, f, pre, G, GK, scale, probs_k, indices, tpe, dense, rmap, status, \
                  warp_bytes);                                                                                 \
  }                                                                                                            \
  extern "C" __global__ void moerail_router_bwd_##SUF(const T* grad, int grad_dense, const T* logits,          \
                                                      const i64* indices, i64 n_tok, int E, int k, int f,      \
                                                      int pre, float scale, T* out, int* status,               \
                                                      int warp_bytes) {                                        \
    router_bwd<T>(grad, grad_dense, logits, indices, n_tok, E, k, f, pre, scale, out, status, warp_bytes);     \
  }                                                                                                            \
  extern "C" __global__ void moerail_aux_scores_fwd_##SUF(const T* logits, i64 n_tok, int E, int k, int f,     \
                                                          typename Elem<T>::Acc* scores, u8* rmap, u64* tpe,   \
                                                          int* status, int warp_bytes) {                       \
    aux_scores_fwd<T>(logits, n_tok, E, k, f, scores, rmap, tpe, status, warp_bytes);                          \
  }                                                                                                            \
  extern "C" __global__ void moerail_aux_scores_bwd_##SUF(const typename Elem<T>::Acc* grad, const T* logits,  \
                                                          i64 n_tok, int E, int f, T* out, int warp_bytes) {   \
    aux_scores_bwd<T>(grad, logits, n_tok, E, f, out, warp_bytes);                                             \
  }

MR_ROUTER_INSTANTIATE(float, f32)
MR_ROUTER_INSTANTIATE(double, f64)
MR_ROUTER_INSTANTIATE(bf16_t, bf16)
MR_ROUTER_INSTANTIATE(f16_t, f16)
