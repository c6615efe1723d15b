# Shared by the cluster/test scripts (sourced, not run): podman with the
# settings this kind of machine needs, and a state directory outside the repo.
#
#  * runc and cgroupfs: crun refuses hybrid cgroup hierarchies;
#  * default_ulimits = []: otherwise the runtime fails to set RLIMIT_NOFILE/NPROC.
# Nothing here writes a host name into the repository: mirrors, pip settings
# and CA bundles are read from this host when a script runs.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
STATE=${VIEWFORGE_CLUSTER_STATE:-/tmp/viewforge-cluster}
BASE_IMAGE=${BASE_IMAGE:-localhost/debian-local:bookworm}
CPU_IMAGE=${CPU_IMAGE:-localhost/viewforge:cpu}
mkdir -p "$STATE"
if [ ! -f "$STATE/containers.conf" ]; then
  printf '[containers]\ndefault_ulimits = []\n' > "$STATE/containers.conf"
fi
export CONTAINERS_CONF="$STATE/containers.conf"

pm() { podman --runtime runc --cgroup-manager cgroupfs "$@"; }

say() { echo "[$(date +%H:%M:%S)] $*"; }

# The host's Debian mirror, from its apt sources (deb822 or one-line format).
debian_mirror() {
  local uri
  uri=$(grep -hs -E '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{print $2}' \
        | grep -v -- '-security' | head -n 1 || true)
  if [ -z "$uri" ]; then
    uri=$(grep -hs -E '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
          | grep -v -- '-security' | awk '{for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) {print $i; exit}}' \
          | head -n 1 || true)
  fi
  echo "$uri"
}
