#!/bin/sh
# Build the Debian package in a clean environment and leave it in dist/:
#   dist/atomnode_<version>_<arch>.deb (+ .changes, .buildinfo)
# Installs missing build dependencies when run as root. The build happens in a
# temporary copy of the tree, so no build output is left in the source tree.
# Usage: packaging/build-deb.sh   (what `make deb` runs)
set -eu
cd "$(dirname "$0")/.."
top=$(pwd)

say() { echo "atomnode-deb: $*"; }
die() { echo "atomnode-deb: error: $*" >&2; exit 1; }

# dpkg-dev (dpkg-parsechangelog, dpkg-buildpackage) must be there before anything else.
if ! command -v dpkg-buildpackage >/dev/null 2>&1; then
    [ "$(id -u)" = 0 ] || die "dpkg-dev is missing; as root: apt-get install dpkg-dev"
    say "installing dpkg-dev"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends dpkg-dev build-essential >/dev/null
fi

version=$(sed -n 's/^version *= *"\([^"]*\)".*/\1/p' pyproject.toml | head -n1)
deb_version=$(dpkg-parsechangelog -S Version)
upstream=${deb_version%-*}
[ "$upstream" = "$version" ] || die "debian/changelog is at $deb_version but pyproject.toml at $version: add a changelog entry (dch -v $version)"
arch=$(dpkg --print-architecture)

# Build dependencies.
if ! dpkg-checkbuilddeps >/dev/null 2>&1; then
    if [ "$(id -u)" != 0 ]; then
        dpkg-checkbuilddeps || true
        die "missing build dependencies; as root: apt-get build-dep ./"
    fi
    say "installing build dependencies"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get build-dep -y -qq --no-install-recommends ./ >/dev/null
fi
for tool in lintian; do
    if ! command -v $tool >/dev/null 2>&1; then
        [ "$(id -u)" = 0 ] || die "$tool is missing; as root: apt-get install $tool"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $tool >/dev/null
    fi
done

work=$(mktemp -d "${TMPDIR:-/tmp}/atomnode-deb.XXXXXX")
trap 'rm -rf "$work"' EXIT INT TERM
src="$work/atomnode-$version"
mkdir -p "$src"

# Copy the tree as git sees it (tracked and untracked, minus ignored files).
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    git ls-files -z -co --exclude-standard \
        | xargs -0 sh -c 'for f; do [ -e "$f" ] && printf "%s\0" "$f"; done; exit 0' sh \
        | tar --null -T - -cf - | tar -C "$src" -xf -
else
    tar --exclude=./.venv --exclude=./var --exclude=./dist --exclude=./build \
        --exclude='*.egg-info' --exclude=__pycache__ -cf - . | tar -C "$src" -xf -
fi

say "building atomnode $deb_version ($arch)"
log="$work/build.log"
if ! (cd "$src" && env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 \
        ${SOURCE_DATE_EPOCH:+SOURCE_DATE_EPOCH=$SOURCE_DATE_EPOCH} \
        dpkg-buildpackage -us -uc -b) >"$log" 2>&1; then
    tail -n 60 "$log" >&2
    die "dpkg-buildpackage failed (last lines above)"
fi

deb="atomnode_${deb_version}_${arch}.deb"
changes="atomnode_${deb_version}_${arch}.changes"
[ -f "$work/$deb" ] || die "dpkg-buildpackage did not produce $deb"

say "lintian"
if ! (cd "$work" && lintian --fail-on error,warning --info "$changes"); then
    die "lintian found errors or warnings (fix them or override with a reason in debian/atomnode.lintian-overrides)"
fi

mkdir -p "$top/dist"
rm -f "$top"/dist/atomnode_*
cp "$work/$deb" "$work/$changes" "$work"/atomnode_*.buildinfo "$top/dist/"
say "built dist/$deb ($(du -h "$top/dist/$deb" | cut -f1))"
