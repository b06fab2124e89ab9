#!/usr/bin/env bash
# A real Slurm cluster (with accounting) for kislurm's tests on this one machine, all under one base folder:
# one slurmctld, slurmdbd with MariaDB, and N slurmd "nodes" (Debian's slurmd runs several per host: `slurmd -N`).
#
# Usage: tools/slurm_cluster.sh start [--nodes N] | stop | status
#
#   start   install the Debian packages if missing (slurmctld slurmd slurm-client munge slurmdbd mariadb-server),
#           then configure and start munged, MariaDB, slurmdbd, slurmctld and N slurmd on loopback. Idempotent:
#           running daemons are left alone. Waits until every node is up and sacct works, then writes $BASE/env.sh.
#           When the configuration changed (another MaxArraySize, port or node count) it rewrites it and restarts
#           the daemons that read it; job state and the accounting database are kept, and running jobs survive.
#           --nodes N (default: $KISLURM_SLURM_NODES, else 1). One node is named after `hostname -s`; with N > 1
#           the nodes are kn1..knN, each its own slurmd with its own port, spool, pid and log file (%n in
#           slurm.conf), and a marked block in /etc/hosts maps kn1..knN to 127.0.0.1 so a rendezvous on the first
#           node's name (submitit's MASTER_ADDR) resolves, as node names do on a real cluster.
#   stop    stop the daemons by the PIDs in their pid files (never by name) and remove the hosts block; the base
#           folder is kept.
#   status  exit 0 when every daemon runs and the controller answers, 1 otherwise.
#
# Environment:
#   KISLURM_SLURM_BASE            base folder for config, state, logs, pids, sockets and the database
#                                 (default /tmp/kislurm-slurm); daemon logs are in $BASE/log
#   KISLURM_SLURM_MAX_ARRAY_SIZE  MaxArraySize (default 1001, Slurm's): array task indices must be below it. A start
#                                 with a value other than the running cluster's restarts slurmctld and slurmd (~6 s):
#                                   KISLURM_SLURM_MAX_ARRAY_SIZE=3 tools/slurm_cluster.sh start   # arrays 0..2 only
#                                   tools/slurm_cluster.sh start                                  # back to 1001
#   KISLURM_SLURM_PORT            first of the loopback TCP ports: slurmctld, the first slurmd, slurmdbd, MariaDB,
#                                 then one more per extra node (default 6817, so 6817..6820 for one node and
#                                 6817..6821 for two)
#   KISLURM_SLURM_NODES           node count when --nodes is not given (default 1); kept in env.sh
#   KISLURM_SLURM_FIRST_JOB_ID    FirstJobId (default 1) for a new cluster: two clusters on one host need apart ranges,
#                                 since submitit derives a job's MASTER_PORT from its job id (tools/dev test starts a
#                                 second cluster for half the Slurm tests at 500000)
#   KISLURM_SLURM_JOB_REQUEUE     JobRequeue (default 1); 0 makes a cluster that refuses to requeue jobs, as some
#                                 sites do (a start with another value restarts slurmctld and slurmd, like MaxArraySize)
#
# Partitions: `main` (the default) and `urgent`, whose jobs preempt main's (PreemptType=preempt/partition_prio,
# PreemptMode=REQUEUE): the running job gets SIGTERM, SIGKILL KillWait (15 s) later, and is requeued by Slurm.
#
# Behaviour worth knowing (Slurm 22.05 as packaged in Debian 12):
#   - a requeued job (e.g. submitit's `scontrol requeue` after the timeout signal) may start again 10 s later
#     (AuthInfo cred_expire, 120 s by default);
#   - `--signal=SIG@S` is sent at the controller's 30-s periodic check once the job has under S + 30 s left, so with
#     a 1-minute limit submitit's default USR2@90 arrives 0-30 s after the start, possibly before Python has installed
#     submitit's handler (the task then dies of USR2); USR2@5 arrives 25-55 s in;
#   - `scontrol reconfigure` does not change MaxArraySize once an array was submitted; a restart does.
#
# Clients need SLURM_CONF: `. "$BASE/env.sh"` after start. Must run as root (the daemons run as root).
set -euo pipefail

readonly PACKAGES=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)
readonly DB_USER=slurm
readonly DB_NAME=slurm_acct_db
readonly CLUSTER_NAME=kislurm
readonly DEFAULT_MAX_ARRAY_SIZE=1001
readonly WAIT_S=60
# AuthInfo cred_expire: also how long a requeued job waits before it may start again (Slurm default 120 s).
readonly REQUEUE_DELAY_S=10
# KillWait: seconds between SIGTERM and SIGKILL (Slurm's default is 30). A cell saves at the step after SIGTERM, so a
# tiny test cell needs a few seconds on a loaded machine; 15 s leaves it a wide margin.
readonly KILL_WAIT_S=15
readonly PREEMPT_PARTITION=urgent

BASE=${KISLURM_SLURM_BASE:-/tmp/kislurm-slurm}
MAX_ARRAY_SIZE=${KISLURM_SLURM_MAX_ARRAY_SIZE:-$DEFAULT_MAX_ARRAY_SIZE}
PORT=${KISLURM_SLURM_PORT:-6817}
NODES=${KISLURM_SLURM_NODES:-1}
JOB_REQUEUE=${KISLURM_SLURM_JOB_REQUEUE:-1}
FIRST_JOB_ID=${KISLURM_SLURM_FIRST_JOB_ID:-1}
readonly HOSTS_FILE=/etc/hosts

log() { printf 'slurm_cluster: %s\n' "$*" >&2; }
die() { printf 'slurm_cluster: error: %s\n' "$*" >&2; exit 1; }

now_s() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now_s)" 'BEGIN { printf "%.1f", b - a }'; }

# ---------------------------------------------------------------------------------------------------------------------
# paths

set_paths() {
    [[ "$BASE" == /* ]] || BASE="$(pwd)/$BASE"
    BASE="${BASE%/}"
    ETC="$BASE/etc"; RUN="$BASE/run"; LOG="$BASE/log"; STATE="$BASE/state"; DB="$BASE/mariadb"
    CONF="$ETC/slurm.conf"; DBD_CONF="$ETC/slurmdbd.conf"
    MUNGE_KEY="$ETC/munge.key"; MUNGE_SOCKET="$RUN/munge.socket"
    DB_SOCKET="$RUN/mariadb.sock"; DB_PASS_FILE="$ETC/db.pass"
    CTLD_PORT=$PORT; DBD_PORT=$((PORT + 2)); DB_PORT=$((PORT + 3))
    HOSTS_BEGIN="# kislurm test cluster $BASE: begin"; HOSTS_END="# kislurm test cluster $BASE: end"
    export SLURM_CONF="$CONF"
}

# The node names: the host's own for one node, kn1..knN for several.
node_names() {
    local i
    if ((NODES == 1)); then hostname -s; else for ((i = 1; i <= NODES; i++)); do echo "kn$i"; done; fi
}

# slurmd port of node i (1-based): the first node keeps PORT+1, extra nodes follow MariaDB's port.
slurmd_port() { if (($1 == 1)); then echo $((PORT + 1)); else echo $((PORT + 2 + $1)); fi; }

# The daemons of this cluster, as pid-file names: one slurmd@NODE per node.
daemons() {
    local n
    echo munged mariadb slurmdbd slurmctld
    for n in $(node_names); do echo "slurmd@$n"; done
}

# pid file of each daemon, and its /proc/<pid>/comm (checked so a stale pid file never names another process)
pid_file() { echo "$RUN/$1.pid"; }
comm_of() {
    case "$1" in
        munged) echo munged ;; mariadb) echo mariadbd ;; slurmdbd) echo slurmdbd ;;
        slurmctld) echo slurmctld ;; slurmd@*) echo slurmd ;;
    esac
}

# Prints the daemon's pid when its pid file names a live process of the right program.
running_pid() {
    local f pid
    f="$(pid_file "$1")"
    [[ -s "$f" ]] || return 1
    pid="$(tr -dc '0-9' <"$f")"
    [[ -n "$pid" && -r "/proc/$pid/comm" ]] || return 1
    [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == "$(comm_of "$1")" ]] || return 1
    echo "$pid"
}

is_running() { running_pid "$1" >/dev/null; }

# ---------------------------------------------------------------------------------------------------------------------
# checks

validate_env() {
    if ! [[ "$MAX_ARRAY_SIZE" =~ ^[0-9]{1,7}$ ]] || ! ((10#$MAX_ARRAY_SIZE >= 1 && 10#$MAX_ARRAY_SIZE <= 4000001)); then
        die "KISLURM_SLURM_MAX_ARRAY_SIZE='$MAX_ARRAY_SIZE' is not an integer in 1..4000001; fix: unset it, or e.g. 3"
    fi
    [[ "$FIRST_JOB_ID" =~ ^[1-9][0-9]{0,7}$ ]] ||
        die "KISLURM_SLURM_FIRST_JOB_ID='$FIRST_JOB_ID' is not an integer in 1..99999999; fix: unset it, or e.g. 500000"
    if ! [[ "$NODES" =~ ^[0-9]{1,2}$ ]] || ! ((10#$NODES >= 1 && 10#$NODES <= 16)); then
        die "--nodes / KISLURM_SLURM_NODES='$NODES' is not an integer in 1..16; fix: e.g. --nodes 2"
    fi
    NODES=$((10#$NODES))
    [[ "$JOB_REQUEUE" == 0 || "$JOB_REQUEUE" == 1 ]] ||
        die "KISLURM_SLURM_JOB_REQUEUE='$JOB_REQUEUE' is not 0 or 1; fix: unset it (default 1)"
    if ! [[ "$PORT" =~ ^[0-9]{1,5}$ ]] || ! ((10#$PORT >= 1024 && 10#$PORT <= 65500)); then
        die "KISLURM_SLURM_PORT='$PORT' is not a port in 1024..65500; fix: unset it (default 6817) or pick a free one"
    fi
    [[ "$BASE" =~ ^[A-Za-z0-9_./+-]+$ ]] ||
        die "KISLURM_SLURM_BASE='$BASE' has characters slurm.conf cannot hold (spaces...); fix: use a plain path"
    MAX_ARRAY_SIZE=$((10#$MAX_ARRAY_SIZE))
    PORT=$((10#$PORT))
}

require_root() {
    [[ "$(id -u)" -eq 0 ]] || die "must run as root (the Slurm daemons run as SlurmUser=root); fix: sudo $0 $*"
}

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# A port is an error only when our own daemon for it is not the one holding it.
check_port_free() {
    local port=$1 daemon=$2
    is_running "$daemon" && return 0
    if port_in_use "$port"; then
        die "port $port (for $daemon) is already in use by another process;" \
            "fix: stop it, or set KISLURM_SLURM_PORT to the first of 4 free ports"
    fi
}

# Checked before anything starts, so a busy port never leaves half a cluster behind.
check_ports_free() {
    local i=1 n
    check_port_free "$CTLD_PORT" slurmctld
    for n in $(node_names); do check_port_free "$(slurmd_port $i)" "slurmd@$n"; i=$((i + 1)); done
    check_port_free "$DBD_PORT" slurmdbd
    check_port_free "$DB_PORT" mariadb
}

# ---------------------------------------------------------------------------------------------------------------------
# packages

missing_packages() {
    local p
    for p in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q '^install ok installed$' || echo "$p"
    done
}

POLICY_GUARD=""
remove_policy_guard() { [[ -n "$POLICY_GUARD" ]] && rm -f "$POLICY_GUARD"; POLICY_GUARD=""; }

ensure_packages() {
    local missing t0 apt_log="$LOG/apt.log"
    mapfile -t missing < <(missing_packages)
    ((${#missing[@]} == 0)) && return 0
    command -v apt-get >/dev/null ||
        die "packages missing (${missing[*]}) and no apt-get; fix: install them with your package manager"
    t0="$(now_s)"
    log "installing ${missing[*]} (log: $apt_log)"
    # Keep package scripts from starting system-wide daemons (munge, mariadb, slurm) outside the base folder.
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        POLICY_GUARD=/usr/sbin/policy-rc.d
        trap remove_policy_guard EXIT
    fi
    local apt=(env DEBIAN_FRONTEND=noninteractive apt-get -y -qq -o Dpkg::Options::=--force-confdef
        -o Dpkg::Options::=--force-confold install --no-install-recommends "${missing[@]}")
    if ! "${apt[@]}" >>"$apt_log" 2>&1; then
        log "apt-get install failed; running apt-get update and retrying"
        apt-get update -qq >>"$apt_log" 2>&1 || die "apt-get update failed; see $apt_log"
        "${apt[@]}" >>"$apt_log" 2>&1 || die "apt-get install ${missing[*]} failed; see $apt_log"
    fi
    remove_policy_guard
    log "installed packages in $(elapsed "$t0") s"
}

# ---------------------------------------------------------------------------------------------------------------------
# configuration

# Binding to loopback only works when the host name resolves to a 127.x address (slurm binds to what it resolves).
hostname_is_loopback() {
    local addr
    addr="$(getent ahostsv4 "$(hostname -s)" 2>/dev/null | awk 'NR == 1 { print $1 }')"
    [[ "$addr" == 127.* ]]
}

# Memory each node may offer: the machine's, shared out between the nodes (CR_Core: not enforced).
real_memory_mb() { awk -v n="$NODES" '/^MemTotal:/ { printf "%d", $2 / 1024 * 0.9 / n }' /proc/meminfo; }

# Node lines: one slurmd per node on this host (NodeHostname), each with its own port. A lone node offers 2 CPUs
# (this machine's); with several, each offers 4, so that one node can hold a whole TP=2 x DP=2 cell and two nodes
# can hold 2 ranks each (the nodes then oversubscribe this host's cores: slower, same results).
render_nodes() {
    local i=1 n host cpus=2
    host="$(hostname -s)"
    ((NODES > 1)) && cpus=4
    for n in $(node_names); do
        echo "NodeName=$n NodeHostname=$host NodeAddr=127.0.0.1 Port=$(slurmd_port $i) CPUs=$cpus RealMemory=$(real_memory_mb) State=UNKNOWN"
        i=$((i + 1))
    done
    echo "PartitionName=main Nodes=$(node_names | paste -sd,) Default=YES MaxTime=INFINITE State=UP PriorityTier=1"
    # A job here preempts the main partition's jobs: SIGTERM, then SIGKILL after KillWait, then Slurm requeues them
    # (PreemptMode=REQUEUE), as a site that preempts without a warning signal does.
    echo "PartitionName=$PREEMPT_PARTITION Nodes=$(node_names | paste -sd,) MaxTime=INFINITE State=UP PriorityTier=2"
}

render_slurm_conf() {
    local node comm=""
    node="$(hostname -s)"
    hostname_is_loopback && comm="CommunicationParameters=NoCtldInAddrAny,NoInAddrAny"
    cat <<EOF
# Written by tools/slurm_cluster.sh; rewritten on every start.
ClusterName=$CLUSTER_NAME
SlurmctldHost=$node(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$(slurmd_port 1)
$comm
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=$REQUEUE_DELAY_S
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$STATE/slurmctld
SlurmdSpoolDir=$STATE/slurmd@%n
SlurmctldPidFile=$(pid_file slurmctld)
SlurmdPidFile=$RUN/slurmd@%n.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd@%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
SlurmdParameters=config_overrides
MpiDefault=none
ReturnToService=2
MailProg=/bin/true
KillWait=$KILL_WAIT_S
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
MinJobAge=300
JobRequeue=$JOB_REQUEUE
FirstJobId=$FIRST_JOB_ID
MaxArraySize=$MAX_ARRAY_SIZE
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$DBD_PORT
AccountingStoragePass=$MUNGE_SOCKET
JobCompType=jobcomp/none
$(render_nodes)
EOF
}

render_slurmdbd_conf() {
    local comm=""
    hostname_is_loopback && comm="CommunicationParameters=NoInAddrAny"
    cat <<EOF
# Written by tools/slurm_cluster.sh; rewritten on every start.
$comm
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
PidFile=$(pid_file slurmdbd)
LogFile=$LOG/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=$DB_USER
StoragePass=$(cat "$DB_PASS_FILE")
StorageLoc=$DB_NAME
EOF
}

# Writes $2 from stdin atomically with mode $1; prints "changed" when the content differs from before.
write_if_changed() {
    local mode=$1 dest=$2 tmp
    tmp="$(mktemp "$dest.XXXXXX")"
    cat >"$tmp"
    chmod "$mode" "$tmp"
    if [[ -f "$dest" ]] && cmp -s "$tmp" "$dest"; then
        rm -f "$tmp"
    else
        mv -f "$tmp" "$dest"
        echo changed
    fi
}

make_dirs() {
    mkdir -p "$BASE"
    chmod 755 "$BASE"
    mkdir -p "$ETC" "$RUN" "$LOG" "$STATE/slurmctld" "$DB"
    local n
    for n in $(node_names); do mkdir -p "$STATE/slurmd@$n"; done
    chmod 755 "$ETC" "$RUN"
    chmod 700 "$DB"
}

ensure_secrets() {
    if [[ ! -s "$MUNGE_KEY" ]]; then
        rm -f "$MUNGE_KEY"
        mungekey --create --keyfile="$MUNGE_KEY" >>"$LOG/munged.log" 2>&1 ||
            die "mungekey --create failed; see $LOG/munged.log"
    fi
    chmod 600 "$MUNGE_KEY"
    if [[ ! -s "$DB_PASS_FILE" ]]; then
        (umask 077 && head -c 18 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' >"$DB_PASS_FILE.tmp")
        mv -f "$DB_PASS_FILE.tmp" "$DB_PASS_FILE"
    fi
}

# ---------------------------------------------------------------------------------------------------------------------
# waiting

# wait_until DESCRIPTION LOGFILE COMMAND...: retry COMMAND until it succeeds or WAIT_S seconds pass.
wait_until() {
    local what=$1 logfile=$2 deadline
    shift 2
    deadline=$((SECONDS + WAIT_S))
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || die "timed out after ${WAIT_S}s waiting for $what; see $logfile"
        sleep 0.2
    done
}

# True when every node of this cluster is up (idle, mix or alloc) in sinfo.
nodes_up() {
    local states n
    states="$(timeout 10 sinfo -h -N -o '%N %t' 2>/dev/null)" || return 1
    for n in $(node_names); do
        grep -Eq "^$n (idle|mix|alloc)\$" <<<"$states" || return 1
    done
}

cluster_registered() {
    timeout 10 sacctmgr -n -P list cluster format=cluster 2>/dev/null | grep -qx "$CLUSTER_NAME"
}

# ---------------------------------------------------------------------------------------------------------------------
# daemons

# Closes every descriptor above 2 of the current (sub)shell: our lock, and any pipe of a calling CI step that would
# otherwise wait for the daemon to exit.
close_inherited_fds() {
    local fd
    for fd in "/proc/$BASHPID/fd/"*; do
        fd=${fd##*/}
        ((fd > 2)) && eval "exec $fd>&-" 2>/dev/null
    done
    return 0
}

# launch LOGFILE COMMAND...: run COMMAND (which daemonizes itself) with stdin /dev/null, output to LOGFILE.
launch() {
    local logfile=$1
    shift
    (close_inherited_fds && exec "$@" </dev/null >>"$logfile" 2>&1)
}

# launch_detached LOGFILE COMMAND...: the same for a COMMAND that stays in the foreground: it runs in the background,
# in its own session, with no shell process left waiting for it.
launch_detached() {
    local logfile=$1
    shift
    (close_inherited_fds && exec setsid "$@" </dev/null >>"$logfile" 2>&1) &
}

start_munged() {
    is_running munged && return 0
    rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock"
    launch "$LOG/munged.log" munged --key-file="$MUNGE_KEY" --socket="$MUNGE_SOCKET" --pid-file="$(pid_file munged)" \
        --log-file="$LOG/munged.log" --seed-file="$STATE/munged.seed" ||
        die "munged failed to start; see $LOG/munged.log"
    wait_until "munged" "$LOG/munged.log" munge -n -S "$MUNGE_SOCKET"
}

db_sql() { mariadb --no-defaults -u root -S "$DB_SOCKET" -e "$1"; }

start_mariadb() {
    if ! is_running mariadb; then
        if [[ ! -d "$DB/data/mysql" ]]; then
            rm -rf "$DB/data"
            launch "$LOG/mariadb-install.log" mariadb-install-db --no-defaults --user=root --datadir="$DB/data" \
                --skip-test-db --auth-root-authentication-method=socket ||
                die "mariadb-install-db failed; see $LOG/mariadb-install.log"
        fi
        check_port_free "$DB_PORT" mariadb
        launch_detached "$LOG/mariadb.log" mariadbd --no-defaults --user=root --datadir="$DB/data" \
            --socket="$DB_SOCKET" --pid-file="$(pid_file mariadb)" --port="$DB_PORT" --bind-address=127.0.0.1 \
            --skip-name-resolve --log-error="$LOG/mariadb.log" --innodb-buffer-pool-size=1G \
            --innodb-lock-wait-timeout=900
        wait_until "MariaDB" "$LOG/mariadb.log" mariadb-admin --no-defaults -u root -S "$DB_SOCKET" ping
        wait_until "MariaDB pid file" "$LOG/mariadb.log" is_running mariadb
    fi
    local pass
    pass="$(cat "$DB_PASS_FILE")"
    db_sql "CREATE USER IF NOT EXISTS '$DB_USER'@'127.0.0.1' IDENTIFIED BY '$pass';
            ALTER USER '$DB_USER'@'127.0.0.1' IDENTIFIED BY '$pass';
            GRANT ALL ON $DB_NAME.* TO '$DB_USER'@'127.0.0.1';" >>"$LOG/mariadb.log" 2>&1 ||
        die "could not create the MariaDB user '$DB_USER'; see $LOG/mariadb.log"
}

start_slurmdbd() {
    is_running slurmdbd && return 0
    check_port_free "$DBD_PORT" slurmdbd
    launch "$LOG/slurmdbd.log" slurmdbd || die "slurmdbd failed to start; see $LOG/slurmdbd.log"
    wait_until "slurmdbd" "$LOG/slurmdbd.log" timeout 10 sacctmgr -n list cluster
}

start_slurmctld() {
    is_running slurmctld && return 0
    check_port_free "$CTLD_PORT" slurmctld
    launch "$LOG/slurmctld.log" slurmctld || die "slurmctld failed to start; see $LOG/slurmctld.log"
    wait_until "slurmctld" "$LOG/slurmctld.log" timeout 10 scontrol ping
}

start_slurmds() {
    local i=1 n
    for n in $(node_names); do
        if ! is_running "slurmd@$n"; then
            check_port_free "$(slurmd_port $i)" "slurmd@$n"
            launch "$LOG/slurmd@$n.log" slurmd -N "$n" || die "slurmd -N $n failed to start; see $LOG/slurmd@$n.log"
        fi
        i=$((i + 1))
    done
}

# Slurmd daemons of any node count (a restart with fewer nodes must still stop the others), by their pid files.
all_slurmds() {
    local f
    for f in "$RUN"/slurmd@*.pid; do [[ -e "$f" ]] && basename "$f" .pid; done
    return 0
}

# /etc/hosts block mapping the node names to loopback (several nodes only); written in place, since /etc/hosts
# may be a bind mount that a rename cannot replace.
remove_hosts_block() {
    [[ -w "$HOSTS_FILE" ]] && grep -qF "$HOSTS_BEGIN" "$HOSTS_FILE" || return 0
    local kept
    kept="$(awk -v b="$HOSTS_BEGIN" -v e="$HOSTS_END" '$0 == b { skip = 1 } !skip { print } $0 == e { skip = 0 }' \
        "$HOSTS_FILE")"
    printf '%s\n' "$kept" >"$HOSTS_FILE"
}

write_hosts_block() {
    remove_hosts_block
    ((NODES > 1)) || return 0
    [[ -w "$HOSTS_FILE" ]] || die "$HOSTS_FILE is not writable; fix: run as root, or use --nodes 1"
    printf '%s\n127.0.0.1 %s\n%s\n' "$HOSTS_BEGIN" "$(node_names | paste -sd' ')" "$HOSTS_END" >>"$HOSTS_FILE"
}

# stop_daemons NAME...: SIGTERM to each by the pid in its pid file, wait for all (SIGKILL after 30 s).
stop_daemons() {
    local name pid i pids=() names=()
    for name in "$@"; do
        if pid="$(running_pid "$name")"; then
            kill -TERM "$pid" 2>/dev/null || true
            pids+=("$pid")
            names+=("$name")
        fi
    done
    for ((i = 0; i < ${#pids[@]}; i++)); do
        wait_gone "${pids[i]}" 30 || {
            log "${names[i]} (pid ${pids[i]}) ignored SIGTERM for 30 s; sending SIGKILL"
            kill -KILL "${pids[i]}" 2>/dev/null || true
            wait_gone "${pids[i]}" 5 || true
        }
    done
    for name in "$@"; do rm -f "$(pid_file "$name")"; done
}

# wait_gone PID SECONDS: true once PID has exited.
wait_gone() {
    local pid=$1 deadline=$((SECONDS + $2))
    while kill -0 "$pid" 2>/dev/null; do
        ((SECONDS < deadline)) || return 1
        sleep 0.1
    done
}

# ---------------------------------------------------------------------------------------------------------------------
# commands

all_running() {
    local d
    for d in $(daemons); do is_running "$d" || return 1; done
}

write_env_sh() {
    write_if_changed 644 "$BASE/env.sh" >/dev/null <<EOF
# Written by tools/slurm_cluster.sh start: source it before using Slurm clients.
export SLURM_CONF=$(printf %q "$CONF")
export KISLURM_SLURM_BASE=$(printf %q "$BASE")
export KISLURM_SLURM_PORT=$PORT
export KISLURM_SLURM_NODES=$NODES
export KISLURM_SLURM_FIRST_JOB_ID=$FIRST_JOB_ID
EOF
}

current_array_size() { timeout 10 scontrol show config 2>/dev/null | awk '$1 == "MaxArraySize" { print $3 }'; }

cmd_start() {
    local t0 slurm_changed dbd_changed
    t0="$(now_s)"
    require_root start
    make_dirs
    ensure_packages
    ensure_secrets
    slurm_changed="$(render_slurm_conf | write_if_changed 644 "$CONF")"
    dbd_changed="$(render_slurmdbd_conf | write_if_changed 600 "$DBD_CONF")"
    if all_running && [[ -z "$slurm_changed$dbd_changed" ]] && timeout 10 scontrol ping >/dev/null 2>&1; then
        write_env_sh
        log "already running (base $BASE, MaxArraySize=$MAX_ARRAY_SIZE)"
        return 0
    fi
    if [[ -n "$slurm_changed$dbd_changed" ]]; then
        # Restart (not `scontrol reconfigure`): slurmctld 22.05 keeps the MaxArraySize it saw at the first array
        # submission, so only a restart changes it. Running and pending jobs survive the restart.
        stop_daemons $(all_slurmds) slurmctld
    fi
    if [[ -n "$dbd_changed" ]]; then  # its database port or password may have changed too
        stop_daemons slurmdbd
        stop_daemons mariadb
    fi
    check_ports_free
    write_hosts_block
    start_munged
    start_mariadb
    start_slurmdbd
    start_slurmctld
    start_slurmds
    wait_until "the $NODES node(s) to be up in sinfo" "$LOG/slurmctld.log" nodes_up
    wait_until "slurmctld to register cluster $CLUSTER_NAME in accounting" "$LOG/slurmctld.log" cluster_registered
    wait_until "sacct" "$LOG/slurmdbd.log" timeout 10 sacct -n -X -S now
    write_env_sh
    log "up in $(elapsed "$t0") s ($NODES node(s): $(node_names | paste -sd' '); base $BASE," \
        "MaxArraySize=$MAX_ARRAY_SIZE); clients: . $BASE/env.sh"
}

cmd_stop() {
    require_root stop
    # controller and node first, then accounting, then the database and munge they use
    stop_daemons $(all_slurmds) slurmctld
    stop_daemons slurmdbd
    stop_daemons mariadb munged
    remove_hosts_block
    log "stopped (state kept in $BASE)"
}

cmd_status() {
    local d down=()
    for d in $(daemons); do is_running "$d" || down+=("$d"); done
    if ((${#down[@]})); then
        log "down: ${down[*]} not running (base $BASE); fix: tools/slurm_cluster.sh start"
        return 1
    fi
    if ! timeout 10 scontrol ping >/dev/null 2>&1; then
        log "down: slurmctld does not answer; see $LOG/slurmctld.log"
        return 1
    fi
    log "up: nodes $(timeout 10 sinfo -h -N -o '%N=%t' 2>/dev/null | paste -sd' '), MaxArraySize=$(current_array_size)," \
        "base $BASE"
}

main() {
    local cmd=${1:-}
    shift || true
    while (($#)); do
        case "$1" in
            --nodes) NODES=${2:-}; shift 2 || die "--nodes needs a value, e.g. --nodes 2" ;;
            --nodes=*) NODES=${1#--nodes=}; shift ;;
            *) die "unknown argument '$1'; usage: $0 start [--nodes N] | stop | status" ;;
        esac
    done
    validate_env
    set_paths
    case "$cmd" in
        start | stop)
            mkdir -p "$BASE"
            exec 9>"$BASE/.lock"
            flock -w 600 9 || die "another tools/slurm_cluster.sh holds $BASE/.lock for over 600 s"
            "cmd_$cmd"
            ;;
        status) cmd_status ;;
        *) die "usage: $0 start [--nodes N] | stop | status (got '${cmd}')" ;;
    esac
}

main "$@"
