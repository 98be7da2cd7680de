// Permutation layout (which token goes to which row) and row movement, with moerail-core's
// permute.rs semantics (Megatron-Core's permute): rows are expert-major, ascending in token
// order inside an expert, each expert's rows optionally padded with empty rows (source -1,
// zeros) up to a multiple of `align`; drop-and-pad gives every expert exactly `capacity` rows.
//
// The layout is built without atomics, so it is the same on every run: tokens are cut into
// blocks of `tb`; one thread per (block, expert) counts, a single-block scan turns the counts
// into each (block, expert)'s first row, and the same thread writes its rows in token order.
#include "common.cuh"

extern "C" __global__ void moerail_fill_u32(u32* p, i64 n, u32 v) {
  for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) p[i] = v;
}

// bc[b][e] = tokens of block b routed to expert e (routing map form).
extern "C" __global__ void moerail_layout_count_map(const u8* __restrict__ map, i64 n_tok, int E, i64 tb,
                                                   i64* __restrict__ bc) {
  const i64 b = blockIdx.x;
  const i64 t0 = b * tb, t1 = mr_min(n_tok, t0 + tb);
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    i64 c = 0;
    for (i64 t = t0; t < t1; ++t) c += map[t * E + e] != 0;
    bc[b * E + e] = c;
  }
}

// The same from top-k indices [T, k] (-1 = dropped slot); flags ids outside [-1, E) and
// experts listed twice by a token.
extern "C" __global__ void moerail_layout_count_idx(const i64* __restrict__ idx, i64 n_tok, int k, int E, i64 tb,
                                                   i64* __restrict__ bc, int* status) {
  const i64 b = blockIdx.x;
  const i64 t0 = b * tb, t1 = mr_min(n_tok, t0 + tb);
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    i64 c = 0;
    bool dup = false;
    for (i64 t = t0; t < t1; ++t) {
      int n = 0;
      for (int j = 0; j < k; ++j) n += idx[t * k + j] == e;
      c += n;
      dup = dup || n > 1;
    }
    bc[b * E + e] = c;
    if (dup && status) atomicOr(status, MR_ST_DUPLICATE);
  }
  bool bad = false;
  for (i64 i = t0 * k + threadIdx.x; i < t1 * k; i += blockDim.x) bad = bad || idx[i] < -1 || idx[i] >= E;
  if (bad && status) atomicOr(status, MR_ST_BAD_INDEX);
}

// One block. In: bc[b][e] counts. Out: bc[b][e] = first row of (block b, expert e); totals[e];
// row_counts[e] = totals[e] rounded up to `align`; start[0..E] = first row of each expert and
// start[E] = all rows; meta[0] = all rows (what a caller without num_out_tokens reads back).
extern "C" __global__ void moerail_layout_scan(i64* __restrict__ bc, i64 nb, int E, i64 align,
                                              i64* __restrict__ totals, i64* __restrict__ row_counts,
                                              i64* __restrict__ start, i64* __restrict__ meta) {
  MR_DYN_SMEM(i64, smem);
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    i64 run = 0;
    for (i64 b = 0; b < nb; ++b) {
      i64 c = bc[b * E + e];
      bc[b * E + e] = run;
      run += c;
    }
    totals[e] = run;
    row_counts[e] = align > 1 ? (run + align - 1) / align * align : run;
  }
  __syncthreads();
  block_exclusive_scan((i64)E, [&](i64 e) { return row_counts[e]; }, start, smem);
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    const i64 s = start[e];
    for (i64 b = 0; b < nb; ++b) bc[b * E + e] += s;
  }
  if (threadIdx.x == 0) meta[0] = start[E];
}

// Rows of expert e past its tokens (alignment padding), and rows past all experts' rows (only
// when the caller's row count exceeds the routing's), become empty: source -1, prob 0.
MR_DEVICE void pad_rows(int e, int E, const i64* totals, const i64* start, i64 n_rows, i64* si, void* pp,
                        int pbytes) {
  for (i64 r = start[e] + totals[e]; r < start[e + 1] && r < n_rows; ++r) {
    si[r] = -1;
    if (pp) zero_elem(pp, r, pbytes);
  }
  if (e == E - 1)
    for (i64 r = start[E]; r < n_rows; ++r) {
      si[r] = -1;
      if (pp) zero_elem(pp, r, pbytes);
    }
}

// sorted_indices (and permuted probs, `pbytes` wide) from a routing map.
extern "C" __global__ void moerail_layout_fill_map(const u8* __restrict__ map, const void* probs, int pbytes,
                                                  i64 n_tok, int E, i64 tb, const i64* __restrict__ bc,
                                                  const i64* __restrict__ totals, const i64* __restrict__ start,
                                                  i64 n_rows, i64* __restrict__ si, void* pp) {
  const i64 b = blockIdx.x;
  const i64 t0 = b * tb, t1 = mr_min(n_tok, t0 + tb);
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    i64 cur = bc[b * E + e];
    for (i64 t = t0; t < t1; ++t) {
      if (map[t * E + e] != 0) {
        if (cur < n_rows) {
          si[cur] = t;
          if (pp) copy_elem(probs, t * E + e, pp, cur, pbytes);
        }
        ++cur;
      }
    }
    if (b == (i64)gridDim.x - 1) pad_rows(e, E, totals, start, n_rows, si, pp, pbytes);
  }
}

// The same from top-k indices; probs are [T, k].
extern "C" __global__ void moerail_layout_fill_idx(const i64* __restrict__ idx, const void* probs, int pbytes,
                                                  i64 n_tok, int k, int E, i64 tb, const i64* __restrict__ bc,
                                                  const i64* __restrict__ totals, const i64* __restrict__ start,
                                                  i64 n_rows, i64* __restrict__ si, void* pp) {
  const i64 b = blockIdx.x;
  const i64 t0 = b * tb, t1 = mr_min(n_tok, t0 + tb);
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    i64 cur = bc[b * E + e];
    for (i64 t = t0; t < t1; ++t) {
      for (int j = 0; j < k; ++j) {
        if (idx[t * k + j] == e) {
          if (cur < n_rows) {
            si[cur] = t;
            if (pp) copy_elem(probs, t * k + j, pp, cur, pbytes);
          }
          ++cur;
        }
      }
    }
    if (b == (i64)gridDim.x - 1) pad_rows(e, E, totals, start, n_rows, si, pp, pbytes);
  }
}

// Megatron's drop-and-pad layout: expert e takes rows [e * cap, (e + 1) * cap): its routed tokens
// in ascending order, then the earliest tokens not routed to it. One block per expert.
extern "C" __global__ void moerail_layout_drop_pad(const u8* __restrict__ map, const void* probs, int pbytes,
                                                  i64 n_tok, int E, i64 cap, i64* __restrict__ si, void* pp) {
  __shared__ int warp_tot[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  for (i64 e = blockIdx.x; e < E; e += gridDim.x) {
    i64 n = 0;  // rows written so far (block-uniform)
    for (int want = 1; want >= 0; --want) {
      for (i64 c0 = 0; c0 < n_tok && n < cap; c0 += blockDim.x) {
        const i64 t = c0 + threadIdx.x;
        const bool on = t < n_tok && ((map[t * E + e] != 0) == (want == 1));
        const u32 bal = __ballot_sync(MR_FULL_MASK, on);
        if (lane == 0) warp_tot[warp] = __popc(bal);
        __syncthreads();
        i64 before = 0, all = 0;
        for (int w = 0; w < nw; ++w) {
          if (w < warp) before += warp_tot[w];
          all += warp_tot[w];
        }
        __syncthreads();
        const i64 pos = n + before + __popc(bal & ((1u << lane) - 1u));
        if (on && pos < cap) {
          si[e * cap + pos] = t;
          if (pp) copy_elem(probs, t * E + e, pp, e * cap + pos, pbytes);
        }
        n += all;
      }
    }
    for (i64 r = n + threadIdx.x; r < cap; r += blockDim.x) {
      si[e * cap + r] = -1;
      if (pp) zero_elem(pp, e * cap + r, pbytes);
    }
  }
}

// out[r] = src[si[r]] for rows of `vecs` V-sized words; -1 (or out-of-range) rows become zeros.
template <class V>
MR_DEVICE void gather_rows(const V* __restrict__ src, const i64* __restrict__ si, i64 n_rows, i64 vecs,
                           i64 n_src, V* __restrict__ out) {
  for (i64 r = blockIdx.x; r < n_rows; r += gridDim.x) {
    const i64 t = si[r];
    const bool ok = t >= 0 && t < n_src;
    const V* s = src + (ok ? t : 0) * vecs;
    V* o = out + r * vecs;
    if (ok) {
      for (i64 v = threadIdx.x; v < vecs; v += blockDim.x) o[v] = s[v];
    } else {
      V z = {};
      for (i64 v = threadIdx.x; v < vecs; v += blockDim.x) o[v] = z;
    }
  }
}

#define MR_GATHER(W, V)                                                                                      \
  extern "C" __global__ void moerail_gather_rows_##W(const V* src, const i64* si, i64 n_rows, i64 vecs,      \
                                                     i64 n_src, V* out) {                                     \
    gather_rows<V>(src, si, n_rows, vecs, n_src, out);                                                        \
  }
MR_GATHER(1, u8)
MR_GATHER(2, u16)
MR_GATHER(4, u32)
MR_GATHER(8, u64)
MR_GATHER(16, mr_vec16)

// offsets[0..E] = exclusive prefix of counts[E] (offsets[E] = total). One block.
extern "C" __global__ void moerail_counts_offsets(const i64* __restrict__ counts, int E, i64* __restrict__ offsets) {
  MR_DYN_SMEM(i64, smem);
  block_exclusive_scan((i64)E, [&](i64 e) { return counts[e] > 0 ? counts[e] : (i64)0; }, offsets, smem);
}

// w[r] = probs[si[r], expert(r)] converted to W (0 for padding rows), expert(r) from offsets.
template <class P, class W>
MR_DEVICE void row_weights(const P* __restrict__ probs, i64 n_tok, int E, const i64* __restrict__ si, i64 n_rows,
                           const i64* __restrict__ offsets, W* __restrict__ w) {
  for (i64 r = (i64)blockIdx.x * blockDim.x + threadIdx.x; r < n_rows; r += (i64)gridDim.x * blockDim.x) {
    const i64 t = si[r];
    const i64 e = upper_segment(offsets, E, r);
    W v = W(0);
    if (t >= 0 && t < n_tok && e >= 0 && e < E) v = (W)(double)Elem<P>::load(probs[t * E + e]);
    w[r] = v;
  }
}

#define MR_ROW_WEIGHTS(P, PS, W, WS)                                                                         \
  extern "C" __global__ void moerail_row_weights_##PS##_##WS(const P* probs, i64 n_tok, int E, const i64* si, \
                                                             i64 n_rows, const i64* offsets, W* w) {          \
    row_weights<P, W>(probs, n_tok, E, si, n_rows, offsets, w);                                               \
  }
MR_ROW_WEIGHTS(float, f32, float, f32)
MR_ROW_WEIGHTS(float, f32, double, f64)
MR_ROW_WEIGHTS(double, f64, float, f32)
MR_ROW_WEIGHTS(double, f64, double, f64)
MR_ROW_WEIGHTS(bf16_t, bf16, float, f32)
MR_ROW_WEIGHTS(bf16_t, bf16, double, f64)
MR_ROW_WEIGHTS(f16_t, f16, float, f32)
MR_ROW_WEIGHTS(f16_t, f16, double, f64)

// out[si[r], expert(r)] = values[r] (`vbytes` wide) into a zeroed [T, E].
extern "C" __global__ void moerail_scatter_rows(const void* values, int vbytes, const i64* __restrict__ si,
                                               i64 n_rows, const i64* __restrict__ offsets, int E, i64 n_tok,
                                               void* out) {
  for (i64 r = (i64)blockIdx.x * blockDim.x + threadIdx.x; r < n_rows; r += (i64)gridDim.x * blockDim.x) {
    const i64 t = si[r];
    const i64 e = upper_segment(offsets, E, r);
    if (t >= 0 && t < n_tok && e >= 0 && e < E) copy_elem(values, r, out, t * E + e, vbytes);
  }
}
