#!/usr/bin/env bash
# A real single-node Slurm for tests (Debian 12 / Slurm 22.05), run as root without systemd.
#
#   tests/slurm/start_slurm.sh start   install (when missing) and start munge, MariaDB, slurmdbd,
#                                      slurmctld, slurmd; wait until `sinfo` shows the node idle
#   tests/slurm/start_slurm.sh stop    stop exactly the daemons `start` started (by their PIDs)
#   tests/slurm/start_slurm.sh status  exit 0 when the cluster answers and the node is up
#
# Variables (all optional):
#   MASPO_SLURM_STATE   state dir: pids, logs, spool, database (default /tmp/maspo_slurm)
#   MASPO_SLURM_DB_PORT MariaDB TCP port on 127.0.0.1 (default 13306, away from a system MySQL)
#   MASPO_SLURM_CLUSTER cluster name (default maspo)
#
# Why each daemon: munge authenticates every Slurm RPC; slurmdbd + MariaDB give `sacct`, which
# nemo-run polls for job state (without it nemo-run reports UNKNOWN). Config goes to /etc/slurm,
# where sbatch/srun/sacct look by default, so no SLURM_CONF has to travel into jobs.
# Exit status is non-zero with a one-line reason on stderr when anything cannot be set up.
set -euo pipefail

STATE="${MASPO_SLURM_STATE:-/tmp/maspo_slurm}"
DB_PORT="${MASPO_SLURM_DB_PORT:-13306}"
CLUSTER="${MASPO_SLURM_CLUSTER:-maspo}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PACKAGES=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)
DB_PASS="maspo-test-only"

die() { echo "start_slurm: $*" >&2; exit 1; }
log() { echo "start_slurm: $*" >&2; }

need_root() { [ "$(id -u)" = 0 ] || die "must run as root (it installs packages and runs the daemons)"; }

install_if_missing() {
    local missing=0 bin
    for bin in slurmctld slurmd sbatch sacct munged mungekey slurmdbd mariadbd mariadb-install-db; do
        command -v "$bin" >/dev/null 2>&1 || missing=1
    done
    [ "$missing" = 0 ] && return 0
    command -v apt-get >/dev/null 2>&1 || die "Slurm is not installed and apt-get is not available"
    log "installing ${PACKAGES[*]} with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >"$STATE/apt.log" 2>&1 || die "apt-get update failed (see $STATE/apt.log)"
    # unsafe-io: no fsync per unpacked file (fine on a throwaway test machine)
    apt-get install -y -qq --no-install-recommends -o Dpkg::Options::=--force-unsafe-io "${PACKAGES[@]}" \
        >>"$STATE/apt.log" 2>&1 \
        || die "apt-get install ${PACKAGES[*]} failed (see $STATE/apt.log)"
}

# Runs "$@" in the background, stdout/stderr to $STATE/log/<name>.log, pid to $STATE/pid/<name>.
spawn() {
    local name="$1"; shift
    setsid "$@" >"$STATE/log/$name.log" 2>&1 < /dev/null &
    echo $! >"$STATE/pid/$name"
}

# wait_for SECONDS DESCRIPTION COMMAND...: polls COMMAND every 0.2 s.
wait_for() {
    local timeout_s="$1" what="$2"; shift 2
    local deadline=$((SECONDS + timeout_s))
    until "$@" >/dev/null 2>&1; do
        [ "$SECONDS" -lt "$deadline" ] || die "timed out after ${timeout_s}s waiting for $what (logs: $STATE/log)"
        sleep 0.2
    done
}

start_munge() {
    mkdir -p /etc/munge /run/munge /var/lib/munge /var/log/munge
    [ -s /etc/munge/munge.key ] || mungekey --create --force >/dev/null
    chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge
    chmod 0400 /etc/munge/munge.key
    chmod 0755 /run/munge
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        return 0  # a munged is already serving this key (e.g. the machine's own)
    fi
    spawn munged setpriv --reuid=munge --regid=munge --init-groups munged --foreground --force
    wait_for 15 "munged" sh -c 'munge -n | unmunge'
}

start_mariadb() {
    local datadir="$STATE/mysql" sock="$STATE/mysqld.sock"
    mariadb-install-db --no-defaults --datadir="$datadir" --user=root --auth-root-authentication-method=socket \
        --skip-test-db >"$STATE/log/mariadb-install.log" 2>&1 || die "mariadb-install-db failed (see $STATE/log/mariadb-install.log)"
    spawn mariadbd mariadbd --no-defaults --user=root --datadir="$datadir" --socket="$sock" \
        --port="$DB_PORT" --bind-address=127.0.0.1 --pid-file="$STATE/mysqld.pid" --skip-log-bin \
        --innodb-buffer-pool-size=32M --innodb-log-file-size=8M
    wait_for 30 "mariadbd on port $DB_PORT" mariadb --no-defaults --socket="$sock" -uroot -e 'SELECT 1'
    mariadb --no-defaults --socket="$sock" -uroot -e "
        CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
        CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
        GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
        GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';" || die "could not create the slurm database user"
}

write_configs() {
    local host node_line mem_mb
    host="$(hostname -s)"
    # slurmd -C prints the node's real shape; keep its CPU/socket/core counts, drop UpTime, and
    # declare a bit less memory than exists so the node never drains for "low RealMemory".
    node_line="$(slurmd -C | head -n1 | sed -e 's/ UpTime=.*//' -e 's/ RealMemory=[0-9]*//')"
    mem_mb="$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)"
    mkdir -p /etc/slurm
    sed -e "s|@HOST@|$host|g" -e "s|@STATE@|$STATE|g" -e "s|@CLUSTER@|$CLUSTER|g" \
        -e "s|@NODE_LINE@|$node_line RealMemory=$mem_mb NodeAddr=127.0.0.1 State=UNKNOWN|" \
        "$HERE/slurm.conf.in" >/etc/slurm/slurm.conf
    sed -e "s|@STATE@|$STATE|g" -e "s|@DB_PORT@|$DB_PORT|g" -e "s|@DB_PASS@|$DB_PASS|g" \
        "$HERE/slurmdbd.conf.in" >/etc/slurm/slurmdbd.conf
    chmod 0600 /etc/slurm/slurmdbd.conf
}

node_idle() { sinfo -h -N -o '%t' 2>/dev/null | grep -qE '^(idle|mix|alloc)'; }

start() {
    need_root
    if [ -f "$STATE/pid/slurmctld" ] && status >/dev/null 2>&1; then
        log "already running (state $STATE)"; return 0
    fi
    stop >/dev/null 2>&1 || true
    rm -rf "$STATE"
    mkdir -p "$STATE/log" "$STATE/pid" "$STATE/ctld" "$STATE/spool" "$STATE/jobs"
    local t0=$SECONDS
    install_if_missing
    log "packages ready after $((SECONDS - t0)) s"
    t0=$SECONDS
    start_munge
    start_mariadb
    write_configs
    spawn slurmdbd slurmdbd -D
    wait_for 30 "slurmdbd" sacctmgr -n list cluster
    sacctmgr -i add cluster "$CLUSTER" >/dev/null 2>&1 || true
    spawn slurmctld slurmctld -D -i
    spawn slurmd slurmd -D
    wait_for 30 "the node to become idle in sinfo" node_idle
    wait_for 30 "sacct to answer" sacct -n -X
    log "up after $((SECONDS - t0)) s more: $(sinfo -h -o '%P %a %D %t')"
}

status() { node_idle && sacct -n -X >/dev/null 2>&1; }

stop() {
    local name pid
    for name in slurmd slurmctld slurmdbd mariadbd munged; do
        [ -f "$STATE/pid/$name" ] || continue
        pid="$(cat "$STATE/pid/$name")"
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
        rm -f "$STATE/pid/$name"
    done
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) die "usage: $0 start|stop|status" ;;
esac
