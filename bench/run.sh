#!/usr/bin/env bash
# bench/run.sh: atomnode and gearmand 1.1.20 side by side, same machine, same load, one run.
#
# Builds bench/loadgen, then for each workload starts each server on a fresh process (and a
# fresh database) on a free port of 127.0.0.1, drives it with loadgen, stops it by PID, REPS
# times, and prints a markdown table of medians and the ratios that issues 2 and 3 ask for.
#
# Environment:
#   SCALE (1)       multiplies every job count (SCALE=0.05 REPS=1: a smoke run, under a minute)
#   REPS (3)        runs per server and workload; the table shows medians
#   SECTIONS        subset of: roundtrip serial grab submit drain depth kill campaign (default: all)
#   SERVERS         subset of: gm (gearmand -t 1), gs (gearmand -t 1 -q libsqlite3), an (atomnode)
#   GRAB_SECS       duration of each grab-latency run (default 5*SCALE, at least 1)
#   KILL_VERIFY=1   after the kill -9 test, drain the recovered queue and check every job
#   KILLS           kills in the kill -9 campaign under load (default 100*SCALE, at least 5)
#   TIMEOUT (600)   per loadgen run, seconds
#   RESULTS=FILE    also append every raw RESULT line to FILE
#   KEEP_TMP=1      keep the temp dir (databases, server logs)
#   GEARMAND (/usr/sbin/gearmand)  ATOMNODE (.venv/bin/atomnode of this checkout)
# Exit status: 0 if every row passes, 1 if a row fails or a run errors, 3 on setup problems.
set -uo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(dirname "$HERE")
SCALE=${SCALE:-1}
REPS=${REPS:-3}
SECTIONS=${SECTIONS:-"roundtrip serial grab submit drain depth kill campaign"}
SERVERS=${SERVERS:-"gm gs an"}
TIMEOUT=${TIMEOUT:-600}
GEARMAND=${GEARMAND:-/usr/sbin/gearmand}
ATOMNODE=${ATOMNODE:-$ROOT/.venv/bin/atomnode}
LOADGEN=$HERE/out/loadgen
CC=${CC:-gcc}

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
has "$SERVERS" gm || has "$SERVERS" gs && { [ -x "$GEARMAND" ] || die "no gearmand at $GEARMAND (apt-get install gearman-job-server)"; }
if has "$SERVERS" an && [ ! -x "$ATOMNODE" ]; then
  log "no atomnode at $ATOMNODE (make venv): atomnode rows will be n/a"
  SERVERS=$(echo " $SERVERS " | sed 's/ an / /')
fi

TMP=$(mktemp -d "${TMPDIR:-/tmp}/atomnode-bench.XXXXXX")
RES=$TMP/results
: >"$RES"
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

# start_server KIND [DB]: a fresh server on a free port; sets SRV_PID and SRV_PORT.
start_server() {
  local kind=$1 db=${2:-} tries
  RUN_ID=$((RUN_ID + 1))
  for tries in 1 2 3; do
    SRV_PORT=$("$LOADGEN" freeport) || die "no free port"
    local logf=$TMP/$kind-$RUN_ID.log
    case $kind in
      gm) "$GEARMAND" -L 127.0.0.1 -p "$SRV_PORT" -t 1 -l "$logf" >"$logf.out" 2>&1 & ;;
      gs) [ -n "$db" ] || db=$TMP/$kind-$RUN_ID.db
          "$GEARMAND" -L 127.0.0.1 -p "$SRV_PORT" -t 1 -l "$logf" -q libsqlite3 \
            --libsqlite3-db="$db" >"$logf.out" 2>&1 & ;;
      an) [ -n "$db" ] || { mkdir -p "$TMP/an-$RUN_ID"; db=$TMP/an-$RUN_ID/q.db; }
          "$ATOMNODE" run --listen "127.0.0.1:$SRV_PORT" --db "$db" >"$logf" 2>&1 & ;;
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
  out=$("$LOADGEN" "$workload" -p "$SRV_PORT" -t "$TIMEOUT" --label "$label" "$@" 2>"$TMP/lg.err")
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
N_DEPTH_BATCH=$(n 50000 2000)
N_KILL=$(n 1000000 10000)
KILLS=${KILLS:-$(n 100 5)}
GRAB_SECS=${GRAB_SECS:-$(calc 'v = 5 * '"$SCALE"'; if (v < 1) v = 1; print v')}

runs_of() { # runs_of SECTION KINDS WORKLOAD ARGS...: REPS rounds, servers interleaved
  local section=$1 kinds=$2 rep kind
  shift 2
  for rep in $(seq 1 "$REPS"); do
    for kind in $kinds; do
      has "$SERVERS" "$kind" || continue
      log "$section: $kind, run $rep/$REPS"
      one "$kind" "$kind/$section" "$@"
    done
  done
}

sized_runs() { # like runs_of, but the job count differs per server: N_GS / N_AN
  local section=$1 kinds=$2 ngs=$3 nan=$4 rep kind
  shift 4
  for rep in $(seq 1 "$REPS"); do
    for kind in $kinds; do
      has "$SERVERS" "$kind" || continue
      log "$section: $kind, run $rep/$REPS"
      case $kind in gs) one "$kind" "$kind/$section" "$@" -n "$ngs" ;; *) one "$kind" "$kind/$section" "$@" -n "$nan" ;; esac
    done
  done
}

kill_test() {
  has "$SERVERS" an || return 0
  local prefix=kill$$ rep since
  log "kill: atomnode, queueing $N_KILL jobs"
  if ! start_server an; then echo "ERROR label=an/kill-fill rc=start" >>"$RES"; return; fi
  local db=$SRV_DB
  lg an/kill-fill submit-bg -c 4 -w 16 -n "$N_KILL" -f bench-kill --unique-prefix "$prefix" --pid "$SRV_PID"
  for rep in $(seq 1 "$REPS"); do
    stop_server KILL
    log "kill: kill -9 with $N_KILL jobs queued, restart $rep/$REPS"
    since=$(date +%s%N)
    "$ATOMNODE" run --listen "127.0.0.1:$SRV_PORT" --db "$db" >>"$TMP/an-kill.log" 2>&1 &
    SRV_PID=$!
    lg an/kill-restart status -f bench-kill --wait --since-ns "$since" -t 120
    local rss
    rss=$(awk '/^VmRSS:/ { print $2 }' "/proc/$SRV_PID/status" 2>/dev/null)
    [ -n "$rss" ] && echo "RESULT workload=rss label=an/kill-rss rss_kb=$rss jobs=$N_KILL bytes_per_job=$(calc "printf \"%.0f\", $rss * 1024 / $N_KILL")" >>"$RES"
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

log "bench: SCALE=$SCALE REPS=$REPS SERVERS='$SERVERS' SECTIONS='$SECTIONS' tmp=$TMP"
T0=$(date +%s)
for s in $SECTIONS; do
  case $s in
    roundtrip) runs_of roundtrip "gm an" roundtrip -c 4 -w 16 -k 4 -n "$N_RT" -f bench-rt ;;
    serial) runs_of serial "gm an" roundtrip -c 1 -w 1 -k 1 -n "$N_SERIAL" -f bench-serial ;;
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

echo
echo "## atomnode vs gearmand 1.1.20: SCALE=$SCALE REPS=$REPS (medians), $(nproc) cores, Linux $(uname -r), ${ELAPSED}s"
echo
echo "| issue | measure | gearmand | atomnode | measured | target | result |"
echo "|---|---|---|---|---|---|---|"
row() { echo "| $1 | $2 | $3 | $4 | $5 | $6 | $7 |"; }

if has "$SECTIONS" roundtrip; then
  g=$(med gm/roundtrip jobs_per_s) a=$(med an/roundtrip jobs_per_s)
  row 2 "pipelined foreground round trips, 4 clients x 16 in flight, 4 workers ($N_RT jobs), jobs/s" \
    "$(cell "$g") (-t 1)" "$(cell "$a")" "$(ratio "$a" "$g")" ">= 0.5x" "$(verdict "print ($a >= 0.5 * $g) ? 1 : 0" "$a" "$g")"
fi
if has "$SECTIONS" serial; then
  g=$(med gm/serial p50_us) a=$(med an/serial p50_us)
  row 2 "serial round trip p50 latency (-c1 -w1 -k1, $N_SERIAL jobs)" \
    "$(cell "$g")us" "$(cell "$a")us" "$(ratio "$a" "$g")" "<= 1.5x" "$(verdict "print ($a <= 1.5 * $g) ? 1 : 0" "$a" "$g")"
fi
if has "$SECTIONS" grab; then
  gi=$(med gm/grab-idle grab_p99_us) gl=$(med gm/grab-load grab_p99_us) gf=$(med gm/grab-fg grab_p99_us)
  ai=$(med an/grab-idle grab_p99_us) al=$(med an/grab-load grab_p99_us) af=$(med an/grab-fg grab_p99_us)
  aw=
  [ -n "$ai" ] && [ -n "$al" ] && [ -n "$af" ] &&
    aw=$(calc "m = $ai; if ($al > m) m = $al; if ($af > m) m = $af; print m")
  row 2 "GRAB_JOB reply p99: idle / background submits flat out / foreground jobs flat out (${GRAB_SECS}s each)" \
    "$(ms "$gi") / $(ms "$gl") / $(ms "$gf")" "$(ms "$ai") / $(ms "$al") / $(ms "$af")" "$(ms "$aw") worst" "< 5 ms" "$(verdict "print ($aw < 5000) ? 1 : 0" "$aw")"
  gs=$(med gs/grab-load grab_p99_us)
  row 3 "GRAB_JOB reply p99 while durable submits run flat out (4x16)" \
    "$(ms "$gs") (sqlite)" "$(ms "$al")" "$(ms "$al")" "< 5 ms" "$(verdict "print ($al < 5000) ? 1 : 0" "$al")"
fi
if has "$SECTIONS" submit; then
  g=$(med gs/submit jobs_per_s) a=$(med an/submit jobs_per_s)
  row 3 "acknowledged durable background submits/s, 4 clients x 16 in flight ($N_SUB_GS / $N_SUB_AN jobs)" \
    "$(cell "$g") (sqlite)" "$(cell "$a")" "$(ratio "$a" "$g")" ">= 20x" "$(verdict "print ($a >= 20 * $g) ? 1 : 0" "$a" "$g")"
fi
if has "$SECTIONS" drain; then
  g=$(med gs/drain jobs_per_s) a=$(med an/drain jobs_per_s)
  row 3 "draining a queue, 4 workers ($N_DRAIN_GS / $N_DRAIN_AN jobs), jobs/s" \
    "$(cell "$g") (sqlite)" "$(cell "$a")" "$(ratio "$a" "$g")" ">= 10x" "$(verdict "print ($a >= 10 * $g) ? 1 : 0" "$a" "$g")"
fi
if has "$SECTIONS" depth; then
  g=$(med gm/depth ratio) a=$(med an/depth ratio)
  ge=$(med gm/depth empty_jobs_per_s) gd=$(med gm/depth jobs_per_s)
  ae=$(med an/depth empty_jobs_per_s) ad=$(med an/depth jobs_per_s)
  row 3 "submit rate with $N_DEPTH jobs queued / empty queue ($N_DEPTH_BATCH-job batches), jobs/s" \
    "$(cell "$gd") / $(cell "$ge") = $(cell "$g") (-t 1)" "$(cell "$ad") / $(cell "$ae")" "$(cell "$a")" ">= 0.8" "$(verdict "print ($a >= 0.8) ? 1 : 0" "$a")"
  g=$(med gm/depth bytes_per_job) a=$(med an/depth bytes_per_job)
  row 3 "memory per queued job (RSS delta / $((N_DEPTH + N_DEPTH_BATCH)) jobs), bytes" \
    "$(cell "$g") (-t 1)" "$(cell "$a")" "$(cell "$a")" "measured" "-"
fi
if has "$SECTIONS" kill && has "$SERVERS" an; then
  a=$(med an/kill-restart seconds) tot=$(range an/kill-restart total)
  totmin=$(vals an/kill-restart total | sort -g | head -n 1)
  row 3 "kill -9 with $N_KILL jobs queued: restart until status answers (jobs listed: $(cell "$tot"))" \
    "-" "$(calc "printf \"%.2f s\", $a")" "$(calc "printf \"%.2f s\", $a")" "<= 4 s" \
    "$(verdict "print ($a <= 4 && $totmin == $N_KILL) ? 1 : 0" "$a" "$totmin")"
  f=$(med an/kill-fill bytes_per_job) r=$(med an/kill-rss bytes_per_job)
  row 3 "memory per queued job with $N_KILL queued: after submitting / after recovery, bytes" \
    "-" "$(cell "$f") / $(cell "$r")" "$(cell "$f") / $(cell "$r")" "measured" "-"
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
  for k in cpu_us_per_job prefill_jobs_per_s ratio empty_jobs_per_s fill_jobs_per_s bytes_per_job seconds total conn_jobs_min conn_jobs_max; do
    v=$(med "$label" "$k")
    [ -n "$v" ] && other="$other $k=$v"
  done
  echo "| $label | $((runs - errs)) | $errs | $(cell "$(med "$label" jobs)") | $(cell "$(med "$label" jobs_per_s)") | $(cell "$(range "$label" jobs_per_s)") | $(cell "$(med "$label" p50_us)") | $(cell "$(med "$label" p99_us)") | $(cell "$(med "$label" grab_p99_us)") |$other |"
  [ "$errs" -gt 0 ] && FAILS=$((FAILS + 1))
done
echo
echo "Sizes: SCALE=$SCALE REPS=$REPS GRAB_SECS=$GRAB_SECS; $("$GEARMAND" --version 2>/dev/null | grep -m 1 gearmand)"
FAILS=$((FAILS + $(cat "$TMP/fails" 2>/dev/null | wc -l)))
[ "$FAILS" -eq 0 ] || { log "bench: $FAILS row(s) failed or could not be measured"; exit 1; }
exit 0
