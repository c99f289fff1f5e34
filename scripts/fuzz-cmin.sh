#!/usr/bin/env bash
# make fuzz-cmin: shrinks each fuzz/corpus/<target>/ to the inputs that
# still add coverage (libFuzzer's merge), so the committed corpus and the
# replay in `make test` stay small after long `make fuzz` runs. Named
# inputs (seed-*, crash-*, ...) are kept whatever the merge says: tests
# refer to them by name.
#   FUZZ_TARGETS="vhd_open" make fuzz-cmin   some targets only
set -uo pipefail
cd "$(dirname "$0")/.."

targets=${FUZZ_TARGETS:-"wire_frames vm_state snapshot_load vhd_open qcow2_open virtio_blk_chain api_request destination_stream virtio_queue_restore"}
if ! rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
    echo "make fuzz-cmin: no nightly Rust toolchain (cargo-fuzz needs one)" >&2
    exit 1
fi
mkdir -p target/fuzz
for t in $targets; do
    dir=fuzz/corpus/$t
    keep=$(mktemp -d)
    for f in $(ls "$dir" | grep -v '^[0-9a-f]\{40\}$'); do cp "$dir/$f" "$keep/"; done
    before=$(ls "$dir" | wc -l)
    # Build, then merge by hand: libFuzzer keeps in $min only the inputs
    # that add coverage over what is already there.
    min=$(mktemp -d)
    bin=fuzz/target/x86_64-unknown-linux-gnu/release/$t
    if ! cargo +nightly fuzz build -O "$t" >"target/fuzz/$t.cmin.log" 2>&1 ||
        ! "$bin" -merge=1 -rss_limit_mb=2048 -max_len=1048576 -timeout=10 "$min" "$dir" \
            >>"target/fuzz/$t.cmin.log" 2>&1; then
        echo "make fuzz-cmin: $t failed; see target/fuzz/$t.cmin.log" >&2
        rm -rf "$keep" "$min"
        exit 1
    fi
    rm -f "$dir"/*
    cp "$min"/* "$dir/" 2>/dev/null
    cp "$keep"/* "$dir/" 2>/dev/null
    rm -rf "$keep" "$min"
    printf '%-22s %6s -> %6s inputs\n' "$t" "$before" "$(ls "$dir" | wc -l)"
done
