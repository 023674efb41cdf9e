#!/usr/bin/env bash
# bench-inpod.sh: the ambient `inpod` redirect mode measured on the real binaries
# (crates/agent/examples/inpod_bench.rs; issue 9 "Numbers"). Prints Markdown tables.
#
#   scripts/bench-inpod.sh [--no-build] [add|enroll|rss ...]     (default: all three)
#
#   add    [--pods 50]    ambient-pod CNI ADD (real plugin → real agent → rules in the pod →
#                         ZDS ack from the in-pod ztunnel stand-in) against the reference
#                         `bridge` plugin's own ADD for the same pods, with a step breakdown
#   enroll [--pods 200]   label flip of N running pods until all are acked; agent restart
#                         recovery; both against a one-exec-per-rule baseline
#   rss    [--pods 1000]  agent VmRSS / VmHWM with N pods enrolled
#
# PODS_ADD, PODS_ENROLL, PODS_RSS override the pod counts of the default run.
# Root; every namespace is the bench's own (mcni-*); the agent's --host-proc-dir and
# --netns-dir are private scratch dirs. Needs /usr/lib/cni/{bridge,host-local} (REF_PLUGINS).
set -euo pipefail
cd "$(dirname "$(readlink -f "$0")")/.."
if [ "${1:-}" = --no-build ]; then shift; else
    cargo build -q --release -p meshcni-agent -p meshcni-plugin
    cargo build -q --release -p meshcni-agent --example inpod_bench
fi
echo "Machine: $(nproc) vCPU $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//'), $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), Linux $(uname -r), $(iptables --version); commit $(git rev-parse --short HEAD)$(git diff --quiet || echo ' (+ working tree)'), $(date -u +%F)."
echo
BIN=target/release/examples/inpod_bench
if [ $# -gt 0 ]; then exec "$BIN" "$@"; fi
for cmd in "add --pods ${PODS_ADD:-50}" "enroll --pods ${PODS_ENROLL:-200}" "rss --pods ${PODS_RSS:-1000}"; do
    echo "### inpod_bench $cmd"
    echo
    # shellcheck disable=SC2086
    "$BIN" $cmd
    echo
done
