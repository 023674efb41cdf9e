#!/usr/bin/env bash
# test.sh: meshcni's whole test suite, as root on Debian 12 (the README test command; CI runs it
# through .ci/run). Steps, in order (each runs even if an earlier one failed; exit status is
# non-zero if any failed):
#
#   1. scripts/setup.sh      dependencies (idempotent; --fuzz unless FUZZ_SECONDS=0)
#   2. preflight             root + every tool the tests use, else stop with what is missing
#   3. cargo fmt --check     the workspace, then the fuzz/ project
#   4. cargo clippy --workspace --all-targets -- -D warnings
#   5. image                 scripts/build-image.sh: the container image (release build) into
#                            target/images/meshcni-agent.tar; name, digest and sizes printed
#   6. cargo test --workspace --no-fail-fast
#                            unit, golden, root/netns tests and the real-runtime tests
#                            (crates/plugin/tests/runtimes.rs: cnitool and containerd CRI,
#                            crates/plugin/tests/podman.rs: podman's CNI backend, driving the
#                            built meshcni binary inside throw-away netns;
#                            crates/plugin/tests/image.rs: the image built twice (same digest),
#                            imported into a private containerd, every binary in it run)
#   7. cluster e2e           scripts/cluster-e2e.sh: a real single-node Kubernetes (k8s 1.34,
#                            containerd 2.2, reference CNI plugins 1.10) in throw-away netns +
#                            mount ns: pods, CNI STATUS/GC, helm install/upgrade/uninstall of the
#                            chart with the image; prints `N passed, N failed`
#   8. fuzz                  every target in fuzz/ for FUZZ_SECONDS (default 60) each, with
#                            cargo-fuzz + libFuzzer on *stable* Rust (--sanitizer none, see
#                            fuzz/README.md); FUZZ_SECONDS=0 skips fuzzing.
#
# Env: FUZZ_SECONDS (default 60), MESHCNI_CRI_VENV (CRI client venv, default /opt/meshcni/cri-venv),
# CARGO_INCREMENTAL (default 0 here: a one-shot run gains nothing from incremental caches, which
# cost GBs). Each step's line in the summary also gives the free disk after it (the CI disk is
# shared and finite; see the dev/release profiles in Cargo.toml).
set -uo pipefail
cd "$(dirname "$(readlink -f "$0")")/.."

FUZZ_SECONDS="${FUZZ_SECONDS:-60}"
export MESHCNI_CRI_VENV="${MESHCNI_CRI_VENV:-/opt/meshcni/cri-venv}"
export MESHCNI_HELM="${MESHCNI_HELM:-/opt/meshcni/bin/helm-v4.3.2}"
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
T0=$(date +%s)
results=()
failed=0

# run NAME CMD...: one step, timed, recorded; output goes straight through (CI reads cargo's lines).
run() {
    local name="$1" t rc
    shift
    t=$(date +%s)
    echo "=== test.sh: $name: $*"
    "$@"
    rc=$?
    local disk
    disk="$(df -h --output=avail . 2>/dev/null | tail -1 | tr -d ' ') free"
    if [ $rc = 0 ]; then
        results+=("ok      $name ($(( $(date +%s) - t ))s, $disk)")
    else
        results+=("FAILED  $name (exit $rc, $(( $(date +%s) - t ))s, $disk)")
        failed=1
    fi
    return $rc
}

finish() {
    echo "=== test.sh: steps (total $(( $(date +%s) - T0 ))s)"
    printf '    %s\n' "${results[@]}"
    exit $failed
}

[ "$(id -u)" = 0 ] || { echo "test.sh: must run as root (netns, iptables, containerd tests)" >&2; exit 1; }

setup_args=()
[ "$FUZZ_SECONDS" != 0 ] && setup_args+=(--fuzz)
run "setup" bash scripts/setup.sh "${setup_args[@]}" || finish

preflight() {
    local missing=() t
    for t in ip nsenter iptables iptables-save iptables-legacy-save nft ipset conntrack jq \
             cnitool containerd ctr runc podman conmon python3 cargo gcc readelf \
             clang bpftool tc make pkg-config; do
        command -v "$t" >/dev/null || missing+=("$t")
    done
    for t in /usr/lib/cni/bridge /usr/lib/cni/host-local /usr/lib/cni/portmap /bin/busybox \
             "$MESHCNI_CRI_VENV/bin/python" "$MESHCNI_HELM"; do
        [ -x "$t" ] || missing+=("$t")
    done
    # crates/ebpf's build.rs: libbpf-dev's helper headers, the kernel UAPI, libelf for libbpf-sys.
    for t in /usr/include/bpf/bpf_helpers.h /usr/include/linux/bpf.h /usr/include/libelf.h \
             /usr/include/zlib.h; do
        [ -f "$t" ] || missing+=("$t")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        echo "test.sh: missing after setup: ${missing[*]} (see scripts/setup.sh output above)" >&2
        return 1
    fi
}
run "preflight" preflight || finish

run "cargo fmt" cargo fmt --all --check
run "cargo fmt (fuzz)" cargo fmt --manifest-path fuzz/Cargo.toml --check
run "cargo clippy" cargo clippy --workspace --all-targets -- -D warnings
run "image" scripts/build-image.sh
run "cargo test" cargo test --workspace --no-fail-fast
# A real single-node Kubernetes in its own netns + mount ns (scripts/k8s-node.sh): the chart,
# the image, CNI STATUS/GC through containerd 2.x; prints `N passed, N failed`.
run "cluster e2e" bash scripts/cluster-e2e.sh

# libFuzzer prints a line per new corpus entry: keep that in fuzz/artifacts/<target>/fuzz.log
# and show the final stats (or, on a crash, the end of the log with the panic and artifact path).
fuzz() {
    local t log rc=0
    cargo fuzz build --fuzz-dir fuzz --sanitizer none || return 1
    for t in $(cargo fuzz list --fuzz-dir fuzz); do
        mkdir -p "fuzz/corpus/$t" "fuzz/artifacts/$t"
        log="fuzz/artifacts/$t/fuzz.log"
        echo "--- fuzz $t for ${FUZZ_SECONDS}s (seeds fuzz/seeds/$t, corpus fuzz/corpus/$t, log $log)"
        if cargo fuzz run --fuzz-dir fuzz --sanitizer none "$t" "fuzz/corpus/$t" "fuzz/seeds/$t" -- \
            -max_total_time="$FUZZ_SECONDS" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 >"$log" 2>&1; then
            grep -E '^(Done |stat::(number_of_executed_units|average_exec_per_sec|new_units_added|peak_rss_mb))' "$log"
        else
            rc=1
            echo "fuzz $t FAILED; end of $log:"
            tail -n 60 "$log"
        fi
    done
    return $rc
}
if [ "$FUZZ_SECONDS" != 0 ]; then run "fuzz (${FUZZ_SECONDS}s/target)" fuzz; fi
finish
