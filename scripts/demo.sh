#!/usr/bin/env bash
# `make demo-migrate` (`make demo` is the cluster: scripts/demo-cluster.sh).
# Builds a lab (network namespaces: a fabric bridge, hosts a and b, a
# client), boots the test guest on host a with a working set being
# dirtied, pings it from the client every 10 ms, and live-migrates it
# a -> b, then b -> a, printing each move's figures with the pings lost
# and the largest reply gap. Everything is torn down after.
set -euo pipefail
cd "$(dirname "$0")/.."
ferry=$PWD/target/release/ferry
guest=$PWD/target/guest/ferry-guest.elf
lab=demo
ip=10.200.77.10
dir=$(mktemp -d /tmp/ferry-demo.XXXXXX)
key=$dir/cluster.key
pids=()

cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  "$ferry" lab down --name "$lab" >/dev/null 2>&1 || true
  rm -rf "$dir"
}
trap cleanup EXIT

say() { printf '\n== %s\n' "$*"; }
wait_for() { # wait_for FILE PATTERN [SECONDS]
  for _ in $(seq 1 $(( ${3:-20} * 20 ))); do grep -qs "$2" "$1" && return 0; sleep 0.05; done
  echo "demo: timed out waiting for '$2' in $1" >&2; cat "$1" >&2; exit 1
}
host_ip() { [ "$1" = a ] && echo 10.200.77.1 || echo 10.200.77.2; }

say "lab up: namespaces $lab-fabric, $lab-a, $lab-b, $lab-client on 10.200.77.0/24"
"$ferry" lab down --name "$lab" >/dev/null 2>&1 || true
"$ferry" lab up --name "$lab" >/dev/null
"$ferry" lab tap add a vm0 --name "$lab" >/dev/null
"$ferry" lab tap add b vm0 --name "$lab" >/dev/null
"$ferry" keygen --out "$key" 2>/dev/null

say "boot the test guest on host a: 1 GiB, 512 MiB working set dirtied at 50 MiB/s, ip $ip"
ip netns exec "$lab-a" "$ferry" run --kernel "$guest" --mem-mib 1024 \
  --cmdline "ip=$ip wss_mib=512 dirty_mib_s=50 heartbeat_ms=500" \
  --net tap=vm0,mac=52:54:00:c0:ff:ee --serial "file:$dir/a1.log" --api-sock "$dir/a1.sock" 2>"$dir/a1.err" &
pids+=($!)
wait_for "$dir/a1.log" "workload ready" 60
tr -d '\r' < "$dir/a1.log" | head -3

move() { # move FROM TO N: live-migrate the VM at $sock from host FROM to host TO
  local from=$1 to=$2 n=$3 port=$((7600 + $3))
  ip netns exec "$lab-$to" "$ferry" receive --listen "tcp:$(host_ip "$to"):$port" --key-file "$key" --net tap=vm0 \
    --serial "file:$dir/$to$n.log" --api-sock "$dir/$to$n.sock" 2>"$dir/$to$n.err" &
  pids+=($!)
  wait_for "$dir/$to$n.err" "waiting for a migration"
  "$ferry" ping --netns "$lab-client" --target "$ip" --interval-ms 10 --duration-ms 4000 > "$dir/ping$n.json" &
  local pinger=$!
  sleep 0.5
  ip netns exec "$lab-$from" "$ferry" migrate --mode live --json --key-file "$key" \
    --to "tcp:$(host_ip "$to"):$port" --api-sock "$sock" > "$dir/mig$n.json"
  wait "$pinger"
  sock=$dir/$to$n.sock
  wait_for "$dir/$to$n.log" "heartbeat"
  python3 - "$dir/mig$n.json" "$dir/ping$n.json" "$from" "$to" <<'PY'
import json, sys
f = json.load(open(sys.argv[1])); p = json.load(open(sys.argv[2]))
f.update(pings_sent=p["pings_sent"], pings_lost=p["pings_lost"], max_gap_ms=p["max_gap_ms"])
keys = ["mode", "mem_mib", "total_ms", "downtime_ms", "rounds", "bytes_sent", "pages_zero", "pages_sent",
        "pings_sent", "pings_lost", "max_gap_ms", "round0_mib_s", "throttle_pct"]
print(f"live migration {sys.argv[3]} -> {sys.argv[4]}:")
print(json.dumps({k: f[k] for k in keys}, indent=2))
PY
}

sock=$dir/a1.sock
say "live-migrate a -> b while the client pings every 10 ms"
move a b 1
say "live-migrate b -> a"
move b a 2

say "the guest checks every page of its working set after two moves"
"$ferry" console --api-sock "$sock" verify
wait_for "$dir/a2.log" "verify .*checksum=\|verify FAILED" 60
sleep 0.7 # let the lines in flight finish
grep "verify " "$dir/a2.log" | tr -d '\r'
grep "heartbeat" "$dir/a2.log" | tail -1 | tr -d '\r'
"$ferry" shutdown --api-sock "$sock"
say "lab down"
