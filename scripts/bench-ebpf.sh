#!/usr/bin/env bash
# bench-ebpf.sh: issue 11 "Numbers" — the ambient `ebpf` redirect mode against the `iptables`
# mode (and no redirection) in the same run, through the same ztunnel stand-in
# (crates/agent/examples/ebpf_bench.rs). Prints Markdown tables. Root; every namespace is the
# bench's own (mcni-*; the enroll lab's pod netns are held by file descriptors, not mounted),
# pins on a private bpffs.
#
#   scripts/bench-ebpf.sh [--no-build]                      conn (500 × 3 rounds, 256 MiB bulk)
#                                                           + enroll 200 pods (3 rounds)
#   scripts/bench-ebpf.sh [--no-build] conn [--n N] [--rounds R] [--bulk-mib M]
#   scripts/bench-ebpf.sh [--no-build] enroll [--pods N] [--rounds R] [--attach tcx|clsact]
set -euo pipefail
cd "$(dirname "$(readlink -f "$0")")/.."
if [ "${1:-}" = --no-build ]; then shift; else
    cargo build -q --release -p meshcni-agent --example ebpf_bench
fi
echo "Machine: $(nproc) vCPU $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//'), $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), Linux $(uname -r), load average $(cut -d' ' -f1-3 /proc/loadavg); commit $(git rev-parse --short HEAD)$(git diff --quiet || echo ' (+ working tree)'), $(date -u +%F)."
echo
BIN=target/release/examples/ebpf_bench
if [ $# -gt 0 ]; then exec "$BIN" "$@"; fi
for cmd in "conn --n 500 --rounds 3 --bulk-mib 256" "enroll --pods 200 --rounds 3"; do
    echo "### ebpf_bench $cmd"
    echo
    # shellcheck disable=SC2086
    "$BIN" $cmd
    echo
done
