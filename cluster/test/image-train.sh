#!/usr/bin/env bash
# train.py for a few steps inside the CPU image (build-image.sh), through the
# image's entry point (torchrun, one process), on the built-in sample.
#   cluster/test/image-train.sh
source "$(dirname "$0")/lib.sh"
runs="$STATE/image-runs"
cache="$STATE/container-cache"
rm -rf "$runs/train" && mkdir -p "$runs" "$cache" && chmod 777 "$runs" "$cache"  # the image's user is uid 1000
say "training 3 steps in $CPU_IMAGE"
podman --runtime runc --cgroup-manager cgroupfs run --rm --timeout 600 --network host \
  -v "$runs:/workspace/viewforge/runs" -v "$cache:/cache" "$CPU_IMAGE" \
  --method simclr --pipeline dali --run-dir runs/train --max-steps 3 --batch-size 16 --image-size 32 --amp fp32 \
  --knn-every 0 --log-every 1 --workers 1 > "$STATE/image-train.log" 2>&1 \
  || { tail -n 30 "$STATE/image-train.log" >&2; exit 1; }
grep -E '^(simclr on|done)' "$STATE/image-train.log" || true
python3 - "$runs/train/log.jsonl" <<'PY'
import json, sys
steps = [r["step"] for r in map(json.loads, open(sys.argv[1])) if "loss" in r]
assert steps == [1, 2, 3], steps
print("logged steps", steps)
PY
say "image train: PASS"
