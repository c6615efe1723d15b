#!/usr/bin/env bash
# Stage numba-cuda for the GPU machine, whose numba may lack the CUDA target
# (numba's own is deprecated; numba-cuda replaces it) and whose Python has no
# package registry. Run from the project root here, after
# ../shared/device/stage-dali.sh; it prints the device calls to make.
# numba-cuda needs NVVM (nvidia-nvvm); NVRTC and nvJitLink come with torch.
set -euo pipefail
root=$(git rev-parse --show-toplevel)
cd "$root"
grep -qxF '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude

rm -rf .gpu
mkdir -p .gpu/wheels
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux2010_x86_64 -d .gpu/wheels \
  numba-cuda==0.30.4 'cuda-bindings>=13,<14' cuda-core cuda-pathfinder 'nvidia-nvvm>=13,<14'

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
echo "bench/gpu_check.sh then puts .gpu/site first (as a site directory) by itself."
