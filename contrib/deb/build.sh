#!/usr/bin/env bash
# Builds a Debian package of crier from this repository, with dpkg-deb and no cargo plug-in.
#
#   contrib/deb/build.sh [--binary PATH] [--out DIR] [--revision N]
#
# --binary PATH  package this crier binary (stripped here) instead of building one with
#                `cargo build --release --locked --bin crier`
# --out DIR      where the .deb goes (default: target/debian); its path is printed on stdout
# --revision N   the Debian revision (default: 1): crier_<Cargo version>-N_<arch>.deb
# --fast         gzip -1 instead of xz -6 (the same contents; ~1 s instead of ~45 s for a
#                debug binary; what the tests use)
#
# Needs dpkg-deb, dpkg-shlibdeps (dpkg-dev), strip (binutils), gzip, and cargo (the release
# build, and `cargo tree` for the licences of the crates linked in). The Maintainer field
# comes from DEBFULLNAME and DEBEMAIL when set. File dates come from SOURCE_DATE_EPOCH, else
# the last commit: the same inputs give the same .deb.
#
# Contents: /usr/bin/crier; the unit (systemd/crier.service, with /usr/bin/crier); the conffile
# /etc/crier/crier.toml (conf/crier.toml); /usr/lib/sysusers.d/crier.conf (the crier group);
# /usr/share/doc/crier (README, SECURITY, copyright, changelog, the Grafana dashboard and the
# Prometheus rules under examples/).
set -euo pipefail

root="$(cd "$(dirname "$0")/../.." && pwd)"
here="$root/contrib/deb"
binary=""
out="$root/target/debian"
revision=1
compress=(-Zxz)

die() { echo "contrib/deb/build.sh: $*" >&2; exit 1; }

while [ $# -gt 0 ]; do
  case "$1" in
    --binary) binary="${2:?--binary needs a path}"; shift 2 ;;
    --out) out="${2:?--out needs a directory}"; shift 2 ;;
    --revision) revision="${2:?--revision needs a number}"; shift 2 ;;
    --fast) compress=(-Zgzip -z1); shift ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    *) die "unknown argument: $1 (see --help)" ;;
  esac
done

for tool in dpkg-deb dpkg-shlibdeps strip gzip cargo; do
  command -v "$tool" >/dev/null 2>&1 || die "needs $tool (apt-get install dpkg-dev binutils; cargo from rustup)"
done

cd "$root"
version="$(awk -F'"' '/^\[/{p=($0=="[package]")} p && /^version *=/{print $2; exit}' Cargo.toml)"
[ -n "$version" ] || die "no version in Cargo.toml"
debversion="$version-$revision"
arch="$(dpkg --print-architecture)"
maintainer="${DEBFULLNAME:-crier developers} <${DEBEMAIL:-crier@packages.invalid}>"
if [ -z "${SOURCE_DATE_EPOCH:-}" ]; then
  SOURCE_DATE_EPOCH="$(git -C "$root" log -1 --format=%ct 2>/dev/null || date +%s)"
fi
export SOURCE_DATE_EPOCH
commit="$(git -C "$root" rev-parse --short=12 HEAD 2>/dev/null || echo unknown)"
first_year="$(git -C "$root" log --reverse --format=%cd --date=format:%Y 2>/dev/null | head -1 || true)"
last_year="$(date -u -d "@$SOURCE_DATE_EPOCH" +%Y)"
years="${first_year:-$last_year}"
[ "$years" = "$last_year" ] || years="$years-$last_year"

if [ -z "$binary" ]; then
  cargo build --release --locked --bin crier >&2
  binary="${CARGO_TARGET_DIR:-$root/target}/release/crier"
fi
[ -x "$binary" ] || die "$binary is not an executable"

# Debian's paths for this release (bookworm: /lib/systemd/system; later: /usr/lib/...).
unitdir="$(pkg-config --variable=systemdsystemunitdir systemd 2>/dev/null || true)"
unitdir="${unitdir:-/lib/systemd/system}"

umask 022
stage="$(mktemp -d)"
trap 'rm -rf "$stage"' EXIT
pkg="$stage/crier"
doc="$pkg/usr/share/doc/crier"
mkdir -p "$pkg/DEBIAN" "$pkg/usr/bin" "$pkg$unitdir" "$pkg/etc/crier" \
  "$pkg/usr/lib/sysusers.d" "$doc/examples" "$pkg/usr/share/man/man1" \
  "$pkg/usr/share/lintian/overrides"

# The binary, stripped as dh_strip strips an executable (the build id stays).
install -m 0755 "$binary" "$pkg/usr/bin/crier"
strip --remove-section=.comment --remove-section=.note "$pkg/usr/bin/crier"

# The unit, pointing at the packaged binary; its by-hand install notes replaced.
{
  echo "# crier as a systemd service, from the crier package. Change settings with a drop-in:"
  echo "# systemctl edit crier (see /usr/share/doc/crier/README.md, \"Install from the .deb\")."
  sed -n '/^\[Unit\]/,$p' systemd/crier.service |
    sed -e 's#/usr/local/bin/crier#/usr/bin/crier#g' \
      -e 's#^\[Unit\]$#[Unit]\nDocumentation=man:crier(1) file:/usr/share/doc/crier/README.md#'
} > "$pkg$unitdir/crier.service"
chmod 0644 "$pkg$unitdir/crier.service"
grep -q '/usr/local' "$pkg$unitdir/crier.service" && die "the unit still names /usr/local"

install -m 0644 conf/crier.toml "$pkg/etc/crier/crier.toml"
install -m 0644 systemd/crier.sysusers "$pkg/usr/lib/sysusers.d/crier.conf"

install -m 0644 README.md SECURITY.md "$doc/"
gzip -9n < "$here/crier.1" > "$pkg/usr/share/man/man1/crier.1.gz"
chmod 0644 "$pkg/usr/share/man/man1/crier.1.gz"
# Not a Debian upload: there is no ITP bug to close.
echo "crier: initial-upload-closes-no-bugs" > "$pkg/usr/share/lintian/overrides/crier"
chmod 0644 "$pkg/usr/share/lintian/overrides/crier"
install -m 0644 contrib/grafana/crier.json "$doc/examples/grafana-dashboard.json"
install -m 0644 contrib/prometheus/crier-alerts.yml "$doc/examples/prometheus-alerts.yml"
{
  cat <<EOF
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: crier
Comment: /usr/bin/crier links these Rust crates statically, each under the licence
 named after it (cargo tree, from Cargo.lock at build time). The Apache-2.0 text is in
 /usr/share/common-licenses; the MIT, ISC, BSD and Unicode notices come with each crate.
 .
EOF
  cargo tree --locked --offline -e normal --prefix none --format '{p} {l}' |
    grep -v -e '^crier v' -e '(proc-macro)' |
    sed -e 's/ (\*)$//' -e 's# ([^)]*/[^)]*)##' | LC_ALL=C sort -u | sed 's/^/ /'
  cat <<EOF

Files: *
Copyright: $years crier developers
License: Apache-2.0

License: Apache-2.0
 On Debian systems, the full text of the Apache License, Version 2.0 is in
 /usr/share/common-licenses/Apache-2.0.
EOF
} > "$doc/copyright"
chmod 0644 "$doc/copyright"
{
  echo "crier ($debversion) unstable; urgency=medium"
  echo
  echo "  * Built from the crier repository at $commit by contrib/deb/build.sh."
  echo
  echo " -- $maintainer  $(date -u -R -d "@$SOURCE_DATE_EPOCH")"
} | gzip -9n > "$doc/changelog.Debian.gz"
chmod 0644 "$doc/changelog.Debian.gz"

# Depends: the shared libraries the binary needs, from dpkg's own tables.
shlib="$stage/shlib"
mkdir -p "$shlib/debian"
printf 'Source: crier\n\nPackage: crier\nArchitecture: any\n' > "$shlib/debian/control"
depends="$(cd "$shlib" && dpkg-shlibdeps -O -e"$pkg/usr/bin/crier" 2>/dev/null | sed -n 's/^shlibs:Depends=//p')"
[ -n "$depends" ] || die "dpkg-shlibdeps found no dependencies for the binary"

installed_size="$(du -sk --apparent-size --exclude=DEBIAN "$pkg" | cut -f1)"
sed -e "s|@VERSION@|$debversion|" -e "s|@ARCH@|$arch|" -e "s|@MAINTAINER@|$maintainer|" \
  -e "s|@DEPENDS@|$depends|" -e "s|@SIZE@|$installed_size|" "$here/control" > "$pkg/DEBIAN/control"
echo /etc/crier/crier.toml > "$pkg/DEBIAN/conffiles"
for s in postinst prerm postrm; do
  install -m 0755 "$here/$s" "$pkg/DEBIAN/$s"
done
(cd "$pkg" && find . -type f ! -path './DEBIAN/*' -printf '%P\n' | LC_ALL=C sort | xargs md5sum) > "$pkg/DEBIAN/md5sums"
chmod 0644 "$pkg/DEBIAN/control" "$pkg/DEBIAN/conffiles" "$pkg/DEBIAN/md5sums"

find "$pkg" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
mkdir -p "$out"
deb="$(cd "$out" && pwd)/crier_${debversion}_${arch}.deb"
dpkg-deb --root-owner-group "${compress[@]}" --build "$pkg" "$deb" >&2
echo "$deb"
