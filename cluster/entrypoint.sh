#!/bin/sh
# The image's entry point: its arguments go to train.py under torchrun.
#
#   one node:     docker run ... viewforge --method mocov2 --data /data/imagenet
#                 (one process per GPU, or NPROC_PER_NODE; one on a machine without GPUs)
#   many nodes:   every node runs the same command with NNODES=<n> and
#                 RDZV_ENDPOINT=<first node>:29500 (c10d rendezvous; RDZV_ID names the job)
#   anything else: docker run --entrypoint python3 viewforge ...
set -eu
cd /workspace/viewforge
# torchrun's restarts need a fresh rendezvous store per round (pytorch/pytorch#135712).
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE="${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}"
if [ -z "${NPROC_PER_NODE:-}" ]; then
  NPROC_PER_NODE=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  [ "${NPROC_PER_NODE:-0}" -ge 1 ] || NPROC_PER_NODE=1
fi
if [ "${NNODES:-1}" = 1 ] && [ -z "${RDZV_ENDPOINT:-}" ]; then
  exec torchrun --standalone --nproc-per-node "$NPROC_PER_NODE" train.py "$@"
fi
exec torchrun --nnodes "${NNODES:-1}" --nproc-per-node "$NPROC_PER_NODE" \
  --rdzv-backend c10d --rdzv-endpoint "${RDZV_ENDPOINT:?set RDZV_ENDPOINT=<first node>:<port>}" \
  --rdzv-id "${RDZV_ID:-viewforge}" --max-restarts "${MAX_RESTARTS:-0}" ${TORCHRUN_ARGS:-} train.py "$@"
