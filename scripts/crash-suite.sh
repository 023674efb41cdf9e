#!/usr/bin/env bash
# crash-suite.sh: issue 12 item 4 "Numbers" — the crash suite (crates/agent/tests/crash_suite.rs)
# at full size: SIGKILL the real meshcni-agent at random moments during install + enrollment of
# 200 pods, a change of 50 pods and uninstall, in each mode (sidecar-only, iptables, inpod,
# ebpf), `ROUNDS` rounds each (3 kills per round; 20 rounds give ≥ 50 kills per mode), plus
# `ADD_KILLS` plugin kills mid-ADD per ambient mode; `meshcni-agent doctor` is the oracle.
# Counts (kills, convergences, violations, time to doctor-green) are printed and appended as
# JSON lines to OUT. Root; everything happens in mcni-* network namespaces and a private bpffs.
#   scripts/crash-suite.sh [MODE...]   MODE: sidecar_only iptables inpod ebpf (default: all)
#   env: ROUNDS (20) PODS (200) ADD_KILLS (10) SEED (time) OUT (crash-suite.jsonl)
set -euo pipefail
cd "$(dirname "$(readlink -f "$0")")/.."
export CARGO_INCREMENTAL=0
modes=("$@")
[ ${#modes[@]} -gt 0 ] || modes=(sidecar_only iptables inpod ebpf)
out="${OUT:-crash-suite.jsonl}"
cargo build -q -p meshcni-plugin
cargo test -q -p meshcni-agent --test crash_suite --no-run
for m in "${modes[@]}"; do
  seed=()
  [ -z "${SEED:-}" ] || seed=("MESHCNI_CRASH_SUITE_SEED=$SEED")
  env MESHCNI_CRASH_SUITE_ROUNDS="${ROUNDS:-20}" \
    MESHCNI_CRASH_SUITE_PODS="${PODS:-200}" \
    MESHCNI_CRASH_SUITE_ADD_KILLS="${ADD_KILLS:-10}" \
    MESHCNI_CRASH_SUITE_OUT="$out" \
    "${seed[@]}" \
    cargo test -q -p meshcni-agent --test crash_suite -- --exact "crash_suite_$m" --nocapture
done
echo "counts appended to $out"
