#!/usr/bin/env bash
# A Debian base image made here, for machines that reach no image registry:
# debootstrap (minbase) from the host's own Debian mirror, imported into podman.
#   cluster/test/base-image.sh            # -> localhost/debian-local:bookworm
source "$(dirname "$0")/lib.sh"
if pm image exists "$BASE_IMAGE"; then
  say "base image $BASE_IMAGE exists"
  exit 0
fi
mirror=$(debian_mirror)
if [ -z "$mirror" ]; then
  echo "no Debian mirror in this host's apt sources" >&2
  exit 1
fi
root="$STATE/rootfs"
rm -rf "$root"
say "debootstrap bookworm from the host's mirror"
debootstrap --variant=minbase bookworm "$root" "$mirror" > "$STATE/debootstrap.log" 2>&1 \
  || { tail -n 20 "$STATE/debootstrap.log" >&2; exit 1; }
tar -C "$root" -c . | pm import - "$BASE_IMAGE" > /dev/null
rm -rf "$root"
say "imported $BASE_IMAGE"
