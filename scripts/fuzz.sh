#!/usr/bin/env bash
# make fuzz: runs every cargo-fuzz target for FUZZ_SECONDS (default 60)
# seconds on its corpus in fuzz/corpus/<target>/, which the run grows.
# Crashes land in fuzz/artifacts/<target>/; copy each into the corpus (and
# fix it): `make test` replays the corpus on stable.
#   FUZZ_SECONDS=600 make fuzz          longer
#   FUZZ_TARGETS="vhd_open" make fuzz   some targets only
#   FUZZ_JOBS=2 make fuzz               parallel workers per target
set -uo pipefail
cd "$(dirname "$0")/.."

seconds=${FUZZ_SECONDS:-60}
jobs=${FUZZ_JOBS:-1}
targets=${FUZZ_TARGETS:-"wire_frames vm_state snapshot_load vhd_open qcow2_open virtio_blk_chain api_request destination_stream virtio_queue_restore"}

if ! rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
    echo "make fuzz: no nightly Rust toolchain (cargo-fuzz needs one); install it with" >&2
    echo "    rustup toolchain install nightly" >&2
    exit 1
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    echo "make fuzz: installing cargo-fuzz" >&2
    cargo install cargo-fuzz || { echo "make fuzz: cannot install cargo-fuzz" >&2; exit 1; }
fi

mkdir -p target/fuzz
summary=target/fuzz/summary.txt
: > "$summary"
failed=0
for t in $targets; do
    log=target/fuzz/$t.log
    mkdir -p "fuzz/corpus/$t"
    echo "== $t: ${seconds}s"
    # -rss_limit_mb: a target that allocates without bound is a crash too.
    # -timeout: an input that takes 10 s is a hang.
    parallel=()
    [ "$jobs" -gt 1 ] && parallel=(-jobs="$jobs" -workers="$jobs")
    if cargo +nightly fuzz run -O "$t" -- \
        -max_total_time="$seconds" -rss_limit_mb=2048 -max_len=1048576 -timeout=10 \
        "${parallel[@]}" -print_final_stats=1 >"$log" 2>&1; then
        status=ok
    else
        status=CRASH
        failed=1
    fi
    execs=$(grep -h 'stat::number_of_executed_units' "$log" fuzz-*.log 2>/dev/null | awk '{s += $2} END {print s + 0}')
    crashes=$(ls "fuzz/artifacts/$t" 2>/dev/null | grep -c '^\(crash\|oom\|leak\|timeout\)-' || true)
    printf '%-18s %-6s executions %-12s crash/oom/timeout artifacts %s\n' "$t" "$status" "$execs" "$crashes" | tee -a "$summary"
    rm -f fuzz-*.log
done
echo "summary in $summary; logs in target/fuzz/"
if [ "$failed" = 1 ]; then
    echo "make fuzz: a target crashed; its input is in fuzz/artifacts/<target>/" >&2
    exit 1
fi
