// Megatron's sort_chunks_by_idxs: the rows are cut into chunks of split_sizes and written in the
// chunk order sorted_idxs. Offsets are computed on the device from the (device) split sizes, so
// the op needs no host synchronisation; values are not validated here (the CPU path does), but
// every access stays in bounds whatever they are.
#include "common.cuh"

// src_start[c] = first input row of chunk c; dst_start[p] = first output row of the p-th chunk
// written (chunk order[p]); both with a final total. One block; `smem` blockDim.x i64.
extern "C" __global__ void moerail_chunk_offsets(const i64* __restrict__ split, const i64* __restrict__ order, int n,
                                                i64* __restrict__ src_start, i64* __restrict__ dst_start) {
  MR_DYN_SMEM(i64, smem);
  block_exclusive_scan((i64)n, [&](i64 c) { return split[c] > 0 ? split[c] : (i64)0; }, src_start, smem);
  block_exclusive_scan(
      (i64)n,
      [&](i64 p) {
        const i64 c = order[p];
        return (c >= 0 && c < n && split[c] > 0) ? split[c] : (i64)0;
      },
      dst_start, smem);
}

template <class V>
MR_DEVICE void sort_chunks(const V* __restrict__ in, i64 vecs, i64 n_rows, const i64* __restrict__ order, int n,
                           const i64* __restrict__ src_start, const i64* __restrict__ dst_start, V* __restrict__ out) {
  for (i64 r = blockIdx.x; r < n_rows; r += gridDim.x) {
    const i64 p = upper_segment(dst_start, n, r);
    i64 src = -1;
    if (p >= 0 && p < n) {
      const i64 c = order[p];
      if (c >= 0 && c < n) src = src_start[c] + (r - dst_start[p]);
    }
    V* o = out + r * vecs;
    if (src >= 0 && src < n_rows) {
      const V* s = in + src * vecs;
      for (i64 v = threadIdx.x; v < vecs; v += blockDim.x) o[v] = s[v];
    } else {
      V z = {};
      for (i64 v = threadIdx.x; v < vecs; v += blockDim.x) o[v] = z;
    }
  }
}

#define MR_SORT_CHUNKS(W, V)                                                                                 \
  extern "C" __global__ void moerail_sort_chunks_##W(const V* in, i64 vecs, i64 n_rows, const i64* order,   \
                                                     int n, const i64* src_start, const i64* dst_start,     \
                                                     V* out) {                                               \
    sort_chunks<V>(in, vecs, n_rows, order, n, src_start, dst_start, out);                                   \
  }
MR_SORT_CHUNKS(1, u8)
MR_SORT_CHUNKS(2, u16)
MR_SORT_CHUNKS(4, u32)
MR_SORT_CHUNKS(8, u64)
MR_SORT_CHUNKS(16, mr_vec16)
