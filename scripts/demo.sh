#!/usr/bin/env bash
# `make demo`: boot the bundled test guest, show its heartbeat, pause it,
# resume it (the guest reports how long it was stopped), verify its memory,
# and shut it down.
set -euo pipefail
cd "$(dirname "$0")/.."
ferry=target/release/ferry
guest=target/guest/ferry-guest.elf
dir=$(mktemp -d /tmp/ferry-demo.XXXXXX)
sock=$dir/api.sock
log=$dir/console.log
pid=
cleanup() { [ -n "$pid" ] && kill "$pid" 2>/dev/null; wait 2>/dev/null; rm -rf "$dir"; }
trap cleanup EXIT

say() { printf '\n== %s\n' "$*"; }
wait_for() { # wait_for PATTERN [SECONDS]
  for _ in $(seq 1 $(( ${2:-10} * 20 ))); do grep -qs "$1" "$log" && return 0; sleep 0.05; done
  echo "demo: timed out waiting for '$1'" >&2; cat "$log" >&2; exit 1
}

say "boot the test guest: 256 MiB, 2 vCPUs, 64 MiB working set dirtied at 32 MiB/s"
"$ferry" run --kernel "$guest" --mem-mib 256 --vcpus 2 \
  --cmdline "wss_mib=64 dirty_mib_s=32 heartbeat_ms=500" \
  --serial "file:$log" --api-sock "$sock" &
pid=$!
wait_for "booted"
wait_for "heartbeat 3"
tr -d '\r' < "$log"

say "pause for 1.5 s"
"$ferry" pause --api-sock "$sock"
"$ferry" info --api-sock "$sock" | grep '"state"'
sleep 1.5
lines=$(wc -l < "$log")
say "resume: the next heartbeat reports the stop the guest measured itself (max_stall_us)"
"$ferry" resume --api-sock "$sock"
sleep 1.2
tail -n +"$((lines + 1))" "$log" | tr -d '\r'

say "verify every page of the working set"
"$ferry" console --api-sock "$sock" verify
wait_for "verify "
grep "verify " "$log" | tr -d '\r'

say "shut down"
"$ferry" shutdown --api-sock "$sock"
wait "$pid" && pid=
echo "done"
