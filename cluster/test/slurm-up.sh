#!/usr/bin/env bash
# A real one-node Slurm on this machine for tests: munge, slurmctld and slurmd,
# with this host as controller and as its only node (at 127.0.0.1).
#   source <(cluster/test/slurm-up.sh)     # prints `export SLURM_CONF=...`
# Everything lives under $VIEWFORGE_CLUSTER_STATE/slurm; nothing in /etc changes
# but the munge key the munge package creates. slurm-down.sh stops it.
source "$(dirname "$0")/lib.sh"
dir="$STATE/slurm"
conf="$dir/slurm.conf"
mkdir -p "$dir/state" "$dir/spool" "$dir/log"
node=$(hostname -s)
cpus=$(nproc)

if ! pgrep -x munged > /dev/null; then
  [ -f /etc/munge/munge.key ] || { mungekey --create 2>/dev/null || create-munge-key -f; } >&2
  mkdir -p /run/munge && chown munge:munge /run/munge && chmod 755 /run/munge
  runuser -u munge -- /usr/sbin/munged >&2
fi

cat > "$conf" <<CONF
ClusterName=viewforge-test
SlurmctldHost=$node(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
ReturnToService=2
JobRequeue=1
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
NodeName=$node NodeAddr=127.0.0.1 CPUs=$cpus State=UNKNOWN
PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
export SLURM_CONF="$conf"

if ! pgrep -x slurmctld > /dev/null; then
  slurmctld -f "$conf" -i >&2  # -i: ignore state left by an earlier test
fi
if ! pgrep -x slurmd > /dev/null; then
  slurmd -f "$conf" >&2
fi
for _ in $(seq 60); do
  if sinfo -h -o '%t' 2>/dev/null | grep -q -E '^(idle|mix|alloc)'; then
    echo "export SLURM_CONF=$conf"
    exit 0
  fi
  sleep 1
done
echo "slurm did not come up; see $dir/log" >&2
tail -n 20 "$dir/log/slurmctld.log" "$dir/log/slurmd.log" >&2 || true
exit 1
