#!/usr/bin/env bash
# pipelines/colour.py's CUDA kernels compiled inside the CPU image
# (build-image.sh) with only what pip installed there: numba-cuda, the NVVM
# and nvJitLink wheels (the image has no system CUDA, and no GPU is needed):
# every kernel, float32 and float16 out, PTX then a cubin for sm_90 and sm_80
# (bench/cuda_ptx.py). Fails when a kernel does not compile or link.
#   cluster/test/image-kernels.sh
source "$(dirname "$0")/lib.sh"
log="$STATE/image-kernels.log"
say "compiling and linking the CUDA kernels in $CPU_IMAGE"
pm run --rm --network none --entrypoint bash "$CPU_IMAGE" -c '
  set -e
  for d in /usr/local/cuda /opt/cuda; do [ ! -e "$d" ] || { echo "a system CUDA at $d: not the pip-only setup" >&2; exit 1; }; done
  [ -z "${CUDA_HOME:-}${CUDA_PATH:-}" ] || { echo "CUDA_HOME/CUDA_PATH set: not the pip-only setup" >&2; exit 1; }
  python3 bench/cuda_ptx.py --arch 9.0,8.0 --dtype float32,float16' > "$log" 2>&1 \
  || { cat "$log" >&2; exit 1; }
cat "$log"
say "image kernels: PASS"
