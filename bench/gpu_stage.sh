#!/usr/bin/env bash
# Stage numba-cuda for the GPU machine, whose numba may lack the CUDA target
# (numba's own is deprecated; numba-cuda replaces it) and whose Python has no
# package registry. Run from the project root here, after
# ../shared/device/stage-dali.sh; it prints the device calls to make.
#
#   bash bench/gpu_stage.sh [CUDA]     # CUDA: torch's CUDA major.minor there (default 13.0: torch 2.11.0+cu130)
#
# numba-cuda needs NVVM (nvidia-nvvm); the kernels' PTX is linked by
# nvJitLink. Both are pinned to torch's CUDA minor version: NVVM writes PTX
# of its own CUDA version, which an older nvJitLink (torch's) refuses
# ("Unsupported .version"), so an unpinned NVVM (the newest 13.x) would not
# link there. NVRTC comes with torch.
set -euo pipefail
cuda=${1:-13.0}
[[ "$cuda" =~ ^[0-9]+\.[0-9]+$ ]] || { echo "gpu_stage: CUDA must be major.minor, like 13.0" >&2; exit 2; }
major=${cuda%%.*}
root=$(git rev-parse --show-toplevel)
cd "$root"

rm -rf .gpu
mkdir -p .gpu/wheels
echo '*' > .gpu/.gitignore  # the folder ignores itself (in a worktree too, whose .git is a file)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux2010_x86_64 -d .gpu/wheels \
  numba-cuda==0.30.4 "cuda-bindings>=$major,<$((major + 1))" cuda-core cuda-pathfinder \
  "nvidia-nvvm==$cuda.*" "nvidia-nvjitlink==$cuda.*"

tar -C .gpu -cf .gpu/all.tar wheels
rm -rf .gpu/wheels
( cd .gpu && split -b 50M -d -a 1 all.tar part. && rm all.tar )
n=0
for f in .gpu/part.*; do
  n=$((n + 1))
  mkdir -p ".gpu/p$n"
  mv "$f" ".gpu/p$n/"
done
echo "Staged $n parts under .gpu/p1 .. .gpu/p$n (ignored by git). Device calls, one right after another:"
for i in $(seq 1 "$n"); do
  if [ "$i" -lt "$n" ]; then
    echo "  call: carry [\".gpu/p$i\"], command: ls -la .gpu/p$i"
  else
    echo "  call: carry [\".gpu/p$i\"], command: cat .gpu/p*/part.* | tar -x -C .gpu && python3 -m pip install -q --no-index --no-deps --no-compile --target .gpu/site .gpu/wheels/*.whl && ls .gpu/site"
  fi
done
echo "bench/gpu_check.sh then puts .gpu/site first on sys.path (a site directory, ahead of site-packages) by itself."
