#!/usr/bin/env bash
# demo.sh: the README demo, as root on Debian 12. Builds a throw-away node out of network
# namespaces, starts pods through the meshcni plugin with cnitool (conflist: bridge+host-local →
# portmap → meshcni), shows the rules the plugin installed, makes real flows and prints where
# each was captured; then DELs every pod and removes every namespace it created.
#
#   scripts/demo.sh                          install missing deps (scripts/setup.sh), build,
#                                            run; ambient section in the default redirect
#                                            mode (inpod, as the agent's default)
#   scripts/demo.sh --ambient-mode inpod     the same, explicitly
#   scripts/demo.sh --ambient-mode iptables  ambient section in node-level iptables mode
#   scripts/demo.sh --ambient-mode ebpf      ambient section in node-level tc eBPF mode (pins
#                                            on a private bpffs under the work dir)
#   SKIP_SETUP=1 scripts/demo.sh ...         skip scripts/setup.sh (deps known to be present)
#
# Any other argument is an error (usage on stderr, exit 2).
#
# Safety: only namespaces named mcni-<pid>-… created by the demo are touched (their names are
# recorded in the work dir and removed by the trap below even if the demo is killed); the
# host's own network is never changed; traffic stays between those namespaces.
set -euo pipefail
cd "$(dirname "$(readlink -f "$0")")/.."

usage() {
    echo "usage: scripts/demo.sh [--ambient-mode inpod|iptables|ebpf]   (default: inpod)" >&2
}
ambient_mode=inpod
while [ $# -gt 0 ]; do
    case "$1" in
        --ambient-mode)
            [ $# -ge 2 ] || { echo "demo.sh: --ambient-mode needs a value" >&2; usage; exit 2; }
            ambient_mode="$2"
            shift 2
            ;;
        --ambient-mode=*)
            ambient_mode="${1#--ambient-mode=}"
            shift
            ;;
        -h | --help)
            usage
            exit 0
            ;;
        *)
            echo "demo.sh: unknown argument: $1" >&2
            usage
            exit 2
            ;;
    esac
done
case "$ambient_mode" in
    inpod | iptables | ebpf) ;;
    *)
        echo "demo.sh: unknown ambient mode: $ambient_mode (known: inpod, iptables, ebpf)" >&2
        usage
        exit 2
        ;;
esac

[ "$(id -u)" = 0 ] || { echo "demo.sh: run as root (network namespaces, iptables)" >&2; exit 1; }

if [ "${SKIP_SETUP:-0}" != 1 ]; then
    # Idempotent: checks first, installs only what is missing. Its chatter goes to a log.
    log="$(mktemp /tmp/mcni-demo-setup.XXXXXX.log)"
    if ! bash scripts/setup.sh >"$log" 2>&1; then
        cat "$log" >&2
        echo "demo.sh: scripts/setup.sh failed (log above)" >&2
        exit 1
    fi
    rm -f "$log"
fi

echo "demo.sh: building the workspace (cargo build --workspace) ..."
cargo build --workspace --quiet
target_dir="$(readlink -f "${CARGO_TARGET_DIR:-target}")/debug"

WORK="$(mktemp -d /tmp/mcni-demo.XXXXXX)"
cleanup() {
    # The demo cleans up after itself; this catches a crash or a signal. A signal sent to this
    # script alone (not the process group) would leave meshcni-demo running: stop it first
    # (its agents follow through their parent-death signal).
    if [ -n "${demo_pid:-}" ] && kill -0 "$demo_pid" 2>/dev/null; then
        kill -TERM "$demo_pid" 2>/dev/null || true
        wait "$demo_pid" 2>/dev/null || true
    fi
    if [ -f "$WORK/netns" ]; then
        while read -r ns; do
            case "$ns" in
                mcni-*) [ -e "/run/netns/$ns" ] && ip netns del "$ns" 2>/dev/null || true ;;
            esac
        done <"$WORK/netns"
    fi
    rm -f /var/lib/cni/results/mcni-demo-"${demo_pid:-none}"-* 2>/dev/null || true
    # ebpf mode: the private bpffs mounts the demo recorded (only under the work dir). Lazy
    # unmount: the pins go with the mount, and with them the last reference to our links.
    if [ -f "$WORK/mounts" ]; then
        while read -r m; do
            case "$m" in
                "$WORK"/*) mountpoint -q "$m" && umount -l "$m" 2>/dev/null || true ;;
            esac
        done <"$WORK/mounts"
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

"$target_dir/meshcni-demo" --plugin-dir "$target_dir" --work-dir "$WORK" \
    --ambient-mode "$ambient_mode" &
demo_pid=$!
wait "$demo_pid"
