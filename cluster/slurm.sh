#!/bin/bash
# Multi-node pre-training under SLURM: one srun task per node, each a torchrun
# that starts one process per GPU; the nodes meet by c10d rendezvous on the
# first node. A requeued or resubmitted job resumes from its run directory.
#
#   sbatch --nodes=4 cluster/slurm.sh --method mocov2 --pipeline dali --data /data/imagenet
#   CONTAINER=viewforge.sif sbatch cluster/slurm.sh ...     # inside Apptainer (see cluster/README.md)
#
#SBATCH --job-name=viewforge
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=48:00:00
#SBATCH --requeue
#SBATCH --output=%x-%j.out
set -euo pipefail

cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
gpus_per_node=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
port=${MASTER_PORT:-29500}
# Stable across requeues, so the job finds its own checkpoint.
run_dir=${RUN_DIR:-runs/${SLURM_JOB_NAME}-${SLURM_JOB_ID}}

launcher=()
if [ -n "${CONTAINER:-}" ]; then
  launcher=(apptainer exec --nv --bind "$PWD" "$CONTAINER")
fi

# DALI threads per process: the task's cores shared by its GPUs.
workers=$(( ${SLURM_CPUS_PER_TASK:-16} / gpus_per_node ))
[ "$workers" -ge 1 ] || workers=1

srun --kill-on-bad-exit=1 "${launcher[@]}" \
  torchrun --nnodes "$SLURM_NNODES" --nproc_per_node "$gpus_per_node" \
  --rdzv_id "$SLURM_JOB_ID" --rdzv_backend c10d --rdzv_endpoint "$head_node:$port" \
  train.py --run-dir "$run_dir" --workers "$workers" "$@"
