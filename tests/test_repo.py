"""``make repo`` (packaging/build-repo.sh): a signed apt repository from built packages,
checked the way apt checks it (gpgv against the exported keyring, the hashes in Release).

Uses small stand-in packages built with dpkg-deb, and throw-away keys in temporary GnuPG
homes. The end-to-end use by apt (install, upgrade, refusal of other keys and of unsigned
repositories) is in tests/packaging/run.sh (``make test-deb``)."""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

TOP = Path(__file__).resolve().parent.parent
SCRIPT = TOP / "packaging" / "build-repo.sh"

pytestmark = pytest.mark.skipif(
    not all(shutil.which(t) for t in ("gpg", "gpgv", "apt-ftparchive", "dpkg-deb")),
    reason="needs gnupg, apt-utils and dpkg (scripts/sysdeps.sh test installs them)",
)


def make_deb(where: Path, version: str, payload: str = "x") -> Path:
    root = where / f"pkg-{version}-{payload}"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "usr/share/doc/atomnode").mkdir(parents=True)
    (root / "usr/share/doc/atomnode/stand-in").write_text(payload)
    (root / "DEBIAN/control").write_text(
        "Package: atomnode\n"
        f"Version: {version}\n"
        "Architecture: amd64\n"
        "Maintainer: atomnode tests <tests@atomnode.invalid>\n"
        "Description: stand-in package for the repository test\n"
    )
    deb = where / f"atomnode_{version}_amd64.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "-Zgzip", "--build", str(root), str(deb)],
                   check=True, capture_output=True)
    return deb


def gnupg_home(tmp_path: Path, name: str) -> Path:
    home = tmp_path / f"gnupg-{name}"
    home.mkdir(mode=0o700)
    subprocess.run(
        ["gpg", "--batch", "--quiet", "--passphrase", "", "--quick-gen-key",
         f"test {name} <{name}@atomnode.invalid>", "ed25519", "sign", "1d"],
        check=True, capture_output=True, env={**os.environ, "GNUPGHOME": str(home)},
    )
    return home


@pytest.fixture
def homes(tmp_path: Path):
    made: list[Path] = []

    def make(name: str) -> Path:
        made.append(gnupg_home(tmp_path, name))
        return made[-1]

    yield make
    for home in made:  # gpg starts an agent per home
        subprocess.run(["gpgconf", "--kill", "all"], env={**os.environ, "GNUPGHOME": str(home)},
                       capture_output=True)


def publish(repo: Path, debs: list[Path], **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["sh", str(SCRIPT)], cwd=TOP, capture_output=True, text=True,
        env={**os.environ, "REPO_DIR": str(repo), "REPO_DEBS": " ".join(map(str, debs)), **env},
    )


def verify(repo: Path) -> str:
    """What apt does: InRelease signed by the exported key; every index's hash as listed."""
    keyring = repo / "atomnode-archive-keyring.gpg"
    inrelease = repo / "dists/bookworm/InRelease"
    subprocess.run(["gpgv", "--keyring", str(keyring), str(inrelease)], check=True,
                   capture_output=True)
    subprocess.run(["gpgv", "--keyring", str(keyring), str(repo / "dists/bookworm/Release.gpg"),
                    str(repo / "dists/bookworm/Release")], check=True, capture_output=True)
    release = (repo / "dists/bookworm/Release").read_text()
    assert "MD5Sum" not in release and "SHA1" not in release
    for field in ("Suite: bookworm", "Codename: bookworm", "Components: main",
                  "Architectures: amd64", "Origin: atomnode"):
        assert field in release
    sha256 = release.split("SHA256:\n", 1)[1].split("\n")
    listed = {}
    for line in sha256:
        if not line.startswith(" "):
            break
        digest, size, name = line.split()
        listed[name] = digest
    for name in ("main/binary-amd64/Packages", "main/binary-amd64/Packages.gz"):
        data = (repo / "dists/bookworm" / name).read_bytes()
        assert listed[name] == hashlib.sha256(data).hexdigest()
    packages = gzip.decompress((repo / "dists/bookworm/main/binary-amd64/Packages.gz").read_bytes())
    return packages.decode()


def test_publish_sign_and_add_versions(tmp_path: Path, homes) -> None:
    home = homes("good")
    repo = tmp_path / "repo"
    first = make_deb(tmp_path, "0.1.0")
    r = publish(repo, [first], GNUPGHOME=str(home))
    assert r.returncode == 0, r.stderr
    assert "Version: 0.1.0" in verify(repo)
    assert (repo / "pool/main/a/atomnode/atomnode_0.1.0_amd64.deb").read_bytes() == first.read_bytes()

    # Publishing the next version keeps the previous one (sites can go back to it).
    (tmp_path / "next").mkdir()
    nxt = make_deb(tmp_path / "next", "0.1.1")
    r = publish(repo, [nxt], GNUPGHOME=str(home))
    assert r.returncode == 0, r.stderr
    packages = verify(repo)
    assert "Version: 0.1.0" in packages and "Version: 0.1.1" in packages

    # A published version never changes.
    (tmp_path / "again").mkdir()
    changed = make_deb(tmp_path / "again", "0.1.1", payload="other")
    r = publish(repo, [changed], GNUPGHOME=str(home))
    assert r.returncode != 0
    assert "already published with other contents" in r.stderr


def test_the_key_from_a_file_and_another_key_does_not_verify(tmp_path: Path, homes) -> None:
    good, other = homes("good"), homes("other")
    key_file = tmp_path / "secret.key"
    with key_file.open("wb") as f:
        subprocess.run(["gpg", "--batch", "--export-secret-keys"], check=True, stdout=f,
                       env={**os.environ, "GNUPGHOME": str(good)})
    deb = make_deb(tmp_path, "0.1.0")
    r = publish(tmp_path / "a", [deb], REPO_KEY=str(key_file),
                GNUPGHOME=str(tmp_path / "no-such-home"))
    assert r.returncode == 0, r.stderr
    verify(tmp_path / "a")
    r = publish(tmp_path / "b", [deb], GNUPGHOME=str(other))
    assert r.returncode == 0, r.stderr
    # b's InRelease does not verify with a's key.
    bad = subprocess.run(["gpgv", "--keyring", str(tmp_path / "a/atomnode-archive-keyring.gpg"),
                          str(tmp_path / "b/dists/bookworm/InRelease")], capture_output=True)
    assert bad.returncode != 0


def test_no_key_or_no_package_is_a_clear_error(tmp_path: Path) -> None:
    empty = tmp_path / "empty-home"
    empty.mkdir(mode=0o700)
    deb = make_deb(tmp_path, "0.1.0")
    r = publish(tmp_path / "repo", [deb], GNUPGHOME=str(empty))
    assert r.returncode != 0
    assert "no secret key to sign with" in r.stderr
    assert not (tmp_path / "repo/dists").exists()
    r = publish(tmp_path / "repo", [tmp_path / "missing.deb"], GNUPGHOME=str(empty))
    assert r.returncode != 0
