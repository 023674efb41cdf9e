#!/usr/bin/env bash
# bench-outside-faults.sh: time from an outside fault to `meshcni-agent doctor` green (issue 12
# item 5), through crates/agent/tests/outside_faults.rs: the real agent (inpod mode) in a lab
# node netns, pods from the testkit's fake API server, the in-pod ztunnel stand-in.
#
#   scripts/bench-outside-faults.sh            # the API outage lasts 60 s
#   MESHCNI_API_OUTAGE_SECS=20 scripts/bench-outside-faults.sh
#
# Prints one `time-to-green <fault>: <seconds> s` line per fault (and the keeper's longest
# removal-to-reinsert window during the conflist loop). The tests run one at a time so the
# timings do not share the CPU with each other.
#
# Safety: the tests create their own network namespaces (mcni-*) and remove them; root needed.
set -euo pipefail

ROOT="$(cd "$(dirname "$(readlink -f "$0")")/.." && pwd)"
cd "$ROOT"
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
export MESHCNI_API_OUTAGE_SECS="${MESHCNI_API_OUTAGE_SECS:-60}"
[ "$(id -u)" = 0 ] || { echo "bench-outside-faults.sh: needs root (network namespaces)" >&2; exit 1; }
cargo test -p meshcni-agent --test outside_faults -- --nocapture --test-threads=1 2>&1 |
    grep -oE '(time-to-green .*|\((a|b|c|d)\) .*|test result.*|FAILED.*|panicked.*)'
