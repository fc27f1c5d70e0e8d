#!/usr/bin/env bash
# End-to-end test of the Debian package under a real systemd (`make test-deb`).
#
# Builds the package (make deb) and publishes it into a signed apt repository (make repo,
# with a throw-away key made for the run), boots a Debian 12 minbase root filesystem with
# systemd-nspawn, serves the repository over HTTP on loopback inside it, adds it with its
# key (deb822 .sources, Signed-By) and installs with `apt-get install atomnode`. Then it
# checks the service as a site would use it: active with Type=notify, status text and a
# watchdog; a job round trip on 127.0.0.1:4730; stable past WatchdogSec; queued jobs
# surviving a restart; repositories signed by another key, or unsigned, refused by apt;
# an upgrade through apt to a newer version built from a changed copy of this tree (a
# schema migration step, a changed shipped configuration file) while 1,000 jobs are
# queued and two are running: nothing lost, the running jobs finished or requeued with
# their attempt counted, the site's edit of atomnode.yml kept, no prompt; a downgrade
# refused with the schema message, the queue intact; workers started as another user;
# a clear journal message when port 4730 is taken; a frozen daemon killed and restarted
# by the watchdog; remove keeps state, purge deletes it (after the upgrade).
#
# Runs unattended as root. It installs what it needs (debootstrap,
# systemd-container, gnupg, apt-utils) and caches the root filesystem in $ATOMNODE_TEST_CACHE
# (default /var/cache/atomnode-test), so reruns take about a minute.
# The container shares the host network: ports 4730 and 4731 must be free on the host.
#
# Environment:
#   ATOMNODE_TEST_DEB=FILE     test this .deb instead of building one (the next version
#                              for the upgrade is still built from this tree)
#   ATOMNODE_TEST_CACHE=DIR    root filesystem cache
#   ATOMNODE_TEST_MIRROR=URL   Debian mirror (default: the one apt on the host uses)
#   ATOMNODE_TEST_KEEP=1       leave the container running at the end (debugging)
set -uo pipefail

cd "$(dirname "$0")/../.." || exit 1
TOP=$(pwd)
SUITE=bookworm
CACHE=${ATOMNODE_TEST_CACHE:-/var/cache/atomnode-test}
# Bump the suffix when the package list changes, so a stale cache is not used.
# man-db: systemd-analyze verify checks the unit's man: Documentation link.
ROOT_PACKAGES=systemd,systemd-sysv,dbus,python3,man-db
ROOTFS=$CACHE/$SUITE-minbase-v2
MACHINE=atomnode-test
WATCHDOG_TEST_SEC=5
PORT=4730
# The test's apt repositories, served inside the container on loopback.
REPO_PORT=4739
REPO_URL=http://127.0.0.1:$REPO_PORT
NEXT_PID=
NEXT_DEB=

PASSED=0
FAILED=0
FAILED_NAMES=()
NSPAWN_PID=
LEADER=
RUNDIR=

say() { printf '%s packaging: %s\n' "$(date +%H:%M:%S)" "$*"; }
summary() {
    echo "packaging: $PASSED passed, $FAILED failed${FAILED_NAMES:+ (${FAILED_NAMES[*]})}"
}
skip() {
    echo "packaging: SKIPPED: $*"
    echo "packaging: 0 passed, 0 failed (skipped)"
    exit 0
}
abort() {
    echo "packaging: ERROR: $*" >&2
    FAILED=$((FAILED + 1))
    FAILED_NAMES+=("setup")
    summary
    exit 1
}

# check NAME FUNCTION: run one check, record and print its result.
check() {
    local name=$1
    shift
    say "check: $name"
    local out
    if out=$("$@" 2>&1); then
        PASSED=$((PASSED + 1))
        echo "  ok   $name${out:+: $(echo "$out" | tail -n1)}"
    else
        FAILED=$((FAILED + 1))
        FAILED_NAMES+=("$name")
        echo "  FAIL $name"
        echo "$out" | sed 's/^/       | /'
    fi
}

# --- the container ------------------------------------------------------------

# inside CMD...: run a command inside the booted container (all its namespaces).
inside() {
    nsenter -t "$LEADER" -a env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 \
        DEBIAN_FRONTEND=noninteractive SYSTEMD_PAGER= SYSTEMD_COLORS=0 "$@"
}

# prop NAME: one property of atomnode.service, as `systemctl show` prints it.
prop() { inside systemctl show -p "$1" --value atomnode.service; }

# wait_for SECONDS DESCRIPTION COMMAND...: poll (every 0.2 s) until COMMAND succeeds.
wait_for() {
    local secs=$1 what=$2
    shift 2
    local end=$((SECONDS + secs))
    until "$@" >/dev/null 2>&1; do
        if ((SECONDS >= end)); then
            echo "timed out after ${secs}s waiting for: $what"
            return 1
        fi
        sleep 0.2
    done
}

stop_container() {
    [ -n "$NSPAWN_PID" ] || return 0
    if [ "${ATOMNODE_TEST_KEEP:-0}" = 1 ]; then
        say "leaving the container running: nsenter -t $LEADER -a bash; kill $NSPAWN_PID"
        return 0
    fi
    if kill -0 "$NSPAWN_PID" 2>/dev/null; then
        kill -TERM "$NSPAWN_PID" 2>/dev/null
        local end=$((SECONDS + 20))
        while kill -0 "$NSPAWN_PID" 2>/dev/null && ((SECONDS < end)); do sleep 0.2; done
        if kill -0 "$NSPAWN_PID" 2>/dev/null; then
            say "container did not halt in 20s; killing it"
            kill -KILL "$NSPAWN_PID" 2>/dev/null
        fi
    fi
    wait "$NSPAWN_PID" 2>/dev/null
    NSPAWN_PID=
}

cleanup() {
    stop_container
    if [ -n "$NEXT_PID" ] && kill -0 "$NEXT_PID" 2>/dev/null; then
        kill -- -"$NEXT_PID" 2>/dev/null || kill "$NEXT_PID" 2>/dev/null
        wait "$NEXT_PID" 2>/dev/null
    fi
    local home
    for home in "$RUNDIR"/gnupg-*; do
        [ -d "$home" ] && GNUPGHOME=$home gpgconf --kill all 2>/dev/null
    done
    if [ -n "$RUNDIR" ] && [ "${ATOMNODE_TEST_KEEP:-0}" != 1 ]; then
        rm -rf "$RUNDIR"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

ensure_tools() {
    local missing=""
    command -v debootstrap >/dev/null || missing="$missing debootstrap"
    command -v systemd-nspawn >/dev/null || missing="$missing systemd-container"
    command -v nsenter >/dev/null || missing="$missing util-linux"
    command -v ss >/dev/null || missing="$missing iproute2"
    command -v gpg >/dev/null || missing="$missing gnupg"
    command -v apt-ftparchive >/dev/null || missing="$missing apt-utils"
    [ -z "$missing" ] && return 0
    say "installing:$missing"
    export DEBIAN_FRONTEND=noninteractive
    { apt-get update -qq && apt-get install -y -qq --no-install-recommends $missing; } >/dev/null ||
        abort "could not install$missing"
}

debian_mirror() {
    if [ -n "${ATOMNODE_TEST_MIRROR:-}" ]; then
        echo "$ATOMNODE_TEST_MIRROR"
        return
    fi
    local uri
    uri=$(apt-get indextargets --format '$(URI)' 2>/dev/null |
        sed -n "s#^\(.*\)/dists/$SUITE/main/binary-.*#\1#p" | head -n1)
    echo "${uri:-http://deb.debian.org/debian}"
}

ensure_rootfs() {
    if [ -f "$ROOTFS/.atomnode-root-ok" ]; then
        say "root filesystem: cached in $ROOTFS"
        return 0
    fi
    local mirror tmp
    mirror=$(debian_mirror)
    tmp="$ROOTFS.tmp.$$"
    mkdir -p "$CACHE"
    rm -rf "$ROOTFS" "$ROOTFS".tmp.*
    say "root filesystem: debootstrap $SUITE from $mirror (about a minute)"
    if ! debootstrap --variant=minbase --include="$ROOT_PACKAGES" "$SUITE" "$tmp" "$mirror" \
        >"$CACHE/debootstrap.log" 2>&1; then
        tail -n 20 "$CACHE/debootstrap.log" >&2
        rm -rf "$tmp"
        abort "debootstrap failed (log: $CACHE/debootstrap.log)"
    fi
    touch "$tmp/.atomnode-root-ok"
    mv "$tmp" "$ROOTFS"
}

# The host's apt sources that also work inside the container: Debian's, with a
# keyring the container has.
copy_apt_sources() {
    local root=$1 f key copied=0
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] || continue
        grep -qi debian "$f" || continue
        key=$(sed -n 's/^Signed-By: *\(\/[^ ]*\).*/\1/p; s/.*signed-by=\([^] ]*\).*/\1/p' "$f" | head -n1)
        if [ -n "$key" ] && [ ! -e "$root$key" ]; then
            continue
        fi
        mkdir -p "$root$(dirname "$f")"
        cp "$f" "$root$f"
        copied=$((copied + 1))
    done
    if [ "$copied" -gt 0 ] && [ ! -f /etc/apt/sources.list ]; then
        rm -f "$root/etc/apt/sources.list"
    fi
}

boot_container() {
    local root="$RUNDIR/root"
    # A throw-away copy of the cached root filesystem (reflinked where possible).
    cp -a --reflink=auto "$ROOTFS" "$root" || abort "could not copy $ROOTFS"
    copy_apt_sources "$root"
    # The repositories, served from /srv inside the container (c_install).
    mkdir -p "$root/srv"
    cp -a "$RUNDIR/repo" "$RUNDIR/repo-other" "$root/srv/" || abort "could not copy the repositories"
    cp -a "$RUNDIR/repo" "$root/srv/repo-unsigned"
    rm -f "$root/srv/repo-unsigned/dists/$SUITE/InRelease" "$root/srv/repo-unsigned/dists/$SUITE/Release.gpg"
    mkdir -p "$root/mnt/test"
    cp "$DEB" "$root/mnt/test/" || abort "could not copy $DEB"
    cp "$TOP/tests/packaging/gearman_helper.py" "$root/mnt/test/gearman_helper.py"
    # The test's watchdog: shorter than the packaged 30 s, to keep the run short.
    mkdir -p "$root/etc/systemd/system/atomnode.service.d"
    printf '[Service]\nWatchdogSec=%ss\n' "$WATCHDOG_TEST_SEC" \
        >"$root/etc/systemd/system/atomnode.service.d/50-test-watchdog.conf"
    echo "$MACHINE" >"$root/etc/hostname"

    say "booting the container (systemd-nspawn)"
    setsid systemd-nspawn -q --register=no --keep-unit -D "$root" -M "$MACHINE" -b \
        --console=passive >"$RUNDIR/nspawn.log" 2>&1 </dev/null &
    NSPAWN_PID=$!
    # The container's PID 1 is the nspawn process's child running systemd (nspawn
    # may fork short-lived helpers first): wait until it serves its private bus.
    local end=$((SECONDS + 60)) pid
    while [ -z "$LEADER" ]; do
        kill -0 "$NSPAWN_PID" 2>/dev/null || {
            cat "$RUNDIR/nspawn.log" >&2
            abort "systemd-nspawn exited during boot"
        }
        if ((SECONDS >= end)); then
            cat "$RUNDIR/nspawn.log" >&2
            ps -o pid,ppid,stat,comm --ppid "$NSPAWN_PID" >&2
            abort "systemd in the container did not come up in 60s"
        fi
        for pid in $(cat /proc/"$NSPAWN_PID"/task/*/children 2>/dev/null); do
            if [ "$(cat /proc/"$pid"/comm 2>/dev/null)" = systemd ] &&
                [ -S "/proc/$pid/root/run/systemd/private" ]; then
                LEADER=$pid
            fi
        done
        [ -n "$LEADER" ] || sleep 0.1
    done
    local state
    state=$(inside timeout 60 systemctl is-system-running --wait 2>&1)
    say "container up (init pid $LEADER on the host): system $state"
}

# --- checks ---------------------------------------------------------------------

c_tree_clean() {
    # make deb builds in a temporary copy: nothing but dist/ may appear here.
    local left="" p
    for p in build debian/.debhelper debian/atomnode debian/files debian/debhelper-build-stamp \
        debian/atomnode.substvars debian/atomnode.postinst.debhelper ../atomnode_*.deb \
        ../atomnode_*.changes ../atomnode_*.buildinfo; do
        [ -e "$p" ] && left="$left $p"
    done
    [ -z "$left" ] || { echo "build output left in the source tree:$left"; return 1; }
    echo "only dist/ written"
}

DEB_IN=

# --- the repository -------------------------------------------------------------

# gen_key NAME: a throw-away signing key in $RUNDIR/gnupg-NAME (never committed anywhere).
gen_key() {
    local home="$RUNDIR/gnupg-$1"
    mkdir -m 700 "$home"
    GNUPGHOME=$home gpg --batch --quiet --passphrase '' \
        --quick-gen-key "atomnode test archive ($1) <test-$1@atomnode.invalid>" ed25519 sign 1d
}

c_make_repo() {
    # `make repo` as a site would run it, the key given as a GnuPG home; then the same
    # package signed with another key (which the container's apt must refuse).
    gen_key good && gen_key other || { echo "gpg could not make the test keys"; return 1; }
    GNUPGHOME=$RUNDIR/gnupg-good REPO_DIR=$RUNDIR/repo REPO_DEBS=$DEB make -s repo || return 1
    GNUPGHOME=$RUNDIR/gnupg-other REPO_DIR=$RUNDIR/repo-other REPO_DEBS=$DEB make -s repo >/dev/null || return 1
    local f
    for f in dists/$SUITE/InRelease dists/$SUITE/Release.gpg dists/$SUITE/Release \
        dists/$SUITE/main/binary-amd64/Packages.gz atomnode-archive-keyring.gpg \
        "pool/main/a/atomnode/$(basename "$DEB")"; do
        [ -s "$RUNDIR/repo/$f" ] || { echo "make repo wrote no $f"; return 1; }
    done
    gpgv --keyring "$RUNDIR/repo/atomnode-archive-keyring.gpg" "$RUNDIR/repo/dists/$SUITE/Release.gpg" \
        "$RUNDIR/repo/dists/$SUITE/Release" 2>&1 || { echo "Release.gpg does not verify"; return 1; }
    if gpgv --keyring "$RUNDIR/repo/atomnode-archive-keyring.gpg" "$RUNDIR/repo-other/dists/$SUITE/InRelease" >/dev/null 2>&1; then
        echo "the other key's InRelease verifies with the archive key"; return 1
    fi
    echo "dists/$SUITE signed (InRelease, Release.gpg), keyring exported"
}

# sources FILE URL: the deb822 stanza of docs/install.md, pointing at URL.
sources() {
    inside sh -c "mkdir -p \"\$(dirname $1)\" && cat >$1" <<EOF
Types: deb
URIs: $2
Suites: $SUITE
Components: main
Signed-By: /usr/share/keyrings/atomnode-archive-keyring.gpg
EOF
}

c_install() {
    inside apt-get update -q >/dev/null || { inside apt-get update; return 1; }
    # Serve /srv (the repositories) on loopback, the way any static web server would.
    inside systemd-run --quiet --unit=pkgtest-repo -p DynamicUser=yes python3 -m http.server "$REPO_PORT" \
        --bind 127.0.0.1 --directory /srv || return 1
    wait_for 15 "the repository server" inside python3 -c \
        "import urllib.request; urllib.request.urlopen('$REPO_URL/repo/dists/$SUITE/InRelease', timeout=2)" ||
        { inside systemctl status --no-pager pkgtest-repo; return 1; }
    # What docs/install.md tells a site to do.
    inside install -m 644 /srv/repo/atomnode-archive-keyring.gpg /usr/share/keyrings/atomnode-archive-keyring.gpg
    sources /etc/apt/sources.list.d/atomnode.sources "$REPO_URL/repo/" || return 1
    inside apt-get update -q >/dev/null || { inside apt-get update; return 1; }
    inside apt-get install -y -q --no-install-recommends atomnode </dev/null || return 1
    inside apt-cache policy atomnode | grep -F "$REPO_URL/repo" >/dev/null ||
        { echo "atomnode was not installed from the repository:"; inside apt-cache policy atomnode; return 1; }
    inside test -L /usr/bin/atomnode -a -x /usr/bin/atomnode || { echo "no /usr/bin/atomnode"; return 1; }
    inside test -f /etc/atomnode/atomnode.yml || { echo "no /etc/atomnode/atomnode.yml"; return 1; }
    inside test -f /usr/share/man/man8/atomnode.8.gz || { echo "no man page"; return 1; }
    inside getent passwd atomnode || { echo "no atomnode user"; return 1; }
    # Not a conffile (an upgrade must never stop at a conffile question): copied from
    # the shipped template on the first install; conf.d/ is there for the site's drop-ins.
    if inside dpkg-query -W -f='${Conffiles}\n' atomnode | grep /etc/atomnode/atomnode.yml >/dev/null; then
        echo "/etc/atomnode/atomnode.yml is a conffile"; return 1
    fi
    inside cmp /usr/share/atomnode/atomnode.yml /etc/atomnode/atomnode.yml ||
        { echo "/etc/atomnode/atomnode.yml is not the shipped template"; return 1; }
    inside test -d /etc/atomnode/conf.d || { echo "no /etc/atomnode/conf.d"; return 1; }
    inside atomnode --version
}

# apt_update_only URL: `apt-get update` of that one repository, the lists of the others kept.
apt_update_only() {
    inside rm -rf /root/one.d
    sources /root/one.d/test.sources "$1" || return 1
    inside apt-get update -o Dir::Etc::SourceList=/dev/null -o Dir::Etc::SourceParts=/root/one.d \
        -o APT::Get::List-Cleanup=0
}

c_untrusted_repos() {
    # The site's sources stanza with its key, pointed at the same package in a repository
    # signed by another key, and at one not signed at all: apt must refuse both.
    local name out rc
    for name in repo-other repo-unsigned; do
        out=$(apt_update_only "$REPO_URL/$name/" 2>&1)
        rc=$?
        if [ "$rc" = 0 ] || ! echo "$out" | grep -E "NO_PUBKEY|is not signed|BADSIG" >/dev/null; then
            echo "apt-get update of $name: exit $rc, expected a refusal:"; echo "$out"; return 1
        fi
        echo "$name refused: $(echo "$out" | grep -E '^(E|W):' | head -n1)"
    done
    if inside apt-cache policy atomnode | grep -E "repo-(other|unsigned)"; then
        echo "apt knows packages from a refused repository"; return 1
    fi
    # And the good one still verifies.
    apt_update_only "$REPO_URL/repo/" >/dev/null || { echo "the good repository no longer updates"; return 1; }
    inside rm -rf /root/one.d
}

c_active() {
    # postinst starts the unit with `|| true`: apt succeeding proves nothing.
    local state
    state=$(inside systemctl is-active atomnode)
    if [ "$state" != active ]; then
        echo "atomnode.service is $state"
        inside systemctl status --no-pager -l atomnode
        inside journalctl -u atomnode --no-pager -n 40
        return 1
    fi
    inside systemctl is-enabled atomnode >/dev/null || { echo "atomnode.service not enabled"; return 1; }
    local type wd wd_pkg status
    type=$(prop Type)
    [ "$type" = notify ] || { echo "Type=$type, expected notify"; return 1; }
    wd=$(prop WatchdogUSec)
    [ "$wd" = "${WATCHDOG_TEST_SEC}s" ] || { echo "WatchdogUSec=$wd, expected ${WATCHDOG_TEST_SEC}s (test drop-in)"; return 1; }
    wd_pkg=$(inside grep -h '^WatchdogSec=' /lib/systemd/system/atomnode.service)
    [ -n "$wd_pkg" ] || { echo "the packaged unit sets no WatchdogSec"; return 1; }
    # The daemon may send STATUS= just after READY=1.
    wait_for 15 "a non-empty StatusText" sh -c "[ -n \"\$(nsenter -t $LEADER -a systemctl show -p StatusText --value atomnode)\" ]" ||
        { echo "StatusText stayed empty"; return 1; }
    status=$(prop StatusText)
    echo "Type=$type WatchdogUSec=$wd (packaged: $wd_pkg) StatusText='$status'"
}

helper() { inside timeout 60 python3 /mnt/test/gearman_helper.py "$@"; }

c_roundtrip() {
    local handle got
    handle=$(helper submit-bg pkgtest-roundtrip hello-from-the-test) || return 1
    echo "queued $handle"
    helper admin status | grep -P '^pkgtest-roundtrip\t1\t' ||
        { echo "admin status does not show the queued job"; helper admin status; return 1; }
    got=$(helper --timeout 20 work pkgtest-roundtrip 1) || return 1
    [ "$got" = hello-from-the-test ] || { echo "worker got '$got'"; return 1; }
    # Completion is recorded in the next batch; wait for the queue to show it.
    wait_for 10 "status: pkgtest-roundtrip with nothing queued or running" \
        sh -c "nsenter -t $LEADER -a python3 /mnt/test/gearman_helper.py admin status | grep -qP '^pkgtest-roundtrip\t0\t0\t'" ||
        { helper admin status; return 1; }
    inside atomnode status || { echo "'atomnode status' failed"; return 1; }
    echo "worker got '$got'; queue empty"
}

c_jobs_done() {
    # The durable history shows the round-trip job as done.
    local out
    out=$(inside atomnode jobs list --function pkgtest-roundtrip --json) || { echo "$out"; return 1; }
    echo "$out" | grep '"done"' >/dev/null || { echo "no done job in: $out"; return 1; }
    echo "jobs list shows pkgtest-roundtrip done"
}

c_console() {
    # The web console and /metrics are on by default on 127.0.0.1:4731 (no config edit).
    local out
    out=$(inside python3 -c '
import sys, urllib.request
for path in ("/metrics", "/"):
    body = urllib.request.urlopen("http://127.0.0.1:4731" + path, timeout=10).read().decode()
    print("==", path, len(body), "bytes")
    sys.stdout.write(body)
') || { echo "$out"; inside journalctl -u atomnode --no-pager -n 30; return 1; }
    echo "$out" | grep '^atomnode_jobs_completed_total{function="pkgtest-roundtrip"' >/dev/null ||
        { echo "/metrics has no completed count for pkgtest-roundtrip:"; echo "$out" | head -40; return 1; }
    echo "$out" | grep '<tr data-function="pkgtest-roundtrip">' >/dev/null ||
        { echo "the overview page does not list pkgtest-roundtrip:"; echo "$out" | tail -60; return 1; }
    echo "/metrics and the overview page answer on 127.0.0.1:4731"
}

c_watchdog_stable() {
    local pid1 pid2 restarts
    pid1=$(prop MainPID)
    [ "$pid1" -gt 0 ] 2>/dev/null || { echo "no MainPID"; return 1; }
    # Real time must pass here: the watchdog fires only after WatchdogSec.
    sleep $((WATCHDOG_TEST_SEC * 2 + 1))
    pid2=$(prop MainPID)
    restarts=$(prop NRestarts)
    [ "$(inside systemctl is-active atomnode)" = active ] || { echo "not active after $((WATCHDOG_TEST_SEC * 2 + 1))s"; return 1; }
    [ "$pid1" = "$pid2" ] || { echo "MainPID changed $pid1 -> $pid2"; inside journalctl -u atomnode --no-pager -n 30; return 1; }
    [ "$restarts" = 0 ] || { echo "NRestarts=$restarts"; return 1; }
    echo "same MainPID $pid1 after $((WATCHDOG_TEST_SEC * 2 + 1))s, NRestarts=0"
}

c_restart_keeps_queue() {
    helper submit-bg pkgtest-durable job 3 >/dev/null || return 1
    local pid1 pid2
    pid1=$(prop MainPID)
    inside systemctl restart atomnode || { inside journalctl -u atomnode --no-pager -n 30; return 1; }
    pid2=$(prop MainPID)
    [ "$pid1" != "$pid2" ] || { echo "MainPID unchanged after restart"; return 1; }
    helper admin status | grep -P '^pkgtest-durable\t3\t' ||
        { echo "after restart:"; helper admin status; return 1; }
    echo "3 queued jobs still queued after restart (MainPID $pid1 -> $pid2)"
}

# job_field FUNCTION FIELD: FIELD of the (one) job of FUNCTION in `atomnode jobs list --json`.
job_field() {
    inside atomnode jobs list --function "$1" --json |
        python3 -c "import json, sys; jobs = json.load(sys.stdin); print(' '.join(str(j['$2']) for j in jobs))"
}

# db_schema: the queue database's schema version, and the upgrade test's marker row.
db_schema() {
    inside python3 -c "
import sqlite3
c = sqlite3.connect('/var/lib/atomnode/atomnode.db', timeout=10)
v = c.execute('PRAGMA user_version').fetchone()[0]
t = c.execute(\"SELECT count(*) FROM sqlite_master WHERE name = 'upgrade_test'\").fetchone()[0]
print(v, 'migrated' if t else 'not-migrated')"
}

# Set by main: the version installed first, the next version's schema.
OLD_VERSION=
NEXT_SCHEMA=

c_upgrade() {
    # The next version, built from a changed copy of this tree (next-version.sh) by the same
    # tooling, in the background since the start (main waits for it): publish it into the
    # served repository.
    [ -n "$NEXT_DEB" ] || { tail -n 60 "$RUNDIR/next-build.log"; echo "building the next version failed"; return 1; }
    local new
    new=$(dpkg-deb -f "$NEXT_DEB" Version)
    [ "$(inside dpkg-query -W -f='${Version}' atomnode)" = "$OLD_VERSION" ] || { echo "installed: $(inside dpkg-query -W -f='${Version}' atomnode), expected $OLD_VERSION"; return 1; }
    [ "$(db_schema)" = "$((NEXT_SCHEMA - 1)) not-migrated" ] || { echo "database before the upgrade: $(db_schema)"; return 1; }
    GNUPGHOME=$RUNDIR/gnupg-good REPO_DIR=$RUNDIR/root/srv/repo REPO_DEBS=$NEXT_DEB make -s repo >/dev/null ||
        { echo "make repo could not publish $NEXT_DEB"; return 1; }

    # The site's state at upgrade time: an edited main file, its own drop-in, 1,000 queued
    # jobs and two running ones. Each running job waits for a file: the first is let go
    # once the old daemon is stopping (it finishes during the drain), the second never (it
    # outlives shutdown_timeout and must go back to the queue with its attempt counted).
    inside sh -c 'echo "# edited by the site before the upgrade" >>/etc/atomnode/atomnode.yml'
    local edited
    edited=$(inside sha256sum /etc/atomnode/atomnode.yml)
    inside sh -c 'cat >/etc/atomnode/conf.d/40-pkgtest-upgrade.yml <<EOF
shutdown_timeout: 6
handlers:
  - function: pkgtest-drain-finishes
    command: "while [ ! -e /var/lib/atomnode/pkgtest-release ]; do sleep 0.1; done"
    shell: true
  - function: pkgtest-drain-outlives
    command: "while [ ! -e /var/lib/atomnode/pkgtest-never ]; do sleep 0.1; done"
    shell: true
EOF'
    inside atomnode check-config >/dev/null || { inside atomnode check-config; return 1; }
    inside systemctl restart atomnode || { inside journalctl -u atomnode --no-pager -n 30; return 1; }
    helper --timeout 120 submit-bg pkgtest-bulk "bulk-{i}" 1000 >/dev/null || return 1
    helper submit-bg pkgtest-drain-finishes x >/dev/null || return 1
    helper submit-bg pkgtest-drain-outlives x >/dev/null || return 1
    wait_for 20 "both long jobs running" sh -c "nsenter -t $LEADER -a python3 /mnt/test/gearman_helper.py admin status |
        grep -P '^pkgtest-drain-(finishes|outlives)\t1\t1\t' | wc -l | grep -x 2" ||
        { helper admin status; return 1; }
    helper admin status | grep -P '^pkgtest-bulk\t1000\t0\t' >/dev/null || { helper admin status; return 1; }
    local pid_old
    pid_old=$(prop MainPID)

    # The upgrade, as unattended-upgrades runs it: 'apt-get upgrade' (which holds a package
    # back rather than install a new dependency for it), non-interactive, stdin closed (a
    # conffile prompt would fail), no --force-conf* option. It reads only the atomnode
    # repository's lists, so that Debian's own updates since the container image was made
    # neither slow the test nor make it depend on the mirror's day.
    inside apt-get update -q >/dev/null || { inside apt-get update; return 1; }
    local t0=$SECONDS
    inside sh -c 'apt-get upgrade -y -q -o Dir::Etc::SourceList=/etc/apt/sources.list.d/atomnode.sources \
        -o Dir::Etc::SourceParts=/nonexistent </dev/null >/root/upgrade.log 2>&1; echo $? >/root/upgrade.rc' &
    local apt_pid=$!
    wait_for 180 "the old daemon stopping" sh -c "[ \"\$(nsenter -t $LEADER -a systemctl show -p ActiveState --value atomnode)\" = deactivating ]" ||
        { wait "$apt_pid"; inside cat /root/upgrade.log; return 1; }
    local t_stop=$SECONDS
    inside touch /var/lib/atomnode/pkgtest-release
    wait "$apt_pid"
    local t_done=$SECONDS
    local rc
    rc=$(inside cat /root/upgrade.rc)
    [ "$rc" = 0 ] || { echo "apt-get exited $rc:"; inside cat /root/upgrade.log; return 1; }
    inside grep -Ei "conffile|configuration file" /root/upgrade.log && { echo "apt/dpkg asked about a configuration file"; return 1; }

    # The new version runs, on the migrated database, with every job.
    [ "$(inside dpkg-query -W -f='${Version}' atomnode)" = "$new" ] || { echo "version after upgrade: $(inside dpkg-query -W -f='${Version}' atomnode)"; return 1; }
    [ "$(inside systemctl is-active atomnode)" = active ] || { echo "not active after the upgrade"; inside journalctl -u atomnode --no-pager -n 40; return 1; }
    [ "$(prop MainPID)" != "$pid_old" ] || { echo "MainPID unchanged: the daemon was not restarted"; return 1; }
    # Serving again within the restart budget: the drain (shutdown_timeout 6 s here) plus a
    # start that recovers and migrates 1,000 jobs.
    ((t_done - t_stop <= 6 + 30)) || { echo "stop to active took $((t_done - t_stop))s"; return 1; }
    inside atomnode --version | grep -F "${new%%-*}" >/dev/null || { echo "atomnode --version: $(inside atomnode --version)"; return 1; }
    [ "$(db_schema)" = "$NEXT_SCHEMA migrated" ] || { echo "database after upgrade: $(db_schema), expected $NEXT_SCHEMA migrated"; return 1; }
    inside journalctl -u atomnode --no-pager -o cat | grep "migrating schema to version $NEXT_SCHEMA" >/dev/null ||
        { echo "no migration in the journal"; return 1; }
    helper admin status | grep -P '^pkgtest-bulk\t1000\t0\t' >/dev/null || { echo "after the upgrade:"; helper admin status; return 1; }
    helper admin status | grep -P '^pkgtest-durable\t3\t' >/dev/null || { echo "after the upgrade:"; helper admin status; return 1; }
    # The job that finished during the drain is done, handed out once; the one that
    # outlived shutdown_timeout went back to the queue with its attempt counted, and the
    # new daemon runs it again (its second attempt).
    [ "$(job_field pkgtest-drain-finishes state) $(job_field pkgtest-drain-finishes attempts)" = "done 1" ] ||
        { echo "pkgtest-drain-finishes: $(inside atomnode jobs list --function pkgtest-drain-finishes)"; return 1; }
    wait_for 15 "the outlived job running again" sh -c "nsenter -t $LEADER -a atomnode jobs list --function pkgtest-drain-outlives --json | grep '\"attempts\": 2' >/dev/null" ||
        { echo "pkgtest-drain-outlives: $(inside atomnode jobs list --function pkgtest-drain-outlives)"; return 1; }
    inside journalctl -u atomnode --no-pager -o cat | grep "killing command pid .* at shutdown" >/dev/null ||
        { echo "the journal does not show the outliving job killed at shutdown"; return 1; }
    # The site's files: the edited main file kept, the new template shipped beside it,
    # nothing left for dpkg to ask about.
    [ "$(inside sha256sum /etc/atomnode/atomnode.yml)" = "$edited" ] || { echo "/etc/atomnode/atomnode.yml changed"; return 1; }
    inside grep "Changed in the upgrade test build" /usr/share/atomnode/atomnode.yml >/dev/null ||
        { echo "the new shipped configuration file is not installed"; return 1; }
    inside grep "Changed in the upgrade test build" /etc/atomnode/atomnode.yml >/dev/null &&
        { echo "the upgrade rewrote the site's atomnode.yml"; return 1; }
    if inside sh -c 'ls /etc/atomnode/*.dpkg-* /etc/atomnode/*.ucf-* 2>/dev/null' | grep . >/dev/null; then
        echo "dpkg left configuration files to merge"; return 1
    fi
    echo "$OLD_VERSION -> $new in $((t_done - t0))s (stop+start $((t_done - t_stop))s): schema $NEXT_SCHEMA, 1000+3 queued kept, drained job done, outlived job requeued (attempt 2 running), atomnode.yml edit kept, no prompt"
}

c_downgrade_refused() {
    # Back to the previous version: its preinst sees a schema it does not know and refuses,
    # leaving the new version installed and running and the queue as it was.
    local out rc
    out=$(inside apt-get install -y -q --allow-downgrades "atomnode=$OLD_VERSION" </dev/null 2>&1)
    rc=$?
    [ "$rc" != 0 ] || { echo "the downgrade to $OLD_VERSION succeeded:"; echo "$out" | tail -n 20; return 1; }
    echo "$out" | grep "has schema version $NEXT_SCHEMA, written by a newer atomnode" >/dev/null ||
        { echo "no schema message in:"; echo "$out" | tail -n 30; return 1; }
    local status
    status=$(inside dpkg-query -W -f='${Status} ${Version}' atomnode)
    [ "$status" = "install ok installed $(dpkg-deb -f "$NEXT_DEB" Version)" ] || { echo "after the refused downgrade: $status"; return 1; }
    wait_for 30 "atomnode active" sh -c "[ \"\$(nsenter -t $LEADER -a systemctl is-active atomnode)\" = active ]" ||
        { inside journalctl -u atomnode --no-pager -n 30; return 1; }
    [ "$(db_schema)" = "$NEXT_SCHEMA migrated" ] || { echo "database: $(db_schema)"; return 1; }
    # The queue is intact: every one of the 1,000 jobs (distinct payloads) and the 3 from
    # before is delivered.
    local got
    got=$(helper --timeout 120 work pkgtest-bulk 1000) || return 1
    [ "$(echo "$got" | grep -c '^bulk-')" = 1000 ] && [ "$(echo "$got" | sort -u | wc -l)" = 1000 ] ||
        { echo "worker got $(echo "$got" | wc -l) bulk jobs, $(echo "$got" | sort -u | wc -l) distinct"; return 1; }
    got=$(helper --timeout 20 work pkgtest-durable 3) || return 1
    [ "$(echo "$got" | grep -c '^job$')" = 3 ] || { echo "worker got: $got"; return 1; }
    # Let the outlived job finish and drop the test's handlers.
    inside touch /var/lib/atomnode/pkgtest-never
    wait_for 20 "the outlived job done" sh -c "nsenter -t $LEADER -a atomnode jobs list --function pkgtest-drain-outlives --json | grep '\"done\"' >/dev/null" ||
        { inside atomnode jobs list --function pkgtest-drain-outlives; return 1; }
    inside rm -f /etc/atomnode/conf.d/40-pkgtest-upgrade.yml
    inside systemctl restart atomnode || return 1
    echo "refused: $(echo "$out" | grep -m1 'refusing to install'); 1000+3 jobs delivered after it"
}

c_worker_user() {
    # Workers run as their configured user, under NoNewPrivileges and the
    # capability bounding set of the unit. On failure the configuration is put
    # back, so that the checks after this one test a running service.
    c_worker_user_steps && return 0
    inside rm -f /etc/atomnode/conf.d/50-pkgtest-whoami.yml
    inside systemctl reset-failed atomnode
    inside systemctl restart atomnode
    return 1
}

c_worker_user_steps() {
    inside sh -c 'cat >/etc/atomnode/conf.d/50-pkgtest-whoami.yml <<EOF
handlers:
  - {function: pkgtest-whoami, command: [id, -un], user: nobody}
EOF'
    inside atomnode check-config >/dev/null || { inside atomnode check-config; return 1; }
    inside systemctl restart atomnode || { inside journalctl -u atomnode --no-pager -n 30; return 1; }
    local got
    got=$(helper --timeout 20 submit pkgtest-whoami x) || { inside journalctl -u atomnode --no-pager -n 30; return 1; }
    [ "$(echo "$got" | tr -d '[:space:]')" = nobody ] || { echo "handler ran as '$got'"; return 1; }
    echo "handler ran as nobody"
}

c_pool_user() {
    # A supervised worker pool, like AtoM's, with its workers started as another
    # user by the hardened service; the config is put back afterwards.
    c_pool_user_steps
    local rc=$?
    inside rm -f /etc/atomnode/conf.d/50-pkgtest-pool.yml
    inside systemctl restart atomnode
    return $rc
}

c_pool_user_steps() {
    inside sh -c 'cat >/etc/atomnode/conf.d/50-pkgtest-pool.yml <<EOF
pools:
  - name: pkgtest
    command: [python3, /mnt/test/gearman_helper.py, --timeout, "3600", work, pkgtest-pool, "1000000"]
    directory: /mnt/test
    user: nobody
    count: 2
EOF'
    inside atomnode check-config >/dev/null || { inside atomnode check-config; return 1; }
    inside systemctl restart atomnode || { inside journalctl -u atomnode --no-pager -n 30; return 1; }
    local got users
    got=$(helper --timeout 30 submit pkgtest-pool from-the-pool-test) ||
        { inside atomnode status; inside journalctl -u atomnode --no-pager -n 30; return 1; }
    [ "$got" = FROM-THE-POOL-TEST ] || { echo "pool worker answered '$got'"; return 1; }
    users=$(inside ps -o user= -C python3 2>/dev/null || inside sh -c 'for p in /proc/[0-9]*; do grep -l gearman_helper $p/cmdline >/dev/null 2>&1 && stat -c %U $p; done')
    echo "$users" | grep nobody >/dev/null || { echo "no worker process running as nobody: $users"; return 1; }
    echo "$users" | grep root >/dev/null && { echo "a worker runs as root: $users"; return 1; }
    inside atomnode status | grep pkgtest >/dev/null || { echo "'atomnode status' does not show the pool:"; inside atomnode status; return 1; }
    echo "2 pool workers as nobody; job answered"
}

c_port_in_use() {
    inside systemctl stop atomnode
    inside systemd-run --quiet --unit=pkgtest-porthog python3 /mnt/test/gearman_helper.py hold-port "$PORT" ||
        return 1
    wait_for 10 "the port holder to listen" sh -c "ss -Hltn 'sport = :$PORT' | grep -q ." ||
        { inside systemctl status --no-pager pkgtest-porthog; inside systemctl stop pkgtest-porthog; return 1; }
    inside systemctl start atomnode && { echo "atomnode started although port $PORT is taken"; return 1; }
    local journal
    journal=$(inside journalctl -u atomnode --no-pager -n 50 -o cat)
    inside systemctl stop pkgtest-porthog
    inside systemctl reset-failed atomnode
    echo "$journal" | grep -i "port $PORT.*in use" | grep -i gearman >/dev/null ||
        { echo "the journal does not say port $PORT is inside use / gearman:"; echo "$journal" | tail -n 15; return 1; }
    wait_for 10 "port $PORT free" sh -c "! ss -Hltn 'sport = :$PORT' | grep -q ." || return 1
    inside systemctl start atomnode || { inside journalctl -u atomnode --no-pager -n 30; return 1; }
    echo "$journal" | grep -i "in use" | tail -n1
}

c_watchdog_kills_frozen() {
    local pid1 r1 pid2 r2
    pid1=$(prop MainPID)
    r1=$(prop NRestarts)
    inside systemctl kill --kill-who=main --signal=SIGSTOP atomnode || return 1
    wait_for $((WATCHDOG_TEST_SEC * 3 + 15)) "a watchdog restart" \
        sh -c "[ \"\$(nsenter -t $LEADER -a systemctl show -p NRestarts --value atomnode)\" -gt $r1 ]" ||
        { inside journalctl -u atomnode --no-pager -n 20; return 1; }
    wait_for 30 "atomnode active again" sh -c "[ \"\$(nsenter -t $LEADER -a systemctl is-active atomnode)\" = active ]" ||
        { inside journalctl -u atomnode --no-pager -n 30; return 1; }
    pid2=$(prop MainPID)
    r2=$(prop NRestarts)
    [ "$pid2" != "$pid1" ] || { echo "MainPID unchanged"; return 1; }
    inside journalctl -u atomnode --no-pager -o cat | grep "Watchdog timeout" >/dev/null ||
        { echo "no 'Watchdog timeout' in the journal"; return 1; }
    echo "watchdog restarted it: MainPID $pid1 -> $pid2, NRestarts $r1 -> $r2"
}

c_verify() {
    local out
    out=$(inside systemd-analyze verify atomnode.service 2>&1)
    # It exits 0 even on parse errors: any output is a failure.
    [ -z "$out" ] || { echo "$out"; return 1; }
    echo "systemd-analyze verify: clean"
}

c_clean_stop() {
    # `systemctl stop` drains and exits 0: the unit ends inactive, not failed.
    inside systemctl reset-failed atomnode 2>/dev/null
    inside systemctl restart atomnode || return 1
    helper submit-bg pkgtest-stop x >/dev/null || return 1
    inside systemctl stop atomnode
    local result status state
    result=$(prop Result)
    status=$(prop ExecMainStatus)
    state=$(inside systemctl is-active atomnode)
    inside systemctl start atomnode || return 1
    if [ "$result" != success ] || [ "$status" != 0 ] || [ "$state" != inactive ]; then
        echo "after stop: state=$state Result=$result ExecMainStatus=$status"
        inside journalctl -u atomnode --no-pager -n 25 -o cat
        return 1
    fi
    echo "stopped cleanly (exit 0)"
}

c_remove_keeps_state() {
    inside apt-get remove -y -q atomnode >/dev/null || return 1
    local state
    state=$(inside systemctl is-active atomnode)
    [ "$state" != active ] || { echo "still active after remove"; return 1; }
    inside test -f /var/lib/atomnode/atomnode.db || { echo "remove deleted the queue database"; inside ls -la /var/lib/atomnode; return 1; }
    inside test -f /etc/atomnode/atomnode.yml || { echo "remove deleted the configuration"; return 1; }
    inside test ! -e /usr/bin/atomnode || { echo "/usr/bin/atomnode left after remove"; return 1; }
    echo "removed; database and configuration kept"
}

c_purge() {
    inside apt-get purge -y -q atomnode >/dev/null || return 1
    local state left=""
    state=$(inside systemctl is-active atomnode)
    [ "$state" != active ] || { echo "still active after purge"; return 1; }
    for d in /var/lib/atomnode /etc/atomnode /opt/venvs/atomnode; do
        inside test -e "$d" && left="$left $d"
    done
    [ -z "$left" ] || { echo "left after purge:$left"; return 1; }
    inside getent passwd atomnode && { echo "user atomnode left after purge"; return 1; }
    echo "purged: state, configuration, venv and user gone"
}

# --- main -----------------------------------------------------------------------

main() {
    local start=$SECONDS
    [ "$(uname -s)" = Linux ] || skip "not Linux: systemd-nspawn needs Linux"
    [ "$(id -u)" = 0 ] || skip "not root: booting a container with systemd-nspawn needs root (CI runs as root)"
    [ -d /sys/fs/cgroup ] && [ -n "$(ls -A /sys/fs/cgroup 2>/dev/null)" ] ||
        skip "no cgroup filesystem mounted at /sys/fs/cgroup: systemd cannot boot inside a container here"
    command -v apt-get >/dev/null || skip "no apt-get: this test needs a Debian host"
    ensure_tools

    if ss -Hltn "sport = :4731" | grep -q .; then
        ss -ltnp "sport = :4731" >&2
        abort "port 4731 (the web console's default) is in use on the host; the container shares the host network. Stop whatever listens there first"
    fi
    if ss -Hltn "sport = :$PORT" | grep -q .; then
        ss -ltnp "sport = :$PORT" >&2
        abort "port $PORT is inside use on the host; the container shares the host network, so the packaged daemon could not bind it. Stop whatever listens there first (gearman-job-server? systemctl disable --now gearman-job-server)"
    fi

    RUNDIR=$(mktemp -d "${TMPDIR:-/tmp}/atomnode-test.XXXXXX")
    if ss -Hltn "sport = :$REPO_PORT" | grep -q .; then
        ss -ltnp "sport = :$REPO_PORT" >&2
        abort "port $REPO_PORT (the test's repository server) is in use on the host"
    fi

    if [ -n "${ATOMNODE_TEST_DEB:-}" ]; then
        DEB=$ATOMNODE_TEST_DEB
        [ -f "$DEB" ] || abort "ATOMNODE_TEST_DEB=$DEB does not exist"
    else
        say "building the package (make deb)"
        check "build+lintian" make -s deb
        check "build leaves the tree clean" c_tree_clean
        DEB=$(ls -t dist/atomnode_*.deb 2>/dev/null | head -n1)
        [ -n "$DEB" ] || abort "make deb produced no dist/atomnode_*.deb"
    fi
    DEB=$(readlink -f "$DEB")
    OLD_VERSION=$(dpkg-deb -f "$DEB" Version)
    NEXT_SCHEMA=$(($(sed -n 's/^SCHEMA_VERSION = \([0-9][0-9]*\)$/\1/p' atomnode/queue/store.py) + 1))
    # The next version for the upgrade check: same tooling, a changed copy of this tree,
    # built while the container boots and the first checks run.
    say "building the next version in the background"
    setsid sh -c "sh tests/packaging/next-version.sh '$RUNDIR/next' && sh '$RUNDIR/next/packaging/build-deb.sh'" \
        >"$RUNDIR/next-build.log" 2>&1 </dev/null &
    NEXT_PID=$!
    check "make repo (signed)" c_make_repo

    ensure_rootfs
    boot_container

    check "install" c_install
    check "active+notify+watchdog" c_active
    check "job round trip" c_roundtrip
    check "jobs list shows done" c_jobs_done
    check "web console and /metrics" c_console
    check "up past WatchdogSec" c_watchdog_stable
    check "restart keeps queue" c_restart_keeps_queue
    check "repositories of another key or unsigned refused" c_untrusted_repos
    say "waiting for the next version's build"
    if wait "$NEXT_PID"; then
        NEXT_DEB=$(ls "$RUNDIR"/next/dist/atomnode_*.deb 2>/dev/null | head -n1)
    fi
    NEXT_PID=
    check "apt upgrade loses nothing" c_upgrade
    check "downgrade refused, queue intact" c_downgrade_refused
    check "worker runs as its user" c_worker_user
    check "pool workers run as their user" c_pool_user
    check "port 4730 in use is explained" c_port_in_use
    check "watchdog restarts a frozen daemon" c_watchdog_kills_frozen
    check "systemd-analyze verify" c_verify
    check "stop is clean" c_clean_stop
    check "remove keeps state" c_remove_keeps_state
    check "purge removes state" c_purge

    stop_container
    say "done in $((SECONDS - start))s"
    summary
    [ "$FAILED" = 0 ]
}

main "$@"
