#!/usr/bin/env bash
# Reads `strace -ff -o DIR/t` output (one file per thread, t.TID) under
# each directory of RUNS and prints the syscalls per thread kind. See
# scripts/seccomp-trace.sh.
set -euo pipefail
runs=${1:?usage: seccomp-lists.sh RUNS_DIR}
for dir in "$runs"/*/; do
    # Per run, two passes: which threads name themselves (and their
    # parents), then each thread's syscalls: a named thread's from its
    # naming on (those before count for its parent), an unnamed one's all
    # (it runs under its parent's filter: counted for the nearest named
    # ancestor).
    files=("$dir"t.*)
    awk '
        FNR == 1 { tid = FILENAME; sub(/.*\./, "", tid); on = (pass == 2 && !(tid in name)) }
        pass == 1 && /^prctl\(PR_SET_NAME, "/ && !(tid in name) {
            n = $0; sub(/.*PR_SET_NAME, "/, "", n); sub(/".*/, "", n); name[tid] = n
        }
        pass == 1 && /^(clone3|clone|vfork|fork)\(/ { c = $0; sub(/.*= /, "", c); if (c ~ /^[0-9]+$/) parent[c] = tid }
        pass == 2 {
            s = $0; if (s ~ /^(<\.\.\.|---|\+\+\+)/) next
            sub(/\(.*/, "", s); if (s !~ /^[a-z_0-9]+$/) next
            # Until a thread names itself (the naming included) it runs
            # under the filter of the thread that started it.
            if (on) calls[tid, s] = 1; else if (tid in parent) calls[parent[tid], s] = 1
            if (!on && $0 ~ /^prctl\(PR_SET_NAME, "/) on = 1
        }
        END {
            for (k in calls) {
                split(k, p, SUBSEP); t = p[1]
                u = t; while (!(u in name) && (u in parent)) u = parent[u]
                n = (u in name) ? name[u] : "main"
                print n "\t" p[2]
            }
        }' pass=1 "${files[@]}" pass=2 "${files[@]}"
done | awk -F'\t' '
    { k = $1; sub(/^vcpu[0-9]+$/, "vcpu", k); sub(/^api-conn$/, "api", k); sub(/^migration-in$/, "migration", k); print k "\t" $2 }
' | sort -u | awk -F'\t' '
    $1 != last { if (last != "") printf "\n"; printf "%s:", $1; last = $1 }
    { printf " %s", $2 }
    END { printf "\n" }'
