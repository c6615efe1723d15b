#!/usr/bin/env bash
# Build the CPU image from the repository's Dockerfile with podman, on a
# machine without an image registry:
#   cluster/test/build-image.sh        # -> localhost/viewforge:cpu
# The base is the local Debian image (base-image.sh). pip inside the build
# uses this host's pip settings: its configuration (files and PIP_*
# variables) is written to a build-only directory with the CA bundle, and
# the local wheel directories it names are mounted read-only for the build.
# Nothing of it stays in the image, and no host name enters the repository.
# TORCH_VERSION / TORCHVISION_VERSION choose the wheels (default: the README's
# pins). A CPU-only torch needs a CPU torchvision beside it: PyPI's
# torchvision links CUDA libraries and fails to import next to torch+cpu.
source "$(dirname "$0")/lib.sh"
"$(dirname "$0")/base-image.sh"

host="$STATE/host-build"
rm -rf "$host" && mkdir -p "$host"
ca=${PIP_CERT:-${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}}
[ -f "$ca" ] && cp "$ca" "$host/ca.crt"
volumes=(-v "$host:/run/host-build:ro")
# `pip config list` gives section.key='value' lines, environment included.
{
  echo "[global]"
  pip_conf=$(python3 -m pip config list 2>/dev/null || true)
  while IFS= read -r line; do
    [ -n "$line" ] || continue
    key=${line%%=*}; value=${line#*=}; value=${value#\'}; value=${value%\'}
    key=${key#*.}
    case "$key" in
      cert) [ -f "$host/ca.crt" ] && echo "cert = /run/host-build/ca.crt" ;;
      *) echo "$key = $value" ;;
    esac
  done <<< "$(echo "$pip_conf" | sed -e 's/^:env:\./global./' | awk -F= '!seen[$1]++')"
} > "$host/pip.conf"
# Local directories the settings name (find-links, file:// indexes, constraints).
for path in $(grep -E '^(find-links|extra-index-url|index-url|constraint) =' "$host/pip.conf" \
              | cut -d= -f2- | tr ' ' '\n' | sed -e 's#^file://##' | grep '^/' || true); do
  dir=$path
  [ -f "$path" ] && dir=$(dirname "$path")
  case "$dir" in */simple) dir=$(dirname "$dir") ;; esac  # an index's files lie beside simple/
  [ -d "$dir" ] && volumes+=(-v "$dir:$dir:ro")
done

torch=${TORCH_VERSION:-2.14.1}
vision=${TORCHVISION_VERSION:-0.29.1}
say "building $CPU_IMAGE on $BASE_IMAGE (torch $torch, torchvision $vision)"
cd "$REPO"
pm build --network host "${volumes[@]}" \
  --build-arg BASE_IMAGE="$BASE_IMAGE" --build-arg PIP_CONFIG_FILE=/run/host-build/pip.conf \
  --build-arg TORCH_VERSION="$torch" --build-arg TORCHVISION_VERSION="$vision" \
  -t "$CPU_IMAGE" -f Dockerfile . > "$STATE/build.log" 2>&1 \
  || { tail -n 40 "$STATE/build.log" >&2; exit 1; }
say "built $CPU_IMAGE ($(pm image inspect --format '{{.Size}}' "$CPU_IMAGE" | awk '{printf "%.1f GB", $1 / 1e9}'))"
