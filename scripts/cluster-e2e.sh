#!/usr/bin/env bash
# cluster-e2e.sh: end-to-end tests on a real single-node Kubernetes (scripts/k8s-node.sh: etcd,
# kube-apiserver, controller-manager, scheduler, containerd 2.x, kubelet, kube-proxy, reference
# CNI plugins v1.10 at cniVersion 1.1.0), all inside a network + mount namespace of its own.
# Prints one line per test and `N passed, N failed` at the end; exits non-zero on any failure.
#
#   scripts/cluster-e2e.sh [FILTER]     run the tests whose name contains FILTER (default: all)
#
# Needs: root; the binaries of scripts/k8s-build.sh (built when missing: the first run on a
# machine pays for the Go builds); the meshcni binaries in $CARGO_TARGET_DIR (default
# target)/release or debug (built with cargo when missing); busybox-static, openssl, runc,
# iptables, jq (scripts/setup.sh).
# MCNI_K8S_KEEP=1 leaves the node running at the end (prints how to reach it and remove it).
set -uo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"
FILTER="${1:-}"
[ "$(id -u)" = 0 ] || { echo "cluster-e2e.sh: run as root" >&2; exit 1; }

T0=$(date +%s)
PASSED=0
FAILED=0
FAILED_NAMES=()
WORK="$(mktemp -d /var/tmp/mcni-k8s-e2e.XXXXXX)"
NODE_DIR="$WORK/node"

cleanup() {
    if [ "${MCNI_K8S_KEEP:-0}" = 1 ] && [ -f "$NODE_DIR/state" ]; then
        echo "cluster-e2e: node kept: MCNI_K8S_DIR=$NODE_DIR $HERE/k8s-node.sh exec -- kubectl get pods -A"
        echo "cluster-e2e: remove it with: $HERE/k8s-node.sh down $NODE_DIR"
        return
    fi
    [ -f "$NODE_DIR/state" ] && "$HERE/k8s-node.sh" down "$NODE_DIR" >/dev/null 2>&1
    rm -rf "$WORK"
}
trap cleanup EXIT

k() { "$HERE/k8s-node.sh" exec "$NODE_DIR" -- kubectl "$@"; }
innode() { "$HERE/k8s-node.sh" exec "$NODE_DIR" -- "$@"; }

# run_test NAME: run test_NAME, count it, print PASS/FAIL with its output on failure.
run_test() {
    local name="$1" out rc t
    [ -z "$FILTER" ] || [[ "$name" == *"$FILTER"* ]] || return 0
    t=$(date +%s)
    out="$WORK/$name.out"
    ("test_$name") >"$out" 2>&1
    rc=$?
    if [ $rc = 0 ]; then
        PASSED=$((PASSED + 1))
        echo "PASS $name ($(($(date +%s) - t))s)"
    else
        FAILED=$((FAILED + 1))
        FAILED_NAMES+=("$name")
        echo "FAIL $name ($(($(date +%s) - t))s, rc=$rc):"
        sed 's/^/    /' "$out" | tail -n 60
    fi
}

fail() { echo "FAILED: $*"; exit 1; }

# ---------------------------------------------------------------------------------------------
# Images: pause (containerd's sandbox image) and busybox, imported into the node's containerd.
images() {
    local d="$WORK/images"
    mkdir -p "$d"
    python3 "$HERE/lib/mk-oci-image.py" --busybox /bin/busybox --name localhost/meshcni-pause:latest \
        --entrypoint /bin/sleep --cmd 2147483647 -o "$d/pause.tar" >/dev/null || return 1
    python3 "$HERE/lib/mk-oci-image.py" --busybox /bin/busybox --name localhost/busybox:test \
        --entrypoint /bin/sh -o "$d/busybox.tar" >/dev/null || return 1
    echo "$d/pause.tar:$d/busybox.tar"
}

# pod_manifest NAME [ANNOTATIONS_JSON] -- ARGS...: a busybox pod running ARGS.
pod_json() {
    local name="$1" ann="$2"
    shift 2
    jq -n --arg name "$name" --argjson ann "$ann" --args '{
        apiVersion: "v1", kind: "Pod",
        metadata: {name: $name, namespace: "default", annotations: $ann, labels: {app: $name}},
        spec: {terminationGracePeriodSeconds: 0, automountServiceAccountToken: false,
               containers: [{name: "main", image: "localhost/busybox:test", imagePullPolicy: "Never",
                             command: $ARGS.positional}]}}' "$@"
}

wait_running() { k wait --for=condition=Ready "pod/$1" --timeout="${2:-90}s"; }
pod_ip() { k get pod "$1" -o jsonpath='{.status.podIP}'; }

# ---------------------------------------------------------------------------------------------
test_node_ready() {
    k get node mcni-k8s-node -o wide || fail "no node"
    [ "$(k get node mcni-k8s-node -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}')" = True ] ||
        fail "node not Ready"
    k get node mcni-k8s-node -o jsonpath='{.status.nodeInfo.kubeletVersion} {.status.nodeInfo.containerRuntimeVersion}{"\n"}'
}

test_pod_gets_bridge_ip_and_tcp_works() {
    pod_json server '{}' nc -ll -p 8080 -e hostname | k apply -f - || fail "create server"
    pod_json client '{}' sleep 3600 | k apply -f - || fail "create client"
    wait_running server || { k describe pod server; fail "server not Running"; }
    wait_running client || { k describe pod client; fail "client not Running"; }
    local ip
    ip="$(pod_ip server)"
    echo "server IP: $ip"
    [[ "$ip" == 10.244.0.* ]] || fail "server IP $ip not from the bridge's host-local range 10.244.0.0/24"
    innode ip -4 addr show mcni-cni0 || fail "no bridge mcni-cni0 in the node netns"
    local got
    got="$(k exec client -- nc -w 5 "$ip" 8080)" || fail "client could not connect to $ip:8080"
    echo "client got: $got"
    [ "$got" = server ] || fail "expected the server's hostname 'server', got '$got'"
    k delete pod server client --wait=true --timeout=60s
}

# ---------------------------------------------------------------------------------------------
main() {
    echo "cluster-e2e: building/checking node binaries"
    "$HERE/k8s-build.sh" >"$WORK/build.log" 2>&1 || { cat "$WORK/build.log"; echo "0 passed, 1 failed"; exit 1; }
    local imgs
    imgs="$(images)" || { echo "cluster-e2e: building test images failed"; echo "0 passed, 1 failed"; exit 1; }
    local t
    t=$(date +%s)
    if ! MCNI_K8S_IMAGES="$imgs" "$HERE/k8s-node.sh" up "$NODE_DIR" >"$WORK/up.env" 2>"$WORK/up.log"; then
        cat "$WORK/up.log"
        echo "0 passed, 1 failed"
        exit 1
    fi
    grep -E '^\S+: \[|node up' "$WORK/up.log" | sed 's/^/cluster-e2e: /'
    echo "cluster-e2e: node up in $(($(date +%s) - t))s"

    run_test node_ready
    run_test pod_gets_bridge_ip_and_tcp_works

    echo "cluster-e2e: total $(($(date +%s) - T0))s"
    [ $FAILED = 0 ] || echo "failed: ${FAILED_NAMES[*]}"
    echo "$PASSED passed, $FAILED failed"
    [ $FAILED = 0 ]
}
main
