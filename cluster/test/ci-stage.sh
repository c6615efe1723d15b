#!/usr/bin/env bash
# The CI stage for containers and Slurm, run by .ci/run after the unit tests:
#   1. the CPU image built from the Dockerfile with podman (base-image.sh, build-image.sh);
#   2. the CUDA colour kernels compiled and linked inside it from its pip wheels only, no GPU (image-kernels.sh);
#   3. train.py a few steps inside it (image-train.sh);
#   4. two containers as two nodes, c10d on 127.0.0.1 (two-containers.sh);
#   5. a real one-node Slurm: `sbatch cluster/slurm.sh`, requeued twice mid-job (slurm-job.sh);
#   6. cluster/slurm.sh running its job inside the image (slurm-job.sh with CONTAINER).
# A part whose tools cannot be installed here (apt, debootstrap, a container
# that cannot start at all) is skipped with one line saying so; a part that
# could run and fails fails the stage. Every part runs under a time limit.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
export DEBIAN_FRONTEND=noninteractive
start=$SECONDS
budget=${CLUSTER_STAGE_BUDGET:-1140}  # seconds for the whole stage (.ci/run allows 20 minutes)
failed=0
step() { echo "== cluster: $*"; }
part() {  # part <seconds> <name> <script> [args]: run, report its time, note a failure
  local limit=$1 name=$2; shift 2
  local t0=$SECONDS rc=0 left=$((budget - (SECONDS - start) - 45))
  if [ "$left" -lt 90 ]; then
    echo "== cluster: $name SKIPPED: the stage's time budget ($budget s) is spent"
    return 1
  fi
  local capped=0
  [ "$limit" -le "$left" ] || { limit=$left; capped=1; }
  timeout --kill-after=30 "$limit" "$@" || rc=$?
  if [ "$rc" -eq 0 ]; then
    echo "== cluster: $name passed in $((SECONDS - t0)) s"
  elif [ "$rc" -eq 124 ] && [ "$capped" = 1 ]; then
    # A slow machine, not a failure of ours: the part had less than its own limit.
    echo "== cluster: $name SKIPPED: stopped after $((SECONDS - t0)) s, at the end of the stage's time budget ($budget s)"
  else
    [ "$rc" -eq 124 ] && echo "== cluster: $name ran past its $limit s limit" >&2
    echo "== cluster: $name FAILED (exit $rc) after $((SECONDS - t0)) s" >&2
    failed=1
  fi
  return "$rc"
}

have_slurm=1
if ! command -v sbatch > /dev/null || ! command -v munged > /dev/null; then
  timeout 600 apt-get install -y -qq --no-install-recommends slurm-wlm munge > /tmp/viewforge-apt-slurm.log 2>&1 \
    || have_slurm=0
fi
have_podman=1
image_built=0
if ! command -v podman > /dev/null || ! command -v runc > /dev/null || ! command -v debootstrap > /dev/null; then
  timeout 600 apt-get install -y -qq --no-install-recommends podman runc debootstrap uidmap \
    > /tmp/viewforge-apt-podman.log 2>&1 || have_podman=0
fi

if [ "$have_podman" = 1 ]; then
  step "local base image (debootstrap from the host's mirror)"
  if ! timeout 600 "$here/base-image.sh"; then
    echo "== cluster: container part SKIPPED: no local base image (debootstrap or podman import failed)"
    have_podman=0
  elif ! timeout 120 bash -c "source '$here/lib.sh'; pm run --rm --network host \"\$BASE_IMAGE\" true"; then
    echo "== cluster: container part SKIPPED: podman cannot start a container on this machine"
    have_podman=0
  fi
else
  echo "== cluster: container part SKIPPED: apt-get could not install podman, runc and debootstrap (see /tmp/viewforge-apt-podman.log)"
fi
if [ "$have_podman" = 1 ]; then
  step "CPU image from the Dockerfile"
  if part 900 "image build" "$here/build-image.sh"; then
    image_built=1
    step "CUDA kernels compiled and linked in the image (pip's NVVM and nvJitLink, no GPU)"
    part 240 "image kernels" "$here/image-kernels.sh"
    step "train.py in the image"
    part 600 "image train" "$here/image-train.sh"
    step "two containers as two nodes"
    part 600 "two containers" "$here/two-containers.sh"
  fi
fi
# Slurm after the image: on a machine too slow for the whole budget, the
# image's parts (the kernels' compile above all) are the ones that run.
if [ "$have_slurm" = 1 ]; then
  step "Slurm job with two requeues"
  part 600 "slurm job" "$here/slurm-job.sh"
  if [ "$image_built" = 1 ]; then
    step "cluster/slurm.sh inside the image"
    part 600 "slurm job in the image" env REQUEUES=0 CONTAINER=localhost/viewforge:cpu CONTAINER_RUNTIME=podman \
      "$here/slurm-job.sh"
  fi
else
  echo "== cluster: Slurm part SKIPPED: apt-get could not install slurm-wlm and munge (see /tmp/viewforge-apt-slurm.log)"
fi
"$here/slurm-down.sh" > /dev/null 2>&1 || true
echo "== cluster: stage took $((SECONDS - start)) s"
exit "$failed"
