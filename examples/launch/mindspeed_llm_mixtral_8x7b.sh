#!/usr/bin/env bash
# Mixtral-8x7B on MindSpeed-LLM (Ascend NPUs) with moerail as a MindSpeed feature: one node of 8 NPUs
# per torchrun. moerail is enabled by two lines before MindSpeed's adaptor is imported, here in a small
# launcher that then runs MindSpeed-LLM's own pretrain_gpt.py:
#
#   import moerail.integrations.mindspeed as moerail_mindspeed
#   moerail_mindspeed.enable()
#
# and by the feature's flags (--moerail-ops, --moerail-dispatcher, --moerail-expert-placement).
# MindSpeed's --moe-permute-fusion is declared incompatible with --moerail-ops: leave it off.
set -euo pipefail
: "${MINDSPEED_LLM:?set MINDSPEED_LLM to your MindSpeed-LLM checkout}"
: "${DATA_PATH:?set DATA_PATH to your preprocessed dataset prefix}"
: "${TOKENIZER_PATH:?set TOKENIZER_PATH to the tokenizer folder}"
NNODES=${NNODES:-8}

LAUNCHER=$(mktemp --suffix=.py)
trap 'rm -f "$LAUNCHER"' EXIT
cat > "$LAUNCHER" <<PY
import os, runpy, sys
import moerail.integrations.mindspeed as moerail_mindspeed
moerail_mindspeed.enable()
root = os.path.abspath("$MINDSPEED_LLM")
sys.path.insert(0, root)
sys.argv[0] = os.path.join(root, "pretrain_gpt.py")
runpy.run_path(sys.argv[0], run_name="__main__")
PY

MODEL=(
  --num-layers 32 --hidden-size 4096 --ffn-hidden-size 14336 --num-attention-heads 32
  --group-query-attention --num-query-groups 8 --seq-length 4096 --max-position-embeddings 32768
  --position-embedding-type rope --rotary-base 1000000 --swiglu --normalization RMSNorm
  --untie-embeddings-and-output-weights --disable-bias-linear
  --num-experts 8 --moe-router-topk 2 --moe-router-load-balancing-type aux_loss --moe-aux-loss-coeff 1e-2
)
LAYOUT=(
  --tensor-model-parallel-size 1 --pipeline-model-parallel-size 2 --expert-model-parallel-size 8
  --micro-batch-size 1 --global-batch-size 512 --use-distributed-optimizer
  --moe-token-dispatcher-type alltoall --moe-grouped-gemm
)
MOERAIL=(
  --moerail-ops --moerail-dispatcher auto --moerail-expert-placement refine
)
TRAIN=(
  --bf16 --lr 1e-4 --min-lr 1e-5 --lr-decay-style cosine --weight-decay 0.1 --clip-grad 1.0
  --train-iters 10000 --log-interval 10 --eval-interval 1000 --eval-iters 10
  --tokenizer-type PretrainedFromHF --tokenizer-name-or-path "$TOKENIZER_PATH" --data-path "$DATA_PATH" --split 99,1,0
)

torchrun --nproc-per-node 8 --nnodes "$NNODES" --node-rank "${NODE_RANK:-0}" \
  --master-addr "${MASTER_ADDR:-localhost}" --master-port "${MASTER_PORT:-6000}" \
  "$LAUNCHER" "${MODEL[@]}" "${LAYOUT[@]}" "${MOERAIL[@]}" "${TRAIN[@]}" "$@"
