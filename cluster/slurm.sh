#!/bin/bash
# Multi-node pre-training under Slurm: one srun task per node, each a torchrun
# that starts one process per GPU Slurm gave the node (one process on a node
# without GPUs); the nodes meet by c10d rendezvous on the job's first node.
#
#   sbatch --nodes=4 --gpus-per-node=8 cluster/slurm.sh --method mocov2 --pipeline dali --data /data/imagenet
#   CONTAINER=viewforge.sif sbatch ... cluster/slurm.sh ...        # inside Apptainer (see cluster/README.md)
#   CONTAINER=localhost/viewforge:cpu CONTAINER_RUNTIME=podman sbatch ... cluster/slurm.sh ...
#
# The time limit and preemption: Slurm sends SIGUSR1 to this script 3 minutes
# before the time limit (--signal), and the script requeues the job
# (`scontrol requeue`); a preempted job is requeued by Slurm itself (--requeue,
# with the cluster's PreemptMode=REQUEUE). SIGTERM is left alone, so that
# scancel still ends the job. The requeued job keeps its id, so it finds its
# run directory, runs/<job name>-<job id>, and train.py resumes from the
# checkpoint there (every epoch end, and every --ckpt-every steps: set it so
# that little is lost). RUN_DIR=runs/<name> makes a resubmission resume too.
#
#SBATCH --job-name=viewforge
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=16
#SBATCH --time=48:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@180
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
set -euo pipefail

cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
# The rendezvous address: the first node's NodeAddr in slurm.conf (its name where none is set).
head_addr=$(scontrol show node "$head_node" 2>/dev/null | grep -o 'NodeAddr=[^ ]*' | cut -d= -f2 || true)
head_addr=${head_addr:-$head_node}
# GPUs per node as Slurm granted them (--gpus-per-node, --gres=gpu:N); none: one CPU process.
gpus=${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-0}}
gpus=${gpus##*:}
nproc=${NPROC_PER_NODE:-$gpus}
[ "$nproc" -ge 1 ] 2>/dev/null || nproc=1
port=${MASTER_PORT:-29500}
# Stable across requeues, so the job finds its own checkpoint.
run_dir=${RUN_DIR:-runs/${SLURM_JOB_NAME}-${SLURM_JOB_ID}}
# DALI threads per process: the task's cores shared by its processes.
workers=$(( ${SLURM_CPUS_PER_TASK:-16} / nproc ))
[ "$workers" -ge 1 ] || workers=1

# Inside a container: Apptainer by default. It needs no plugin in slurmd
# (pyxis/enroot's --container-image does), runs unprivileged, reads a .sif
# from the shared file system and passes GPUs with --nv, so the same script
# works on most clusters. podman is for machines like our CI's.
launcher=()
if [ -n "${CONTAINER:-}" ]; then
  case "${CONTAINER_RUNTIME:-apptainer}" in
    apptainer) launcher=(apptainer exec --nv --bind "$PWD" --pwd "$PWD" "$CONTAINER") ;;
    podman) cache=${VIEWFORGE_CACHE:-$PWD/runs/.cache}
            mkdir -p "$cache"
            launcher=(podman ${PODMAN_ARGS:-} run --rm --network host --ipc host --user "$(id -u):$(id -g)"
                      -v "$PWD:$PWD" -w "$PWD" -v "$cache:$cache" -e "VIEWFORGE_CACHE=$cache"
                      -e TORCH_DISABLE_SHARE_RDZV_TCP_STORE -e HOME=/tmp --entrypoint "" "$CONTAINER") ;;
    *) echo "CONTAINER_RUNTIME must be apptainer or podman" >&2; exit 2 ;;
  esac
fi

# torchrun's restarts (--max-restarts) need a fresh store per round (pytorch/pytorch#135712).
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}

requeue() {
  trap '' USR1
  echo "$(date -Is) SIGUSR1: the time limit is near, requeueing job $SLURM_JOB_ID"
  scontrol requeue "$SLURM_JOB_ID"
}
trap requeue USR1

echo "$(date -Is) job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): $SLURM_NNODES node(s) x $nproc process(es), run dir $run_dir"
# In the background, so that the trap runs as soon as a signal arrives.
srun --kill-on-bad-exit=1 "${launcher[@]}" \
  torchrun --nnodes "$SLURM_NNODES" --nproc-per-node "$nproc" \
  --rdzv-id "$SLURM_JOB_ID" --rdzv-backend c10d --rdzv-endpoint "$head_addr:$port" \
  train.py --run-dir "$run_dir" --workers "$workers" "$@" &
step=$!
while :; do
  rc=0
  wait "$step" || rc=$?
  kill -0 "$step" 2>/dev/null || exit "$rc"  # srun is done: its status is the job's
done
