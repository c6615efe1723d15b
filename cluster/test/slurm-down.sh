#!/usr/bin/env bash
# Stop the test Slurm that slurm-up.sh started (its daemons, by their pid files).
source "$(dirname "$0")/lib.sh"
for pidfile in "$STATE/slurm/slurmd.pid" "$STATE/slurm/slurmctld.pid"; do
  if [ -f "$pidfile" ]; then
    kill "$(cat "$pidfile")" 2>/dev/null || true
    rm -f "$pidfile"
  fi
done
