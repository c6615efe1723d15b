#!/usr/bin/env bash
# Two containers of the CPU image as two nodes: each runs the entry point's
# torchrun with NNODES=2, and they meet by c10d rendezvous on 127.0.0.1 (host
# network). Both ranks must end every step with identical parameters
# (train.py's replica digests, compared at every checkpoint).
#   cluster/test/two-containers.sh
source "$(dirname "$0")/lib.sh"
runs="$STATE/image-runs"
cache="$STATE/container-cache"
rm -rf "$runs/two-nodes" && mkdir -p "$runs" "$cache" && chmod 777 "$runs" "$cache"
port=$(python3 -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
say "two containers, c10d rendezvous on 127.0.0.1:$port"
cleanup() { podman --runtime runc --cgroup-manager cgroupfs rm -f -t 0 viewforge-node0 viewforge-node1 > /dev/null 2>&1 || true; }
cleanup
trap cleanup EXIT
pids=()
for node in 0 1; do
  # c10d tells the nodes apart by (address, pid): both addresses are 127.0.0.1
  # and torchrun would be pid 1 in both containers, so they share the host's pids.
  podman --runtime runc --cgroup-manager cgroupfs run --rm --name "viewforge-node$node" --timeout 600 \
    --network host --pid host \
    -e NNODES=2 -e NPROC_PER_NODE=1 -e RDZV_ENDPOINT="127.0.0.1:$port" -e RDZV_ID=two-containers \
    -e TORCHRUN_ARGS="--local-addr 127.0.0.1" -e OMP_NUM_THREADS=1 \
    -v "$runs:/workspace/viewforge/runs" -v "$cache:/cache" "$CPU_IMAGE" \
    --method simclr --pipeline torchvision --run-dir runs/two-nodes --max-steps 4 --ckpt-every 1 \
    --batch-size 16 --image-size 16 --amp fp32 --knn-every 0 --log-every 1 --workers 0 \
    > "$STATE/two-containers-$node.log" 2>&1 &
  pids+=($!)
done
rc=0
for pid in "${pids[@]}"; do wait "$pid" || rc=$?; done
if [ "$rc" -ne 0 ]; then
  tail -n 20 "$STATE"/two-containers-*.log >&2
  exit 1
fi
python3 - "$runs/two-nodes/log.jsonl" <<'PY'
import json, sys
digests = [r["replica_digests"] for r in map(json.loads, open(sys.argv[1])) if "replica_digests" in r]
assert len(digests) >= 4 and all(len(d) == 2 and d[0] == d[1] for d in digests), digests
assert digests[0] != digests[-1], "the parameters should change"
print(f"{len(digests)} checkpoints, ranks identical at each: {digests[-1][0]:.6f}")
PY
say "two containers: PASS"
