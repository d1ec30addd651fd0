# shellcheck shell=bash
# Shared helpers for scripts/services/*.sh. Sourced, never run.
#
# Conventions every service script follows:
#   * stdout carries only `export NAME=value` lines (so `eval "$(kafka.sh start)"` works);
#     progress and errors go to stderr.
#   * state lives in $STATE_DIR/<service>/ (pid file, logs, data) and $STATE_DIR/<service>.env;
#     `stop` keeps the data, so `start` afterwards comes back on the same data and the same ports;
#     `clean` stops and deletes the service's state.
#   * the service runs in its own session (setsid), so a Ctrl-C in the calling shell or test run
#     does not kill it; `stop` sends SIGTERM, waits, then SIGKILL.

SERVICES_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_DIR="$(cd "$SERVICES_DIR/../.." && pwd)"
STATE_DIR="${STATE_DIR:-/tmp/alphaengine-services}"
# shellcheck disable=SC2034  # used by kafka.sh
CACHE_DIR="${ALPHAENGINE_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/alphaengine}"
STOP_TIMEOUT="${STOP_TIMEOUT:-30}"

if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$REPO_DIR/.venv/bin/python" ]]; then
        PYTHON="$REPO_DIR/.venv/bin/python"
    else
        PYTHON="$(command -v python3 || true)"
    fi
fi
HELPERS="$SERVICES_DIR/_helpers.py"

log() { printf '[%s] %s\n' "${SERVICE:-services}" "$*" >&2; }
die() {
    printf '[%s] ERROR: %s\n' "${SERVICE:-services}" "$*" >&2
    exit 1
}

need_cmd() {
    command -v "$1" >/dev/null 2>&1 || die "'$1' not found on PATH. $2"
}

need_python() {
    [[ -n "$PYTHON" && -x "$PYTHON" ]] || die "no Python found: create the venv (make venv) or set PYTHON"
}

# Install a Python package into $PYTHON's environment if its module cannot be imported.
# ensure_py_pkg <import name> <pip requirement>
ensure_py_pkg() {
    need_python
    if ! "$PYTHON" -c "import $1" >/dev/null 2>&1; then
        log "Python module '$1' missing in $PYTHON: pip install '$2'"
        "$PYTHON" -m pip install --quiet "$2" >&2 || die "pip install '$2' failed"
    fi
}

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

# svc_init <name>: sets SERVICE, SVC_DIR, PID_FILE, ENV_FILE
svc_init() {
    SERVICE="$1"
    SVC_DIR="$STATE_DIR/$SERVICE"
    PID_FILE="$SVC_DIR/$SERVICE.pid"
    ENV_FILE="$STATE_DIR/$SERVICE.env"
}

# pid_of_service: prints the pid if the pid file names a live process whose command line contains
# $SVC_MARKER (guards against a recycled pid); returns 1 otherwise.
pid_of_service() {
    [[ -f "$PID_FILE" ]] || return 1
    local pid
    pid="$(cat "$PID_FILE" 2>/dev/null || true)"
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    [[ -r "/proc/$pid/cmdline" ]] || return 1
    # a zombie (exited, not yet reaped) is not running
    [[ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" != "Z" ]] || return 1
    if [[ -n "${SVC_MARKER:-}" ]]; then
        tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF -- "$SVC_MARKER" || return 1
    fi
    echo "$pid"
}

is_running() { pid_of_service >/dev/null; }

# is_paused: the process is stopped by SIGSTOP
is_paused() {
    local pid
    pid="$(pid_of_service)" || return 1
    [[ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" == "T" ]]
}

# launch <logfile> <command...>: starts the command in its own session in the background and
# writes its pid to $PID_FILE (the exec'd command keeps the pid written).
launch() {
    local logfile="$1"
    shift
    rm -f "$PID_FILE"
    # shellcheck disable=SC2016
    setsid bash -c 'echo $$ >"$0"; exec "$@"' "$PID_FILE" "$@" </dev/null >>"$logfile" 2>&1 &
    local _
    for _ in $(seq 1 50); do
        [[ -s "$PID_FILE" ]] && return 0
        sleep 0.1
    done
    die "the process did not start (no pid file $PID_FILE); see $logfile"
}

# stop_service: SIGTERM (after SIGCONT if paused), wait up to $STOP_TIMEOUT s, then SIGKILL.
stop_service() {
    local pid
    if ! pid="$(pid_of_service)"; then
        rm -f "$PID_FILE"
        log "not running"
        return 0
    fi
    local t0
    t0="$(now)"
    kill -CONT "$pid" 2>/dev/null || true
    kill -TERM "$pid" 2>/dev/null || true
    local deadline=$((SECONDS + STOP_TIMEOUT))
    while kill -0 "$pid" 2>/dev/null && [[ -r "/proc/$pid/stat" ]] &&
        [[ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" != "Z" ]]; do
        if ((SECONDS >= deadline)); then
            log "pid $pid still alive after ${STOP_TIMEOUT}s: SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
            # also anything left in its session (children)
            pkill -KILL -s "$pid" 2>/dev/null || true
            break
        fi
        sleep 0.2
    done
    rm -f "$PID_FILE"
    log "stopped (pid $pid) in $(elapsed "$t0")s"
}

pause_service() {
    local pid
    pid="$(pid_of_service)" || die "not running"
    kill -STOP "$pid"
    log "paused (SIGSTOP pid $pid): connections stay open but nothing answers; '$0 resume' continues"
}

resume_service() {
    local pid
    pid="$(pid_of_service)" || die "not running"
    kill -CONT "$pid"
    log "resumed (SIGCONT pid $pid)"
}

# free_ports <n>: n distinct free loopback TCP ports, space-separated
free_ports() {
    need_python
    "$PYTHON" "$HELPERS" free-ports "$1"
}

# port_free <port>: true if nothing listens on 127.0.0.1:<port>
port_free() {
    "$PYTHON" "$HELPERS" port-free "$1"
}

# env_get <file> <NAME>: the value of `export NAME=value` in file (empty if absent)
env_get() {
    [[ -f "$1" ]] || return 0
    sed -n "s/^export $2=//p" "$1" | tail -n 1
}

# write_env <NAME=value>...: writes $ENV_FILE atomically as export lines
write_env() {
    mkdir -p "$STATE_DIR"
    local tmp="$ENV_FILE.tmp.$$" kv
    : >"$tmp"
    for kv in "$@"; do
        printf 'export %s\n' "$kv" >>"$tmp"
    done
    mv -f "$tmp" "$ENV_FILE"
}

print_env() {
    [[ -f "$ENV_FILE" ]] || die "no env file $ENV_FILE: start the service first"
    cat "$ENV_FILE"
}

log_tail() {
    local f
    for f in "$@"; do
        if [[ -s "$f" ]]; then
            printf -- '--- last lines of %s ---\n' "$f" >&2
            tail -n 30 "$f" >&2
        fi
    done
}

# wait_http <url> <timeout s> <logfiles...>: wait until GET url returns 2xx, or the process dies.
wait_http() {
    local url="$1" timeout="$2"
    shift 2
    local deadline=$((SECONDS + timeout))
    while ! curl -sf -o /dev/null --max-time 2 "$url"; do
        if ! is_running; then
            log_tail "$@"
            die "the process exited before $url answered; logs above"
        fi
        if ((SECONDS >= deadline)); then
            log_tail "$@"
            die "$url did not answer within ${timeout}s; logs above (the process is still running: '$0 stop')"
        fi
        sleep 0.2
    done
}

usage_common() {
    cat >&2 <<EOF
usage: $0 {start|stop|restart|status|env|pause|resume|clean}
  start    start (or, if running, just print) the service; prints export lines on stdout
  stop     SIGTERM, wait up to \$STOP_TIMEOUT (${STOP_TIMEOUT}s), SIGKILL; keeps data and ports
  restart  stop, then start on the same data and ports
  status   exit 0 if running and answering, 1 otherwise
  env      print the export lines of the last start
  pause    SIGSTOP the process (it stops answering, its sockets stay open)
  resume   SIGCONT it
  clean    stop and delete the service's state (data, logs, env file)
state: $STATE_DIR (STATE_DIR=...)
EOF
}

# dispatch "$@": the subcommands every service script has. The script defines cmd_start (which gets the
# arguments after the subcommand) and cmd_status; a script with more subcommands lists them in
# EXTRA_SUBCOMMANDS, implements each as cmd_<name>, and describes them in EXTRA_USAGE.
dispatch() {
    local sub="${1:-}"
    (($#)) && shift
    case "$sub" in
    start) cmd_start "$@" ;;
    stop) stop_service ;;
    restart)
        stop_service
        cmd_start "$@"
        ;;
    status) cmd_status ;;
    env) print_env ;;
    pause) pause_service ;;
    resume) resume_service ;;
    clean)
        stop_service
        rm -rf "$SVC_DIR" "$ENV_FILE"
        log "state removed"
        ;;
    *)
        if [[ -n "$sub" && " ${EXTRA_SUBCOMMANDS:-} " == *" $sub "* ]]; then
            "cmd_$sub" "$@"
            return
        fi
        usage_common
        [[ -z "${EXTRA_USAGE:-}" ]] || echo "$EXTRA_USAGE" >&2
        exit 2
        ;;
    esac
}
