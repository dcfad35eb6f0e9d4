#!/usr/bin/env bash
# `make test-slurm`: a one-host SLURM cluster from the distribution's packages, for as long as COMMAND runs.
#
#   bash scripts/slurm_cluster.sh COMMAND [ARGS...]
#
# Installs slurm-wlm and munge with apt-get when they are missing (needs root, as CI is), writes a
# munge key and a slurm.conf into a scratch folder (this host is the only node, with its real CPU
# count and memory; JobRequeue=1), starts munged, slurmctld and slurmd as this script's own
# processes (not through systemd), waits until `sinfo` shows the node idle, then runs COMMAND with
# SLURM_CONF set, so sbatch/srun/scontrol/squeue talk to this cluster. On exit, also after a failure
# or Ctrl-C, it stops exactly the daemons it started (by PID) and removes the scratch folder.
# Where the host cannot run SLURM (not root and no packages, apt-get failing, a daemon not starting)
# it says so in one line and exits non-zero: that is never a pass.
set -euo pipefail

fail() { echo "slurm_cluster: $*" >&2; exit 2; }

[ $# -gt 0 ] || fail "usage: scripts/slurm_cluster.sh COMMAND [ARGS...]"

install_packages() {
    local missing=()
    for tool in slurmctld slurmd sbatch munged; do command -v "$tool" >/dev/null || missing+=("$tool"); done
    [ ${#missing[@]} -eq 0 ] && return 0
    [ "$(id -u)" -eq 0 ] || fail "SLURM is not installed (${missing[*]} missing) and installing it needs root: run as root, or apt-get install slurm-wlm munge first"
    command -v apt-get >/dev/null || fail "SLURM is not installed (${missing[*]} missing) and there is no apt-get to install slurm-wlm and munge"
    echo "slurm_cluster: installing slurm-wlm and munge (missing: ${missing[*]})" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends slurm-wlm munge >/dev/null \
        || fail "apt-get install slurm-wlm munge failed (run apt-get update first?)"
    for tool in slurmctld slurmd sbatch munged; do command -v "$tool" >/dev/null || fail "$tool missing after installing slurm-wlm munge"; done
}

install_packages
[ "$(id -u)" -eq 0 ] || fail "the single-host cluster runs its daemons as root (SlurmdUser=root); run as root"

SCRATCH=$(mktemp -d /tmp/paraclip-slurm.XXXXXX)
PIDS=()
COMMAND_PID=
cleanup() {
    local status=$?
    if [ -n "$COMMAND_PID" ] && kill -0 "$COMMAND_PID" 2>/dev/null; then  # stopped by a signal: the command first
        kill -TERM "$COMMAND_PID" 2>/dev/null || true
        wait "$COMMAND_PID" 2>/dev/null || true
    fi
    if [ -n "${SLURM_CONF:-}" ] && [ ${#PIDS[@]} -eq 3 ]; then  # jobs still there: cancel them (their steps outlive slurmd)
        scancel --quiet $(squeue -h -o %A 2>/dev/null | sort -u) 2>/dev/null || true
        for _ in $(seq 30); do [ -z "$(squeue -h 2>/dev/null)" ] && break; sleep 0.5; done
    fi
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do kill "${PIDS[i]}" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
    done
    if [ "$status" -ne 0 ] && [ -d "$SCRATCH/log" ]; then
        for log in "$SCRATCH"/log/*.log; do echo "--- $log (last lines)" >&2; tail -n 15 "$log" >&2 || true; done
    fi
    rm -rf "$SCRATCH"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

mkdir -p "$SCRATCH"/{munge,log,ctld,slurmd,run}
chmod 0700 "$SCRATCH/munge"
HOST=$(hostname -s)
CPUS=$(nproc)
# RealMemory in MB: what the node has, less 1 GB for the system (slurmd refuses a node that reports less)
MEM_MB=$(awk '/^MemTotal:/ {m = int($2 / 1024) - 1024; print (m > 512 ? m : 512)}' /proc/meminfo)
PORT_CTLD=$(python3 -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')
PORT_SLURMD=$(python3 -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')

# munge: a fresh key, owned by the user running munged, mode 0400, and a private socket
dd if=/dev/urandom of="$SCRATCH/munge/munge.key" bs=1024 count=1 status=none
chmod 0400 "$SCRATCH/munge/munge.key"
MUNGE_SOCKET="$SCRATCH/munge/munge.socket"
munged --foreground --force --key-file="$SCRATCH/munge/munge.key" --socket="$MUNGE_SOCKET" \
    --pid-file="$SCRATCH/munge/munged.pid" --log-file="$SCRATCH/log/munged.log" \
    --seed-file="$SCRATCH/munge/munged.seed" >>"$SCRATCH/log/munged.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 100); do [ -S "$MUNGE_SOCKET" ] && break; sleep 0.1; done
[ -S "$MUNGE_SOCKET" ] || fail "munged did not start (see its log above)"

# Containers usually lack usable cgroups: processes are tracked by their parent ids (linuxproc), and
# tasks are bound to CPUs with sched_setaffinity (task/affinity) when the kernel allows it here.
TASK_PLUGIN=task/affinity
python3 -c 'import os; os.sched_setaffinity(0, os.sched_getaffinity(0))' 2>/dev/null || TASK_PLUGIN=task/none

cat >"$SCRATCH/slurm.conf" <<EOF
ClusterName=paraclip-test
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=$PORT_CTLD
SlurmdPort=$PORT_SLURMD
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCKET
StateSaveLocation=$SCRATCH/ctld
SlurmdSpoolDir=$SCRATCH/slurmd
SlurmctldPidFile=$SCRATCH/run/slurmctld.pid
SlurmdPidFile=$SCRATCH/run/slurmd.pid
SlurmctldLogFile=$SCRATCH/log/slurmctld.log
SlurmdLogFile=$SCRATCH/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=$TASK_PLUGIN
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SwitchType=switch/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
JobRequeue=1
# the main scheduler every 2 s (not 60): a job released or resubmitted starts within seconds
SchedulerParameters=sched_interval=2
KillWait=5
MinJobAge=600
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
export SLURM_CONF="$SCRATCH/slurm.conf"

slurmctld -D -i -f "$SLURM_CONF" >>"$SCRATCH/log/slurmctld.out" 2>&1 &
PIDS+=($!)
slurmd -D -f "$SLURM_CONF" -N "$HOST" >>"$SCRATCH/log/slurmd.out" 2>&1 &
PIDS+=($!)

idle=
for _ in $(seq 120); do
    for pid in "${PIDS[@]}"; do kill -0 "$pid" 2>/dev/null || fail "a SLURM daemon (pid $pid) exited at start (see its log above)"; done
    state=$(sinfo -h -N -n "$HOST" -o '%t' 2>/dev/null || true)
    if [ "$state" = idle ]; then idle=1; break; fi
    sleep 0.5
done
[ -n "$idle" ] || fail "node $HOST not idle after 60 s (sinfo: ${state:-no answer})"
echo "slurm_cluster: node $HOST idle ($CPUS CPUs, ${MEM_MB} MB, $TASK_PLUGIN); SLURM_CONF=$SLURM_CONF" >&2

# in the background and waited for, so that a signal to this script is handled at once (bash defers traps
# until a foreground command ends)
"$@" &
COMMAND_PID=$!
wait "$COMMAND_PID"
