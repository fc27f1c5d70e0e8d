#!/usr/bin/env bash
# bench/run.sh: atomnode and gearmand 1.1.20 side by side, same machine, same load, one run.
#
# Builds bench/loadgen, then for each workload starts each server on a fresh process (and a
# fresh database) on a free port of 127.0.0.1, drives it with loadgen, stops it by PID, REPS
# times with the servers interleaved, and prints the machine, then a markdown table of medians
# and the ratios that issues 2, 3 and 12 ask for, with each server's CPU per job.
# On a machine with two or more CPUs the load generator and the server run pinned to
# different CPUs (taskset), so that they do not take turns on one.
#
# Environment:
#   SCALE (1)       multiplies every job count (SCALE=0.05 REPS=1: a smoke run, under a minute)
#   REPS (3)        runs per server and workload; the table shows medians (3 or more to count)
#   QUICK_REPS      runs of the short rows whose result moves with the machine's phases
#                   (roundtrip, serial, bglat, gearload: seconds each), default REPS, and at
#                   least 5 when REPS is 3 or more: one run in a slow phase cannot set the
#                   median of 5, as it can of 3
#   SECTIONS        subset of: roundtrip serial grab bglat submit drain depth kill campaign rss
#                   gearload (default: all; gearload only when its source is there, see GEARLOAD_SRC)
#   SERVERS         subset of: gm (gearmand -t 1), gs (gearmand -t 1 -q libsqlite3), an (atomnode)
#   GRAB_SECS       duration of each grab-latency run (default 5*SCALE, at least 1)
#   KILL_VERIFY=1   after the kill -9 test, drain the recovered queue and check every job
#   KILLS           kills in the kill -9 campaign under load (default 100*SCALE, at least 5)
#   TIMEOUT (600)   per loadgen run, seconds
#   RESULTS=FILE    also append every raw RESULT line to FILE
#   KEEP_TMP=1      keep the temp dir (databases, server logs)
#   PIN (1)         0: no taskset pinning; LOAD_CPU (0) and SERVER_CPU (last CPU) choose the CPUs
#   GEARMAND (/usr/sbin/gearmand)  ATOMNODE (.venv/bin/atomnode of this checkout)
#   AN_ARGS         extra arguments for every `atomnode run` (default: the web console off
#                   when this atomnode has one)
#   CONSOLE_ARGS    arguments that turn the web console on, for the idle-RSS row (default:
#                   `--http 127.0.0.1:PORT` when `atomnode run --help` offers --http; else the
#                   console-on figure is n/a)
#   BASE_REF        a git ref of this repository: its atomnode/ package (extensions built) runs too, as server
#                   `ab` beside `an` in every atomnode row (same venv), to measure a change
#   GEARLOAD_SRC    gearload.c of the independent generator (default ../shared/bench/gearload.c
#                   beside this checkout); the `gearload` section builds it into bench/out/
# Exit status: 0 if every row passes, 1 if a row fails or a run errors, 3 on setup problems.
set -uo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(dirname "$HERE")
SCALE=${SCALE:-1}
REPS=${REPS:-3}
QUICK_REPS=${QUICK_REPS:-$(( REPS >= 3 && REPS < 5 ? 5 : REPS ))}
SECTION_REPS=$REPS  # the current section's runs (REPS, or QUICK_REPS for the short rows)
GEARLOAD_SRC=${GEARLOAD_SRC:-$(dirname "$ROOT")/shared/bench/gearload.c}
DEFAULT_SECTIONS="roundtrip serial grab bglat submit drain depth kill campaign rss"
[ -f "$GEARLOAD_SRC" ] && DEFAULT_SECTIONS="$DEFAULT_SECTIONS gearload"
SECTIONS=${SECTIONS:-$DEFAULT_SECTIONS}
SERVERS=${SERVERS:-"gm gs an"}
TIMEOUT=${TIMEOUT:-600}
GEARMAND=${GEARMAND:-/usr/sbin/gearmand}
ATOMNODE=${ATOMNODE:-$ROOT/.venv/bin/atomnode}
LOADGEN=$HERE/out/loadgen
GEARLOAD=$HERE/out/gearload
CC=${CC:-gcc}
NCPU=$(nproc 2>/dev/null || echo 1)
PIN=${PIN:-1}
LOAD_CPU=${LOAD_CPU:-0}
SERVER_CPU=${SERVER_CPU:-$((NCPU - 1))}

log() { printf '%s %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "run.sh: $*"; exit 3; }

# n BASE [MIN]: BASE*SCALE rounded, at least MIN.
n() { awk -v b="$1" -v s="$SCALE" -v m="${2:-1}" 'BEGIN { v = int(b * s + 0.5); if (v < m) v = m; print v }'; }
has() { case " $1 " in *" $2 "*) return 0 ;; *) return 1 ;; esac; }

# ---------- setup ----------
mkdir -p "$HERE/out"
if [ ! -x "$LOADGEN" ] || [ "$HERE/loadgen.c" -nt "$LOADGEN" ]; then
  log "building loadgen"
  "$CC" -O2 -Wall -Wextra -std=gnu11 -o "$LOADGEN" "$HERE/loadgen.c" -lm || die "cannot build loadgen"
fi
if has "$SECTIONS" gearload; then
  if [ ! -f "$GEARLOAD_SRC" ]; then
    log "no gearload source at $GEARLOAD_SRC: the gearload section is skipped"
    SECTIONS=$(echo " $SECTIONS " | sed 's/ gearload / /')
  elif [ ! -x "$GEARLOAD" ] || [ "$GEARLOAD_SRC" -nt "$GEARLOAD" ]; then
    log "building gearload from $GEARLOAD_SRC"
    "$CC" -O2 -Wall -Wextra -std=gnu11 -o "$GEARLOAD" "$GEARLOAD_SRC" || die "cannot build gearload"
  fi
fi
# Pinning: the generator on LOAD_CPU, every server on SERVER_CPU (all its threads).
PIN_LOAD=() PIN_SRV=()
if [ "$PIN" = 1 ] && [ "$NCPU" -ge 2 ] && command -v taskset >/dev/null; then
  PIN_LOAD=(taskset -c "$LOAD_CPU") PIN_SRV=(taskset -c "$SERVER_CPU")
  PINNING="generator on CPU $LOAD_CPU, server on CPU $SERVER_CPU (taskset)"
else
  PINNING="not pinned"
fi
has "$SERVERS" gm || has "$SERVERS" gs && { [ -x "$GEARMAND" ] || die "no gearmand at $GEARMAND (apt-get install gearman-job-server)"; }
if has "$SERVERS" an && [ ! -x "$ATOMNODE" ]; then
  log "no atomnode at $ATOMNODE (make venv): atomnode rows will be n/a"
  SERVERS=$(echo " $SERVERS " | sed 's/ an / /')
fi
AN_HELP=
has "$SERVERS" an && AN_HELP=$("$ATOMNODE" run --help 2>/dev/null)
# The web console (issue 13) is off in every row unless a row turns it on.
if [ -z "${AN_ARGS+x}" ]; then
  AN_ARGS=
  case $AN_HELP in *--http*) AN_ARGS="--http none" ;; esac
fi
read -r -a AN_EXTRA <<<"$AN_ARGS"

TMP=$(mktemp -d "${TMPDIR:-/tmp}/atomnode-bench.XXXXXX")
RES=$TMP/results
: >"$RES"
if [ -n "${BASE_REF:-}" ] && has "$SERVERS" an; then
  mkdir -p "$TMP/base"
  git -C "$ROOT" archive "$BASE_REF" atomnode | tar -x -C "$TMP/base" || die "cannot export $BASE_REF"
  # Its compiled hot path too (setup.py: mypyc and the C extensions), built as `make venv`
  # builds this tree's: without it `ab` would run the pure-Python modules, about twice the
  # CPU per round trip, and every comparison with `an` would be wrong.
  if git -C "$ROOT" cat-file -e "$BASE_REF:setup.py" 2>/dev/null; then
    log "building $BASE_REF's extensions"
    git -C "$ROOT" archive "$BASE_REF" setup.py pyproject.toml | tar -x -C "$TMP/base" &&
      (cd "$TMP/base" && "$(dirname "$ATOMNODE")/python" setup.py -q build_ext --inplace \
        >"$TMP/base-build.log" 2>&1) && rm -rf "$TMP/base/build" ||
      die "cannot build $BASE_REF's extensions (see $TMP/base-build.log)"
  fi
  BASE_DESC="$BASE_REF ($(git -C "$ROOT" rev-parse --short "$BASE_REF"))"
  SERVERS="$SERVERS ab"
fi
SRV_PID=
cleanup() {
  # Only the server this script started and has not reaped yet, by its PID.
  [ -n "$SRV_PID" ] && kill -KILL "$SRV_PID" 2>/dev/null && wait "$SRV_PID" 2>/dev/null
  if [ "${KEEP_TMP:-0}" = 1 ]; then log "kept $TMP"; else rm -rf "$TMP"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------- servers ----------
SRV_PORT= SRV_DB=
RUN_ID=0

# start_server KIND [DB [AN_ARGS...]]: a fresh server on a free port; sets SRV_PID and SRV_PORT.
start_server() {
  local kind=$1 db=${2:-} tries
  local -a an_args=("${AN_EXTRA[@]}")
  [ $# -gt 2 ] && an_args=("${@:3}")
  RUN_ID=$((RUN_ID + 1))
  for tries in 1 2 3; do
    SRV_PORT=$("$LOADGEN" freeport) || die "no free port"
    local logf=$TMP/$kind-$RUN_ID.log
    case $kind in
      gm) "${PIN_SRV[@]}" "$GEARMAND" -L 127.0.0.1 -p "$SRV_PORT" -t 1 -l "$logf" >"$logf.out" 2>&1 & ;;
      gs) [ -n "$db" ] || db=$TMP/$kind-$RUN_ID.db
          "${PIN_SRV[@]}" "$GEARMAND" -L 127.0.0.1 -p "$SRV_PORT" -t 1 -l "$logf" -q libsqlite3 \
            --libsqlite3-db="$db" >"$logf.out" 2>&1 & ;;
      an|ab) [ -n "$db" ] || { mkdir -p "$TMP/an-$RUN_ID"; db=$TMP/an-$RUN_ID/q.db; }
          local pypath=${PYTHONPATH:-}
          [ "$kind" = ab ] && pypath=$TMP/base
          "${PIN_SRV[@]}" env PYTHONPATH="$pypath" "$ATOMNODE" run --listen "127.0.0.1:$SRV_PORT" --db "$db" \
            "${an_args[@]//@FREEPORT@/$("$LOADGEN" freeport)}" >"$logf" 2>&1 & ;;
    esac
    SRV_PID=$! SRV_DB=$db
    if wait_serving; then return 0; fi
    log "$kind did not start on port $SRV_PORT (log: $(tail -n 3 "$logf" 2>/dev/null | tr '\n' ' '))"
    stop_server KILL
  done
  return 1
}

# wait_serving: until the admin `status` answers (60 s), as long as the process lives.
wait_serving() {
  local i
  for i in $(seq 1 600); do
    kill -0 "$SRV_PID" 2>/dev/null || return 1
    "$LOADGEN" status -p "$SRV_PORT" -f '' --wait -t 0.1 >/dev/null 2>&1 && return 0
  done
  return 1
}

# stop_server [KILL]: SIGTERM (or SIGKILL) the server we started, by PID, and reap it.
stop_server() {
  local sig=${1:-TERM} i
  [ -n "$SRV_PID" ] || return 0
  kill "-$sig" "$SRV_PID" 2>/dev/null
  for i in $(seq 1 150); do kill -0 "$SRV_PID" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$SRV_PID" 2>/dev/null
  wait "$SRV_PID" 2>/dev/null
  SRV_PID=
} 2>/dev/null # also hides bash's "Killed" job notice

# lg LABEL WORKLOAD ARGS...: run loadgen against the current server, record its RESULT line.
lg() {
  local label=$1 workload=$2 out rc
  shift 2
  out=$("${PIN_LOAD[@]}" "$LOADGEN" "$workload" -p "$SRV_PORT" -t "$TIMEOUT" --label "$label" "$@" 2>"$TMP/lg.err")
  rc=$?
  if [ $rc -ne 0 ]; then
    log "  $label: loadgen exit $rc: $(tail -n 2 "$TMP/lg.err" | tr '\n' ' ')"
    echo "ERROR label=$label rc=$rc" >>"$RES"
    return 1
  fi
  out=$(printf '%s\n' "$out" | grep '^RESULT')
  printf '%s\n' "$out" >>"$RES"
  [ -n "${RESULTS:-}" ] && printf '%s\n' "$out" >>"$RESULTS"
  log "  $out"
  return 0
}

# one KIND LABEL WORKLOAD ARGS...: fresh server, one loadgen run, stop.
one() {
  local kind=$1 label=$2
  shift 2
  if ! start_server "$kind"; then echo "ERROR label=$label rc=start" >>"$RES"; return 1; fi
  lg "$label" "$@" --pid "$SRV_PID"
  stop_server
}

# ---------- results ----------
# vals LABEL KEY: every value of KEY in the RESULT lines of LABEL.
vals() { grep -F " label=$1 " "$RES" | tr ' ' '\n' | sed -n "s/^$2=//p"; }
# med LABEL KEY: median (empty if none); range LABEL KEY: min-max.
med() { vals "$1" "$2" | sort -g | awk '{ v[NR] = $1 } END { if (NR) print (NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2) }'; }
range() { vals "$1" "$2" | sort -g | awk 'NR == 1 { a = $1 } { b = $1 } END { if (NR > 1) printf "%s-%s", a, b; else if (NR) print a }'; }
errors() { grep -c -F "ERROR label=$1 " "$RES"; }
# calc EXPR: awk arithmetic on strings that may be empty (then prints nothing).
calc() { awk "BEGIN { $1 }" 2>/dev/null; }

# ---------- sections ----------
N_RT=$(n 100000 1000)
N_SERIAL=$(n 10000 500)
N_SUB_GS=$(n 3000 1000)
N_SUB_AN=$(n 100000 2000)
N_DRAIN_GS=$(n 2000 500)
N_DRAIN_AN=$(n 50000 2000)
N_DEPTH=$(n 500000 10000)
# The depth row's two timed batches: 150,000 jobs, about 2 s each at today's rates. With 50,000
# (0.65 s each) a few slow fsyncs in one batch moved the ratio by 0.1-0.25: 0.73-1.01 over
# 8 runs of one build (docs/performance.md, round 9).
N_DEPTH_BATCH=$(n 150000 2000)
N_KILL=$(n 1000000 10000)
KILLS=${KILLS:-$(n 100 5)}
N_BGLAT_AN=$(n 3000 400)
N_BGLAT_GS=$(n 1000 200)
BGLAT_RATE=${BGLAT_RATE:-200}
RSS_SETTLE=${RSS_SETTLE:-2}
GRAB_SECS=${GRAB_SECS:-$(calc 'v = 5 * '"$SCALE"'; if (v < 1) v = 1; print v')}

runs_of() { # runs_of SECTION KINDS WORKLOAD ARGS...: SECTION_REPS rounds, servers interleaved
  local section=$1 kinds=$2 rep kind
  shift 2
  has "$kinds" an && kinds="$kinds ab"
  for rep in $(seq 1 "$SECTION_REPS"); do
    for kind in $kinds; do
      has "$SERVERS" "$kind" || continue
      log "$section: $kind, run $rep/$SECTION_REPS"
      one "$kind" "$kind/$section" "$@"
    done
  done
}

sized_runs() { # like runs_of, but the job count differs per server: N_GS / N_AN
  local section=$1 kinds=$2 ngs=$3 nan=$4 rep kind
  shift 4
  has "$kinds" an && kinds="$kinds ab"
  for rep in $(seq 1 "$SECTION_REPS"); do
    for kind in $kinds; do
      has "$SERVERS" "$kind" || continue
      log "$section: $kind, run $rep/$SECTION_REPS"
      case $kind in gs) one "$kind" "$kind/$section" "$@" -n "$ngs" ;; *) one "$kind" "$kind/$section" "$@" -n "$nan" ;; esac
    done
  done
}

# server_cpu_us PID: user + system CPU of a process (all threads), microseconds.
server_cpu_us() {
  local hz
  hz=$(getconf CLK_TCK)
  sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | awk -v hz="$hz" '{ printf "%.0f", ($12 + $13) * 1e6 / hz }'
}

# gearload_runs: pipelined round trips driven by the independent generator (the project's
# baseline tool), servers interleaved; server CPU read from /proc around each run.
gearload_runs() {
  local rep kind label out c0 c1 jobs
  for rep in $(seq 1 "$SECTION_REPS"); do
    for kind in gm an ab; do
      has "$SERVERS" "$kind" || continue
      label=$kind/gearload-rt
      log "gearload: $kind, run $rep/$SECTION_REPS"
      if ! start_server "$kind"; then echo "ERROR label=$label rc=start" >>"$RES"; continue; fi
      c0=$(server_cpu_us "$SRV_PID")
      out=$("${PIN_LOAD[@]}" "$GEARLOAD" roundtrip -p "$SRV_PORT" -c 4 -w 16 -k 4 -n "$N_RT" \
        -f bench-gl -t "$TIMEOUT" --label "$label" 2>"$TMP/lg.err")
      if [ $? -ne 0 ]; then
        log "  $label: gearload failed: $(tail -n 2 "$TMP/lg.err" | tr '\n' ' ')"
        echo "ERROR label=$label rc=gearload" >>"$RES"
      else
        c1=$(server_cpu_us "$SRV_PID")
        out=$(printf '%s\n' "$out" | grep '^RESULT' | tail -n 1)
        jobs=$(printf '%s\n' "$out" | tr ' ' '\n' | sed -n 's/^jobs=//p')
        out="$out server_cpu_s=$(calc "printf \"%.2f\", ($c1 - $c0) / 1e6") cpu_us_per_job=$(calc "printf \"%.1f\", ($c1 - $c0) / $jobs")"
        printf '%s\n' "$out" >>"$RES"
        [ -n "${RESULTS:-}" ] && printf '%s\n' "$out" >>"$RESULTS"
        log "  $out"
      fi
      stop_server
    done
  done
}

# rss_runs: resident memory of an idle server (no pools, no jobs) RSS_SETTLE s after it
# answers; atomnode with the web console off (AN_ARGS) and, when there is one, on.
rss_runs() {
  local rep kind label rss
  local -a console=()
  if [ -n "${CONSOLE_ARGS+x}" ]; then
    read -r -a console <<<"$CONSOLE_ARGS"
  else
    case $AN_HELP in *--http*) console=(--http "127.0.0.1:@FREEPORT@") ;; esac
  fi
  for rep in $(seq 1 "$REPS"); do
    for kind in gm an ab an-console; do
      case $kind in
        an-console) has "$SERVERS" an && [ ${#console[@]} -gt 0 ] || continue
                    start_server an "" "${console[@]}" || { echo "ERROR label=an-console/rss-idle rc=start" >>"$RES"; continue; } ;;
        *) has "$SERVERS" "$kind" || continue
           start_server "$kind" || { echo "ERROR label=$kind/rss-idle rc=start" >>"$RES"; continue; } ;;
      esac
      label=$kind/rss-idle
      sleep "$RSS_SETTLE"
      rss=$(awk '/^VmRSS:/ { print $2 }' "/proc/$SRV_PID/status" 2>/dev/null)
      if [ -n "$rss" ]; then
        echo "RESULT workload=rss label=$label rss_kb=$rss" >>"$RES"
        log "  $label: $rss kB"
      else
        echo "ERROR label=$label rc=rss" >>"$RES"
      fi
      stop_server
    done
  done
}

# rss_of PID [FIELD]: a status field (VmRSS by default) of a process, in kB.
rss_of() { awk -v f="${2:-VmRSS}:" '$1 == f { print $2 }' "/proc/$1/status" 2>/dev/null; }

kill_test() {
  has "$SERVERS" an || return 0
  local prefix=kill$$ rep since rss0 rss hwm t0 waited
  log "kill: atomnode, $N_KILL jobs through the queue (they stay in the history), then $N_KILL queued"
  if ! start_server an; then echo "ERROR label=an/kill-fill rc=start" >>"$RES"; return; fi
  local db=$SRV_DB
  # The history: N_KILL jobs submitted and run, so that the database holds as many finished
  # jobs as queued ones (issue 10, point 3: the restart budget counts 1M history rows).
  sleep "$RSS_SETTLE"
  rss0=$(rss_of "$SRV_PID")
  if lg an/kill-history drain -c 4 -w 16 -k 4 -n "$N_KILL" -f bench-history; then
    # Memory after the drain (issue 10, point 8): RSS back within 100 MiB of its value
    # before the load, within 10 s. Polled every 0.25 s from the end of the drain.
    hwm=$(rss_of "$SRV_PID" VmHWM) t0=$(date +%s%N) waited=
    while :; do
      rss=$(rss_of "$SRV_PID")
      waited=$(calc "printf \"%.2f\", ($(date +%s%N) - $t0) / 1e9")
      [ -z "$rss" ] && break
      [ $((rss - rss0)) -le 102400 ] && break
      calc "exit !($waited >= 10)" && break
      sleep 0.25
    done
    [ -n "$rss" ] && echo "RESULT workload=rss label=an/drain-rss jobs=$N_KILL rss_before_kb=$rss0 rss_peak_kb=$hwm rss_after_kb=$rss seconds=$waited" >>"$RES"
    log "  drain-rss: before $rss0 kB, peak $hwm kB, $rss kB after ${waited}s"
  fi
  lg an/kill-fill submit-bg -c 4 -w 16 -n "$N_KILL" -f bench-kill --unique-prefix "$prefix" --pid "$SRV_PID"
  # Each restart twice: as deployed (every core: recovery reads SQLite in a thread while
  # the broker takes the jobs read so far), and pinned to the server's one core as the
  # throughput rows are (no gearmand counterpart here; the poller sleeps meanwhile).
  local pin label
  for rep in $(seq 1 "$REPS"); do
    for pin in all one; do
      stop_server KILL
      label=an/kill-restart
      [ "$pin" = one ] && label=an/kill-restart-1cpu
      log "kill: kill -9 with $N_KILL jobs queued, restart $rep/$REPS ($pin)"
      since=$(date +%s%N)
      if [ "$pin" = one ]; then
        "${PIN_SRV[@]}" "$ATOMNODE" run --listen "127.0.0.1:$SRV_PORT" --db "$db" "${AN_EXTRA[@]}" \
          >>"$TMP/an-kill.log" 2>&1 &
      else
        "$ATOMNODE" run --listen "127.0.0.1:$SRV_PORT" --db "$db" "${AN_EXTRA[@]}" \
          >>"$TMP/an-kill.log" 2>&1 &
      fi
      SRV_PID=$!
      lg "$label" status -f bench-kill --wait --since-ns "$since" -t 120
      local rss
      rss=$(awk '/^VmRSS:/ { print $2 }' "/proc/$SRV_PID/status" 2>/dev/null)
      [ -n "$rss" ] && echo "RESULT workload=rss label=an/kill-rss rss_kb=$rss jobs=$N_KILL bytes_per_job=$(calc "printf \"%.0f\", $rss * 1024 / $N_KILL")" >>"$RES"
    done
  done
  if [ "${KILL_VERIFY:-0}" = 1 ]; then
    log "kill: draining the recovered queue and checking every job"
    lg an/kill-verify drain --no-prefill -k 4 -n "$N_KILL" -f bench-kill --unique-prefix "$prefix"
  fi
  stop_server
}

campaign() {
  has "$SERVERS" an || return 0
  local out
  log "campaign: kill -9 under load, $KILLS kills (bench/killcampaign.py)"
  out=$("$ROOT/.venv/bin/python" "$HERE/killcampaign.py" --kills "$KILLS" --atomnode "$ATOMNODE" 2>"$TMP/campaign.err")
  out=$(printf '%s\n' "$out" | grep '^RESULT')
  if [ -z "$out" ]; then
    log "  campaign failed: $(tail -n 3 "$TMP/campaign.err" | tr '\n' ' ')"
    echo "ERROR label=an/kill-campaign rc=1" >>"$RES"
    return
  fi
  printf '%s\n' "$out" >>"$RES"
  [ -n "${RESULTS:-}" ] && printf '%s\n' "$out" >>"$RESULTS"
  log "  $out"
}

log "bench: SCALE=$SCALE REPS=$REPS QUICK_REPS=$QUICK_REPS SERVERS='$SERVERS' SECTIONS='$SECTIONS' tmp=$TMP"
log "bench: $PINNING"
LOAD0=$(cut -d ' ' -f 1-3 /proc/loadavg)
T0=$(date +%s)
for s in $SECTIONS; do
  case $s in roundtrip|serial|bglat|gearload) SECTION_REPS=$QUICK_REPS ;; *) SECTION_REPS=$REPS ;; esac
  case $s in
    roundtrip) runs_of roundtrip "gm an" roundtrip -c 4 -w 16 -k 4 -n "$N_RT" -f bench-rt ;;
    serial) runs_of serial "gm an" roundtrip -c 1 -w 1 -k 1 -n "$N_SERIAL" -f bench-serial ;;
    bglat) sized_runs bglat "gs an" "$N_BGLAT_GS" "$N_BGLAT_AN" bg-latency -c 1 -k 1 --rate "$BGLAT_RATE" \
             --grab plain --poll 1 -f bench-bglat
           # The disk's own floor for that row: one WAL-sized append + fdatasync, same pace.
           for _ in $(seq 1 "$SECTION_REPS"); do
             out=$("${PIN_SRV[@]}" "$ROOT/.venv/bin/python" "$HERE/fsync_probe.py" "$TMP" \
                   --count "$N_BGLAT_AN" --rate "$BGLAT_RATE" 2>>"$TMP/lg.err") && echo "$out" >>"$RES"
           done ;;
    rss) rss_runs ;;
    gearload) gearload_runs ;;
    grab)
      runs_of grab-idle "gm an" grab-latency --grab plain -c 0 -k 4 --idle-workers 4 --duration "$GRAB_SECS" -f bench-grab
      runs_of grab-load "gm gs an" grab-latency --grab plain -c 4 -w 16 -k 4 --idle-workers 4 --duration "$GRAB_SECS" -f bench-grab
      runs_of grab-fg "gm an" grab-latency --grab plain --foreground -c 4 -w 16 -k 4 --idle-workers 4 --duration "$GRAB_SECS" -f bench-grab ;;
    submit) sized_runs submit "gs an" "$N_SUB_GS" "$N_SUB_AN" submit-bg -c 4 -w 16 -f bench-submit ;;
    drain) sized_runs drain "gs an" "$N_DRAIN_GS" "$N_DRAIN_AN" drain -c 4 -w 16 -k 4 -f bench-drain ;;
    depth) runs_of depth "gm an" depth -c 4 -w 16 -n "$N_DEPTH_BATCH" --depth "$N_DEPTH" -f bench-depth ;;
    kill) kill_test ;;
    campaign) campaign ;;
    *) die "unknown section $s" ;;
  esac
done
ELAPSED=$(( $(date +%s) - T0 ))
LOAD1=$(cut -d ' ' -f 1-3 /proc/loadavg)

# ---------- report ----------
FAILS=0
cell() { [ -n "$1" ] && printf '%s' "$1" || printf 'n/a'; }
# verdict OK_EXPR [VALUE...]: PASS/FAIL from an awk condition; n/a if a VALUE is missing.
verdict() {
  local r v
  # Runs in a $(...) subshell: failures are counted in a file.
  for v in "${@:2}"; do [ -n "$v" ] || { echo x >>"$TMP/fails"; echo "n/a"; return; }; done
  r=$(calc "$1") || r=
  case $r in 1) echo PASS ;; 0) echo x >>"$TMP/fails"; echo FAIL ;; *) echo x >>"$TMP/fails"; echo "n/a" ;; esac
}
ms() { [ -n "$1" ] && calc "printf \"%.2f ms\", $1 / 1000" || printf 'n/a'; }
ratio() { [ -n "$1" ] && [ -n "$2" ] && calc "printf \"%.2fx\", $1 / $2" || printf 'n/a'; }

# cpu GM_LABEL AN_LABEL: "gm / an" server CPU per job (µs), medians.
cpu() { printf '%s / %s' "$(cell "$(med "$1" cpu_us_per_job)")" "$(cell "$(med "$2" cpu_us_per_job)")"; }
mib() { [ -n "$1" ] && calc "printf \"%.1f MiB\", $1 / 1024" || printf 'n/a'; }

cpu_model=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n 1)
py=$("$ROOT/.venv/bin/python" -c 'import sys, trio; print("Python", sys.version.split()[0], "trio", trio.__version__)' 2>/dev/null)
echo
echo "## atomnode vs gearmand 1.1.20: SCALE=$SCALE REPS=$REPS, QUICK_REPS=$QUICK_REPS (medians), ${ELAPSED}s"
echo
echo "Machine: ${cpu_model:-unknown CPU}, $NCPU CPUs, $(awk '/^MemTotal:/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo) RAM;" \
  "Linux $(uname -r) $(uname -m); ${py:-Python n/a}; $("$GEARMAND" --version 2>/dev/null | grep -m 1 gearmand);" \
  "$PINNING; load average $LOAD0 at the start, $LOAD1 at the end."
[ -n "${BASE_DESC:-}" ] && echo "Server ab: atomnode's package at $BASE_DESC, for comparison (raw table)."
[ "$REPS" -ge 3 ] || echo "(REPS=$REPS: fewer than 3 runs per cell, a smoke run, not a measurement.)"
echo
echo "| issue | measure | gearmand | atomnode | measured | target | result | server CPU µs/job (gearmand / atomnode) |"
echo "|---|---|---|---|---|---|---|---|"
row() { echo "| $1 | $2 | $3 | $4 | $5 | $6 | $7 | ${8:--} |"; }

if has "$SECTIONS" roundtrip; then
  g=$(med gm/roundtrip cpu_us_per_job) a=$(med an/roundtrip cpu_us_per_job)
  row 12 "server CPU per job, pipelined round trips (4 clients x 16, 4 workers), µs" \
    "$(cell "$g") (-t 1)" "$(cell "$a")" "$(ratio "$a" "$g")" "<= 2.0x" "$(verdict "print ($a <= 2.0 * $g) ? 1 : 0" "$a" "$g")" \
    "$(cpu gm/roundtrip an/roundtrip)"
  g=$(med gm/roundtrip jobs_per_s) a=$(med an/roundtrip jobs_per_s)
  row 2 "pipelined foreground round trips, 4 clients x 16 in flight, 4 workers ($N_RT jobs), jobs/s" \
    "$(cell "$g") (-t 1)" "$(cell "$a")" "$(ratio "$a" "$g")" ">= 0.5x" "$(verdict "print ($a >= 0.5 * $g) ? 1 : 0" "$a" "$g")" \
    "$(cpu gm/roundtrip an/roundtrip)"
fi
if has "$SECTIONS" gearload; then
  g=$(med gm/gearload-rt jobs_per_s) a=$(med an/gearload-rt jobs_per_s)
  row 12 "the same round trips driven by gearload (../shared/bench), jobs/s" \
    "$(cell "$g") (-t 1)" "$(cell "$a")" "$(ratio "$a" "$g")" ">= 0.5x" "$(verdict "print ($a >= 0.5 * $g) ? 1 : 0" "$a" "$g")" \
    "$(cpu gm/gearload-rt an/gearload-rt)"
fi
if has "$SECTIONS" serial; then
  g=$(med gm/serial p50_us) a=$(med an/serial p50_us)
  row 2 "serial round trip p50 latency (-c1 -w1 -k1, $N_SERIAL jobs)" \
    "$(cell "$g")us" "$(cell "$a")us" "$(ratio "$a" "$g")" "<= 1.5x" "$(verdict "print ($a <= 1.5 * $g) ? 1 : 0" "$a" "$g")" \
    "$(cpu gm/serial an/serial)"
fi
if has "$SECTIONS" bglat; then
  g=$(med gs/bglat assign_p99_us) a=$(med an/bglat assign_p99_us)
  g5=$(med gs/bglat assign_p50_us) a5=$(med an/bglat assign_p50_us)
  row 12 "durable background job, submit -> JOB_ASSIGN to an idle AtoM-like worker, $BGLAT_RATE jobs/s, p99 (p50) ($N_BGLAT_GS / $N_BGLAT_AN jobs)" \
    "$(ms "$g") ($(ms "$g5")) (sqlite)" "$(ms "$a") ($(ms "$a5"))" "$(ms "$a")" "<= 2 ms" "$(verdict "print ($a <= 2000) ? 1 : 0" "$a")" \
    "$(cpu gs/bglat an/bglat)"
  f=$(med disk/fsync p99_us) f5=$(med disk/fsync p50_us)
  row 12 "the disk's floor for that row: one 4 KiB log append + fdatasync, $BGLAT_RATE/s, p99 (p50)" \
    "-" "$(ms "$f") ($(ms "$f5"))" "$(ms "$f")" "measured" "-"
fi
if has "$SECTIONS" rss; then
  g=$(med gm/rss-idle rss_kb) a=$(med an/rss-idle rss_kb) c=$(med an-console/rss-idle rss_kb)
  row 12 "idle RSS, no pools, no jobs: console off / on" \
    "$(mib "$g") (-t 1)" "$(mib "$a") / $(mib "$c")" "$(mib "$a")" "<= 35 MiB" "$(verdict "print ($a <= 35 * 1024) ? 1 : 0" "$a")"
fi
if has "$SECTIONS" grab; then
  gi=$(med gm/grab-idle grab_p99_us) gl=$(med gm/grab-load grab_p99_us) gf=$(med gm/grab-fg grab_p99_us)
  ai=$(med an/grab-idle grab_p99_us) al=$(med an/grab-load grab_p99_us) af=$(med an/grab-fg grab_p99_us)
  aw=
  [ -n "$ai" ] && [ -n "$al" ] && [ -n "$af" ] &&
    aw=$(calc "m = $ai; if ($al > m) m = $al; if ($af > m) m = $af; print m")
  row 2 "GRAB_JOB reply p99: idle / background submits flat out / foreground jobs flat out (${GRAB_SECS}s each)" \
    "$(ms "$gi") / $(ms "$gl") / $(ms "$gf")" "$(ms "$ai") / $(ms "$al") / $(ms "$af")" "$(ms "$aw") worst" "< 5 ms" "$(verdict "print ($aw < 5000) ? 1 : 0" "$aw")" \
    "$(cpu gm/grab-load an/grab-load) (bg) $(cpu gm/grab-fg an/grab-fg) (fg)"
  gs=$(med gs/grab-load grab_p99_us)
  row 3 "GRAB_JOB reply p99 while durable submits run flat out (4x16)" \
    "$(ms "$gs") (sqlite)" "$(ms "$al")" "$(ms "$al")" "< 5 ms" "$(verdict "print ($al < 5000) ? 1 : 0" "$al")" \
    "$(cpu gs/grab-load an/grab-load)"
fi
if has "$SECTIONS" submit; then
  g=$(med gs/submit jobs_per_s) a=$(med an/submit jobs_per_s)
  row 3 "acknowledged durable background submits/s, 4 clients x 16 in flight ($N_SUB_GS / $N_SUB_AN jobs)" \
    "$(cell "$g") (sqlite)" "$(cell "$a")" "$(ratio "$a" "$g")" ">= 20x" "$(verdict "print ($a >= 20 * $g) ? 1 : 0" "$a" "$g")" \
    "$(cpu gs/submit an/submit)"
fi
if has "$SECTIONS" drain; then
  g=$(med gs/drain jobs_per_s) a=$(med an/drain jobs_per_s)
  row 3 "draining a queue, 4 workers ($N_DRAIN_GS / $N_DRAIN_AN jobs), jobs/s" \
    "$(cell "$g") (sqlite)" "$(cell "$a")" "$(ratio "$a" "$g")" ">= 10x" "$(verdict "print ($a >= 10 * $g) ? 1 : 0" "$a" "$g")" \
    "$(cpu gs/drain an/drain)"
fi
if has "$SECTIONS" depth; then
  g=$(med gm/depth ratio) a=$(med an/depth ratio)
  ge=$(med gm/depth empty_jobs_per_s) gd=$(med gm/depth jobs_per_s)
  ae=$(med an/depth empty_jobs_per_s) ad=$(med an/depth jobs_per_s)
  row 3 "submit rate with $N_DEPTH jobs queued / empty queue ($N_DEPTH_BATCH-job batches), jobs/s" \
    "$(cell "$gd") / $(cell "$ge") = $(cell "$g") (-t 1)" "$(cell "$ad") / $(cell "$ae")" "$(cell "$a")" ">= 0.8" "$(verdict "print ($a >= 0.8) ? 1 : 0" "$a")" \
    "$(cpu gm/depth an/depth)"
  g=$(med gm/depth bytes_per_job) a=$(med an/depth bytes_per_job)
  row 3 "memory per queued job (RSS delta / $((N_DEPTH + N_DEPTH_BATCH)) jobs), bytes" \
    "$(cell "$g") (-t 1)" "$(cell "$a")" "$(cell "$a")" "measured" "-"
fi
if has "$SECTIONS" kill && has "$SERVERS" an; then
  a=$(med an/kill-restart seconds) tot=$(range an/kill-restart total)
  totmin=$(vals an/kill-restart total | sort -g | head -n 1)
  row 3 "kill -9 with $N_KILL jobs queued and $N_KILL finished: restart until status answers (jobs listed: $(cell "$tot"))" \
    "-" "$(calc "printf \"%.2f s\", $a")" "$(calc "printf \"%.2f s\", $a")" "<= 4 s" \
    "$(verdict "print ($a <= 4 && $totmin == $N_KILL) ? 1 : 0" "$a" "$totmin")"
  a=$(med an/kill-restart-1cpu seconds) tot=$(range an/kill-restart-1cpu total)
  row 3 "the same restart with atomnode pinned to one core (jobs listed: $(cell "$tot"))" \
    "-" "$(calc "printf \"%.2f s\", $a")" "$(calc "printf \"%.2f s\", $a")" "measured" "-"
  r=$(med an/kill-rss bytes_per_job)
  row 3 "memory per queued job with $N_KILL queued, after recovery (RSS / jobs), bytes" \
    "-" "$(cell "$r")" "$(cell "$r")" "measured" "-"
  b=$(med an/drain-rss rss_before_kb) p=$(med an/drain-rss rss_peak_kb)
  r=$(med an/drain-rss rss_after_kb) w=$(med an/drain-rss seconds)
  d=$(calc "printf \"%.0f\", ($r - $b) / 1024")
  row 10 "RSS after draining $N_KILL jobs: before / peak / after (MiB), back within 100 MiB after" \
    "-" "$(calc "printf \"%.0f / %.0f / %.0f\", $b / 1024, $p / 1024, $r / 1024") ($(cell "$w") s)" "+$(cell "$d") MiB" "<= +100 MiB within 10 s" \
    "$(verdict "print ($d <= 100 && $w <= 10) ? 1 : 0" "$d" "$w")"
  if [ "${KILL_VERIFY:-0}" = 1 ]; then
    v=$(med an/kill-verify jobs_per_s)
    row 3 "every recovered job delivered once, intact (drain after restart), jobs/s" "-" "$(cell "$v")" "-" "all $N_KILL" \
      "$(verdict "print 1" "$v")"
  fi
fi

if has "$SECTIONS" campaign && has "$SERVERS" an; then
  k=$(med an/kill-campaign kills) ack=$(med an/kill-campaign acknowledged) del=$(med an/kill-campaign delivered)
  dup=$(med an/kill-campaign duplicated) mis=$(med an/kill-campaign missing) frn=$(med an/kill-campaign foreign)
  row 10 "kill -9 campaign under load ($(cell "$k") kills, 4 clients, 2 workers): acknowledged / delivered / duplicated / missing" \
    "-" "$(cell "$ack") / $(cell "$del") / $(cell "$dup") / $(cell "$mis")" "missing $(cell "$mis"), foreign $(cell "$frn")" "missing 0" \
    "$(verdict "print ($mis == 0 && $frn == 0 && $k >= $KILLS) ? 1 : 0" "$mis" "$frn" "$k")"
fi

echo
echo "Raw medians (min-max over runs); errors are loadgen runs that failed a check or timed out:"
echo
echo "| server/workload | runs | errors | jobs | jobs/s | jobs/s range | p50 us | p99 us | grab p99 us | other |"
echo "|---|---|---|---|---|---|---|---|---|---|"
for label in $(sed -n 's/.* label=\([^ ]*\).*/\1/p' "$RES" | awk '!seen[$0]++'); do
  runs=$(grep -c -F " label=$label " "$RES")
  errs=$(errors "$label")
  other=""
  for k in cpu_us_per_job assign_p50_us assign_p99_us rss_kb prefill_jobs_per_s ratio empty_jobs_per_s fill_jobs_per_s bytes_per_job seconds total conn_jobs_min conn_jobs_max; do
    v=$(med "$label" "$k")
    [ -n "$v" ] && other="$other $k=$v"
  done
  echo "| $label | $((runs - errs)) | $errs | $(cell "$(med "$label" jobs)") | $(cell "$(med "$label" jobs_per_s)") | $(cell "$(range "$label" jobs_per_s)") | $(cell "$(med "$label" p50_us)") | $(cell "$(med "$label" p99_us)") | $(cell "$(med "$label" grab_p99_us)") |$other |"
  [ "$errs" -gt 0 ] && FAILS=$((FAILS + 1))
done
echo
echo "Sizes: SCALE=$SCALE REPS=$REPS GRAB_SECS=$GRAB_SECS; atomnode $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?') $(git -C "$ROOT" status --porcelain --untracked-files=no 2>/dev/null | grep -q . && echo '(with local changes)')"
FAILS=$((FAILS + $(cat "$TMP/fails" 2>/dev/null | wc -l)))
[ "$FAILS" -eq 0 ] || { log "bench: $FAILS row(s) failed or could not be measured"; exit 1; }
exit 0
