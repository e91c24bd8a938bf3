#!/usr/bin/env bash
# Multi-node training with torchrun: run this same script on every node of the job, in any order.
#
#   HEAD_NODE=node-a JOB_ID=finetune-0412 bash examples/distributed/torchrun_multinode.sh   # on node-a
#   HEAD_NODE=node-a JOB_ID=finetune-0412 bash examples/distributed/torchrun_multinode.sh   # on node-b
#
# HEAD_NODE is one of the nodes (its torchrun hosts the c10d rendezvous on RDZV_PORT); every node must
# reach it there, and reach the other nodes on any TCP port (NCCL opens its own). OUT_DIR must be a folder
# every node sees at the same path: each node writes its shards of every checkpoint into it.
set -euo pipefail

: "${HEAD_NODE:?set HEAD_NODE to the hostname or IP of one of the nodes, the same on every node}"
: "${JOB_ID:?set JOB_ID to a name for this job, the same on every node and new for every job}"
NNODES=${NNODES:-2}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
RDZV_PORT=${RDZV_PORT:-29500}
RECIPE=${RECIPE:-recipes/finetune/smollm2-135m-instruct/full.yaml}
# The global batch counts sequences across all GPUs: a multiple of MICRO_BATCH_SIZE x GPUs per node x nodes.
GLOBAL_BATCH_SIZE=${GLOBAL_BATCH_SIZE:-64}
MICRO_BATCH_SIZE=${MICRO_BATCH_SIZE:-4}
OUT_DIR=${OUT_DIR:-/shared/plainlm/out/$JOB_ID}
PLAINLM_DIR=${PLAINLM_DIR:-$(cd "$(dirname "$0")/../.." && pwd)}

cd "$PLAINLM_DIR"
export PATH="$PLAINLM_DIR/.venv/bin:$PATH"
# export NCCL_SOCKET_IFNAME=eth0   # if the nodes have several interfaces and NCCL picks the wrong one
# export NCCL_DEBUG=INFO           # to see what NCCL chose

# --max_restarts: a failed process restarts the whole group, which continues from the newest checkpoint.
exec torchrun \
    --nnodes "$NNODES" \
    --nproc_per_node "$GPUS_PER_NODE" \
    --rdzv_backend c10d \
    --rdzv_endpoint "$HEAD_NODE:$RDZV_PORT" \
    --rdzv_id "$JOB_ID" \
    --max_restarts 3 \
    -m plainlm finetune --config "$RECIPE" --strategy fsdp --out_dir "$OUT_DIR" --resume auto \
    --train.global_batch_size "$GLOBAL_BATCH_SIZE" --train.micro_batch_size "$MICRO_BATCH_SIZE"
