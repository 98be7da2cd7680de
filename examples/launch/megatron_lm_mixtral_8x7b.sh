#!/usr/bin/env bash
# Mixtral-8x7B on Megatron-LM with moerail: one node of 8 GPUs per torchrun (run it on each node with
# NODE_RANK / MASTER_ADDR set). The layout is what `moerail plan` printed for 64 H100s:
#
#   moerail plan --model Mixtral-8x7B --cluster H100-SXM --devices 64 --gbs 512 --top 3 --space recompute=none,light,heavy,full
#
# (recomputation restricted to what Megatron's flags say; without --space the best layouts may
# need a per-layer memory plan, which `moerail plan --memory` prints for the chosen layout)
#
# Switching moerail on is the two lines at the top of moerail_pretrain_gpt.py (patch_moe_utils);
# MOERAIL_DISPATCHER=auto adds moerail's expert-parallel dispatcher. Data and tokenizer paths are yours.
set -euo pipefail
: "${MEGATRON_LM:?set MEGATRON_LM to your Megatron-LM checkout}"
: "${DATA_PATH:?set DATA_PATH to your preprocessed dataset prefix}"
: "${TOKENIZER_MODEL:?set TOKENIZER_MODEL to the tokenizer model file}"
NNODES=${NNODES:-8}
export MEGATRON_LM MOERAIL_DISPATCHER=${MOERAIL_DISPATCHER:-auto}
HERE=$(cd "$(dirname "$0")" && pwd)

MODEL=(
  --num-layers 32 --hidden-size 4096 --ffn-hidden-size 14336 --num-attention-heads 32
  --group-query-attention --num-query-groups 8 --seq-length 4096 --max-position-embeddings 32768
  --position-embedding-type rope --rotary-base 1000000 --swiglu --normalization RMSNorm
  --untie-embeddings-and-output-weights --disable-bias-linear --no-masked-softmax-fusion
  --num-experts 8 --moe-router-topk 2 --moe-router-load-balancing-type aux_loss --moe-aux-loss-coeff 1e-2
)
# From `moerail plan` (its "Megatron-LM flags of #1").
LAYOUT=(
  --tensor-model-parallel-size 1 --pipeline-model-parallel-size 2 --context-parallel-size 1
  --expert-model-parallel-size 8 --expert-tensor-parallel-size 1 --num-layers-per-virtual-pipeline-stage 1
  --micro-batch-size 2 --global-batch-size 512 --seq-length 4096
  --recompute-granularity selective --recompute-modules moe_act layernorm
  --moe-token-dispatcher-type alltoall --moe-grouped-gemm --use-distributed-optimizer
  --overlap-grad-reduce --overlap-param-gather
)
TRAIN=(
  --bf16 --lr 1e-4 --min-lr 1e-5 --lr-decay-style cosine --weight-decay 0.1 --clip-grad 1.0
  --train-iters 10000 --log-interval 10 --eval-interval 1000 --eval-iters 10
  --tokenizer-type Llama2Tokenizer --tokenizer-model "$TOKENIZER_MODEL" --data-path "$DATA_PATH" --split 99,1,0
)

torchrun --nproc-per-node 8 --nnodes "$NNODES" --node-rank "${NODE_RANK:-0}" \
  --master-addr "${MASTER_ADDR:-localhost}" --master-port "${MASTER_PORT:-6000}" \
  "$HERE/moerail_pretrain_gpt.py" "${MODEL[@]}" "${LAYOUT[@]}" "${TRAIN[@]}" "$@"
