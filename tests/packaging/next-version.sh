#!/bin/sh
# Make the source tree of "the next version" for the upgrade test, in a copy of this tree:
# tests/packaging/next-version.sh DIR
# Copies the tree (as packaging/build-deb.sh does) into DIR and changes what a real
# upgrade changes: a new version (debian/changelog, pyproject.toml, __version__), one more
# schema migration step (a new table, and an index built over the queued jobs), and a
# changed shipped configuration file. DIR is then built with DIR/packaging/build-deb.sh,
# the same tooling as the package under test. Prints the new Debian version.
set -eu
cd "$(dirname "$0")/../.."
dir=$1
mkdir -p "$dir"
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    git ls-files -z -co --exclude-standard \
        | xargs -0 sh -c 'for f; do [ -e "$f" ] && printf "%s\0" "$f"; done; exit 0' sh \
        | tar --null -T - -cf - | tar -C "$dir" -xf -
else
    tar --exclude=./.venv --exclude=./var --exclude=./dist --exclude=./build \
        --exclude='*.egg-info' --exclude=__pycache__ -cf - . | tar -C "$dir" -xf -
fi
cd "$dir"

old=$(sed -n 's/^version *= *"\([^"]*\)".*/\1/p' pyproject.toml | head -n1)
new="$old+upgradetest1"
sed -i "s/^version *= *\"$old\"/version = \"$new\"/" pyproject.toml
sed -i "s/^__version__ = \"$old\"/__version__ = \"$new\"/" atomnode/__init__.py
{
    echo "atomnode ($new) bookworm; urgency=medium"
    echo
    echo "  * Upgrade test build: schema migration step, changed shipped configuration."
    echo
    echo " -- atomnode maintainers <atomnode@packages.invalid>  $(date -R)"
    echo
    cat debian/changelog
} >debian/changelog.new
mv debian/changelog.new debian/changelog

schema=$(sed -n 's/^SCHEMA_VERSION = \([0-9][0-9]*\)$/\1/p' atomnode/queue/store.py)
[ -n "$schema" ] || { echo "next-version: no SCHEMA_VERSION in store.py" >&2; exit 1; }
next=$((schema + 1))
sed -i "s/^SCHEMA_VERSION = $schema\$/SCHEMA_VERSION = $next/" atomnode/queue/store.py
cat >>atomnode/queue/store.py <<PY


# Added by tests/packaging/next-version.sh (the upgrade test's "next version").
MIGRATIONS[$next] = [
    "CREATE TABLE upgrade_test (note TEXT NOT NULL)",
    "INSERT INTO upgrade_test (note) VALUES ('migrated by the upgrade test build')",
    "CREATE INDEX jobs_upgrade_test ON jobs(function, state)",
]
PY

cat >>packaging/atomnode.yml <<'YML'

# Changed in the upgrade test build: a shipped file that differs from the installed one.
YML
echo "$new"
