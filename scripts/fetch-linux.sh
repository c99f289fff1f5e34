#!/usr/bin/env bash
# Fetches Debian's cloud kernel (nothing is built) and extracts the vmlinux
# inside its bzImage, for the Linux smoke test.
#
#   scripts/fetch-linux.sh OUTDIR
#
# Leaves OUTDIR/bzImage, OUTDIR/vmlinux, OUTDIR/busybox (static) and
# OUTDIR/modules/*.ko (the virtio-mmio network driver and what it needs: the
# cloud kernel builds them as modules; a VMX/SVM host's initramfs loads
# them). The bzImage payload is found
# through the setup header (setup_sects at 0x1f1, payload_offset at 0x248,
# payload_length at 0x24c) and is LZ4 in the legacy frame format.
set -euo pipefail
out=${1:?usage: fetch-linux.sh OUTDIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
# Modules in load order (each needs only those before it).
modules="virtio_ring virtio virtio_mmio failover net_failover virtio_net"
[ -s "$out/vmlinux" ] && [ -s "$out/bzImage" ] && [ -s "$out/busybox" ] && [ -s "$out/modules/virtio_net.ko" ] && exit 0

need() { command -v "$1" >/dev/null || { echo "fetch-linux: '$1' is missing (apt-get install $2)" >&2; exit 1; }; }
need apt-get apt
need dpkg-deb dpkg
need lz4 lz4

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
if ! apt-get download linux-image-cloud-amd64 >/dev/null 2>&1; then
  apt-get update -qq
  apt-get download linux-image-cloud-amd64 >/dev/null 2>&1
fi
pkg=$(dpkg-deb -f linux-image-cloud-amd64_*.deb Depends | tr ',' '\n' | grep -o 'linux-image-[^ ]*-cloud-amd64' | head -1)
[ -n "$pkg" ] || { echo "fetch-linux: cannot tell which kernel linux-image-cloud-amd64 depends on" >&2; exit 1; }
apt-get download "$pkg" >/dev/null 2>&1
dpkg-deb -x "$pkg"_*.deb root
bz=$(ls root/boot/vmlinuz-* | head -1)

u8()  { od -An -tu1 -j "$2" -N1 "$1" | tr -d ' '; }
u32() { od -An -tu4 -j "$2" -N4 "$1" | tr -d ' '; }
setup_sects=$(u8 "$bz" $((0x1f1)))
[ "$setup_sects" -eq 0 ] && setup_sects=4
payload_offset=$(u32 "$bz" $((0x248)))
payload_length=$(u32 "$bz" $((0x24c)))
start=$(( (setup_sects + 1) * 512 + payload_offset ))
magic=$(od -An -tx1 -j "$start" -N4 "$bz" | tr -d ' ')
[ "$magic" = "02214c18" ] || { echo "fetch-linux: payload is not legacy LZ4 (magic $magic)" >&2; exit 1; }
dd if="$bz" of=payload.lz4 iflag=skip_bytes,count_bytes skip="$start" count="$payload_length" status=none
# The kernel appends the decompressed size after the frames; lz4 reads the
# legacy frames and stops there.
lz4 -dc payload.lz4 > vmlinux 2>/dev/null || [ -s vmlinux ]
head -c 4 vmlinux | od -An -c | grep -q 'E   L   F' || { echo "fetch-linux: decompressed payload is not an ELF" >&2; exit 1; }
# busybox for the initramfs that hosts with VMX/SVM boot to a shell.
apt-get download busybox-static >/dev/null 2>&1
dpkg-deb -x busybox-static_*.deb bb
cp bb/bin/busybox "$out/busybox"
mkdir -p "$out/modules"
for m in $modules; do
  ko=$(find root/lib/modules -name "$m.ko" | head -1)
  [ -n "$ko" ] || { echo "fetch-linux: module $m.ko not in $pkg" >&2; exit 1; }
  cp "$ko" "$out/modules/"
done
cp "$bz" "$out/bzImage"
mv vmlinux "$out/vmlinux"
echo "fetch-linux: $pkg -> $out/vmlinux ($(stat -c %s "$out/vmlinux") bytes)"
