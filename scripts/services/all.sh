#!/usr/bin/env bash
# Start/stop every service of the service-test tier (Kafka, ClickHouse, S3 via moto, Prometheus) and
# write one env file the tests read.
#
#   scripts/services/all.sh start     # starts them in parallel; prints the env; writes $STATE_DIR/services.env
#   scripts/services/all.sh stop      # stops them (data and ports kept); removes services.env
#   scripts/services/all.sh clean     # stops them and deletes their state
#   scripts/services/all.sh status|env|restart
#
#   eval "$(scripts/services/all.sh start)"    # or: set -a; . /tmp/alphaengine-services/services.env; set +a
#
# Environment (all optional): STATE_DIR (/tmp/alphaengine-services), SERVICES (which ones, default
# "kafka clickhouse s3 prometheus"), PROMETHEUS_CONFIG, and each script's own variables (KAFKA_PORT, ...).
set -euo pipefail
# shellcheck source=scripts/services/_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
SERVICE=all
SERVICES="${SERVICES:-kafka clickhouse s3 prometheus}"
ALL_ENV="$STATE_DIR/services.env"
export STATE_DIR PYTHON

for svc in $SERVICES; do
    [[ -x "$SERVICES_DIR/$svc.sh" ]] || die "unknown service '$svc' in SERVICES (kafka clickhouse s3 prometheus)"
done

has() { [[ " $SERVICES " == *" $1 "* ]]; }

# Installs that must not run in parallel (pip, apt/dpkg lock) happen here, once, before the starts.
prepare() {
    need_python
    local mods=() reqs=()
    has kafka && mods+=("aiokafka") && reqs+=("aiokafka")
    has s3 && mods+=("moto.server, flask, flask_cors") && reqs+=("moto[server]")
    local i
    for i in "${!mods[@]}"; do
        ensure_py_pkg "${mods[$i]}" "${reqs[$i]}"
    done
    local apt=()
    has clickhouse && ! command -v clickhouse-server >/dev/null 2>&1 && apt+=(clickhouse-server)
    has prometheus && ! command -v prometheus >/dev/null 2>&1 && apt+=(prometheus)
    if ((${#apt[@]})); then
        [[ "$(id -u)" == 0 ]] || die "missing Debian packages: sudo apt-get update && sudo apt-get install -y ${apt[*]}"
        log "installing ${apt[*]} (apt-get)"
        {
            DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
                DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${apt[@]}"
        } >"${TMPDIR:-/tmp}/alphaengine-apt.log" 2>&1 || {
            tail -n 20 "${TMPDIR:-/tmp}/alphaengine-apt.log" >&2
            die "apt-get install ${apt[*]} failed (see above)"
        }
    fi
}

# run_all <subcommand>: runs "<svc>.sh <subcommand>" for every service in parallel; stdout of each in
# $WORK/<svc>.out; returns the number of failures and lists them.
run_all() {
    local sub="$1" svc
    local -A pids=()
    for svc in $SERVICES; do
        "$SERVICES_DIR/$svc.sh" "$sub" >"$WORK/$svc.out" &
        pids[$svc]=$!
    done
    FAILED=()
    for svc in $SERVICES; do
        wait "${pids[$svc]}" || FAILED+=("$svc")
    done
}

cmd_start() {
    local t0
    t0="$(now)"
    prepare
    mkdir -p "$STATE_DIR"
    run_all start
    if ((${#FAILED[@]})); then
        rm -f "$ALL_ENV"
        die "could not start: ${FAILED[*]} (messages above; the others keep running: '$0 stop' stops them)"
    fi
    write_all_env
    log "all up in $(elapsed "$t0")s: $SERVICES; env in $ALL_ENV"
    cat "$ALL_ENV"
}

# write_all_env: the combined env file lists every service that is running now, whichever `SERVICES`
# started it, so starting or stopping some services never hides the others from the tests.
write_all_env() {
    local tmp="$ALL_ENV.tmp.$$" svc running=()
    for svc in kafka clickhouse s3 prometheus; do
        if [[ -f "$STATE_DIR/$svc.env" ]] && "$SERVICES_DIR/$svc.sh" status >/dev/null 2>&1; then
            running+=("$svc")
        fi
    done
    if ((${#running[@]} == 0)); then
        rm -f "$ALL_ENV"
        return
    fi
    {
        echo "# written by scripts/services/all.sh on $(date -Is): ${running[*]}"
        echo "export ALPHAENGINE_SERVICES_ENV=$ALL_ENV"
        echo "export ALPHAENGINE_SERVICES_STATE_DIR=$STATE_DIR"
        for svc in "${running[@]}"; do
            cat "$STATE_DIR/$svc.env"
        done
    } >"$tmp"
    mv -f "$tmp" "$ALL_ENV"
}

cmd_stop() {
    run_all "$1"
    write_all_env
    ((${#FAILED[@]} == 0)) || die "could not $1: ${FAILED[*]}"
}

cmd_status() {
    local svc rc=0
    for svc in $SERVICES; do
        "$SERVICES_DIR/$svc.sh" status || rc=1
    done
    return $rc
}

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

case "${1:-}" in
start) cmd_start ;;
stop) cmd_stop stop ;;
restart)
    cmd_stop stop
    cmd_start
    ;;
clean)
    cmd_stop clean
    rmdir "$STATE_DIR" 2>/dev/null || true
    ;;
status) cmd_status ;;
env)
    [[ -f "$ALL_ENV" ]] || die "no $ALL_ENV: '$0 start' first"
    cat "$ALL_ENV"
    ;;
*)
    cat >&2 <<EOF
usage: $0 {start|stop|restart|status|env|clean}
  start    start every service (parallel, idempotent); print and write $ALL_ENV
  stop     stop every service, keep data and ports; $ALL_ENV then lists only those still running
  restart  stop, then start
  status   each service's state; exit 1 if one is not answering
  env      print $ALL_ENV
  clean    stop every service and delete its state
services: $SERVICES (SERVICES=...), state: $STATE_DIR (STATE_DIR=...)
per service: scripts/services/{kafka,clickhouse,s3,prometheus}.sh (also pause/resume)
EOF
    exit 2
    ;;
esac
