#!/usr/bin/env bash
# ClickHouse server (Debian's clickhouse-server, 18.16) on loopback ports with its data in the state dir.
#
#   scripts/services/clickhouse.sh start   # prints: export CLICKHOUSE_HOST=127.0.0.1 CLICKHOUSE_PORT=... ...
#   scripts/services/clickhouse.sh stop    # SIGTERM, SIGKILL after $STOP_TIMEOUT s; data kept
#   scripts/services/clickhouse.sh start   # again: same data, same ports
#   scripts/services/clickhouse.sh status|env|restart|pause|resume|clean
#
# Environment (all optional):
#   STATE_DIR                  /tmp/alphaengine-services (state in $STATE_DIR/clickhouse)
#   CLICKHOUSE_PORT            native protocol port (default: the previous one, else a free one)
#   CLICKHOUSE_HTTP_PORT       HTTP port (same rule)
#   CLICKHOUSE_SYSTEM_CONFIG   /etc/clickhouse-server (where config.xml and users.xml are copied from)
#   CLICKHOUSE_LOG_LEVEL       information
#   CLICKHOUSE_START_TIMEOUT   60
set -euo pipefail
# shellcheck source=scripts/services/_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
svc_init clickhouse

CLICKHOUSE_SYSTEM_CONFIG="${CLICKHOUSE_SYSTEM_CONFIG:-/etc/clickhouse-server}"
CLICKHOUSE_START_TIMEOUT="${CLICKHOUSE_START_TIMEOUT:-60}"
ETC="$SVC_DIR/etc"
CONFIG="$ETC/config.xml"
LOGDIR="$SVC_DIR/log"
PORTS_FILE="$SVC_DIR/ports"
SVC_MARKER="$CONFIG"
HOST=127.0.0.1

ensure_installed() {
    if command -v clickhouse-server >/dev/null 2>&1 && [[ -f "$CLICKHOUSE_SYSTEM_CONFIG/config.xml" ]]; then
        return 0
    fi
    if [[ "$(id -u)" != 0 ]]; then
        die "clickhouse-server is not installed: run 'sudo apt-get update && sudo apt-get install -y clickhouse-server'"
    fi
    log "installing Debian's clickhouse-server (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    {
        apt-get update -qq && apt-get install -y -qq clickhouse-server
    } >"${TMPDIR:-/tmp}/alphaengine-apt-clickhouse.log" 2>&1 || {
        tail -n 20 "${TMPDIR:-/tmp}/alphaengine-apt-clickhouse.log" >&2
        die "apt-get install clickhouse-server failed (see above)"
    }
    command -v clickhouse-server >/dev/null 2>&1 || die "clickhouse-server still not on PATH after apt-get install"
}

choose_ports() {
    local stored_tcp="" stored_http=""
    if [[ -f "$PORTS_FILE" ]]; then
        read -r stored_tcp stored_http <"$PORTS_FILE" || true
    fi
    TCP_PORT="${CLICKHOUSE_PORT:-$stored_tcp}"
    HTTP_PORT="${CLICKHOUSE_HTTP_PORT:-$stored_http}"
    local free
    if [[ -z "$TCP_PORT" || -z "$HTTP_PORT" ]]; then
        free="$(free_ports 2)"
        TCP_PORT="${TCP_PORT:-${free%% *}}"
        HTTP_PORT="${HTTP_PORT:-${free##* }}"
    fi
    [[ "$TCP_PORT" != "$HTTP_PORT" ]] || die "CLICKHOUSE_PORT and CLICKHOUSE_HTTP_PORT must differ"
    local p
    for p in "$TCP_PORT" "$HTTP_PORT"; do
        port_free "$p" || die "port $HOST:$p is in use by another process (set CLICKHOUSE_PORT / CLICKHOUSE_HTTP_PORT, or '$0 clean')"
    done
    mkdir -p "$SVC_DIR"
    echo "$TCP_PORT $HTTP_PORT" >"$PORTS_FILE"
}

query_url() { echo "http://$HOST:$1/?query=SELECT%20version()"; }

cmd_start() {
    need_python
    local pid
    if pid="$(pid_of_service)"; then
        is_paused && die "clickhouse-server (pid $pid) is paused: '$0 resume'"
        read -r TCP_PORT HTTP_PORT <"$PORTS_FILE"
        curl -sf -o /dev/null --max-time 5 "$(query_url "$HTTP_PORT")" ||
            die "clickhouse-server (pid $pid) runs but does not answer on $HOST:$HTTP_PORT; see $LOGDIR"
        log "already running (pid $pid)"
        print_env
        return 0
    fi
    local t0
    t0="$(now)"
    ensure_installed
    choose_ports
    mkdir -p "$ETC" "$LOGDIR"
    # regenerated on every start from the system files: paths into $SVC_DIR, loopback only
    "$PYTHON" "$HELPERS" clickhouse-config "$CLICKHOUSE_SYSTEM_CONFIG" "$ETC" "$SVC_DIR/data" "$LOGDIR" \
        "$HOST" "$TCP_PORT" "$HTTP_PORT" || die "could not write $CONFIG from $CLICKHOUSE_SYSTEM_CONFIG"
    log "starting clickhouse-server on $HOST:$TCP_PORT (native), $HOST:$HTTP_PORT (HTTP), data in $SVC_DIR/data"
    # run from $ETC: relative paths in the config (dictionaries_config) resolve there
    (cd "$ETC" && launch "$LOGDIR/stdout.log" clickhouse-server --config-file="$CONFIG")
    wait_http "$(query_url "$HTTP_PORT")" "$CLICKHOUSE_START_TIMEOUT" \
        "$LOGDIR/stdout.log" "$LOGDIR/clickhouse-server.err.log"
    local version
    version="$(curl -sf --max-time 5 "$(query_url "$HTTP_PORT")")"
    write_env "CLICKHOUSE_HOST=$HOST" "CLICKHOUSE_PORT=$TCP_PORT" "CLICKHOUSE_HTTP_PORT=$HTTP_PORT" \
        "CLICKHOUSE_URL=http://$HOST:$HTTP_PORT" "CLICKHOUSE_VERSION=$version"
    log "clickhouse $version ready in $(elapsed "$t0")s (pid $(cat "$PID_FILE"))"
    print_env
}

cmd_status() {
    local pid
    if ! pid="$(pid_of_service)"; then
        echo "clickhouse: stopped" >&2
        return 1
    fi
    if is_paused; then
        echo "clickhouse: paused (pid $pid)" >&2
        return 1
    fi
    read -r TCP_PORT HTTP_PORT <"$PORTS_FILE"
    if curl -sf -o /dev/null --max-time 5 "$(query_url "$HTTP_PORT")"; then
        echo "clickhouse: running (pid $pid) on $HOST:$TCP_PORT (native), $HOST:$HTTP_PORT (HTTP)" >&2
        return 0
    fi
    echo "clickhouse: running (pid $pid) but not answering on $HOST:$HTTP_PORT" >&2
    return 1
}

dispatch "$@"
