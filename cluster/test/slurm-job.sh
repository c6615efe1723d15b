#!/usr/bin/env bash
# `sbatch cluster/slurm.sh` on the test Slurm (slurm-up.sh): a short SimCLR run
# on the built-in sample, requeued twice mid-job, first by SIGUSR1 to the batch
# script (what --signal sends before the time limit; the script's trap runs
# `scontrol requeue`), then by `scontrol requeue` itself. It must finish, and
# its logged steps continue from its checkpoints with no gap.
#   cluster/test/slurm-job.sh                     # on the host's Python
#   CONTAINER=localhost/viewforge:cpu CONTAINER_RUNTIME=podman cluster/test/slurm-job.sh   # in the image
#   REQUEUES=0 cluster/test/slurm-job.sh          # just train and finish
# Slurm holds a requeued job for about two minutes before it may start again;
# the test lifts the hold (`scontrol update StartTime=now`) to save the wait.
source "$(dirname "$0")/lib.sh"
eval "$("$(dirname "$0")/slurm-up.sh")"
requeues=${REQUEUES:-2}
ckpt=2
# Enough steps after each requeue point that a fast machine cannot finish first.
steps=$(( requeues > 0 ? 40 : 6 ))
out="$STATE/slurm-job"
mkdir -p "$out"
cd "$REPO"
export VIEWFORGE_CACHE=${VIEWFORGE_CACHE:-$STATE/cache}
if [ -n "${CONTAINER:-}" ]; then
  export PODMAN_ARGS="--runtime runc --cgroup-manager cgroupfs"
fi
job=$(sbatch --parsable --job-name=viewforge-test --nodes=1 --cpus-per-task=1 --time=20:00 \
      --output="$out/%x-%j.out" cluster/slurm.sh \
      --method simclr --pipeline torchvision --max-steps "$steps" --ckpt-every "$ckpt" --knn-every 0 \
      --log-every 1 --batch-size 16 --image-size 16 --amp fp32 --workers 0)
run_dir="$REPO/runs/viewforge-test-$job"
output="$out/viewforge-test-$job.out"
say "submitted job $job; run dir $run_dir"

last_step() {
  python3 -c "import json,sys; print(max([json.loads(l).get('step', 0) for l in open(sys.argv[1])] or [0]))" \
    "$run_dir/log.jsonl" 2>/dev/null || echo 0
}
state() { scontrol show job "$job" 2>/dev/null | grep -o 'JobState=[A-Z_]*' | cut -d= -f2; }
wait_for() {  # wait_for <seconds> <what> <command...>
  local limit=$1 what=$2; shift 2
  local end=$((SECONDS + limit))
  until "$@"; do
    if [ "$SECONDS" -ge "$end" ]; then
      echo "FAIL: timed out waiting for $what (job $job: $(state))" >&2
      tail -n 30 "$output" >&2 || true
      scancel "$job" 2>/dev/null || true
      exit 1
    fi
    sleep 0.3
  done
}
past() { [ "$(last_step)" -ge "$1" ]; }
done_ok() { case "$(state)" in COMPLETED) return 0 ;; FAILED|CANCELLED|TIMEOUT|NODE_FAIL|OUT_OF_MEMORY)
  echo "FAIL: job $job ended $(state)" >&2; tail -n 30 "$output" >&2; exit 1 ;; *) return 1 ;; esac; }

pending_now() {  # lift Slurm's hold on a requeued job once it is pending again
  local end=$((SECONDS + 120))
  until [ "$(state)" = PENDING ] || [ "$SECONDS" -ge "$end" ]; do sleep 1; done
  scontrol update JobId="$job" StartTime=now
}
if [ "$requeues" -ge 1 ]; then
  wait_for 600 "step $((ckpt + 2))" past $((ckpt + 2))
  say "step $(last_step): SIGUSR1 to the batch script (what --signal sends before the time limit)"
  scancel --signal=USR1 --batch "$job"
  pending_now
fi
running_past() { [ "$(state)" = RUNNING ] && past "$1"; }
if [ "$requeues" -ge 2 ]; then
  # The log already holds the steps before the first requeue: wait for the
  # resumed job to run and log new ones, or a fast job is requeued while pending.
  second=$(( $(last_step) + 2 > 5 * ckpt ? $(last_step) + 2 : 5 * ckpt ))
  wait_for 600 "the first requeue to train past step $second" running_past "$second"
  say "step $(last_step): scontrol requeue"
  scontrol requeue "$job"
  pending_now
fi
wait_for 900 "the job to complete" done_ok
say "job $job completed"
grep -a -o -E '(job [0-9]+ \(restart [0-9]+\)|SIGUSR1|resumed from).*' "$output" | cut -c1-150 || true
python3 "$REPO/cluster/test/check_log.py" "$run_dir" --steps "$steps" --ckpt-every "$ckpt" --restarts "$requeues"
resumed=$(grep -a -c 'resumed from' "$output" || true)
[ "$resumed" -eq "$requeues" ] || { echo "FAIL: $resumed resumptions in $output, expected $requeues" >&2; exit 1; }
rm -rf "$run_dir"
say "slurm job: PASS"
