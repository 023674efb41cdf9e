#!/usr/bin/env bash
# bench-k8s.sh: issue 10's numbers on the real single-node Kubernetes of scripts/k8s-node.sh
# (etcd, kube-apiserver, controller-manager, scheduler, containerd 2.x, kubelet, kube-proxy,
# reference CNI plugins v1.10 at cniVersion 1.1.0, all inside a network + mount namespace of
# its own; removed at the end, also on failure).
#
#   scripts/bench-k8s.sh [--rounds N] [--watch-pods N] [--watch-seconds S] [--interval S]
#
# 1. Pod start (create -> Running -> Ready) with meshcni in the node's CNI chain vs without,
#    interleaved in the same run (--rounds, default 30: per round one plain and one injected
#    pod per arm, so 2 x rounds pods per arm). The chart is installed with
#    cniConfFileName=10-mcni-bridge.conflist, so the agent keeps meshcni chained into exactly
#    that file. "Without" = a second conflist, 05-mcni-bench-plain.conflist, byte-identical
#    to the node's conflist before the install (bridge + portmap, same network name and IPAM
#    store), is put in front of it: containerd (max_conf_num = 1) loads the first file in
#    name order, so the pod's ADD runs the reference chain only. "With" = that file removed:
#    containerd loads the agent's conflist (bridge, portmap, meshcni). The agent runs in both
#    arms (same watch/keeper load); only the plugin's presence in the chain differs. After
#    each switch the driver waits until `crictl info` shows the expected chain loaded, and per
#    pod it checks the agent's ADD counter moved by exactly 1 (with) or 0 (without).
#    The plugin's own ADD share: its in-process ADD time (plugin start -> reply written, the
#    `meshcni_cni_request_duration_seconds` report it sends the agent; per pod from the
#    histogram's sum/count delta) plus the exec/start-up/exit floor (wall time of exec'ing the
#    same binary with CNI_COMMAND=VERSION).
# 2. Agent memory and CPU with --watch-pods pods (default 200) on the node: the chart upgraded
#    to ambient on (the agent list+watches the node's pods and namespaces only with ambient
#    on; the pods are in a namespace without the ambient label, so they are watched, not
#    enrolled), /proc/<agent pid> sampled every --interval s (default 5) while the pods are
#    created and then for --watch-seconds (default 600).
#
# Output: markdown tables on stdout, also written to target/bench/k8s-<UTC time>.md; progress
# on stderr. Needs: root; the binaries of scripts/k8s-build.sh; helm (/opt/meshcni/bin);
# python3, jq. MCNI_BENCH_IMAGES=DIR uses DIR/{pause,busybox,meshcni-agent}.tar built earlier
# (scripts/build-image.sh --test-images DIR and --out DIR/meshcni-agent.tar); otherwise they are
# built here (release build of the agent and plugin).
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"
ROUNDS=30
WATCH_PODS=200
WATCH_SECONDS=600
INTERVAL=5
while [ $# -gt 0 ]; do
    case "$1" in
        --rounds) ROUNDS="$2"; shift 2 ;;
        --watch-pods) WATCH_PODS="$2"; shift 2 ;;
        --watch-seconds) WATCH_SECONDS="$2"; shift 2 ;;
        --interval) INTERVAL="$2"; shift 2 ;;
        *) echo "bench-k8s.sh: unknown argument $1 (--rounds N, --watch-pods N, --watch-seconds S, --interval S)" >&2; exit 2 ;;
    esac
done
for v in ROUNDS WATCH_PODS WATCH_SECONDS; do
    [[ "${!v}" =~ ^[1-9][0-9]*$ ]] || { echo "bench-k8s.sh: $v must be a positive integer, got '${!v}'" >&2; exit 2; }
done
[[ "$INTERVAL" =~ ^[0-9]+(\.[0-9]+)?$ ]] || { echo "bench-k8s.sh: --interval must be a number of seconds, got '$INTERVAL'" >&2; exit 2; }
# The pod CIDR is a /24 (253 pod addresses); kubelet's maxPods is 250 (k8s-node.sh).
[ "$WATCH_PODS" -le 240 ] || { echo "bench-k8s.sh: --watch-pods $WATCH_PODS: the node's pod CIDR is a /24 and maxPods 250; at most 240" >&2; exit 2; }
[ "$(id -u)" = 0 ] || { echo "bench-k8s.sh: run as root" >&2; exit 1; }
for b in python3 jq; do command -v "$b" >/dev/null || { echo "bench-k8s.sh: $b not found (scripts/setup.sh)" >&2; exit 1; }; done
HELM="${MESHCNI_HELM:-/opt/meshcni/bin/helm-v4.3.2}"
[ -x "$HELM" ] || { echo "bench-k8s.sh: helm missing at $HELM (scripts/setup.sh builds it)" >&2; exit 1; }

log() { echo "bench-k8s: $*" >&2; }
die() { echo "bench-k8s.sh: $*" >&2; exit 1; }

WORK="$(mktemp -d /var/tmp/mcni-k8s-bench.XXXXXX)"
NODE_DIR="$WORK/node"
cleanup() {
    local rc=$?
    if [ -f "$NODE_DIR/state" ]; then
        "$HERE/k8s-node.sh" down "$NODE_DIR" >&2 || log "k8s-node.sh down $NODE_DIR failed (rc=$?)"
    fi
    rm -rf "$WORK"
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

k() { "$HERE/k8s-node.sh" exec "$NODE_DIR" -- kubectl "$@"; }
innode() { "$HERE/k8s-node.sh" exec "$NODE_DIR" -- "$@"; }
driver() { innode python3 "$HERE/lib/k8s-bench-driver.py" "$@"; }

PAUSE_IMAGE=localhost/meshcni/pause:1.0
BUSYBOX_IMAGE=localhost/meshcni/busybox:1.35.0
CONFLIST=10-mcni-bridge.conflist
PLAIN=05-mcni-bench-plain.conflist

log "node binaries (scripts/k8s-build.sh)"
"$HERE/k8s-build.sh" >"$WORK/build.log" 2>&1 || { cat "$WORK/build.log" >&2; die "k8s-build.sh failed"; }
IMGS="${MCNI_BENCH_IMAGES:-}"
if [ -z "$IMGS" ]; then
    IMGS="$WORK/images"
    mkdir -p "$IMGS"
    log "images (scripts/build-image.sh)"
    "$HERE/build-image.sh" --test-images "$IMGS" >/dev/null
    "$HERE/build-image.sh" --out "$IMGS/meshcni-agent.tar" >/dev/null
fi
for f in pause busybox meshcni-agent; do [ -f "$IMGS/$f.tar" ] || die "$IMGS/$f.tar missing"; done

log "node up"
MCNI_K8S_IMAGES="$IMGS/pause.tar:$IMGS/busybox.tar:$IMGS/meshcni-agent.tar" MCNI_K8S_SANDBOX_IMAGE="$PAUSE_IMAGE" \
    "$HERE/k8s-node.sh" up "$NODE_DIR" >"$WORK/up.env" 2>"$WORK/up.log" || { cat "$WORK/up.log" >&2; die "node up failed"; }
# The ambient (inpod) agent mounts /var/run/netns with HostToContainer propagation, which the
# runtime refuses unless the path is on a shared or slave mount; in k8s-node.sh's private mount
# namespace it is a plain directory of the node's /run tmpfs. Make it a shared mount of itself
# (what `ip netns add` does on a real host), inside the node's mount namespace only, before any
# pod exists.
innode mkdir -p /run/netns
innode mount --rbind /run/netns /run/netns
innode mount --make-shared /run/netns
HOST_CONFLIST="$NODE_DIR/fs/etc-cni-net.d/$CONFLIST"
cp "$HOST_CONFLIST" "$WORK/plain.conflist"

# has_meshcni FILE: the conflist's chain ends in meshcni.
has_meshcni() { jq -e '.plugins[-1].type == "meshcni"' "$1" >/dev/null 2>&1; }
rollout() {
    k -n kube-system rollout status ds/meshcni-node --timeout=300s >&2 || {
        k -n kube-system describe pods -l k8s-app=meshcni-node | tail -30 >&2
        k -n kube-system logs -l k8s-app=meshcni-node --tail=30 >&2
        die "DaemonSet meshcni-node not Ready"
    }
}

log "helm install (defaults, cniConfFileName=$CONFLIST)"
innode "$HELM" install meshcni "$REPO/deploy/helm/meshcni" -n kube-system --set cniConfFileName="$CONFLIST" >/dev/null
rollout
for ((i = 0; i < 60; i++)); do has_meshcni "$HOST_CONFLIST" && break; sleep 1; done
has_meshcni "$HOST_CONFLIST" || die "the agent did not chain meshcni into $CONFLIST"
AGENT_IP="$(k -n kube-system get pods -l k8s-app=meshcni-node -o jsonpath='{.items[0].status.podIP}')"
METRICS="http://$AGENT_IP:15014/metrics"
for ((i = 0; i < 30; i++)); do innode curl -fsS -o /dev/null "$METRICS" && break; sleep 1; done
innode curl -fsS -o /dev/null "$METRICS" || die "agent metrics not reachable at $METRICS"

# metric NAME: the agent's value of an unlabelled metric (0 when absent).
metric() { innode curl -fsS "$METRICS" | awk -v n="$1" '$1 == n { print $2; f = 1 } END { if (!f) print 0 }'; }
REINSERTS_BEFORE="$(metric meshcni_config_reinserts_total)"
LOAD_START="$(cut -d' ' -f1-3 /proc/loadavg)"
log "pod start: $ROUNDS rounds x (plain + injected) x (with, without); load average $LOAD_START"
driver podstart --pki "$NODE_DIR/pki" --ns bench --rounds "$ROUNDS" --metrics "$METRICS" \
    --plain-src "$WORK/plain.conflist" --plain-dst "/etc/cni/net.d/$PLAIN" \
    --image "$PAUSE_IMAGE" --sidecar-image "$BUSYBOX_IMAGE" --out "$WORK/podstart.json"
# The bench's conflist was only ever the reference chain; the agent never touched it.
[ ! -e "$NODE_DIR/fs/etc-cni-net.d/$PLAIN" ] || die "$PLAIN left behind"
has_meshcni "$HOST_CONFLIST" || die "meshcni missing from $CONFLIST after the pod start runs"
REINSERTS_AFTER="$(metric meshcni_config_reinserts_total)"
driver execfloor --plugin /opt/cni/bin/meshcni --n 50 --out "$WORK/execfloor.json"
LOAD_PODSTART="$(cut -d' ' -f1-3 /proc/loadavg)"
mkdir -p "$REPO/target/bench"
STAMP="$(date -u +%Y%m%dT%H%M%SZ)"
# The raw per-pod data, kept (the report below is computed from these files).
cp "$WORK/podstart.json" "$REPO/target/bench/k8s-$STAMP-podstart.json"
cp "$WORK/execfloor.json" "$REPO/target/bench/k8s-$STAMP-execfloor.json"

log "deleting the pod-start pods"
k delete namespace bench --wait=true --timeout=600s >/dev/null

OLD_AGENT_UID="$(k -n kube-system get pods -l k8s-app=meshcni-node -o jsonpath='{.items[0].metadata.uid}')"
[ -n "$OLD_AGENT_UID" ] || die "no agent pod before the ambient upgrade"
log "helm upgrade: ambient on (the agent watches the node's pods)"
innode "$HELM" upgrade meshcni "$REPO/deploy/helm/meshcni" -n kube-system --reuse-values --set ambient.enabled=true >/dev/null
# Not `rollout status`: with ambient on (inpod) the agent's readiness stays closed until a
# ztunnel connects to its ZDS socket, and there is no ztunnel on this node. Wait for the new
# agent pod (host network) to run instead; it lists and watches pods and namespaces from start.
# The agent pod is host-network before and after the upgrade: wait for exactly one agent pod,
# a new one (another UID), with its container running, and take that container's pid.
CID=""
for ((i = 0; i < 300; i++)); do
    PODS="$(k -n kube-system get pods -l k8s-app=meshcni-node -o jsonpath='{range .items[*]}{.metadata.uid}{" "}{.status.phase}{" "}{.status.containerStatuses[0].containerID}{"\n"}{end}' || true)"
    if [ "$(printf '%s\n' "$PODS" | grep -c .)" = 1 ]; then
        read -r UID_NOW PHASE CONTAINER <<<"$PODS"
        if [ "$UID_NOW" != "$OLD_AGENT_UID" ] && [ "$PHASE" = Running ] && [ -n "${CONTAINER:-}" ]; then
            CID="${CONTAINER#*://}"
            [ "$(innode crictl inspect "$CID" | jq -r '.status.state')" = CONTAINER_RUNNING ] && break
            CID=""
        fi
    fi
    sleep 1
done
[ -n "$CID" ] || die "the ambient agent pod did not start running within 300 s"
AGENT_PID="$(innode crictl inspect "$CID" | jq -r '.info.pid')"
[[ "$AGENT_PID" =~ ^[0-9]+$ ]] && [ "$(tr -d '\0' <"/proc/$AGENT_PID/cmdline" | head -c 200)" != "" ] ||
    die "agent pid '$AGENT_PID' not found"
grep -q meshcni-agent "/proc/$AGENT_PID/cmdline" || die "pid $AGENT_PID is not meshcni-agent: $(tr '\0' ' ' <"/proc/$AGENT_PID/cmdline")"
log "agent pid $AGENT_PID; $WATCH_PODS pods, then ${WATCH_SECONDS}s sampling every ${INTERVAL}s"
driver watchload --pki "$NODE_DIR/pki" --ns bench-watch --pods "$WATCH_PODS" --image "$PAUSE_IMAGE" \
    --pid "$AGENT_PID" --seconds "$WATCH_SECONDS" --interval "$INTERVAL" --out "$WORK/watchload.json"
cp "$WORK/watchload.json" "$REPO/target/bench/k8s-$STAMP-watchload.json"
RESTARTS="$(k -n kube-system get pods -l k8s-app=meshcni-node -o jsonpath='{.items[0].status.containerStatuses[0].restartCount}')"
LOAD_END="$(cut -d' ' -f1-3 /proc/loadavg)"

COMMIT="$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)"
DIRTY="$(git -C "$REPO" status --porcelain --untracked-files=no 2>/dev/null | grep -q . && echo "+changes" || true)"
VERS="$(k get node mcni-k8s-node -o jsonpath='{.status.nodeInfo.kubeletVersion}, {.status.nodeInfo.containerRuntimeVersion}')"
OUT="$REPO/target/bench/k8s-$STAMP.md"
{
    echo "## bench-k8s.sh, $(date -u '+%Y-%m-%d %H:%M UTC'), commit $COMMIT$DIRTY"
    echo
    echo "Machine: $(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')), kernel $(uname -r);"
    echo "node: $VERS; load average (1/5/15 min) at the start $LOAD_START, after the pod-start runs"
    echo "$LOAD_PODSTART, at the end $LOAD_END. Agent container restarts during the run: $RESTARTS;"
    echo "the agent's config re-inserts (meshcni_config_reinserts_total) during the pod-start runs:"
    echo "$REINSERTS_BEFORE before, $REINSERTS_AFTER after."
    echo "Command: \`sudo scripts/bench-k8s.sh --rounds $ROUNDS --watch-pods $WATCH_PODS --watch-seconds $WATCH_SECONDS --interval $INTERVAL\`"
    echo
    innode python3 "$HERE/lib/k8s-bench-driver.py" report --podstart "$WORK/podstart.json" \
        --execfloor "$WORK/execfloor.json" --watchload "$WORK/watchload.json" \
        --context "$ROUNDS rounds, one pod at a time"
} >"$OUT"
cat "$OUT"
log "written to $OUT"
