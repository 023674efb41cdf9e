#!/usr/bin/env bash
# bench-repair.sh: the repair controller (issue 12 item 1 "Numbers"), measured on the real
# binaries (crates/agent/examples/repair_bench.rs): time from "pod started uncaptured" to
# "pod captured" for N sidecar pods and N ambient pods, and from a third party flushing N
# ambient pods' in-pod rules to "captured" again. Prints a Markdown table.
#
#   scripts/bench-repair.sh [--no-build] [--pods 50] [--resync-seconds 1]
#
# PROFILE=release (default) or PROFILE=debug picks the build. Root; every namespace is the
# bench's own (mcni-*); the agent's --host-proc-dir and --netns-dir are private scratch dirs.
set -euo pipefail
cd "$(dirname "$(readlink -f "$0")")/.."
PROFILE=${PROFILE:-release}
flag=()
[ "$PROFILE" = release ] && flag=(--release)
if [ "${1:-}" = --no-build ]; then shift; else
    cargo build -q "${flag[@]}" -p meshcni-agent -p meshcni-plugin
    cargo build -q "${flag[@]}" -p meshcni-agent --example repair_bench
fi
echo "Machine: $(nproc) vCPU $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//'), $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), Linux $(uname -r), $(iptables --version); $PROFILE build; commit $(git rev-parse --short HEAD)$(git diff --quiet || echo ' (+ working tree)'), $(date -u +%F)."
echo
exec "target/$PROFILE/examples/repair_bench" "$@"
