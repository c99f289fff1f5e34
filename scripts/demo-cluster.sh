#!/usr/bin/env bash
# `make demo`: the cluster. A 3-node lab cluster (network namespaces a, b
# and c, an etcd member and a `ferry node run` agent in each), three highly
# available VMs with disks on a shared volume, all on node a and pinged from
# the client every 10 ms. Node a is paused and drained (live migrations, 2
# at a time), then resumed with failback: every VM comes home. Each step's
# figures are printed: downtime per move, pings lost, drain time. Everything
# is torn down after (agents and VMMs by PID, then `ferry lab down`).
set -euo pipefail
cd "$(dirname "$0")/.."
ferry=$PWD/target/release/ferry
guest=$PWD/target/guest/ferry-guest.elf
lab=demo
cluster=demo
nodes=(a b c)
vms=(web0 web1 web2)
dir=$(mktemp -d /tmp/ferry-cluster-demo.XXXXXX)
key=$dir/cluster.key
vol=$dir/vol
agent_pids=()
ping_pids=()

for f in "$ferry" "$guest"; do
  [ -x "$f" ] || [ -f "$f" ] || { echo "demo: $f is missing: run \`make build guest\`" >&2; exit 1; }
done
[ -x /usr/bin/etcd ] || { echo "demo: etcd is missing: run \`make deps\`" >&2; exit 1; }
command -v python3 >/dev/null || { echo "demo: python3 is missing: run \`make deps\`" >&2; exit 1; }

cleanup() {
  local rc=$?
  set +e
  for p in "${ping_pids[@]}"; do kill "$p" 2>/dev/null; done
  for p in "${agent_pids[@]}"; do kill "$p" 2>/dev/null; done
  # The agents start each VMM in its own session; what is left of them is
  # found by its pid file and killed only if it is still that VMM.
  for f in "$dir"/nodes/*/vms/*/vmm.pid; do
    [ -f "$f" ] || continue
    p=$(cat "$f")
    if [ -r "/proc/$p/cmdline" ] && tr '\0' ' ' < "/proc/$p/cmdline" | grep -q -- "$dir/nodes/"; then
      kill -9 "$p" 2>/dev/null
    fi
  done
  wait 2>/dev/null
  "$ferry" lab down --name "$lab" >/dev/null 2>&1
  if [ "$rc" -ne 0 ]; then
    echo "demo: failed (exit $rc); agent logs:" >&2
    for n in "${nodes[@]}"; do [ -f "$dir/agent-$n.log" ] && tail -5 "$dir/agent-$n.log" >&2; done
  fi
  rm -rf "$dir"
}
trap cleanup EXIT

say() { printf '\n== %s\n' "$*"; }
host_ip() { case $1 in a) echo 10.200.77.1 ;; b) echo 10.200.77.2 ;; c) echo 10.200.77.3 ;; esac; }
vm_ip() { echo "10.200.77.$((20 + $1))"; }
# The cluster's commands, from the client namespace (etcd answers on the
# lab's addresses only).
fc() { ip netns exec "$lab-client" "$ferry" "$@" --etcd "$eps" --cluster "$cluster"; }
console() { echo "$dir/nodes/$1/vms/$2/serial.log"; }
wait_for() { # wait_for FILE PATTERN [SECONDS]
  for _ in $(seq 1 $(( ${3:-30} * 20 ))); do grep -qs "$2" "$1" && return 0; sleep 0.05; done
  echo "demo: timed out waiting for '$2' in $1" >&2; tail -5 "$1" >&2 || true; exit 1
}
guest_cmd() { # guest_cmd NODE VM CMD PREFIX: a console command and its answer line
  local log before text line
  log=$(console "$1" "$2")
  before=$(wc -l < "$log")
  "$ferry" console --api-sock "$dir/nodes/$1/vms/$2/api.sock" "$3"
  for _ in $(seq 1 600); do
    # Complete lines only: the guest may be printing the last one.
    text=$(tail -n +$((before + 1)) "$log"; echo x)
    text=${text%x}
    if [[ $text != *$'\n'* ]]; then text=""; elif [[ $text != *$'\n' ]]; then text=${text%$'\n'*}; fi
    line=$(printf '%s' "$text" | tr -d '\r' | grep -m1 "^$4" || true)
    [ -n "$line" ] && { echo "$line"; return 0; }
    sleep 0.05
  done
  echo "demo: no '$4' answer from $2 on $1" >&2; exit 1
}
# ping_all TAG MS: a background `ferry ping` (every 10 ms) per VM.
ping_all() {
  ping_pids=()
  for i in "${!vms[@]}"; do
    "$ferry" ping --netns "$lab-client" --target "$(vm_ip "$i")" --interval-ms 10 --duration-ms "$2" \
      > "$dir/ping-$1-${vms[$i]}.json" &
    ping_pids+=($!)
  done
}
wait_pings() { for p in "${ping_pids[@]}"; do wait "$p"; done; ping_pids=(); }
# figures TAG TITLE: the moves of a drain or failback summary with each
# VM's pings, as a table.
figures() {
  python3 - "$dir/$1.json" "$dir" "$1" "$2" "$3" <<'PY'
import json, sys
summary = json.load(open(sys.argv[1])); d, tag, title, window = sys.argv[2], sys.argv[3], sys.argv[4], float(sys.argv[5])
print(f"{title}: {summary['moved']} VM(s) moved, {summary['failed']} failed, in {summary['total_ms'] / 1000:.1f} s")
print(f"  {'VM':<6} {'move':<6} {'downtime_ms':>11} {'total_ms':>8} {'rounds':>6} {'MiB_sent':>8}"
      f" {'pings_lost/sent':>15} {'max_gap_ms':>10}")
lost = sent = 0
for m in sorted(summary["moves"], key=lambda m: m["vm"]):
    f = m["figures"] or {}
    p = json.load(open(f"{d}/ping-{tag}-{m['vm']}.json"))
    lost += p["pings_lost"]; sent += p["pings_sent"]
    status = "" if m["ok"] else "  FAILED: " + (m["error"] or "?")
    print(f"  {m['vm']:<6} {m['from'] + '->' + m['to']:<6} {f.get('downtime_ms', 0):>11.1f} {f.get('total_ms', 0):>8.0f}"
          f" {f.get('rounds', 0):>6} {f.get('bytes_sent', 0) / 1048576:>8.1f}"
          f" {str(p['pings_lost']) + ' / ' + str(p['pings_sent']):>15} {p['max_gap_ms']:>10.1f}{status}")
print(f"  pings lost in all: {lost} of {sent} (every VM pinged every 10 ms throughout)")
if summary["total_ms"] + 500 > window:
    print(f"  (the pingers ran {window / 1000:.0f} s: they stopped before the moves ended)")
PY
}

say "lab up: hosts $lab-a, $lab-b, $lab-c (bridge br0, one etcd member each) and $lab-client"
"$ferry" lab down --name "$lab" >/dev/null 2>&1 || true
"$ferry" lab up --name "$lab" --hosts a,b,c --etcd >/dev/null
eps=$("$ferry" lab etcd endpoints --name "$lab")
echo "etcd: $eps"
"$ferry" keygen --out "$key" 2>/dev/null
"$ferry" volume create "$vol" >/dev/null
for i in "${!vms[@]}"; do
  "$ferry" disk create --volume "$vol" --format raw --size 16M "d$i" >/dev/null
done
echo "shared volume $vol with disks d0-d$(( ${#vms[@]} - 1 )); migration key $key"

say "form the cluster: ferry cluster create validates the nodes and the volume first"
fc cluster create --name "$cluster" --nodes a,b,c --volume "$vol" --lab "$lab"

say "a node agent on each host: ferry node run --node-id N --address 10.200.77.N --key-file ..."
for n in "${nodes[@]}"; do
  ip netns exec "$lab-$n" "$ferry" node run --etcd "$eps" --cluster "$cluster" --node-id "$n" \
    --vm-bridge br0 --address "$(host_ip "$n")" --key-file "$key" --state-dir "$dir/nodes/$n" \
    </dev/null >/dev/null 2>"$dir/agent-$n.log" &
  agent_pids+=($!)
done
for _ in $(seq 1 100); do
  up=$(fc cluster status --json 2>/dev/null | python3 -c \
    'import json,sys; print(sum(n["state"] == "Up" for n in json.load(sys.stdin)["nodes"]))' 2>/dev/null || echo 0)
  [ "$up" = 3 ] && break
  sleep 0.2
done
[ "$up" = 3 ] || { echo "demo: the agents did not come up" >&2; exit 1; }

say "three highly available VMs: 256 MiB, 128 MiB working set dirtied at 50 MiB/s, a disk on the volume"
for i in "${!vms[@]}"; do
  second=$([ $((i % 2)) = 0 ] && echo b || echo c)
  fc vm create "${vms[$i]}" --kernel "$guest" --mem-mib 256 \
    --cmdline "wss_mib=128 dirty_mib_s=50 heartbeat_ms=500 ip=$(vm_ip "$i")" \
    --disk "csv:$vol/disks/d$i" --net "mac=52:54:00:de:00:0$i" --preferred-owners "a,$second" >/dev/null
  fc vm start "${vms[$i]}" --on a --wait
done
for i in "${!vms[@]}"; do
  wait_for "$(console a "${vms[$i]}")" "^heartbeat" 60
  guest_cmd a "${vms[$i]}" "disk-write 0 64 $((i + 1))" disk-write >/dev/null
done
echo "each guest wrote a pattern on its disk"
fc cluster status

say "pause and drain node a while the client pings every VM every 10 ms"
window=10000
ping_all drain "$window"
sleep 0.5
fc node pause a --drain --json > "$dir/drain.json" || echo "demo: not every VM left node a" >&2
wait_pings
fc cluster status
echo
figures drain "drain of node a" "$window"

say "resume node a with failback: every VM the drain moved comes home"
ping_all failback "$window"
sleep 0.5
fc node resume a --failback immediate --json > "$dir/failback.json" || echo "demo: not every VM came back" >&2
wait_pings
echo
figures failback "failback to node a" "$window"

say "failover: every process of node a (its agent, its VMMs, its etcd member) is killed -9"
owner_of() { fc vm show "$1" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["owner"]["node"])'; }
crash_ms=$(date +%s%3N)
kill -9 "${agent_pids[0]}" 2>/dev/null || true
for f in "$dir"/nodes/a/vms/*/vmm.pid; do kill -9 "$(cat "$f")" 2>/dev/null || true; done
"$ferry" lab etcd kill a --name "$lab" >/dev/null
for i in "${!vms[@]}"; do
  ip netns exec "$lab-client" true
  "$ferry" ping --netns "$lab-client" --target "$(vm_ip "$i")" --count 1 --wait-reply-ms 60000 >/dev/null
  back_ms=$(( $(date +%s%3N) - crash_ms ))
  echo "${vms[$i]}: answers again from node $(owner_of "${vms[$i]}") ${back_ms} ms after the crash"
done
echo "(ferry cluster events: the leader's detection, fence wait and restart)"
fc cluster events | tail -8

say "every guest checks its disk after two moves and a cold restart"
for i in "${!vms[@]}"; do
  n=$(owner_of "${vms[$i]}")
  d=$(guest_cmd "$n" "${vms[$i]}" "disk-verify 0 64 $((i + 1))" disk-verify)
  echo "${vms[$i]} on $n: ${d%% start=*} (written before two moves and a crash)"
done
echo "(every move is also in the VM's history in etcd: ferry vm history NAME)"

say "stop the VMs; lab down"
for v in "${vms[@]}"; do fc vm stop "$v" --wait; done
