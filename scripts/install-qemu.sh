#!/usr/bin/env bash
# Provides QEMU 7.2 from Debian (qemu-system-x86) for `make bench-qemu` and
# prints the qemu-system-x86_64 to run, without losing the qemu-img the
# tests use.
#
# Debian's qemu-system-common 7.2 cannot be installed beside the newer
# qemu-utils (10.0 from backports here): qemu-utils 10 Breaks
# qemu-system-common << 8.0, so `apt-get install qemu-system-x86` would
# remove it. So, in order:
#  1. a qemu-system-x86_64 7.2 already on PATH, or already unpacked in
#     $QEMU_PREFIX (default target/qemu-7.2), is used as it is;
#  2. if `apt-get -s` shows that installing qemu-system-x86 removes nothing,
#     it is installed the ordinary way (--no-install-recommends);
#  3. otherwise its shared libraries are installed with apt (after checking
#     with `apt-get -s` that this removes nothing either) and the QEMU
#     packages themselves (qemu-system-x86, -common, -data, seabios) are
#     fetched with `apt-get download` and unpacked with `dpkg-deb -x` into
#     $QEMU_PREFIX, outside dpkg's database: the system's qemu-utils stays.
# The last line of stdout is the path of qemu-system-x86_64; with option 3
# the bench passes `-L $QEMU_PREFIX/usr/share/qemu` and sets QEMU_MODULE_DIR.
set -euo pipefail
prefix=${QEMU_PREFIX:-target/qemu-7.2}
want=7.2
pkg=qemu-system-x86

is_72() { "$1" --version 2>/dev/null | head -1 | grep -q "version $want\."; }

if command -v qemu-system-x86_64 >/dev/null && is_72 "$(command -v qemu-system-x86_64)"; then
  command -v qemu-system-x86_64
  exit 0
fi
if [ -x "$prefix/usr/bin/qemu-system-x86_64" ] && is_72 "$prefix/usr/bin/qemu-system-x86_64"; then
  echo "$prefix/usr/bin/qemu-system-x86_64"
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "install-qemu: QEMU $want missing; run as root" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
version=$(apt-cache policy "$pkg" | awk '/Candidate:/ {print $2}')
if [[ "$version" != *:$want+* ]]; then
  apt-get update -qq
  version=$(apt-cache policy "$pkg" | awk '/Candidate:/ {print $2}')
fi
if [[ "$version" != *:$want+* ]]; then
  echo "install-qemu: apt offers $pkg '$version', not $want (Debian 12's)" >&2
  exit 1
fi

# Would a plain install remove anything?
if ! apt-get -s install -y --no-install-recommends "$pkg=$version" | grep -q '^Remv '; then
  echo "install-qemu: apt-get install $pkg=$version" >&2
  apt-get install -y -qq --no-install-recommends "$pkg=$version" >&2
  command -v qemu-system-x86_64
  exit 0
fi
echo "install-qemu: installing $pkg would remove: $(apt-get -s install -y --no-install-recommends "$pkg=$version" |
  awk '/^Remv / {print $2}' | tr '\n' ' '); unpacking it into $prefix instead" >&2

# The binary's shared libraries (its Depends that are not QEMU's own packages).
libs=$(apt-cache show "$pkg=$version" | awk -F': ' '/^Depends:/ {print $2; exit}' | tr ',' '\n' |
  sed -E 's/\(.*\)//; s/\|.*//; s/ //g' | grep -vE '^(qemu-|seabios|ipxe-qemu)' | grep . || true)
# Only the missing ones, and --no-upgrade: naming an installed library to
# apt-get install would upgrade it (and whatever depends on it).
libs=$(for l in $libs; do
  dpkg-query -W -f='${Status}\n' "$l" 2>/dev/null | grep -q '^install ok installed' || echo "$l"
done)
if [ -n "$libs" ]; then
  # shellcheck disable=SC2086
  if apt-get -s install -y --no-install-recommends --no-upgrade $libs | grep -q '^Remv '; then
    echo "install-qemu: installing QEMU's libraries would remove packages; not done:" >&2
    # shellcheck disable=SC2086
    apt-get -s install -y --no-install-recommends --no-upgrade $libs | grep '^Remv ' >&2
    exit 1
  fi
  # shellcheck disable=SC2086
  apt-get install -y -qq --no-install-recommends --no-upgrade $libs >&2
fi

debs=$(mktemp -d)
trap 'rm -rf "$debs"' EXIT
# apt fetches as user _apt where it can write.
chown _apt "$debs" 2>/dev/null || chmod 777 "$debs"
data_version=$(apt-cache policy qemu-system-data | awk '/Candidate:/ {print $2}')
(cd "$debs" && apt-get download -qq "$pkg=$version" "qemu-system-common=$version" \
  "qemu-system-data=$data_version" seabios >&2)
rm -rf "$prefix.tmp"
mkdir -p "$prefix.tmp"
for d in "$debs"/*.deb; do dpkg-deb -x "$d" "$prefix.tmp"; done
rm -rf "$prefix"
mv "$prefix.tmp" "$prefix"
missing=$(ldd "$prefix/usr/bin/qemu-system-x86_64" | grep 'not found' || true)
if [ -n "$missing" ]; then
  echo "install-qemu: libraries missing for $prefix/usr/bin/qemu-system-x86_64:" >&2
  echo "$missing" >&2
  exit 1
fi
is_72 "$prefix/usr/bin/qemu-system-x86_64" || {
  echo "install-qemu: $prefix/usr/bin/qemu-system-x86_64 does not run" >&2
  exit 1
}
echo "$prefix/usr/bin/qemu-system-x86_64"
