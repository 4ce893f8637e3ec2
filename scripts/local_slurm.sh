#!/usr/bin/env bash
# A private single-node Slurm cluster on this machine: try a sweep on a real Slurm before the cluster.
#
#   scripts/local_slurm.sh start    # install slurm-wlm + munge if missing (root + apt), configure, start,
#                                   # wait until the node is idle, print the `export SLURM_CONF=...` line
#   scripts/local_slurm.sh status   # the daemons this script started, and sinfo
#   scripts/local_slurm.sh stop     # stop exactly those daemons (by their pid files), remove all state
#
# Everything lives in $PCAMX_SLURM_DIR (default /tmp/pcamx-slurm): config, munge key and socket, state and
# spool dirs, logs, pid files. This host is the only node (its real CPU count, its memory less 1 GiB); one
# partition, `pcamx-test`; no accounting (sacct has nothing to say: pcamx's launcher quiets its warnings).
# Ports: $PCAMX_SLURM_PORT and the next one (default: two free ports picked at start).
set -euo pipefail

DIR=${PCAMX_SLURM_DIR:-/tmp/pcamx-slurm}
CONF=$DIR/slurm.conf
PARTITION=pcamx-test
DAEMONS=(slurmd slurmctld munged)   # stop order

die() { echo "local_slurm: $*" >&2; exit 1; }

pid_of() {  # the pid in $DIR/<daemon>.pid if that process is alive
    local file=$DIR/$1.pid
    [[ -s $file ]] && kill -0 "$(cat "$file")" 2>/dev/null && cat "$file"
}

install_if_missing() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null && return 0
    [[ $(id -u) -eq 0 ]] || die "slurm-wlm and munge are not installed, and installing them needs root (apt-get)"
    command -v apt-get >/dev/null || die "slurm-wlm and munge are not installed, and this machine has no apt-get"
    echo "local_slurm: installing slurm-wlm and munge ..." >&2
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null \
        || die "apt-get install slurm-wlm munge failed"
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

write_config() {
    local host cpus memory node ctld_port slurmd_port
    host=$(hostname -s)
    # slurmd -C reports this machine's real layout; keep it, with 1 GiB of memory left for the system.
    node=$(slurmd -C | head -1)
    cpus=$(sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' <<<"$node")
    memory=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$node")
    memory=$(( memory > 2048 ? memory - 1024 : memory ))
    node=$(sed "s/^NodeName=[^ ]*/NodeName=$host/; s/RealMemory=[0-9]*/RealMemory=$memory/" <<<"$node")
    ctld_port=${PCAMX_SLURM_PORT:-$(free_port)}
    if [[ -n ${PCAMX_SLURM_PORT:-} ]]; then slurmd_port=$(( PCAMX_SLURM_PORT + 1 )); else slurmd_port=$(free_port); fi
    cat >"$CONF" <<EOF
# Written by scripts/local_slurm.sh: a private single-node cluster ($DIR).
ClusterName=pcamx-local
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=$(id -un)
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge.socket
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
# Schedule every 2 s (default 60 s / 30 s): a requeued job restarts in seconds, not minutes.
SchedulerParameters=sched_interval=2,bf_interval=2
MpiDefault=none
ReturnToService=2
KillWait=5
MinJobAge=30
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=30
$node State=UNKNOWN NodeAddr=127.0.0.1
PartitionName=$PARTITION Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
    echo "local_slurm: node $host, $cpus CPUs, $memory MB, partition $PARTITION, ports $ctld_port/$slurmd_port" >&2
}

start() {
    if [[ -n $(pid_of slurmctld || true) ]]; then
        echo "local_slurm: already running ($DIR)" >&2
        echo "export SLURM_CONF=$CONF"
        return 0
    fi
    install_if_missing
    mkdir -p "$DIR/state" "$DIR/spool"
    chmod 700 "$DIR"
    write_config
    dd if=/dev/urandom of="$DIR/munge.key" bs=1024 count=1 status=none
    chmod 400 "$DIR/munge.key"
    munged --key-file="$DIR/munge.key" --socket="$DIR/munge.socket" --pid-file="$DIR/munged.pid" \
        --log-file="$DIR/munged.log" --seed-file="$DIR/munged.seed" --force \
        || die "munged did not start: $(tail -3 "$DIR/munged.log" 2>/dev/null)"
    SLURM_CONF=$CONF slurmctld -f "$CONF" -i || die "slurmctld did not start: $(tail -5 "$DIR/slurmctld.log")"
    SLURM_CONF=$CONF slurmd -f "$CONF" || die "slurmd did not start: $(tail -5 "$DIR/slurmd.log")"
    local state=""
    for _ in $(seq 1 60); do
        state=$(SLURM_CONF=$CONF sinfo -h -p "$PARTITION" -o %t 2>/dev/null || true)
        [[ $state == idle* ]] && break
        sleep 0.5
    done
    if [[ $state != idle* ]]; then
        echo "local_slurm: the node did not become idle (state '${state:-none}'); last log lines:" >&2
        tail -5 "$DIR/slurmctld.log" "$DIR/slurmd.log" >&2 || true
        stop >/dev/null 2>&1 || true
        exit 1
    fi
    echo "local_slurm: up; run sweeps with hydra.launcher.partition=$PARTITION (stop: $0 stop)" >&2
    echo "export SLURM_CONF=$CONF"
}

status() {
    local running=0 pid
    for daemon in munged slurmctld slurmd; do
        if pid=$(pid_of "$daemon"); then
            echo "$daemon: running (pid $pid)"
            running=1
        else
            echo "$daemon: not running"
        fi
    done
    if [[ $running -eq 1 ]]; then
        SLURM_CONF=$CONF sinfo || true
    fi
    [[ $running -eq 1 ]]
}

stop() {
    local pid
    for daemon in "${DAEMONS[@]}"; do
        if pid=$(pid_of "$daemon"); then
            kill "$pid" 2>/dev/null || true
            for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            kill -9 "$pid" 2>/dev/null || true
        fi
    done
    # Job steps left behind by slurmd (slurmstepd) belong to this cluster only if they use its spool dir.
    pkill -9 -f "slurmstepd.*$DIR" 2>/dev/null || true
    rm -rf "$DIR"
    echo "local_slurm: stopped, $DIR removed" >&2
}

case ${1:-} in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
