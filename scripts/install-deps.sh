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
# The cluster: etcd members in the lab hosts, and protoc for etcd-client's build.
[ -x /usr/bin/etcd ] || pkgs+=(etcd-server)
command -v protoc >/dev/null || pkgs+=(protobuf-compiler)
# nftables: the fault tests drop packets inside the lab namespaces.
command -v nft >/dev/null || pkgs+=(nftables)
# python3: the demos print their figures with it.
command -v python3 >/dev/null || pkgs+=(python3)
[ ${#pkgs[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
  echo "install-deps: missing ${pkgs[*]}; run as root or: sudo apt-get install ${pkgs[*]}" >&2
  exit 1
fi
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${pkgs[@]}"
# Debian's etcd-server enables a single-member etcd on localhost. Ferry runs
# its own members inside the lab's namespaces (or joins a cluster given by
# --etcd); the packaged service is not used, so it is stopped if we just
# installed it and systemd runs it.
if [[ " ${pkgs[*]} " == *" etcd-server "* ]] && [ -d /run/systemd/system ] && command -v systemctl >/dev/null; then
  systemctl disable --now etcd.service >/dev/null 2>&1 || true
fi
