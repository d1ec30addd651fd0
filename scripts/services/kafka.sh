#!/usr/bin/env bash
# Apache Kafka (KRaft, one node: combined broker + controller) from its Maven Central jars, no Docker.
#
#   scripts/services/kafka.sh start      # prints: export KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:PORT ...
#   scripts/services/kafka.sh stop       # SIGTERM (controlled shutdown), SIGKILL after $STOP_TIMEOUT s
#   scripts/services/kafka.sh start      # again: same data, same ports
#   scripts/services/kafka.sh status|env|restart|pause|resume|clean
#
# Environment (all optional):
#   STATE_DIR              /tmp/alphaengine-services (state in $STATE_DIR/kafka, env in $STATE_DIR/kafka.env)
#   KAFKA_VERSION          4.4.0 (a Kafka 4.x release on Maven Central; 4.x brokers need Java 17+)
#   KAFKA_LIBS_DIR         ~/.cache/alphaengine/kafka-$KAFKA_VERSION/libs (fetched once with Maven)
#   MAVEN_REPO_LOCAL       Maven local repository (default: Maven's own, ~/.m2/repository)
#   KAFKA_PORT             PLAINTEXT listener port (default: the previous one, else a free one)
#   KAFKA_CONTROLLER_PORT  CONTROLLER listener port (same rule; fixed once the log dir is formatted)
#   KAFKA_HEAP_OPTS        -Xms256m -Xmx512m
#   KAFKA_START_TIMEOUT    60 (seconds to wait for the broker to answer a metadata request)
set -euo pipefail
# shellcheck source=scripts/services/_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
svc_init kafka

KAFKA_VERSION="${KAFKA_VERSION:-4.4.0}"
KAFKA_SCALA_VERSION="${KAFKA_SCALA_VERSION:-2.13}"
KAFKA_LIBS_DIR="${KAFKA_LIBS_DIR:-$CACHE_DIR/kafka-$KAFKA_VERSION/libs}"
KAFKA_HEAP_OPTS="${KAFKA_HEAP_OPTS:--Xms256m -Xmx512m}"
KAFKA_JVM_OPTS="${KAFKA_JVM_OPTS:--XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:+ExitOnOutOfMemoryError -Djava.awt.headless=true}"
KAFKA_START_TIMEOUT="${KAFKA_START_TIMEOUT:-60}"
MAVEN_DEPENDENCY_PLUGIN="org.apache.maven.plugins:maven-dependency-plugin:3.8.1"

PROPS="$SVC_DIR/server.properties"
LOG4J="$SVC_DIR/log4j2.properties"
DATA="$SVC_DIR/data"
LOGS="$SVC_DIR/logs"
PORTS_FILE="$SVC_DIR/ports"
SVC_MARKER="$PROPS"

check_java() {
    need_cmd java "Install a JDK 17+ (apt-get install openjdk-17-jre-headless)."
    local v major
    v="$(java -version 2>&1 | sed -n 's/.*version "\([^"]*\)".*/\1/p' | head -n 1)"
    major="${v%%.*}"
    [[ "$major" == 1 ]] && major="$(echo "$v" | cut -d. -f2)"
    [[ "$major" =~ ^[0-9]+$ ]] || die "cannot read the Java version from 'java -version' ($v)"
    ((major >= 17)) || die "Kafka $KAFKA_VERSION needs Java 17+, found $v"
}

mvn_cmd() {
    local args=(-B -q)
    [[ -n "${MAVEN_REPO_LOCAL:-}" ]] && args+=("-Dmaven.repo.local=$MAVEN_REPO_LOCAL")
    mvn "${args[@]}" "$@"
}

# The broker's runtime classpath: kafka_2.13 and its runtime dependencies, plus the SLF4J -> Log4j 2
# binding the distribution ships (without it Kafka's SLF4J loggers write nothing).
fetch_libs() {
    [[ -f "$KAFKA_LIBS_DIR/.complete" ]] && return 0
    need_cmd mvn "Install Maven (apt-get install maven)."
    local t0 work
    t0="$(now)"
    log "fetching Kafka $KAFKA_VERSION jars from Maven Central into $KAFKA_LIBS_DIR"
    mkdir -p "$(dirname "$KAFKA_LIBS_DIR")"
    work="$(mktemp -d "$(dirname "$KAFKA_LIBS_DIR")/.fetch.XXXXXX")"
    cat >"$work/pom.xml" <<EOF
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>local.alphaengine</groupId>
  <artifactId>kafka-libs</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>org.apache.kafka</groupId>
      <artifactId>kafka_$KAFKA_SCALA_VERSION</artifactId>
      <version>$KAFKA_VERSION</version>
    </dependency>
  </dependencies>
</project>
EOF
    if ! (cd "$work" && mvn_cmd "$MAVEN_DEPENDENCY_PLUGIN:copy-dependencies" -DincludeScope=runtime \
        -DoutputDirectory="$work/libs" >"$work/mvn.log" 2>&1); then
        cat "$work/mvn.log" >&2
        rm -rf "$work"
        die "Maven could not fetch org.apache.kafka:kafka_$KAFKA_SCALA_VERSION:$KAFKA_VERSION (see above)"
    fi
    local log4j_version slf4j_version binding
    log4j_version="$(find "$work/libs" -name 'log4j-api-*.jar' -printf '%f\n' | sed 's/^log4j-api-\(.*\)\.jar$/\1/' | head -n 1)"
    slf4j_version="$(find "$work/libs" -name 'slf4j-api-*.jar' -printf '%f\n' | sed 's/^slf4j-api-\(.*\)\.jar$/\1/' | head -n 1)"
    if [[ -n "$log4j_version" && -n "$slf4j_version" ]]; then
        if [[ "$slf4j_version" == 1.* ]]; then binding=log4j-slf4j-impl; else binding=log4j-slf4j2-impl; fi
        if ! (cd "$work" && mvn_cmd "$MAVEN_DEPENDENCY_PLUGIN:copy" \
            -Dartifact="org.apache.logging.log4j:$binding:$log4j_version" \
            -DoutputDirectory="$work/libs" >"$work/mvn.log" 2>&1); then
            cat "$work/mvn.log" >&2
            rm -rf "$work"
            die "Maven could not fetch org.apache.logging.log4j:$binding:$log4j_version"
        fi
    else
        log "warning: no log4j-api/slf4j-api jar among Kafka's dependencies; broker logging may be silent"
    fi
    [[ -f "$work/libs/kafka_$KAFKA_SCALA_VERSION-$KAFKA_VERSION.jar" ]] || {
        rm -rf "$work"
        die "kafka_$KAFKA_SCALA_VERSION-$KAFKA_VERSION.jar missing after the Maven fetch"
    }
    touch "$work/libs/.complete"
    rm -rf "$KAFKA_LIBS_DIR"
    mv "$work/libs" "$KAFKA_LIBS_DIR"
    rm -rf "$work"
    log "fetched $(find "$KAFKA_LIBS_DIR" -name '*.jar' | wc -l) jars in $(elapsed "$t0")s"
}

# A Kafka Uuid as `kafka-storage random-uuid` prints it: URL-safe base64 of 16 random bytes, no padding,
# never starting with '-'.
random_cluster_id() {
    "$PYTHON" - <<'EOF'
import base64, os
while True:
    s = base64.urlsafe_b64encode(os.urandom(16)).decode().rstrip("=")
    if not s.startswith("-"):
        print(s)
        break
EOF
}

choose_ports() {
    local stored_port="" stored_cport=""
    if [[ -f "$PORTS_FILE" ]]; then
        read -r stored_port stored_cport <"$PORTS_FILE" || true
    fi
    local formatted=0
    [[ -f "$DATA/meta.properties" ]] && formatted=1
    PORT="${KAFKA_PORT:-$stored_port}"
    if ((formatted)) && [[ -n "$stored_cport" ]]; then
        # the dynamic quorum records the controller endpoint in the metadata log: keep it
        if [[ -n "${KAFKA_CONTROLLER_PORT:-}" && "$KAFKA_CONTROLLER_PORT" != "$stored_cport" ]]; then
            log "warning: KAFKA_CONTROLLER_PORT=$KAFKA_CONTROLLER_PORT ignored: the formatted log dir uses $stored_cport ('$0 clean' to start afresh)"
        fi
        CPORT="$stored_cport"
    else
        CPORT="${KAFKA_CONTROLLER_PORT:-$stored_cport}"
    fi
    local free
    if [[ -z "$PORT" || -z "$CPORT" ]]; then
        free="$(free_ports 2)"
        PORT="${PORT:-${free%% *}}"
        CPORT="${CPORT:-${free##* }}"
        [[ "$PORT" != "$CPORT" ]] || die "could not choose two distinct ports"
    fi
    local p
    for p in "$PORT" "$CPORT"; do
        port_free "$p" || die "port 127.0.0.1:$p is in use by another process (set KAFKA_PORT / KAFKA_CONTROLLER_PORT, or '$0 clean')"
    done
    mkdir -p "$SVC_DIR"
    echo "$PORT $CPORT" >"$PORTS_FILE"
}

write_config() {
    mkdir -p "$DATA" "$LOGS"
    cat >"$PROPS" <<EOF
# generated by scripts/services/kafka.sh; regenerated on every start
process.roles=broker,controller
node.id=1
controller.quorum.bootstrap.servers=127.0.0.1:$CPORT
listeners=PLAINTEXT://127.0.0.1:$PORT,CONTROLLER://127.0.0.1:$CPORT
advertised.listeners=PLAINTEXT://127.0.0.1:$PORT,CONTROLLER://127.0.0.1:$CPORT
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
log.dirs=$DATA
num.partitions=4
default.replication.factor=1
min.insync.replicas=1
auto.create.topics.enable=true
offsets.topic.replication.factor=1
offsets.topic.num.partitions=4
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=4
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
# after a SIGKILL the restarted broker waits for its previous incarnation's session to expire before
# it leads its partitions again: 9 s by default
broker.session.timeout.ms=4000
broker.heartbeat.interval.ms=1000
num.network.threads=2
num.io.threads=4
num.recovery.threads.per.data.dir=1
log.retention.hours=24
EOF
    cat >"$LOG4J" <<EOF
# generated by scripts/services/kafka.sh
status = warn
name = alphaengine-kafka
appender.file.type = File
appender.file.name = FILE
appender.file.fileName = $LOGS/server.log
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = FILE
logger.controller.name = org.apache.kafka.controller
logger.controller.level = INFO
logger.request.name = kafka.request.logger
logger.request.level = WARN
EOF
}

format_storage() {
    [[ -f "$DATA/meta.properties" ]] && return 0
    local cluster_id
    cluster_id="$(random_cluster_id)"
    log "formatting $DATA (cluster id $cluster_id, standalone dynamic quorum)"
    if ! java -Xmx256m -Dlog4j2.configurationFile="$LOG4J" -Dkafka.logs.dir="$LOGS" -cp "$KAFKA_LIBS_DIR/*" \
        kafka.tools.StorageTool format --standalone -t "$cluster_id" -c "$PROPS" >"$LOGS/format.log" 2>&1; then
        cat "$LOGS/format.log" >&2
        die "kafka.tools.StorageTool format failed (see above)"
    fi
}

ready() {
    "$PYTHON" "$HELPERS" kafka-ready "127.0.0.1:$1" "$2" "$3"
}

cmd_start() {
    need_python
    ensure_py_pkg aiokafka aiokafka
    local pid
    if pid="$(pid_of_service)"; then
        is_paused && die "the broker (pid $pid) is paused: '$0 resume'"
        read -r PORT CPORT <"$PORTS_FILE"
        ready "$PORT" "$pid" 10 || die "the broker (pid $pid) runs but does not answer on 127.0.0.1:$PORT; see $LOGS/server.log"
        log "already running (pid $pid)"
        print_env
        return 0
    fi
    local t0
    t0="$(now)"
    check_java
    fetch_libs
    choose_ports
    write_config
    format_storage
    log "starting Kafka $KAFKA_VERSION on 127.0.0.1:$PORT (controller 127.0.0.1:$CPORT), data in $DATA"
    # shellcheck disable=SC2086
    launch "$LOGS/stdout.log" java $KAFKA_HEAP_OPTS $KAFKA_JVM_OPTS \
        -Dkafka.logs.dir="$LOGS" -Dlog4j2.configurationFile="$LOG4J" \
        -cp "$KAFKA_LIBS_DIR/*" kafka.Kafka "$PROPS"
    pid="$(cat "$PID_FILE")"
    if ! ready "$PORT" "$pid" "$KAFKA_START_TIMEOUT"; then
        log_tail "$LOGS/stdout.log"
        if grep -qE '^\[[^]]*\] (ERROR|FATAL)' "$LOGS/server.log" 2>/dev/null; then
            printf -- '--- ERROR/FATAL lines of %s ---\n' "$LOGS/server.log" >&2
            grep -E -A3 '^\[[^]]*\] (ERROR|FATAL)' "$LOGS/server.log" | tail -n 40 >&2
        fi
        is_running && stop_service
        die "Kafka did not become ready on 127.0.0.1:$PORT (logs above, full logs in $LOGS)"
    fi
    write_env "KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:$PORT" "KAFKA_PORT=$PORT" "KAFKA_CONTROLLER_PORT=$CPORT" \
        "KAFKA_VERSION=$KAFKA_VERSION" "KAFKA_LOG_DIR=$LOGS"
    log "ready in $(elapsed "$t0")s (pid $pid)"
    print_env
}

cmd_status() {
    local pid
    if ! pid="$(pid_of_service)"; then
        echo "kafka: stopped" >&2
        return 1
    fi
    if is_paused; then
        echo "kafka: paused (pid $pid)" >&2
        return 1
    fi
    read -r PORT CPORT <"$PORTS_FILE"
    if ready "$PORT" "$pid" 5 2>/dev/null; then
        echo "kafka: running (pid $pid) on 127.0.0.1:$PORT" >&2
        return 0
    fi
    echo "kafka: running (pid $pid) but not answering on 127.0.0.1:$PORT" >&2
    return 1
}

EXTRA_SUBCOMMANDS="fetch"
EXTRA_USAGE="  fetch    only download the jars (prints the libs directory)"
cmd_fetch() {
    check_java
    fetch_libs
    echo "$KAFKA_LIBS_DIR"
}

dispatch "$@"
