#!/usr/bin/env bash
# `make run`: the whole of volmirror on one machine, under ./demo/ of the repository.
#
#   demo/source/        sample volume "demo" (created once: 50 case files, a 32 MiB archive image,
#                       a file of zeros, a symlink, an empty directory); edit it freely
#   demo/mirror/demo/   where the mirror agent writes it
#   demo/kafka/         single-node KRaft broker on 127.0.0.1:9092 (deploy/kafka/kafka.sh)
#   demo/source.toml, demo/mirror.toml, demo/state/   agent configs and state
#   demo/source.log, demo/mirror.log                  agent logs
#   metrics/status: http://127.0.0.1:9464 (source), http://127.0.0.1:9465 (mirror)
#
# Interactive (default): live status line until Ctrl-C, which stops the agents and the broker.
# Headless (DEMO_SECONDS=N, for CI): start everything, wait until the mirror is identical to the
# source, append to one file and create another, check both arrive identical within 30 s, print
# "demo: PASS" or "demo: FAIL: ...", stop everything; exit 0 only on PASS. The checks never run
# past N seconds from the start of this script (stopping comes on top, at most ~1 min).
#
# Everything it starts it stops, on success, failure, Ctrl-C or SIGTERM. State in demo/ is kept
# between runs (`make clean` removes it).
set -euo pipefail

REPO="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/../.." && pwd -P)"
cd "$REPO"
DEMO="$REPO/demo"
SRC="$DEMO/source"
MIRROR_ROOT="$DEMO/mirror"
DST="$MIRROR_ROOT/demo"
KAFKA_DATA="$DEMO/kafka"
KAFKA_SH="$REPO/deploy/kafka/kafka.sh"
BROKER_PORT=9092
CONTROLLER_PORT=9093
SOURCE_METRICS=9464
MIRROR_METRICS=9465
CHANGE_TIMEOUT=30   # seconds a live change may take to arrive in headless mode

if [[ -x "$REPO/.venv/bin/volmirror" ]]; then
  VOLMIRROR="$REPO/.venv/bin/volmirror"
  PYTHON="$REPO/.venv/bin/python"
elif command -v volmirror >/dev/null 2>&1; then
  VOLMIRROR="$(command -v volmirror)"
  PYTHON="python3"
else
  echo "demo: volmirror is not installed: run 'make run' (it builds .venv), not this script directly" >&2
  exit 1
fi

say() { echo "demo: $*"; }
die() { echo "demo: error: $*" >&2; exit 1; }

DEMO_SECONDS="${DEMO_SECONDS:-}"
HEADLESS=0
if [[ -n "$DEMO_SECONDS" ]]; then
  [[ "$DEMO_SECONDS" =~ ^[0-9]+$ && "$DEMO_SECONDS" -ge 10 ]] \
    || die "DEMO_SECONDS must be a whole number of seconds >= 10, got '$DEMO_SECONDS'"
  HEADLESS=1
fi
DEADLINE=$((SECONDS + ${DEMO_SECONDS:-0}))
remaining() { echo $((DEADLINE - SECONDS)); }

# ---------------------------------------------------------------- stop everything we started

SOURCE_PID="" MIRROR_PID="" WATCH_PID="" BROKER_STARTED=0 INTERRUPTED="" CLEANED=0

stop_agent() {   # stop_agent NAME PID : SIGTERM, wait up to 20 s, then SIGKILL
  local name="$1" pid="$2" i rc=0
  [[ -n "$pid" ]] || return 0
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 80; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    if kill -0 "$pid" 2>/dev/null; then
      say "$name agent (pid $pid) still running 20 s after SIGTERM: SIGKILL (see demo/$name.log)"
      kill -KILL "$pid" 2>/dev/null || true
    fi
  fi
  wait "$pid" 2>/dev/null || rc=$?
  rm -f "$DEMO/$name.pid"
  if ((rc != 0)); then
    say "$name agent exited with status $rc (see demo/$name.log)"
  else
    say "$name agent stopped"
  fi
}

cleanup() {
  local rc=$?
  ((CLEANED)) && return 0
  CLEANED=1
  trap '' INT TERM   # a second Ctrl-C must not leave the broker behind
  if [[ -n "$WATCH_PID" ]]; then
    kill -TERM "$WATCH_PID" 2>/dev/null || true
    wait "$WATCH_PID" 2>/dev/null || true
    echo
  fi
  [[ -n "$INTERRUPTED" ]] && say "$INTERRUPTED received: stopping"
  stop_agent source "$SOURCE_PID"
  stop_agent mirror "$MIRROR_PID"
  if ((BROKER_STARTED)); then
    bash "$KAFKA_SH" stop --data "$KAFKA_DATA" || true
  fi
  if [[ -n "$INTERRUPTED" ]]; then
    ((HEADLESS)) && { say "FAIL: interrupted by $INTERRUPTED"; exit 130; }
    exit 0   # interactive: Ctrl-C is the normal way to stop
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'INTERRUPTED=SIGINT; exit 130' INT
trap 'INTERRUPTED=SIGTERM; exit 143' TERM

# ---------------------------------------------------------------- helpers

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

port_owner() {   # best effort: "pid=123 (java)" from ss, else nothing
  command -v ss >/dev/null 2>&1 || return 0
  ss -ltnpH "sport = :$1" 2>/dev/null | grep -o 'users:((.*))' | head -n1 || true
}

require_free_port() {   # require_free_port PORT WHAT
  if port_open "$1"; then
    local who
    who="$(port_owner "$1")"
    die "port $1 ($2) is already in use by another process${who:+: $who}; stop it (or run the demo elsewhere) and retry"
  fi
}

demo_pid() {   # demo_pid NAME : pid of a leftover agent of an earlier run (demo/NAME.pid), if alive
  local f="$DEMO/$1.pid" pid
  [[ -f "$f" ]] || return 1
  pid="$(cat "$f" 2>/dev/null || true)"
  [[ "$pid" =~ ^[0-9]+$ && -r "/proc/$pid/cmdline" ]] || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF -- "$1 --config $DEMO/$1.toml" || return 1
  echo "$pid"
}

log_tail() {   # log_tail NAME
  echo "----- last 25 lines of demo/$1.log -----" >&2
  tail -n 25 "$DEMO/$1.log" >&2 2>/dev/null || echo "(no log)" >&2
}

agents_alive() {   # prints which agent died (with its log) and returns 1
  local name pid
  for name in source mirror; do
    [[ "$name" == source ]] && pid="$SOURCE_PID" || pid="$MIRROR_PID"
    if ! kill -0 "$pid" 2>/dev/null; then
      local rc=0
      wait "$pid" 2>/dev/null || rc=$?
      [[ "$name" == source ]] && SOURCE_PID="" || MIRROR_PID=""
      echo "demo: the $name agent exited (status $rc)" >&2
      log_tail "$name"
      return 1
    fi
  done
}

status_line() {
  "$PYTHON" "$REPO/deploy/demo/statusline.py" --source "127.0.0.1:$SOURCE_METRICS" \
    --mirror "127.0.0.1:$MIRROR_METRICS" 2>/dev/null || true
}

listing() {   # type, mode, size, mtime and symlink target of everything under $1 (not $1 itself)
  (cd "$1" && find . -mindepth 1 \( -type d -printf 'd %m %P\n' \) -o \( -type l -printf 'l %P -> %l\n' \) \
    -o -printf '%y %m %s %T@ %P\n' | LC_ALL=C sort)
}

identical() {   # content (diff -r, symlinks compared as links) and metadata; reason in $DEMO/.diff
  [[ -d "$DST" ]] || { echo "demo/mirror/demo does not exist yet" >"$DEMO/.diff"; return 1; }
  diff -r --no-dereference "$SRC" "$DST" >"$DEMO/.diff" 2>&1 || return 1
  diff <(listing "$SRC") <(listing "$DST") >"$DEMO/.diff" 2>&1 || return 1
}

wait_identical() {   # wait_identical WHAT TIMEOUT : poll until identical; status line every 5 s
  local what="$1" limit=$((SECONDS + $2)) next=$((SECONDS + 5)) t0=$SECONDS
  while ! identical; do
    agents_alive || return 1
    if ((SECONDS >= limit)); then
      echo "demo: $what: not identical after $((SECONDS - t0)) s; differences (first 20 lines):" >&2
      head -n 20 "$DEMO/.diff" >&2
      return 1
    fi
    if ((SECONDS >= next)); then
      say "waiting for $what ($((SECONDS - t0)) s): $(status_line)"
      next=$((SECONDS + 5))
    fi
    sleep 0.2
  done
}

# ---------------------------------------------------------------- sample data

make_samples() {
  [[ -d "$SRC" ]] && return 0
  say "creating sample files in demo/source"
  local tmp="$DEMO/.source.tmp" i
  rm -rf "$tmp"
  mkdir -p "$tmp/cases" "$tmp/archive" "$tmp/inbox"
  for ((i = 1; i <= 50; i++)); do
    printf 'Case %03d\nFiled: 2024-%02d-%02d\nParties: plaintiff %d v. defendant %d\nStatus: open\n' \
      "$i" $((i % 12 + 1)) $((i % 28 + 1)) "$i" $((i + 100)) >"$tmp/cases/case-$(printf %03d "$i").txt"
  done
  head -c $((32 * 1024 * 1024)) /dev/urandom >"$tmp/archive/archive-2024.img"
  head -c $((16 * 1024 * 1024)) /dev/zero >"$tmp/archive/zeros.bin"
  ln -s cases/case-050.txt "$tmp/latest-case"
  # inbox/ stays empty
  mv "$tmp" "$SRC"   # all or nothing: an interrupted run does not leave half a sample volume
}

write_configs() {
  cat >"$DEMO/source.toml" <<EOF
# Written by deploy/demo/run.sh (rewritten on every run). Relative paths: relative to this file.
[kafka]
bootstrap_servers = ["127.0.0.1:$BROKER_PORT"]
topic = "volmirror.events"
partitions = 1
replication_factor = 1

[source]
state_dir = "state/source"
heartbeat_interval = 1.0
checkpoint_interval = 15.0
announce_interval = 10.0

[[source.volumes]]
name = "demo"
path = "source"

[metrics]
listen = "127.0.0.1:$SOURCE_METRICS"
EOF
  cat >"$DEMO/mirror.toml" <<EOF
# Written by deploy/demo/run.sh (rewritten on every run). Relative paths: relative to this file.
[kafka]
bootstrap_servers = ["127.0.0.1:$BROKER_PORT"]
topic = "volmirror.events"
partitions = 1
replication_factor = 1

[mirror]
root = "mirror"
state_dir = "state/mirror"
group_id = "demo-site"
commit_interval_ms = 200

[metrics]
listen = "127.0.0.1:$MIRROR_METRICS"
EOF
  local f
  for f in source mirror; do
    "$VOLMIRROR" check-config --config "$DEMO/$f.toml" >/dev/null || die "demo/$f.toml is invalid (message above)"
  done
}

start_agent() {   # start_agent NAME : background, own session (Ctrl-C reaches us, we stop it in order)
  local name="$1" pid
  printf '=== %s demo: starting %s agent\n' "$(date -Is)" "$name" >>"$DEMO/$name.log"
  setsid "$VOLMIRROR" "$name" --config "$DEMO/$name.toml" --log-format text </dev/null >>"$DEMO/$name.log" 2>&1 &
  pid=$!
  echo "$pid" >"$DEMO/$name.pid"
  [[ "$name" == source ]] && SOURCE_PID="$pid" || MIRROR_PID="$pid"
  say "$name agent started (pid $pid, log demo/$name.log, metrics http://127.0.0.1:$([[ $name == source ]] && echo $SOURCE_METRICS || echo $MIRROR_METRICS)/metrics)"
}

# ---------------------------------------------------------------- start

mkdir -p "$DEMO" "$MIRROR_ROOT" "$DEMO/state"

# Leftovers of an earlier run that was killed hard: our own agents and broker, nobody else's.
for name in source mirror; do
  if pid="$(demo_pid "$name")"; then
    say "stopping the $name agent left running by an earlier demo run (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 80; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    kill -KILL "$pid" 2>/dev/null || true
  fi
done
BROKER_REUSED=0
if bash "$KAFKA_SH" status --data "$KAFKA_DATA" >/dev/null 2>&1; then
  say "reusing the demo broker left running by an earlier run (demo/kafka); it is stopped at the end"
  BROKER_REUSED=1
else
  require_free_port "$BROKER_PORT" "Kafka broker"
  require_free_port "$CONTROLLER_PORT" "Kafka controller"
fi
require_free_port "$SOURCE_METRICS" "source agent metrics"
require_free_port "$MIRROR_METRICS" "mirror agent metrics"

make_samples
write_configs

say "starting a single-node Kafka broker on 127.0.0.1:$BROKER_PORT (data: demo/kafka)"
BROKER_STARTED=1   # from here on the exit trap stops it, even if start fails half-way
if ((HEADLESS)); then
  ((BROKER_REUSED)) || export VOLMIRROR_KAFKA_START_TIMEOUT="$(($(remaining) > 5 ? $(remaining) : 5))"
fi
bash "$KAFKA_SH" start --data "$KAFKA_DATA" --port "$BROKER_PORT" --controller-port "$CONTROLLER_PORT" \
  >/dev/null || die "the Kafka broker did not start (messages above; logs in demo/kafka/node1/logs/)"
say "broker ready after $SECONDS s"

start_agent mirror
start_agent source

# ---------------------------------------------------------------- headless (CI) mode

if ((HEADLESS)); then
  say "headless mode: checks must finish within $DEMO_SECONDS s of the start ($(remaining) s left)"
  t0=$SECONDS
  if ! wait_identical "initial sync" "$(remaining)"; then
    say "FAIL: initial sync of demo/source to demo/mirror/demo not identical within $DEMO_SECONDS s"
    log_tail source; log_tail mirror
    exit 1
  fi
  say "initial sync identical after $((SECONDS - t0)) s ($(find "$SRC" -mindepth 1 | wc -l) entries, $(du -sh --apparent-size "$SRC" | cut -f1)): $(status_line)"

  edited="$SRC/cases/case-007.txt"
  new="$SRC/cases/new-case-$(date +%Y%m%d-%H%M%S)-$$.txt"
  printf 'Hearing %s: adjourned\n' "$(date -Is)" >>"$edited"
  printf 'New case filed %s by the demo\n' "$(date -Is)" >"$new"
  say "appended a line to ${edited#"$REPO"/} and wrote ${new#"$REPO"/}"
  left=$(remaining)
  ((left > CHANGE_TIMEOUT)) && left=$CHANGE_TIMEOUT
  ((left > 0)) || left=1
  t1=$SECONDS
  if ! wait_identical "live changes" "$left"; then
    say "FAIL: the changes did not arrive identical within $left s"
    log_tail source; log_tail mirror
    exit 1
  fi
  cmp "$edited" "$DST/cases/case-007.txt" && cmp "$new" "$DST/cases/${new##*/}" \
    || { say "FAIL: cmp found a difference"; exit 1; }
  say "live changes identical after $((SECONDS - t1)) s: $(status_line)"
  say "PASS: initial sync and live changes byte-identical in demo/mirror/demo ($SECONDS s in all)"
  exit 0
fi

# ---------------------------------------------------------------- interactive mode

cat <<EOF
demo: running. Edit files under demo/source; they appear under demo/mirror/demo.
demo:   logs    demo/source.log  demo/mirror.log
demo:   metrics http://127.0.0.1:$SOURCE_METRICS/metrics (source)  http://127.0.0.1:$MIRROR_METRICS/metrics (mirror)
demo:   status  .venv/bin/volmirror status --config demo/mirror.toml
demo: Ctrl-C stops the agents and the broker.
EOF
if [[ -t 0 && -t 1 ]]; then
  # A redrawn line: volmirror's own watcher (mirror lag/bytes/file updates, source pending files).
  "$VOLMIRROR" status --config "$DEMO/mirror.toml" --source-config "$DEMO/source.toml" --watch &
  WATCH_PID=$!
  while agents_alive; do sleep 1; done
else
  # No terminal: one plain line every 10 s instead of a redrawn one.
  while agents_alive; do
    say "$(date +%H:%M:%S) $(status_line)"
    for ((i = 0; i < 10; i++)); do agents_alive || break 2; sleep 1; done
  done
fi
exit 1   # an agent died (reported above)
