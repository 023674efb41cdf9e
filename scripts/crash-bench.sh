#!/usr/bin/env bash
# crash-bench.sh: issue 8 "Numbers" — SIGKILL the real meshcni-agent (iptables redirect mode)
# at random points (named crash points with random hit counts, or random delays) during the
# initial enrollment of N pods, a change of M pods and uninstall; restart; count kills,
# convergences, violations and uninstall residue bytes (see crates/agent/examples/crash_bench.rs).
# Root; everything happens in mcni-* network namespaces the bench creates and deletes.
# Debug build: crash points (MESHCNI_CRASH_AT) are compiled into debug builds only (or with
# the `crash-points` feature).
#   scripts/crash-bench.sh [--pods 200] [--change 50] [--kills 100] [--seed 1] [--out FILE]
set -euo pipefail
cd "$(dirname "$(readlink -f "$0")")/.."
cargo build -q -p meshcni-plugin
cargo build -q -p meshcni-agent --bins --example crash_bench
exec target/debug/examples/crash_bench "$@"
