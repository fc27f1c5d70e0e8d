#!/bin/sh
# Install the Debian packages that `make run` / `make test` need, only if missing.
# Usage: scripts/sysdeps.sh run|test|bench
set -e
# gcc, libc6-dev and python3-dev build the mypyc-compiled hot path (setup.py), and with
# libsqlite3-dev the C reader recovery uses at a restart; without them atomnode installs
# and runs as pure Python, slower.
run_pkgs="python3 python3-venv gcc libc6-dev python3-dev libsqlite3-dev"
test_pkgs="$run_pkgs gnupg apt-utils gearman-job-server gearman-tools php-cli php-gearman libgearman-client-perl sqlite3 procps iproute2 util-linux mount e2fsprogs chromium chromium-driver mariadb-server"
case "${1:-run}" in
  run) pkgs=$run_pkgs ;;
  test) pkgs=$test_pkgs ;;
  bench) pkgs="$run_pkgs gearman-job-server gcc libc6-dev" ;;
  *) echo "usage: $0 run|test|bench" >&2; exit 2 ;;
esac
missing=""
for p in $pkgs; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
[ -z "$missing" ] && exit 0
if [ "$(id -u)" != 0 ]; then
  echo "atomnode: missing Debian packages:$missing" >&2
  echo "atomnode: install them as root: apt-get install$missing" >&2
  exit 1
fi
echo "atomnode: installing Debian packages:$missing"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# --no-install-recommends keeps gearman-job-server from pulling in anything that starts services.
apt-get install -y -qq --no-install-recommends $missing
# The gearman-job-server package starts its own gearmand on 4730 where an init system runs;
# the tests start their own on free ports, so stop it to keep 4730 for atomnode.
if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
  systemctl disable --now gearman-job-server >/dev/null 2>&1 || true
elif [ -x /etc/init.d/gearman-job-server ]; then
  /etc/init.d/gearman-job-server stop >/dev/null 2>&1 || true
fi
# mariadb-server is there for the tests' own throwaway instances (tests/mariadb_server.py,
# unprivileged, in a temporary directory): stop the system service it may have started.
case " $missing " in
  *" mariadb-server "*)
    if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
      systemctl disable --now mariadb >/dev/null 2>&1 || true
    elif [ -x /etc/init.d/mariadb ]; then
      /etc/init.d/mariadb stop >/dev/null 2>&1 || true
    fi ;;
esac
