#!/bin/sh
# Publish the built package(s) into a signed apt repository (what `make repo` runs):
#
#   dist/repo/pool/main/a/atomnode/atomnode_<version>_<arch>.deb   every version published
#   dist/repo/dists/bookworm/{Release,InRelease,Release.gpg}      signed indexes
#   dist/repo/dists/bookworm/main/binary-<arch>/Packages{,.gz}
#   dist/repo/atomnode-archive-keyring.gpg                        the public key, for Signed-By
#
# Made with Debian's own tools: apt-ftparchive (apt-utils) writes the indexes, gpg signs
# the Release file. Publishing adds to the pool: packages published before stay (so sites
# can pin or go back to them); publish a new version by building it (make deb) and running
# this again. The tree is static: serve it with any web server (docs/install.md).
#
# The signing key is an input, never part of the source tree:
#   GNUPGHOME=DIR            a GnuPG home holding the secret key (default: ~/.gnupg)
#   REPO_KEY=FILE            or: a secret key file (gpg --export-secret-keys), imported
#                            into a temporary GnuPG home for this run
#   REPO_KEY_ID=ID           which key, when the home holds several (default: the only one)
# Other settings:
#   REPO_DIR=DIR             where the repository is (default: dist/repo)
#   REPO_DEBS="FILE..."      the packages to publish (default: dist/atomnode_*.deb)
#   REPO_SUITE=NAME          the suite (codename) (default: bookworm)
set -eu
cd "$(dirname "$0")/.."

say() { echo "atomnode-repo: $*"; }
die() { echo "atomnode-repo: error: $*" >&2; exit 1; }

REPO_DIR=${REPO_DIR:-dist/repo}
SUITE=${REPO_SUITE:-bookworm}
COMPONENT=main

need=""
command -v apt-ftparchive >/dev/null 2>&1 || need="$need apt-utils"
command -v gpg >/dev/null 2>&1 || need="$need gnupg"
if [ -n "$need" ]; then
    [ "$(id -u)" = 0 ] || die "missing:$need; as root: apt-get install$need"
    say "installing:$need"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends $need >/dev/null
fi

debs=${REPO_DEBS:-$(ls dist/atomnode_*.deb 2>/dev/null || true)}
[ -n "$debs" ] || die "no package to publish: run 'make deb' first (or set REPO_DEBS)"

tmp=$(mktemp -d "${TMPDIR:-/tmp}/atomnode-repo.XXXXXX")
trap 'rm -rf "$tmp"' EXIT INT TERM

# The signing key.
if [ -n "${REPO_KEY:-}" ]; then
    [ -r "$REPO_KEY" ] || die "REPO_KEY=$REPO_KEY: cannot read it"
    export GNUPGHOME="$tmp/gnupg"
    mkdir -m 700 "$GNUPGHOME"
    gpg --batch --quiet --import "$REPO_KEY" 2>"$tmp/gpg.log" ||
        { cat "$tmp/gpg.log" >&2; die "REPO_KEY=$REPO_KEY: gpg could not import it"; }
fi
keys=$(gpg --batch --with-colons --list-secret-keys ${REPO_KEY_ID:+"$REPO_KEY_ID"} 2>/dev/null |
    awk -F: '$1 == "fpr" { print $10; exit }' ; true)
[ -n "$keys" ] || die "no secret key to sign with in ${GNUPGHOME:-~/.gnupg}${REPO_KEY_ID:+ matching $REPO_KEY_ID} (give GNUPGHOME=DIR, REPO_KEY=FILE or REPO_KEY_ID=ID)"
if [ -z "${REPO_KEY_ID:-}" ]; then
    n=$(gpg --batch --with-colons --list-secret-keys 2>/dev/null | grep -c '^sec:' || true)
    [ "$n" = 1 ] || die "${GNUPGHOME:-~/.gnupg} holds $n secret keys: say which one with REPO_KEY_ID=ID"
fi
fpr=$keys

# Publish: add the packages to the pool (a version already there must be the same file).
pool="pool/$COMPONENT/a/atomnode"
mkdir -p "$REPO_DIR/$pool"
for deb in $debs; do
    [ -f "$deb" ] || die "$deb: no such package"
    name=$(basename "$deb")
    if [ -e "$REPO_DIR/$pool/$name" ] && ! cmp -s "$deb" "$REPO_DIR/$pool/$name"; then
        die "$REPO_DIR/$pool/$name is already published with other contents: a published version never changes; bump the version (debian/changelog)"
    fi
    cp "$deb" "$REPO_DIR/$pool/$name"
    say "published $name"
done

# The indexes, per architecture found in the pool ("all" packages go into each).
cd "$REPO_DIR"
archs=$(for f in pool/*/*/*/*.deb; do dpkg-deb -f "$f" Architecture; done | sort -u | grep -vx all || true)
[ -n "$archs" ] || archs=$(dpkg --print-architecture)
rm -rf "dists/$SUITE"
for arch in $archs; do
    dir="dists/$SUITE/$COMPONENT/binary-$arch"
    mkdir -p "$dir"
    apt-ftparchive --arch "$arch" packages pool >"$dir/Packages"
    gzip -9n <"$dir/Packages" >"$dir/Packages.gz"
done
apt-ftparchive \
    -o APT::FTPArchive::Release::Origin=atomnode \
    -o APT::FTPArchive::Release::Label=atomnode \
    -o APT::FTPArchive::Release::Suite="$SUITE" \
    -o APT::FTPArchive::Release::Codename="$SUITE" \
    -o APT::FTPArchive::Release::Architectures="$(echo $archs)" \
    -o APT::FTPArchive::Release::Components="$COMPONENT" \
    -o APT::FTPArchive::Release::Description="atomnode packages for Debian $SUITE" \
    -o APT::FTPArchive::MD5=false -o APT::FTPArchive::SHA1=false \
    release "dists/$SUITE" >"$tmp/Release"
mv "$tmp/Release" "dists/$SUITE/Release"

# Sign: InRelease (clear-signed) for current apt, Release.gpg (detached) for older tools.
gpg --batch --yes --quiet --local-user "$fpr" --digest-algo SHA512 \
    --clearsign --output "dists/$SUITE/InRelease" "dists/$SUITE/Release"
gpg --batch --yes --quiet --local-user "$fpr" --digest-algo SHA512 \
    --armor --detach-sign --output "dists/$SUITE/Release.gpg" "dists/$SUITE/Release"
gpg --batch --yes --export "$fpr" >atomnode-archive-keyring.gpg
# Check what a site's apt will check: the signature, against the exported key only.
gpgv --keyring "$(pwd)/atomnode-archive-keyring.gpg" "dists/$SUITE/InRelease" 2>"$tmp/gpgv.log" ||
    { cat "$tmp/gpgv.log" >&2; die "the signature does not verify with the exported key"; }
say "signed $REPO_DIR/dists/$SUITE with key $fpr ($(ls pool/*/*/*/*.deb | wc -l) package(s), $(echo $archs))"
