#!/usr/bin/env bash
# Installs the Debian packages Ferry's tests and demo need, if missing.
set -euo pipefail
pkgs=()
command -v lz4 >/dev/null || pkgs+=(lz4)
command -v ip >/dev/null || pkgs+=(iproute2)
command -v setpriv >/dev/null || pkgs+=(util-linux)
command -v dpkg-deb >/dev/null || pkgs+=(dpkg)
command -v qemu-img >/dev/null || pkgs+=(qemu-utils)
command -v iasl >/dev/null || pkgs+=(acpica-tools)
[ ${#pkgs[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
  echo "install-deps: missing ${pkgs[*]}; run as root or: sudo apt-get install ${pkgs[*]}" >&2
  exit 1
fi
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${pkgs[@]}"
