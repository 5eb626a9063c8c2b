#!/usr/bin/env bash
# Single-node Slurm for development and CI (Debian 12, Slurm 22.05, run as root, no systemd needed).
#
#   scripts/slurm.sh install          apt-install slurmctld slurmd slurm-client munge if missing (quiet)
#   scripts/slurm.sh start            install if needed, start munged + slurmctld + slurmd, then wait until
#                                     a real `srun` job step completes (that is what "ready" means here)
#   scripts/slurm.sh stop [--clean]   cancel every job, stop the daemons by pid; --clean also wipes the
#                                     state, spool and log directories
#   scripts/slurm.sh status           one line per daemon, then `sinfo` when the controller is up
#   scripts/slurm.sh site start|stop [--clean]|status
#                                     a multi-node cluster in network namespaces (below), BESIDE the
#                                     single-node one: own config, state, ports and pidfiles; it shares
#                                     only munged (started if missing, never stopped by `site stop`)
#
# Every command is idempotent: starting a running cluster or stopping a stopped one is a no-op.
#
# Environment:
#   SLURM_BASE       directory for the generated slurm.conf, state, spool, logs and pidfiles
#                    (default /tmp/slurm-dev). /etc/slurm/slurm.conf is a copy so that client commands
#                    find it without SLURM_CONF.
#   SLURM_PROCTRACK  cgroup | linuxproc. Default: cgroup when the cgroup v1 freezer and cpuset
#                    hierarchies are mounted. linuxproc cannot clean up processes that double-fork.
#   SLURM_OVERSUBSCRIBE  jobs allowed to share one core (default 32). Slurm gives each job whole
#                    cores, so without this a 2-core machine runs only 2 jobs at a time.
#   SLURM_ACCOUNTING=1  also install and start MariaDB (private datadir $SLURM_BASE/db, unix socket
#                    only) and slurmdbd, so that `sacct` works (job accounting via jobacct_gather/linux).
#                    Default 0: no accounting storage (`sacct` says "accounting storage is disabled").
#                    Switching a running cluster needs `restart`. tests/test_accounting.py uses it
#                    inside a private mount+network namespace (its own cluster, next to the shared one).
#
# Environment of `site` (tests/site_topology.py sets it up; the defaults are its topology):
#   SLURM_BASE       default /tmp/slurm-site: etc/slurm.conf (client commands need
#                    SLURM_CONF=$SLURM_BASE/etc/slurm.conf), state, spool, logs, pidfiles
#   SITE_CONTROLLER  NAME:ADDR of the controller host (default login:10.78.0.2)
#   SITE_NODES       NAME:ADDR ... of the compute nodes (default "node1:10.78.0.11 node2:10.78.0.12")
#   SITE_NETNS_PREFIX  each host NAME is the network namespace /run/netns/<prefix>NAME (default site-);
#                    its daemon runs there (nsenter --net) in a UTS namespace whose host name is NAME
#   SITE_SLURMCTLD_PORT, SITE_SLURMD_PORT  default 6917, 6918 (the single-node cluster has 6817/6818)
#   Processes are tracked with proctrack/linuxproc: the site's jobs stay out of the cgroup tree that
#   the single-node cluster's slurmd manages. Job ids start at 500000 (FirstJobId).
set -euo pipefail

BASE=${SLURM_BASE:-/tmp/slurm-dev}
NODE=$(hostname -s)
CPUS=$(nproc)
OVERSUB=${SLURM_OVERSUBSCRIBE:-32}
# slurmd drains a node whose RealMemory exceeds what it detects; declare ~85 % of MemTotal (MiB).
MEM_MB=$(awk '/MemTotal/ {printf "%d", $2/1024*0.85}' /proc/meminfo)
if [ -z "${SLURM_PROCTRACK:-}" ]; then
    if [ -d /sys/fs/cgroup/freezer ] && [ -d /sys/fs/cgroup/cpuset ]; then
        SLURM_PROCTRACK=cgroup
    else
        SLURM_PROCTRACK=linuxproc
    fi
fi
if [ "$SLURM_PROCTRACK" = cgroup ]; then TASKPLUGIN=task/cgroup; else TASKPLUGIN=task/none; fi
PKGS=(munge slurmctld slurmd slurm-client)
ACCT=${SLURM_ACCOUNTING:-0}
MYSOCK=/run/mysqld/mysqld.sock
if [ "$ACCT" = 1 ]; then PKGS+=(slurmdbd mariadb-server); fi

log() { echo "[slurm.sh] $*" >&2; }
die() { log "$*"; exit 1; }

need_root() { [ "$(id -u)" = 0 ] || die "must run as root (it starts daemons and writes /etc/slurm)"; }

missing_pkgs() {
    local p
    for p in "${PKGS[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || echo "$p"
    done
}

install_pkgs() {
    local need
    need=$(missing_pkgs | tr '\n' ' ')
    [ -z "${need// /}" ] && return 0
    need_root
    log "installing: $need"
    export DEBIAN_FRONTEND=noninteractive
    # Another apt may be running (CI steps in parallel): wait for dpkg's lock instead of failing.
    local apt=(apt-get -o DPkg::Lock::Timeout=600 -y -qq)
    "${apt[@]}" update >/dev/null
    # Without systemd, the packages' maintainer scripts cannot start the services: harmless, we
    # start the daemons ourselves. First try quietly; on failure retry once and show the errors.
    # shellcheck disable=SC2086
    "${apt[@]}" install --no-install-recommends $need >/dev/null 2>&1 \
        || "${apt[@]}" install --no-install-recommends $need >/dev/null
}

# A daemon counts as alive when its pidfile names a process that is not a zombie: PID 1 on these
# machines reaps orphans lazily, so a stopped daemon may linger in state Z for a while.
pid_alive() { [ -r "/proc/$1/stat" ] && [ "$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" != Z ]; }
alive() { [ -f "$1" ] && pid_alive "$(cat "$1" 2>/dev/null)"; }

start_munge() {
    # The munge package normally generates the key in postinst; make one if that did not happen.
    [ -s /etc/munge/munge.key ] || mungekey --create --keyfile=/etc/munge/munge.key
    chown munge:munge /etc/munge /etc/munge/munge.key
    chmod 0700 /etc/munge
    chmod 0400 /etc/munge/munge.key
    # systemd would create /run/munge (RuntimeDirectory=); do it by hand.
    install -d -o munge -g munge -m 0755 /run/munge
    install -d -o munge -g munge -m 0700 /var/log/munge
    install -d -o munge -g munge -m 0711 /var/lib/munge
    if ! alive /run/munge/munged.pid; then
        rm -f /run/munge/munged.pid /run/munge/munge.socket.2*
        runuser -u munge -- /usr/sbin/munged     # forks into the background, writes its pidfile
    fi
    munge -n | unmunge >/dev/null || die "munge credential round trip failed"
}

write_conf() {
    local ACCT_LINES
    if [ "$ACCT" = 1 ]; then
        ACCT_LINES=$'JobAcctGatherType=jobacct_gather/linux\nAccountingStorageType=accounting_storage/slurmdbd\nAccountingStorageHost=localhost\nAccountingStoragePort=6819'
    else
        ACCT_LINES=$'JobAcctGatherType=jobacct_gather/none\nAccountingStorageType=accounting_storage/none'
    fi
    mkdir -p "$BASE"/{state,spool,log}
    chmod 0755 "$BASE" "$BASE"/{state,spool,log}
    local tmp="$BASE/slurm.conf.new"
    cat >"$tmp" <<EOF
# Generated by scripts/slurm.sh -- single-node development cluster. Edits are overwritten.
ClusterName=dev
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
MailProg=/bin/true
ProctrackType=proctrack/$SLURM_PROCTRACK
TaskPlugin=$TASKPLUGIN
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# Run the main scheduler every second (default 60 s) so new jobs start within ~1 s.
SchedulerParameters=sched_interval=1
$ACCT_LINES
JobCompType=jobcomp/none
ReturnToService=2
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$BASE/state
SlurmdSpoolDir=$BASE/spool
SlurmctldPidFile=$BASE/slurmctld.pid
SlurmdPidFile=$BASE/slurmd.pid
SlurmctldLogFile=$BASE/log/slurmctld.log
SlurmdLogFile=$BASE/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# Finished jobs stay visible to "squeue -t all" for this many seconds.
MinJobAge=300
KillWait=5
InactiveLimit=0
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
# FORCE:N lets up to N jobs share each core, so many notebooks run at once on a small machine.
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:$OVERSUB
EOF
    mv "$tmp" "$BASE/slurm.conf"
    install -d /etc/slurm
    cp "$BASE/slurm.conf" /etc/slurm/slurm.conf
    if [ "$SLURM_PROCTRACK" = cgroup ]; then
        printf '%s\n' 'CgroupPlugin=cgroup/v1' 'CgroupMountpoint=/sys/fs/cgroup' \
            'ConstrainCores=no' 'ConstrainRAMSpace=no' 'ConstrainDevices=no' >/etc/slurm/cgroup.conf
    else
        rm -f /etc/slurm/cgroup.conf
    fi
}

show_logs() { tail -n 20 "$BASE"/log/*.log >&2 2>/dev/null || true; }

wait_ready() {
    local state="" i
    for i in $(seq 1 300); do
        state=$(sinfo -h -n "$NODE" -o '%t' 2>/dev/null || true)
        case "$state" in idle | mix | alloc) break ;; esac
        sleep 0.1
    done
    case "$state" in idle | mix | alloc) ;; *) log "node not usable (state '$state')"; show_logs; exit 1 ;; esac
    # Ready means a job step really launches, not only that the daemons answer.
    if ! timeout 60 srun -N1 -n1 -t 1 -o /dev/null true; then
        log "smoke job step failed"; show_logs; exit 1
    fi
}

start_accounting() {
    # MariaDB (private datadir under $BASE, unix socket only, no networking) + slurmdbd
    install -d -o mysql -g mysql "$BASE/dblog" /run/mysqld
    if [ ! -d "$BASE/db/mysql" ]; then
        install -d -o mysql -g mysql "$BASE/db"
        mysql_install_db --user=mysql --datadir="$BASE/db" --auth-root-authentication-method=socket \
            >"$BASE/dblog/install_db.log" 2>&1 || { cat "$BASE/dblog/install_db.log" >&2; die "mysql_install_db failed"; }
    fi
    if ! alive "$BASE/dblog/mariadbd.pid"; then
        # mariadbd does not daemonize by itself
        setsid mariadbd --user=mysql --datadir="$BASE/db" --socket=$MYSOCK --skip-networking \
            --pid-file="$BASE/dblog/mariadbd.pid" --log-error="$BASE/dblog/mariadb.err" </dev/null >/dev/null 2>&1 &
    fi
    for _ in $(seq 1 150); do mysqladmin --socket=$MYSOCK ping >/dev/null 2>&1 && break; sleep 0.2; done
    mysql --socket=$MYSOCK -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
        CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurmpw';
        GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';" || die "MariaDB did not come up; see $BASE/dblog"
    cat >/etc/slurm/slurmdbd.conf <<EOF
AuthType=auth/munge
DbdHost=localhost
DbdPort=6819
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageLoc=slurm_acct_db
StorageUser=slurm
StoragePass=slurmpw
LogFile=$BASE/dblog/slurmdbd.log
PidFile=$BASE/dblog/slurmdbd.pid
DebugLevel=info
EOF
    chmod 0600 /etc/slurm/slurmdbd.conf   # slurmdbd refuses a world-readable config with a password
    alive "$BASE/dblog/slurmdbd.pid" || slurmdbd
    for _ in $(seq 1 150); do sacctmgr -n list cluster >/dev/null 2>&1 && break; sleep 0.2; done
    sacctmgr -n list cluster format=cluster | grep -qw dev || sacctmgr -i add cluster dev >/dev/null
}

start() {
    need_root
    local t0
    t0=$(date +%s.%N)
    install_pkgs
    start_munge
    if alive "$BASE/slurmctld.pid" && alive "$BASE/slurmd.pid"; then
        wait_ready
        log "already running"
        return 0
    fi
    write_conf
    if [ "$ACCT" = 1 ]; then start_accounting; fi
    alive "$BASE/slurmctld.pid" || slurmctld -f /etc/slurm/slurm.conf        # daemonizes
    alive "$BASE/slurmd.pid" || slurmd -f /etc/slurm/slurm.conf -N "$NODE"   # daemonizes
    wait_ready
    log "up (proctrack/$SLURM_PROCTRACK, OverSubscribe=FORCE:$OVERSUB) in $(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.2f", b-a}') s"
}

stop_pid() {   # stop_pid NAME PIDFILE
    local pid
    [ -f "$2" ] || return 0
    pid=$(cat "$2" 2>/dev/null || true)
    if [ -n "$pid" ] && pid_alive "$pid"; then
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 1 100); do pid_alive "$pid" || break; sleep 0.1; done
        if pid_alive "$pid"; then log "$1 ($pid) ignored SIGTERM, sending SIGKILL"; kill -KILL "$pid" 2>/dev/null || true; fi
    fi
    rm -f "$2"
}

stop() {
    need_root
    local ids
    if alive "$BASE/slurmctld.pid"; then
        # Cancel jobs while the controller still runs; otherwise job processes outlive slurmd.
        ids=$(squeue -h -o '%i' 2>/dev/null || true)
        if [ -n "$ids" ]; then
            # shellcheck disable=SC2086
            scancel $ids 2>/dev/null || true
            for _ in $(seq 1 150); do [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break; sleep 0.1; done
        fi
    fi
    stop_pid slurmd "$BASE/slurmd.pid"
    stop_pid slurmctld "$BASE/slurmctld.pid"
    stop_pid slurmdbd "$BASE/dblog/slurmdbd.pid"   # SLURM_ACCOUNTING=1 only; no-op otherwise
    stop_pid mariadbd "$BASE/dblog/mariadbd.pid"
    stop_pid munged /run/munge/munged.pid
    if [ "${1:-}" = --clean ]; then rm -rf "$BASE"/{state,spool,log,db,dblog}; fi
    log "stopped"
}

status() {
    local f rc=0
    for f in /run/munge/munged.pid "$BASE/slurmctld.pid" "$BASE/slurmd.pid"; do
        if alive "$f"; then
            echo "$(basename "$f" .pid): running (pid $(cat "$f"))"
        else
            echo "$(basename "$f" .pid): stopped"; rc=3
        fi
    done
    if alive "$BASE/slurmctld.pid"; then sinfo || true; fi
    return $rc
}

# -- the multi-node cluster in network namespaces ----------------------------------------------
SITE_CTL=${SITE_CONTROLLER:-login:10.78.0.2}
SITE_NODE_LIST=${SITE_NODES:-node1:10.78.0.11 node2:10.78.0.12}
SITE_PREFIX=${SITE_NETNS_PREFIX:-site-}
SITE_CTLD_PORT=${SITE_SLURMCTLD_PORT:-6917}
SITE_SLURMD_PORT=${SITE_SLURMD_PORT:-6918}

site_conf() { echo "$BASE/etc/slurm.conf"; }
site_nodes() { local spec; for spec in $SITE_NODE_LIST; do echo "${spec%%:*}"; done; }

site_write_conf() {
    local ctl=${SITE_CTL%%:*} ctl_addr=${SITE_CTL#*:} spec names=""
    mkdir -p "$BASE"/{etc,state,spool,log}
    chmod 0755 "$BASE" "$BASE"/{etc,state,spool,log}
    {
        cat <<EOF
# Generated by scripts/slurm.sh site -- multi-node cluster in network namespaces. Edits are overwritten.
ClusterName=site
SlurmctldHost=$ctl($ctl_addr)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
ReturnToService=2
FirstJobId=500000
SlurmctldPort=$SITE_CTLD_PORT
SlurmdPort=$SITE_SLURMD_PORT
StateSaveLocation=$BASE/state
SlurmdSpoolDir=$BASE/spool/%n
SlurmctldPidFile=$BASE/slurmctld.pid
SlurmdPidFile=$BASE/slurmd-%n.pid
SlurmctldLogFile=$BASE/log/slurmctld.log
SlurmdLogFile=$BASE/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
MinJobAge=300
KillWait=5
InactiveLimit=0
EOF
        for spec in $SITE_NODE_LIST; do
            echo "NodeName=${spec%%:*} NodeAddr=${spec#*:} CPUs=$CPUS RealMemory=$((MEM_MB / 4)) State=UNKNOWN"
            names+="${names:+,}${spec%%:*}"
        done
        echo "PartitionName=batch Nodes=$names Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:$OVERSUB"
    } >"$BASE/etc/slurm.conf.new"
    mv "$BASE/etc/slurm.conf.new" "$BASE/etc/slurm.conf"
}

# site_on HOST CMD...: run CMD in HOST's network namespace, in a UTS namespace named HOST
site_on() {
    local host=$1
    shift
    [ -e "/run/netns/$SITE_PREFIX$host" ] || die "no network namespace $SITE_PREFIX$host (the topology is not set up)"
    nsenter --net="/run/netns/$SITE_PREFIX$host" unshare --uts sh -c 'hostname "$0" && exec "$@"' "$host" "$@"
}

site_start() {
    need_root
    install_pkgs
    start_munge
    local conf ctl=${SITE_CTL%%:*} node up="" n
    conf=$(site_conf)
    site_write_conf
    alive "$BASE/slurmctld.pid" || site_on "$ctl" slurmctld -f "$conf"
    for node in $(site_nodes); do
        alive "$BASE/slurmd-$node.pid" || site_on "$node" slurmd -f "$conf" -N "$node"
    done
    n=$(site_nodes | wc -l)
    for _ in $(seq 1 300); do
        up=$(SLURM_CONF=$conf sinfo -h -o '%t %D' 2>/dev/null | awk '$1=="idle"||$1=="mix"||$1=="alloc" {s+=$2} END {print s+0}')
        [ "$up" = "$n" ] && break
        sleep 0.2
    done
    if [ "$up" != "$n" ]; then
        log "site: only $up of $n nodes usable"
        SLURM_CONF=$conf sinfo >&2 || true
        tail -n 20 "$BASE"/log/*.log >&2
        exit 1
    fi
    # Ready means a job step really runs on every node, launched from the controller's host.
    if ! SLURM_CONF=$conf timeout 60 nsenter --net="/run/netns/$SITE_PREFIX$ctl" srun -N"$n" -n"$n" -t 1 -o /dev/null true; then
        log "site: smoke job step failed"
        tail -n 20 "$BASE"/log/*.log >&2
        exit 1
    fi
    log "site: up, $n nodes behind $ctl (SLURM_CONF=$conf)"
}

site_stop() {
    need_root
    local conf node ids
    conf=$(site_conf)
    if alive "$BASE/slurmctld.pid"; then
        ids=$(SLURM_CONF=$conf squeue -h -o '%i' 2>/dev/null || true)
        if [ -n "$ids" ]; then
            # shellcheck disable=SC2086
            SLURM_CONF=$conf scancel $ids 2>/dev/null || true
            for _ in $(seq 1 100); do [ -z "$(SLURM_CONF=$conf squeue -h -o %i 2>/dev/null)" ] && break; sleep 0.1; done
        fi
    fi
    for node in $(site_nodes); do stop_pid "slurmd $node" "$BASE/slurmd-$node.pid"; done
    stop_pid slurmctld "$BASE/slurmctld.pid"
    if [ "${1:-}" = --clean ]; then rm -rf "$BASE"/{etc,state,spool,log}; fi
    log "site: stopped"
}

site_status() {
    local f rc=0 node
    for f in "$BASE/slurmctld.pid" $(for node in $(site_nodes); do echo "$BASE/slurmd-$node.pid"; done); do
        if alive "$f"; then
            echo "$(basename "$f" .pid): running (pid $(cat "$f"))"
        else
            echo "$(basename "$f" .pid): stopped"
            rc=3
        fi
    done
    if alive "$BASE/slurmctld.pid"; then SLURM_CONF=$(site_conf) sinfo || true; fi
    return $rc
}

case "${1:-}" in
    site)
        BASE=${SLURM_BASE:-/tmp/slurm-site}
        case "${2:-}" in
            start) site_start ;;
            stop) site_stop "${3:-}" ;;
            status) site_status ;;
            *) echo "usage: $0 site start | stop [--clean] | status" >&2; exit 2 ;;
        esac ;;
    install) install_pkgs ;;
    start) start ;;
    stop) stop "${2:-}" ;;
    restart) stop "${2:-}"; start ;;
    status) status ;;
    *) echo "usage: $0 install | start | stop [--clean] | restart | status | site start|stop|status" >&2; exit 2 ;;
esac
