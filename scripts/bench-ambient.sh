#!/usr/bin/env bash
# bench-ambient.sh: the ambient `iptables` mode at scale, measured on the real agent binary in a
# lab node netns (workloads from a file, a ztunnel stand-in, N pod veths): enrollment wall time
# and agent CPU at each pod count, memory, idle CPU with the pods enrolled, and a ztunnel
# restart probed on the dataplane (a new connection every millisecond in both directions
# through a captured pod; connections that escaped capture are counted). Prints Markdown
# tables (crates/agent/examples/ambient_scale_bench.rs). Root; touches only its own netns.
#   scripts/bench-ambient.sh [--no-build] [-- example args, e.g. --pods 0,1000,5000 --idle-seconds 20]
set -euo pipefail
cd "$(dirname "$(readlink -f "$0")")/.."
if [ "${1:-}" = --no-build ]; then shift; else
    cargo build -q --release -p meshcni-agent -p meshcni-plugin
    cargo build -q --release -p meshcni-agent --example ambient_scale_bench
fi
[ "${1:-}" = -- ] && shift
echo "Machine: $(nproc) vCPU $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//'), $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), Linux $(uname -r), load average $(cut -d' ' -f1-3 /proc/loadavg); commit $(git rev-parse --short HEAD)$(git diff --quiet || echo ' (+ working tree)'), $(date -u +%F)."
echo
exec target/release/examples/ambient_scale_bench "$@"
