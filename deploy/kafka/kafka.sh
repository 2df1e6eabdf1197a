#!/usr/bin/env bash
# Run a real Apache Kafka 4.x broker (KRaft, combined broker+controller) locally from Maven
# Central jars, with the machine's JDK (17+) and Maven. No release tarball, no Docker, no ZooKeeper.
#
# Usage: deploy/kafka/kafka.sh COMMAND [options]        (works from any cwd)
#   fetch                         materialise the broker jars into the cache (idempotent)
#   start [--data DIR] [--port P] [--controller-port C] [--nodes 1|3]
#                                 write configs, format storage once, start node(s), wait until
#                                 ready; prints the bootstrap servers string on stdout
#   stop [--data DIR]             SIGTERM all nodes, wait up to 30 s, then SIGKILL (idempotent)
#   kill-node N [--data DIR]      SIGKILL node N (fault tests; never kill two of three)
#   start-node N [--data DIR]     restart node N with the same config (never reformats), wait ready
#   status [--data DIR]           one line per node; exit 0 only if all nodes are up
#   bootstrap [--data DIR]        prints host:port,... of the running nodes (exit 1 if none)
#
# Defaults: --data ${VOLMIRROR_KAFKA_DATA:-/tmp/volmirror-kafka}, --port 9092, --nodes 1,
#   --controller-port P+N. So one node: broker 9092, controller 9093; three nodes: brokers
#   9092,9093,9094 and controllers 9095,9096,9097. Everything binds 127.0.0.1.
# Environment:
#   VOLMIRROR_KAFKA_CACHE          jar cache (default $HOME/.cache/volmirror/kafka-<version>)
#   VOLMIRROR_KAFKA_DATA           default data dir
#   VOLMIRROR_KAFKA_HEAP_OPTS      default "-Xms384m -Xmx512m" (per node)
#   VOLMIRROR_KAFKA_START_TIMEOUT  seconds to wait for readiness (default 90)
#   JAVA_HOME / PATH               to locate java (17+); PATH to locate mvn (fetch only)
#
# Data dir layout: cluster.env (nodes, ports, cluster id), .lock, and per node nodeN/ with
#   server.properties, data/ (log.dirs, formatted once), logs/server.log, kafka.out, kafka.pid.
set -euo pipefail

HERE="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd -P)"
POM="$HERE/pom.xml"
BROKER_LOG4J="$HERE/log4j2.yaml"
TOOLS_LOG4J="$HERE/tools-log4j2.yaml"

die() { echo "kafka.sh: error: $*" >&2; exit 1; }
say() { echo "kafka.sh: $*" >&2; }

# Single source of truth for the version: <kafka.version> in pom.xml.
KAFKA_VERSION="$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$POM" | head -n1)"
[[ -n "$KAFKA_VERSION" ]] || die "cannot read <kafka.version> from $POM"
CACHE="${VOLMIRROR_KAFKA_CACHE:-$HOME/.cache/volmirror/kafka-$KAFKA_VERSION}"
LIBS="$CACHE/libs"
MARKER="$CACHE/.fetched"
HEAP_OPTS="${VOLMIRROR_KAFKA_HEAP_OPTS:--Xms384m -Xmx512m}"
START_TIMEOUT="${VOLMIRROR_KAFKA_START_TIMEOUT:-90}"
STOP_TIMEOUT=30

# ---------------------------------------------------------------- tools

JAVA=""
find_java() {
  [[ -n "$JAVA" ]] && return 0
  if [[ -n "${JAVA_HOME:-}" && -x "$JAVA_HOME/bin/java" ]]; then
    JAVA="$JAVA_HOME/bin/java"
  elif command -v java >/dev/null 2>&1; then
    JAVA="$(command -v java)"
  else
    die "java not found (need a JDK/JRE 17+ for Kafka $KAFKA_VERSION): set JAVA_HOME or put java on PATH (Debian: apt-get install openjdk-17-jre-headless)"
  fi
  local v major
  v="$("$JAVA" -version 2>&1 | sed -n 's/.*version "\([^"]*\)".*/\1/p' | head -n1)"
  major="${v%%.*}"
  [[ "$major" == 1 ]] && major="$(echo "$v" | cut -d. -f2)"
  [[ "$major" =~ ^[0-9]+$ ]] || die "cannot parse the version of $JAVA ('$v')"
  (( major >= 17 )) || die "$JAVA is Java $v; Kafka $KAFKA_VERSION needs Java 17+ (set JAVA_HOME)"
}

find_mvn() {
  command -v mvn >/dev/null 2>&1 || die "mvn not found: Maven 3.x is needed once to fetch the Kafka jars (Debian: apt-get install maven)"
}

pom_digest() { sha256sum "$POM" | cut -d' ' -f1; }

is_fetched() {
  [[ -f "$MARKER" && -d "$LIBS" ]] && [[ "$(cat "$MARKER")" == "$(pom_digest)" ]] \
    && compgen -G "$LIBS/kafka_2.13-$KAFKA_VERSION.jar" >/dev/null
}

cmd_fetch() {
  is_fetched && return 0
  find_mvn
  mkdir -p "$CACHE"
  exec 8>"$CACHE/.lock"
  flock 8
  if is_fetched; then exec 8>&-; return 0; fi   # someone else fetched while we waited
  say "fetching Kafka $KAFKA_VERSION jars from Maven Central into $LIBS"
  local tmp="$CACHE/libs.tmp.$$"
  rm -rf "$tmp"
  # Debian's Maven 3.8.7 prints bare ANSI resets even with -B -q -Dstyle.color=never: capture the
  # output, strip escapes, and show what is left (warnings; everything on failure).
  local rc=0
  mvn -B -q -Dstyle.color=never -f "$POM" dependency:copy-dependencies -DincludeScope=runtime \
    -DoutputDirectory="$tmp" >"$CACHE/fetch.log" 2>&1 || rc=$?
  sed 's/\x1b\[[0-9;]*m//g' "$CACHE/fetch.log" | grep -v '^[[:space:]]*$' >&2 || true
  if (( rc != 0 )); then
    rm -rf "$tmp"
    die "mvn dependency:copy-dependencies failed (exit $rc; output above, also in $CACHE/fetch.log)"
  fi
  compgen -G "$tmp/kafka_2.13-$KAFKA_VERSION.jar" >/dev/null || { rm -rf "$tmp"; die "kafka_2.13-$KAFKA_VERSION.jar missing after fetch"; }
  rm -rf "$LIBS"
  mv "$tmp" "$LIBS"
  pom_digest >"$MARKER"
  exec 8>&-
  say "fetched $(ls "$LIBS" | wc -l) jars"
}

# ---------------------------------------------------------------- data dir state

DATA="${VOLMIRROR_KAFKA_DATA:-/tmp/volmirror-kafka}"
OPT_PORT="" OPT_CPORT="" OPT_NODES=""
NODES="" PORT="" CPORT="" CLUSTER_ID=""

parse_opts() {   # parse_opts allowed-option... -- args...
  local allowed=()
  while [[ $# -gt 0 && "$1" != "--" ]]; do allowed+=("$1"); shift; done
  shift || true
  while [[ $# -gt 0 ]]; do
    local opt="$1"
    [[ " ${allowed[*]} " == *" $opt "* ]] || die "unknown option '$opt' (allowed: ${allowed[*]})"
    [[ $# -ge 2 ]] || die "option $opt needs a value"
    case "$opt" in
      --data) DATA="$2" ;;
      --port) OPT_PORT="$2" ;;
      --controller-port) OPT_CPORT="$2" ;;
      --nodes) OPT_NODES="$2" ;;
    esac
    shift 2
  done
  [[ -n "$DATA" ]] || die "empty --data"
  resolve_data
}

# Absolute, symlink-free path: node_pid matches it against the JVM's command line.
resolve_data() { if [[ -d "$DATA" ]]; then DATA="$(cd -- "$DATA" && pwd -P)"; fi; }

env_get() { sed -n "s/^$1=//p" "$DATA/cluster.env" 2>/dev/null | head -n1; }

load_cluster() {   # for commands that need an existing cluster
  [[ -f "$DATA/cluster.env" ]] || return 1
  NODES="$(env_get NODES)"; PORT="$(env_get PORT)"; CPORT="$(env_get CPORT)"
  CLUSTER_ID="$(env_get CLUSTER_ID)"
  [[ "$NODES" =~ ^[13]$ && "$PORT" =~ ^[0-9]+$ && "$CPORT" =~ ^[0-9]+$ ]] \
    || die "corrupt $DATA/cluster.env"
}

node_dir() { echo "$DATA/node$1"; }
node_port() { echo $((PORT + $1 - 1)); }
node_cport() { echo $((CPORT + $1 - 1)); }

lock_data() { exec 9>"$DATA/.lock"; flock 9; }

# pid of node N if its JVM is alive (checked against /proc, so stale pid files are harmless)
node_pid() {
  local f pid
  f="$(node_dir "$1")/kafka.pid"
  [[ -f "$f" ]] || return 1
  pid="$(cat "$f" 2>/dev/null || true)"
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  [[ -r "/proc/$pid/cmdline" ]] || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF "kafka.Kafka $(node_dir "$1")/server.properties" || return 1
  echo "$pid"
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# ---------------------------------------------------------------- config

write_properties() {   # write_properties N
  local n="$1" d voters="" i rf isr
  d="$(node_dir "$n")"
  mkdir -p "$d/data" "$d/logs"
  for ((i = 1; i <= NODES; i++)); do
    voters+="${voters:+,}$i@127.0.0.1:$(node_cport "$i")"
  done
  if [[ "$NODES" == 1 ]]; then rf=1 isr=1; else rf=3 isr=2; fi
  cat >"$d/server.properties.tmp" <<EOF
# Generated by deploy/kafka/kafka.sh for Kafka $KAFKA_VERSION; rewritten on every start.
process.roles=broker,controller
node.id=$n
controller.quorum.voters=$voters
listeners=PLAINTEXT://127.0.0.1:$(node_port "$n"),CONTROLLER://127.0.0.1:$(node_cport "$n")
advertised.listeners=PLAINTEXT://127.0.0.1:$(node_port "$n")
inter.broker.listener.name=PLAINTEXT
controller.listener.names=CONTROLLER
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs=$d/data

default.replication.factor=$rf
min.insync.replicas=$isr
offsets.topic.replication.factor=$rf
offsets.topic.num.partitions=5
transaction.state.log.replication.factor=$rf
transaction.state.log.min.isr=$isr
transaction.state.log.num.partitions=5
share.coordinator.state.topic.replication.factor=$rf
share.coordinator.state.topic.min.isr=$isr
group.initial.rebalance.delay.ms=0

# Blocks of up to 1 MiB plus key and headers must fit (defaults are 1 MiB + 12 bytes).
message.max.bytes=8388608
replica.fetch.max.bytes=8388608

# Faster fencing of a dead node in fault tests (defaults 9000 / 2000).
broker.session.timeout.ms=6000
broker.heartbeat.interval.ms=1000
EOF
  mv "$d/server.properties.tmp" "$d/server.properties"
}

tool() {   # run a Kafka tool class quietly (WARN logging to stderr)
  "$JAVA" -Xmx256m -XX:+UseSerialGC -XX:TieredStopAtLevel=1 -Djava.awt.headless=true \
    -Dlog4j2.configurationFile="$TOOLS_LOG4J" -cp "$LIBS/*" "$@"
}

format_node() {   # format_node N (only if not formatted yet)
  local d out
  d="$(node_dir "$1")"
  [[ -f "$d/data/meta.properties" ]] && return 0
  say "formatting node $1 (cluster id $CLUSTER_ID)"
  if ! out="$(tool kafka.tools.StorageTool format -t "$CLUSTER_ID" -c "$d/server.properties" -g 2>&1)"; then
    echo "$out" >&2
    die "StorageTool format failed for node $1"
  fi
}

# ---------------------------------------------------------------- start / wait

launch_node() {   # launch_node N ; records the server.log offset for the readiness check
  local n="$1" d pid
  d="$(node_dir "$n")"
  [[ -f "$d/data/meta.properties" ]] || die "node $n is not formatted ($d/data); run 'start' first"
  if pid="$(node_pid "$n")"; then
    say "node $n already running (pid $pid)"
    echo 0 >"$d/.log_offset"
    return 0
  fi
  port_open "$(node_port "$n")" && die "port $(node_port "$n") is already in use by another process (node $n)"
  port_open "$(node_cport "$n")" && die "controller port $(node_cport "$n") is already in use by another process (node $n)"
  mkdir -p "$d/logs"
  stat -c %s "$d/logs/server.log" 2>/dev/null >"$d/.log_offset" || echo 0 >"$d/.log_offset"
  echo "=== $(date -Is) starting node $n" >>"$d/kafka.out"
  # G1HeapRegionSize=16m: a produce request of volmirror is up to 4 MiB (kafka.batch_bytes); with the
  # default 1 MiB regions of a small heap each one is a "humongous" allocation, and the broker spent
  # twice the CPU (2 GiB through one partition: 18.4-18.9 s against 9.2-9.5 s; docs/performance.md)
  # shellcheck disable=SC2086
  setsid "$JAVA" $HEAP_OPTS -server -XX:+UseG1GC -XX:G1HeapRegionSize=16m -XX:MaxGCPauseMillis=20 \
    -XX:InitiatingHeapOccupancyPercent=35 -XX:+ExplicitGCInvokesConcurrent \
    -XX:+ExitOnOutOfMemoryError -Djava.awt.headless=true \
    -Dlog4j2.configurationFile="$BROKER_LOG4J" -Dkafka.logs.dir="$d/logs" \
    -cp "$LIBS/*" kafka.Kafka "$d/server.properties" \
    </dev/null >>"$d/kafka.out" 2>&1 8>&- 9>&- &   # don't let the JVM inherit our locks
  pid=$!
  echo "$pid" >"$d/kafka.pid"
  say "node $n starting (pid $pid, port $(node_port "$n"), controller $(node_cport "$n"))"
}

node_started() {   # log written since launch says the server started
  local d off size
  d="$(node_dir "$1")"
  [[ -f "$d/logs/server.log" ]] || return 1
  off="$(cat "$d/.log_offset" 2>/dev/null || echo 0)"
  size="$(stat -c %s "$d/logs/server.log")"
  (( size >= off )) || off=0   # rolled over
  tail -c +"$((off + 1))" "$d/logs/server.log" | grep -qF "Kafka Server started"
}

show_log_tail() {
  local d
  d="$(node_dir "$1")"
  {
    echo "----- last 40 lines of $d/logs/server.log -----"
    tail -n 40 "$d/logs/server.log" 2>/dev/null || echo "(no server.log)"
    if [[ -s "$d/kafka.out" ]]; then
      echo "----- last 40 lines of $d/kafka.out -----"
      tail -n 40 "$d/kafka.out"
    fi
  } >&2
}

wait_ready() {   # wait_ready N...
  local deadline=$((SECONDS + START_TIMEOUT)) pending=("$@") n still
  while :; do
    still=()
    for n in "${pending[@]}"; do
      if ! node_pid "$n" >/dev/null; then
        show_log_tail "$n"
        die "node $n exited during startup"
      fi
      if port_open "$(node_port "$n")" && node_started "$n"; then
        say "node $n ready on 127.0.0.1:$(node_port "$n")"
      else
        still+=("$n")
      fi
    done
    [[ ${#still[@]} -eq 0 ]] && return 0
    pending=("${still[@]}")
    if (( SECONDS >= deadline )); then
      for n in "${pending[@]}"; do show_log_tail "$n"; done
      die "node(s) ${pending[*]} not ready after ${START_TIMEOUT}s (left running; use 'kafka.sh stop --data $DATA')"
    fi
    sleep 0.5
  done
}

bootstrap_string() {   # all nodes, or only running ones with "running"
  local n out=""
  for ((n = 1; n <= NODES; n++)); do
    if [[ "${1:-}" == running ]] && ! node_pid "$n" >/dev/null; then continue; fi
    out+="${out:+,}127.0.0.1:$(node_port "$n")"
  done
  echo "$out"
}

cmd_start() {
  parse_opts --data --port --controller-port --nodes -- "$@"
  find_java
  cmd_fetch
  mkdir -p "$DATA" || die "cannot create data dir $DATA"
  resolve_data
  lock_data
  local n
  if load_cluster; then
    # Existing data dir: the layout is fixed at format time (quorum voters, cluster id).
    [[ -z "$OPT_NODES" || "$OPT_NODES" == "$NODES" ]] || die "$DATA holds a $NODES-node cluster; use another --data or delete it"
    [[ -z "$OPT_PORT" || "$OPT_PORT" == "$PORT" ]] || die "$DATA was created with --port $PORT; use another --data or delete it"
    [[ -z "$OPT_CPORT" || "$OPT_CPORT" == "$CPORT" ]] || die "$DATA was created with --controller-port $CPORT; use another --data or delete it"
  else
    NODES="${OPT_NODES:-1}"
    [[ "$NODES" =~ ^[13]$ ]] || die "--nodes must be 1 or 3"
    PORT="${OPT_PORT:-9092}"
    CPORT="${OPT_CPORT:-$((PORT + NODES))}"
    [[ "$PORT" =~ ^[0-9]+$ && "$CPORT" =~ ^[0-9]+$ ]] || die "ports must be numbers"
    (( PORT + NODES <= CPORT || CPORT + NODES <= PORT )) || die "broker ports $PORT.. and controller ports $CPORT.. overlap"
    (( PORT > 0 && CPORT > 0 && PORT + NODES <= 65536 && CPORT + NODES <= 65536 )) || die "port out of range"
    CLUSTER_ID="$(tool kafka.tools.StorageTool random-uuid | tail -n1 | tr -d '[:space:]')"
    [[ "$CLUSTER_ID" =~ ^[A-Za-z0-9_-]{22}$ ]] || die "StorageTool random-uuid returned '$CLUSTER_ID'"
    printf 'NODES=%s\nPORT=%s\nCPORT=%s\nCLUSTER_ID=%s\nKAFKA_VERSION=%s\n' \
      "$NODES" "$PORT" "$CPORT" "$CLUSTER_ID" "$KAFKA_VERSION" >"$DATA/cluster.env.tmp"
    mv "$DATA/cluster.env.tmp" "$DATA/cluster.env"
  fi
  for ((n = 1; n <= NODES; n++)); do
    node_pid "$n" >/dev/null || write_properties "$n"
    format_node "$n"
  done
  # Start every node before waiting on any: a lone node of three cannot get a quorum.
  for ((n = 1; n <= NODES; n++)); do launch_node "$n"; done
  wait_ready $(seq 1 "$NODES")
  bootstrap_string
}

cmd_stop() {
  parse_opts --data -- "$@"
  load_cluster || { say "nothing to stop in $DATA"; return 0; }
  lock_data
  local n pid pids=() deadline
  for ((n = 1; n <= NODES; n++)); do
    if pid="$(node_pid "$n")"; then
      kill -TERM "$pid" 2>/dev/null || true
      pids+=("$n:$pid")
    fi
  done
  [[ ${#pids[@]} -eq 0 ]] && { say "not running ($DATA)"; return 0; }
  say "stopping node(s) ${pids[*]}"
  deadline=$((SECONDS + STOP_TIMEOUT))
  while (( SECONDS < deadline )); do
    local alive=0
    for ((n = 1; n <= NODES; n++)); do node_pid "$n" >/dev/null && alive=1; done
    (( alive )) || break
    sleep 0.25
  done
  for ((n = 1; n <= NODES; n++)); do
    if pid="$(node_pid "$n")"; then
      say "node $n (pid $pid) still up after ${STOP_TIMEOUT}s: SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
    fi
  done
  for ((n = 1; n <= NODES; n++)); do
    while node_pid "$n" >/dev/null; do sleep 0.1; done
    rm -f "$(node_dir "$n")/kafka.pid"
  done
  say "stopped ($DATA)"
}

node_arg() {   # validates N against the cluster
  [[ "${1:-}" =~ ^[0-9]+$ ]] || die "expected a node number"
  (( $1 >= 1 && $1 <= NODES )) || die "node $1 out of range 1..$NODES"
}

cmd_kill_node() {
  local n="${1:-}"; shift || true
  parse_opts --data -- "$@"
  load_cluster || die "no cluster in $DATA"
  node_arg "$n"
  lock_data
  local pid
  if pid="$(node_pid "$n")"; then
    kill -KILL "$pid"
    while node_pid "$n" >/dev/null; do sleep 0.05; done
    say "node $n (pid $pid) killed"
  else
    say "node $n not running"
  fi
}

cmd_start_node() {
  local n="${1:-}"; shift || true
  parse_opts --data -- "$@"
  load_cluster || die "no cluster in $DATA; run 'start' first"
  node_arg "$n"
  find_java
  is_fetched || die "jars not fetched; run 'kafka.sh fetch'"
  lock_data
  [[ -f "$(node_dir "$n")/server.properties" ]] || die "node $n has no server.properties"
  launch_node "$n"
  wait_ready "$n"
}

cmd_status() {
  parse_opts --data -- "$@"
  load_cluster || { echo "no cluster in $DATA"; return 1; }
  local n pid up=0
  for ((n = 1; n <= NODES; n++)); do
    if pid="$(node_pid "$n")"; then
      if port_open "$(node_port "$n")"; then
        echo "node $n: up (pid $pid) 127.0.0.1:$(node_port "$n")"
        up=$((up + 1))
      else
        echo "node $n: starting (pid $pid) 127.0.0.1:$(node_port "$n") not accepting yet"
      fi
    else
      echo "node $n: down"
    fi
  done
  (( up == NODES ))
}

cmd_bootstrap() {
  parse_opts --data -- "$@"
  load_cluster || die "no cluster in $DATA"
  local s
  s="$(bootstrap_string running)"
  [[ -n "$s" ]] || die "no node of $DATA is running"
  echo "$s"
}

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//' >&2; }

main() {
  local cmd="${1:-}"
  shift || true
  case "$cmd" in
    fetch) [[ $# -eq 0 ]] || die "fetch takes no options"; cmd_fetch ;;
    start) cmd_start "$@" ;;
    stop) cmd_stop "$@" ;;
    kill-node) cmd_kill_node "$@" ;;
    start-node) cmd_start_node "$@" ;;
    status) cmd_status "$@" ;;
    bootstrap) cmd_bootstrap "$@" ;;
    -h | --help | help) usage ;;
    *) usage; exit 2 ;;
  esac
}

main "$@"
