#!/usr/bin/env bash
# The one-shot GPU check: what a session lent a GPU runs first (issue 10).
#
#   bash bench/gpu_check.sh [--out DIR] [--data DIR] [--dry-run]
#
# On the device machine, after ../shared/device/stage-dali.sh's calls (and
# bench/gpu_stage.sh's, which stage numba-cuda for a numba without the CUDA
# target), run it as one call with the results written under $OUT:
#
#   export PYTHONPATH=$PWD/.dali/site:$PYTHONPATH; bash bench/gpu_check.sh --out $OUT --data bench/data/photos
#
# It runs, each under its own time limit, going on when one fails:
#   1. the environment (GPU, driver, versions) and whether numba.cuda works;
#   2. the CUDA colour kernels against the CPU operator and torchvision
#      (tests/pipelines/test_colour.py runs them on the GPU when there is one)
#      and every test marked gpu (the GPU graph against the CPU graph on PNGs,
#      views under a side stream);
#   3. bench/throughput.py for mocov2 and mosrep, DALI's GPU graph against
#      torchvision with all cores: pipeline only, model only, end to end.
# Everything lands in DIR/<device>/ (bench/results/<device>/'s layout):
# summary.txt (each step, its exit code and seconds), env.txt, kernels.txt,
# gpu-tests.txt, throughput.txt, throughput.json/.png. Exit code: 0 when every step passed.
#
# --dry-run checks this script's own logic on the CPU (CI runs it): the same
# steps with the CPU's device name, the tests as they run without a GPU (of
# the kernel tests, the bit-for-bit one only), and a throughput run of a few
# tiny steps on noise JPEGs.
set -uo pipefail
cd "$(dirname "$0")/.."

out=${OUT:-bench/results}
data=""
dry=0
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out=$2; shift 2 ;;
    --data) data=$2; shift 2 ;;
    --dry-run) dry=1; shift ;;
    -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
    *) echo "gpu_check: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
if [ -n "$data" ] && [ ! -d "$data" ]; then
  echo "gpu_check: --data $data is not a folder" >&2; exit 2
fi

# numba-cuda staged by bench/gpu_stage.sh: its .pth redirects numba.cuda, so
# the folder must be a site directory, not merely on PYTHONPATH; and it goes
# first (addsitedir appends, and an older numba-cuda or nvJitLink in
# site-packages would win)
if [ -d .gpu/site ]; then
  mkdir -p .gpu/hook
  cat > .gpu/hook/sitecustomize.py <<EOF
import site, sys
before = list(sys.path)
site.addsitedir('$PWD/.gpu/site')
sys.path[:] = [p for p in sys.path if p not in before] + before
EOF
  export PYTHONPATH=$PWD/.gpu/hook:${PYTHONPATH:-}
fi

if [ "$dry" = 1 ]; then
  device=dry-run-cpu
else
  # the results folder's name as bench/machine.py gives it ('nvidia-h200')
  device=$(python3 -c "import sys, torch; sys.path.insert(0, '.'); from bench.machine import device_slug
print(device_slug(torch.device('cuda')) if torch.cuda.is_available() else '')" 2>/dev/null | tail -n 1)
  if [ -z "$device" ]; then
    echo "gpu_check: torch sees no GPU here; --dry-run checks the script on a CPU" >&2; exit 2
  fi
fi
dest="$out/$device"
mkdir -p "$dest" || { echo "gpu_check: cannot write $dest" >&2; exit 2; }
: > "$dest/summary.txt"
failed=0

step() {  # step NAME SECONDS LOGFILE COMMAND...: run under a time limit, record exit code and time
  local name=$1 limit=$2 logfile=$3; shift 3
  local t0=$SECONDS rc
  echo "== $name (limit ${limit}s)"
  timeout --kill-after=10 "$limit" "$@" > "$dest/$logfile" 2>&1
  rc=$?
  tail -n 5 "$dest/$logfile"
  [ "$rc" -eq 0 ] || failed=1
  printf '%-12s exit %3d  %4ds  %s\n' "$name" "$rc" $((SECONDS - t0)) "$logfile" >> "$dest/summary.txt"
}

step env 60 env.txt bash -c '
  date -u; uname -a; nproc
  nvidia-smi 2>/dev/null || echo "nvidia-smi: none"
  python3 -c "import sys, torch, numba, numpy; print(\"python\", sys.version.split()[0]); print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"available\", torch.cuda.is_available()); print(\"numba\", numba.__version__, \"numpy\", numpy.__version__)"
  python3 -c "import nvidia.dali as d; print(\"dali\", d.__version__)" || echo "dali: not importable"
  python3 -c "from numba import cuda; print(\"numba.cuda\", cuda.__file__, \"available\", cuda.is_available())"'

# A dry run runs one kernel test of the file (the suite runs the whole file on the CPU already).
kernel_tests=()
[ "$dry" = 1 ] && kernel_tests=(-k kernel_is_the_cpu_operator_bit_for_bit)
step kernels 300 kernels.txt python3 -m pytest -q -p no:cacheprovider tests/pipelines/test_colour.py "${kernel_tests[@]}"
step gpu-tests 300 gpu-tests.txt python3 -m pytest -q -p no:cacheprovider -rs -m gpu tests
if [ "$dry" = 1 ]; then
  step throughput 600 throughput.txt python3 bench/throughput.py --device cpu --pipelines dali --methods mocov2 \
    --parts pipeline,model,e2e --batch-size 4 --image-size 32 --workers 1 --warmup 1 --steps 1 --repeats 1 \
    --photos 16 --synthetic-jpegs --out "$dest"
else
  step throughput 420 throughput.txt python3 bench/throughput.py --pipelines dali,torchvision --methods mocov2,mosrep \
    --parts pipeline,model,e2e --warmup 5 --steps 10 --repeats 3 --out "$dest" \
    $([ -n "$data" ] && echo --data "$data" || echo --synthetic-jpegs)
fi

echo "== summary ($dest)"
cat "$dest/summary.txt"
exit $failed
