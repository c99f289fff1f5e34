#!/usr/bin/env bash
# Regenerates the syscall lists behind vmm/src/seccomp.rs: runs the test
# suite with every VMM-running `ferry` under `strace -ff`, seccomp off,
# then prints, per thread kind, every syscall its threads made after they
# were named (what a filter installed at thread start has to allow).
#
#   scripts/seccomp-trace.sh [cargo test args...]    (default: the e2e tests)
#
# Threads are told apart by the name each sets (prctl PR_SET_NAME):
# vcpuN, devices, api/api-conn, migration-in, lease-keeper; an unnamed
# thread counts as its parent's kind (it inherits the parent's filter).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
out=${SECCOMP_TRACE_DIR:-$root/target/seccomp-trace}
rm -rf "$out" && mkdir -p "$out/runs"
wrapper=$out/ferry-traced
cat >"$wrapper" <<WRAP
#!/usr/bin/env bash
# Every VMM (and the node agent's, which it starts): traced, unconfined.
case "\${1:-}" in
run|receive|restore|node)
    dir=\$(mktemp -d "$out/runs/XXXXXX")
    FERRY_SECCOMP=off exec strace -qq -ff -o "\$dir/t" -- "$root/target/release/ferry" "\$@" ;;
*)  exec "$root/target/release/ferry" "\$@" ;;
esac
WRAP
chmod +x "$wrapper"
if [ $# -eq 0 ]; then set -- -p ferry-e2e; fi
FERRY_BIN=$wrapper FERRY_GUEST=$root/target/guest/ferry-guest.elf FERRY_LINUX_DIR=$root/target/linux \
    cargo test --release --no-fail-fast "$@" >"$out/test.log" 2>&1 || echo "(some tests failed under strace: timing; the lists are still usable)"
scripts/seccomp-lists.sh "$out/runs"
