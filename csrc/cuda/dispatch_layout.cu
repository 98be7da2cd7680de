// The dispatch layout the All-to-All planner starts from (DeepEP's get_dispatch_layout): from
// top-k expert ids [T, k] (-1 = dropped) and the rank owning each expert, the tokens each rank,
// each node and each expert receives, and which ranks each token goes to. A token counts once
// per rank and once per node however many of its experts live there. Integer atomics only: the
// counts are the same on every run.
#include "common.cuh"

// Outputs: tokens_per_rank [R], tokens_per_node [R / ranks_per_node], tokens_per_expert [E]
// (all zeroed), token_in_rank bool [T, R] (fully written).
extern "C" __global__ void moerail_dispatch_layout(const i64* __restrict__ idx, i64 n_tok, int k, int E,
                                                  const i64* __restrict__ expert_rank, int R, int ranks_per_node,
                                                  u64* tokens_per_rank, u64* tokens_per_node,
                                                  u64* tokens_per_expert, u8* __restrict__ token_in_rank,
                                                  int* status) {
  for (i64 t = (i64)blockIdx.x * blockDim.x + threadIdx.x; t < n_tok; t += (i64)gridDim.x * blockDim.x) {
    u8* row = token_in_rank + t * R;
    for (int r = 0; r < R; ++r) row[r] = 0;
    for (int j = 0; j < k; ++j) {
      const i64 e = idx[t * k + j];
      if (e < 0) continue;
      if (e >= E) {
        if (status) atomicOr(status, MR_ST_BAD_INDEX);
        continue;
      }
      atomicAdd(&tokens_per_expert[e], 1ULL);
      const i64 r = expert_rank[e];
      if (r < 0 || r >= R) {
        if (status) atomicOr(status, MR_ST_BAD_INDEX);
        continue;
      }
      if (row[r]) continue;
      row[r] = 1;
      atomicAdd(&tokens_per_rank[r], 1ULL);
      // First rank of this token on the node? Then the node gets the token too.
      const int node = (int)(r / ranks_per_node);
      bool seen = false;
      for (int q = node * ranks_per_node; q < (node + 1) * ranks_per_node && q < R; ++q)
        seen = seen || (q != r && row[q]);
      if (!seen) atomicAdd(&tokens_per_node[node], 1ULL);
    }
  }
}
