#!/usr/bin/env bash
# An S3-compatible endpoint: moto's server mode (`moto_server`), on a loopback port.
#
#   scripts/services/s3.sh start   # prints: export S3_ENDPOINT_URL=http://127.0.0.1:PORT AWS_ACCESS_KEY_ID=test ...
#   scripts/services/s3.sh stop|restart|status|env|pause|resume|clean
#
# moto keeps everything in memory: a stop (or restart) loses every bucket and object. The port is kept.
#
# Environment (all optional):
#   STATE_DIR         /tmp/alphaengine-services (state in $STATE_DIR/s3)
#   S3_PORT           port (default: the previous one, else a free one)
#   PYTHON            the interpreter whose environment has (or gets) moto[server]; default .venv/bin/python
#   S3_START_TIMEOUT  30
set -euo pipefail
# shellcheck source=scripts/services/_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
svc_init s3

S3_START_TIMEOUT="${S3_START_TIMEOUT:-30}"
PORTS_FILE="$SVC_DIR/ports"
LOGFILE="$SVC_DIR/moto.log"
SVC_MARKER="moto.server"
HOST=127.0.0.1

choose_port() {
    local stored=""
    [[ -f "$PORTS_FILE" ]] && read -r stored <"$PORTS_FILE"
    PORT="${S3_PORT:-$stored}"
    [[ -n "$PORT" ]] || PORT="$(free_ports 1)"
    port_free "$PORT" || die "port $HOST:$PORT is in use by another process (set S3_PORT, or '$0 clean')"
    mkdir -p "$SVC_DIR"
    echo "$PORT" >"$PORTS_FILE"
}

# moto answers GET /moto-api/data.json with its state as JSON
ready_url() { echo "http://$HOST:$1/moto-api/data.json"; }

cmd_start() {
    need_python
    local pid
    if pid="$(pid_of_service)"; then
        is_paused && die "moto_server (pid $pid) is paused: '$0 resume'"
        read -r PORT <"$PORTS_FILE"
        curl -sf -o /dev/null --max-time 5 "$(ready_url "$PORT")" ||
            die "moto_server (pid $pid) runs but does not answer on $HOST:$PORT; see $LOGFILE"
        log "already running (pid $pid)"
        print_env
        return 0
    fi
    local t0
    t0="$(now)"
    # the import check covers the [server] extra (flask, flask_cors)
    ensure_py_pkg "moto.server, flask, flask_cors" "moto[server]"
    choose_port
    log "starting moto_server on $HOST:$PORT"
    launch "$LOGFILE" "$PYTHON" -m moto.server -H "$HOST" -p "$PORT"
    wait_http "$(ready_url "$PORT")" "$S3_START_TIMEOUT" "$LOGFILE"
    local version
    version="$("$PYTHON" -c 'import moto; print(moto.__version__)')"
    write_env "S3_ENDPOINT_URL=http://$HOST:$PORT" "AWS_ENDPOINT_URL_S3=http://$HOST:$PORT" \
        "AWS_ACCESS_KEY_ID=test" "AWS_SECRET_ACCESS_KEY=test" "AWS_REGION=us-east-1" \
        "AWS_DEFAULT_REGION=us-east-1" "MOTO_VERSION=$version"
    log "moto $version ready in $(elapsed "$t0")s (pid $(cat "$PID_FILE"))"
    print_env
}

cmd_status() {
    local pid
    if ! pid="$(pid_of_service)"; then
        echo "s3: stopped" >&2
        return 1
    fi
    if is_paused; then
        echo "s3: paused (pid $pid)" >&2
        return 1
    fi
    read -r PORT <"$PORTS_FILE"
    if curl -sf -o /dev/null --max-time 5 "$(ready_url "$PORT")"; then
        echo "s3: running (pid $pid) on http://$HOST:$PORT" >&2
        return 0
    fi
    echo "s3: running (pid $pid) but not answering on $HOST:$PORT" >&2
    return 1
}

dispatch "$@"
