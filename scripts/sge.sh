#!/usr/bin/env bash
# Single-host Grid Engine cell for development and CI (Debian 12's Son of Grid Engine 8.1.9, run as
# root, no systemd needed). Runs beside the project's Slurm (scripts/slurm.sh): other daemons,
# other ports (sge_qmaster 6444, sge_execd 6445), nothing shared.
#
#   scripts/sge.sh install   apt-install gridengine-master/-exec/-client if missing, with the debconf
#                            answers preseeded (cell "default", this host as the master); quiet
#   scripts/sge.sh start     install if needed, start sge_qmaster, configure the cell (below), start
#                            sge_execd, then wait until a real `qsub -sync y` job has run
#   scripts/sge.sh stop      delete this cell's jobs, stop sge_execd and sge_qmaster by pid
#   scripts/sge.sh status    one line per daemon, then `qstat -f` when the master is up
#
# Every command is idempotent: starting a running cell (or re-configuring a configured one) and
# stopping a stopped one are no-ops.
#
# The cell (SGE_ROOT=/var/lib/gridengine, SGE_CELL=default), set by `start` every time:
#   * host_aliases maps this host's name and `localhost` together (both are 127.0.0.1 here; the
#     qmaster refuses clients whose address resolves to another name than it expects);
#   * global configuration: min_uid/min_gid 0 (the tests' hub runs as root; a site's cell keeps its
#     own), execd_params ENABLE_ADDGRP_KILL=true (qdel kills every process of the job, also those
#     in their own session);
#   * scheduler: schedule_interval 0:0:1, flush_submit_sec/flush_finish_sec 1 (jobs start within
#     about a second instead of up to 15 s);
#   * one cluster queue $SGE_QUEUE (default all.q) on this host with $SGE_SLOTS slots (default 16),
#     shell /bin/bash, h_rt $SGE_H_RT (default 08:00:00: the longest a job may ask for; the options
#     form reads it), notify $SGE_NOTIFY (default 00:05:00: how long a job may run on after its s_rt
#     warning, so a walltime warning does not end the job early).
set -euo pipefail

export SGE_ROOT=${SGE_ROOT:-/var/lib/gridengine}
export SGE_CELL=${SGE_CELL:-default}
QUEUE=${SGE_QUEUE:-all.q}
SLOTS=${SGE_SLOTS:-16}
H_RT=${SGE_H_RT:-08:00:00}
NOTIFY=${SGE_NOTIFY:-00:05:00}
HOST=$(hostname)
PKGS=(gridengine-common gridengine-client gridengine-master gridengine-exec)
COMMON=$SGE_ROOT/$SGE_CELL/common
SPOOL=/var/spool/gridengine
QMASTER_PID=$SPOOL/qmaster/qmaster.pid
# the execd names its spool directory after the name its address resolves to (here: localhost)
execd_pidfile() {
    local f
    for f in "$SPOOL/execd/$HOST/execd.pid" "$SPOOL"/execd/*/execd.pid; do
        if [ -f "$f" ]; then echo "$f"; return 0; fi
    done
    echo "$SPOOL/execd/$HOST/execd.pid"
}

log() { echo "[sge.sh] $*" >&2; }
die() { log "$*"; exit 1; }
need_root() { [ "$(id -u)" = 0 ] || die "must run as root (it installs packages and starts daemons)"; }

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
    # The packages ask where the master is and whether to configure the cell: answer beforehand.
    local pkg
    for pkg in gridengine-common gridengine-client gridengine-master; do
        debconf-set-selections <<EOF
$pkg shared/gridenginemaster string $HOST
$pkg shared/gridenginecell string $SGE_CELL
$pkg shared/gridengineconfig boolean true
EOF
    done
    export DEBIAN_FRONTEND=noninteractive
    local apt=(apt-get -o DPkg::Lock::Timeout=600 -y -qq)
    "${apt[@]}" update >/dev/null
    # Without systemd the maintainer scripts cannot start the daemons: harmless, `start` does.
    # shellcheck disable=SC2086
    "${apt[@]}" install --no-install-recommends $need >/dev/null 2>&1 \
        || "${apt[@]}" install --no-install-recommends $need >/dev/null
}

# Alive = the pidfile names a process that is not a zombie (PID 1 here reaps orphans lazily).
pid_alive() { [ -r "/proc/$1/stat" ] && [ "$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" != Z ]; }
alive() { [ -f "$1" ] && pid_alive "$(cat "$1" 2>/dev/null)"; }

qmaster_answers() { alive "$QMASTER_PID" && timeout 10 qconf -sh >/dev/null 2>&1; }

wait_for() {  # wait_for SECONDS WHAT COMMAND...
    local secs=$1 what=$2 i
    shift 2
    for ((i = 0; i < secs * 5; i++)); do
        "$@" && return 0
        sleep 0.2
    done
    die "timed out after ${secs}s waiting for $what"
}

set_attrs() {  # set_attrs KIND OBJECT ATTR VALUE [ATTR VALUE ...]: qconf -mattr, no output
    local kind=$1 obj=$2
    shift 2
    while [ $# -gt 0 ]; do
        qconf -mattr "$kind" "$1" "$2" "$obj" >/dev/null
        shift 2
    done
}

configure() {
    local dir
    dir=$(mktemp -d)
    # global configuration: rewrite only the lines we own (-Mconf takes the name from the file)
    qconf -sconf global >"$dir/global"
    sed -i -E \
        -e 's/^min_uid .*/min_uid                      0/' \
        -e 's/^min_gid .*/min_gid                      0/' \
        -e 's/^execd_params .*/execd_params                 ENABLE_ADDGRP_KILL=true/' \
        "$dir/global"
    qconf -Mconf "$dir/global" >/dev/null 2>&1 || true  # "didn't change" is no error
    qconf -ssconf >"$dir/sched"
    sed -i -E \
        -e 's/^schedule_interval .*/schedule_interval                 0:0:1/' \
        -e 's/^flush_submit_sec .*/flush_submit_sec                  1/' \
        -e 's/^flush_finish_sec .*/flush_finish_sec                  1/' \
        "$dir/sched"
    qconf -Msconf "$dir/sched" >/dev/null 2>&1 || true
    # this host: submit host and execution host
    qconf -ss 2>/dev/null | grep -qx "$HOST" || qconf -as "$HOST" >/dev/null
    if ! qconf -se "$HOST" >/dev/null 2>&1; then
        printf 'hostname %s\nload_scaling NONE\ncomplex_values NONE\nuser_lists NONE\nxuser_lists NONE\nprojects NONE\nxprojects NONE\nusage_scaling NONE\nreport_variables NONE\n' "$HOST" >"$dir/host"
        qconf -Ae "$dir/host" >/dev/null
    fi
    # the queue: the default template with no parallel environments (none exist in a new cell) and
    # no load threshold (a busy 2-core machine would put the queue into alarm state), then ours
    if ! qconf -sq "$QUEUE" >/dev/null 2>&1; then
        { EDITOR=cat qconf -aq "$QUEUE" 2>/dev/null || true; } | grep -v '^Parallel environment' \
            | sed -E -e 's/^pe_list .*/pe_list NONE/' -e 's/^load_thresholds .*/load_thresholds NONE/' >"$dir/queue"
        qconf -Aq "$dir/queue" >/dev/null
    fi
    set_attrs queue "$QUEUE" hostlist "$HOST" slots "$SLOTS" shell /bin/bash \
        shell_start_mode unix_behavior h_rt "$H_RT" notify "$NOTIFY"
    rm -rf "$dir"
}

job_runs() {  # a real job, as the scheduler runs it
    timeout 60 qsub -sync y -b y -o /dev/null -e /dev/null -N sge-sh-ready -q "$QUEUE" /bin/true >/dev/null 2>&1
}

cmd_start() {
    need_root
    install_pkgs
    echo "$HOST localhost" >"$COMMON/host_aliases"
    mkdir -p /var/run/gridengine && chown sgeadmin:sgeadmin /var/run/gridengine
    if ! alive "$QMASTER_PID"; then
        log "starting sge_qmaster"
        /usr/sbin/sge_qmaster
    fi
    wait_for 60 "sge_qmaster to answer" qmaster_answers
    configure
    if ! alive "$(execd_pidfile)"; then
        log "starting sge_execd"
        /usr/sbin/sge_execd
    fi
    wait_for 60 "sge_execd to start" alive "$(execd_pidfile)"
    # the execd reports its load after start-up; until then the queue instance is "unknown"
    wait_for 60 "a job to run in $QUEUE" job_runs
    log "cell up: queue $QUEUE@$HOST, $SLOTS slots"
}

stop_pid() {  # stop_pid PIDFILE NAME
    local pidfile=$1 name=$2 pid i
    alive "$pidfile" || return 0
    pid=$(cat "$pidfile")
    log "stopping $name ($pid)"
    kill "$pid" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do
        pid_alive "$pid" || return 0
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
}

cmd_stop() {
    need_root
    if qmaster_answers; then
        qdel -u '*' >/dev/null 2>&1 || true
    fi
    stop_pid "$(execd_pidfile)" sge_execd
    stop_pid "$QMASTER_PID" sge_qmaster
}

cmd_status() {
    local up=0
    if alive "$QMASTER_PID"; then echo "sge_qmaster: running ($(cat "$QMASTER_PID"))"; up=1; else echo "sge_qmaster: stopped"; fi
    if alive "$(execd_pidfile)"; then echo "sge_execd: running ($(cat "$(execd_pidfile)"))"; else echo "sge_execd: stopped"; fi
    if [ $up = 1 ]; then timeout 10 qstat -f -q "$QUEUE" 2>&1 || true; fi
}

case "${1:-}" in
    install) install_pkgs ;;
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    *) die "usage: $0 install|start|stop|status" ;;
esac
