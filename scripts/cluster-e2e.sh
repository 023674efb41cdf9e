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
    [ -f "$NODE_DIR/state" ] && { "$HERE/k8s-node.sh" down "$NODE_DIR" || echo "cluster-e2e: k8s-node.sh down $NODE_DIR failed (rc=$?)"; }
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
        sed 's/^/    /' "$out"
    else
        FAILED=$((FAILED + 1))
        FAILED_NAMES+=("$name")
        echo "FAIL $name ($(($(date +%s) - t))s, rc=$rc):"
        sed 's/^/    /' "$out" | tail -n 60
    fi
}

fail() { echo "FAILED: $*"; exit 1; }

# ---------------------------------------------------------------------------------------------
# Images, all built by scripts/build-image.sh (no registry: imported into the node's containerd):
# the meshcni image (the chart's default name:tag), the pause image (containerd's sandbox image)
# busybox and the in-pod ztunnel stand-in (crates/testkit, meshcni-ztunnel-standin).
# MCNI_E2E_IMAGES=DIR uses DIR/{meshcni-agent,pause,busybox,ztunnel-standin}.tar built earlier.
PAUSE_IMAGE=localhost/meshcni/pause:1.0
BUSYBOX_IMAGE=localhost/meshcni/busybox:1.35.0
ZTUNNEL_STANDIN_IMAGE=localhost/meshcni/ztunnel-standin:test
images() {
    local d="${MCNI_E2E_IMAGES:-}"
    if [ -z "$d" ]; then
        d="$WORK/images"
        mkdir -p "$d"
        "$HERE/build-image.sh" --test-images "$d" >&2 || return 1
        "$HERE/build-image.sh" --out "$d/meshcni-agent.tar" >&2 || return 1
    fi
    local f
    for f in pause busybox ztunnel-standin meshcni-agent; do
        [ -f "$d/$f.tar" ] || { echo "cluster-e2e: $d/$f.tar missing" >&2; return 1; }
    done
    echo "$d/pause.tar:$d/busybox.tar:$d/ztunnel-standin.tar:$d/meshcni-agent.tar"
}

# pod_manifest NAME [ANNOTATIONS_JSON] -- ARGS...: a busybox pod running ARGS.
pod_json() {
    local name="$1" ann="$2"
    shift 2
    local cmd
    cmd="$(printf '%s\n' "$@" | jq -R . | jq -cs .)"
    jq -n --arg name "$name" --argjson ann "$ann" --argjson cmd "$cmd" --arg img "$BUSYBOX_IMAGE" '{
        apiVersion: "v1", kind: "Pod",
        metadata: {name: $name, namespace: "default", annotations: $ann, labels: {app: $name}},
        spec: {terminationGracePeriodSeconds: 0, automountServiceAccountToken: false,
               containers: [{name: "main", image: $img, imagePullPolicy: "Never",
                             command: $cmd}]}}'
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

# Item 6: CNI 1.1.0 STATUS and GC reach the meshcni plugin chained after the reference plugins.
# containerd 2.2 sends STATUS on every CRI Status call (kubelet polls it for the node's Ready
# condition: go-cni Status -> libcni GetStatusNetworkList); no containerd release calls GC, so GC
# is driven through libcni v1.3.0 (cnigc) with the runtime's live sandboxes as valid attachments.
# An exec-recording wrapper (scripts/lib/cni-exec-record) logs every verb meshcni receives.
conflist_host() { echo "$NODE_DIR/fs/etc-cni-net.d/10-mcni-bridge.conflist"; }
node_ready_status() { k get node mcni-k8s-node -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}'; }
node_ready_message() { k get node mcni-k8s-node -o jsonpath='{.status.conditions[?(@.type=="Ready")].message}'; }
# wait_until SECONDS CMD...: poll CMD every second.
wait_until() {
    local secs="$1" i
    shift
    for ((i = 0; i < secs; i++)); do "$@" && return 0; sleep 1; done
    return 1
}
calls() { innode cat /run/cni-record/meshcni.calls 2>/dev/null; }
calls_since() { calls | awk -v t="$1" '$1 > t'; }
status_calls_since() { calls_since "$1" | awk '$2 == "STATUS"'; }
has_status_rc_since() { status_calls_since "$1" | grep -q " rc=$2 "; }
node_is() { [ "$(node_ready_status)" = "$1" ]; }

meshcni_plugin_bin() {
    local b
    for b in "${CARGO_TARGET_DIR:-$REPO/target}/release/meshcni" "${CARGO_TARGET_DIR:-$REPO/target}/debug/meshcni"; do
        [ -x "$b" ] && { echo "$b"; return 0; }
    done
    (cd "$REPO" && cargo build -q -p meshcni-plugin --bin meshcni >&2) || return 1
    echo "${CARGO_TARGET_DIR:-$REPO/target}/debug/meshcni"
}

# plugin_identity: a client certificate for user mcni-plugin (node CA) allowed to read pods and
# namespaces, and a kubeconfig for it at the node's /etc/kubernetes/meshcni-plugin.kubeconfig.
plugin_identity() {
    local p="$NODE_DIR/pki" kd="$NODE_DIR/fs/etc-kubernetes"
    openssl ecparam -name prime256v1 -genkey -noout -out "$kd/meshcni-plugin.key" 2>/dev/null &&
        openssl req -new -key "$kd/meshcni-plugin.key" -subj "/CN=mcni-plugin" -out "$kd/p.csr" 2>/dev/null &&
        printf 'extendedKeyUsage=clientAuth\n' >"$kd/p.ext" &&
        openssl x509 -req -in "$kd/p.csr" -CA "$p/ca.crt" -CAkey "$p/ca.key" -CAcreateserial -days 1 \
            -extfile "$kd/p.ext" -out "$kd/meshcni-plugin.crt" 2>/dev/null || return 1
    cp "$p/ca.crt" "$kd/ca.crt"
    printf '%s\n' "apiVersion: v1" "kind: Config" "clusters:" "- name: mcni-k8s" \
        "  cluster: {certificate-authority: /etc/kubernetes/ca.crt, server: \"https://10.243.0.1:6443\"}" \
        "users:" "- name: mcni-plugin" \
        "  user: {client-certificate: /etc/kubernetes/meshcni-plugin.crt, client-key: /etc/kubernetes/meshcni-plugin.key}" \
        "contexts:" "- name: mcni-plugin" "  context: {cluster: mcni-k8s, user: mcni-plugin}" \
        "current-context: mcni-plugin" >"$kd/meshcni-plugin.kubeconfig"
    k create clusterrole mcni-plugin --verb=get,list,watch --resource=pods,namespaces >/dev/null &&
        k create clusterrolebinding mcni-plugin --clusterrole=mcni-plugin --user=mcni-plugin >/dev/null
}

test_cni_status_and_gc_reach_meshcni() {
    local bin cl orig t0 kd="$NODE_DIR/fs/etc-kubernetes"
    bin="$(meshcni_plugin_bin)" || fail "no meshcni plugin binary"
    plugin_identity || fail "plugin identity"
    install -m 0755 "$bin" "$NODE_DIR/fs/opt-cni-bin/meshcni.real"
    install -m 0755 "$HERE/lib/cni-exec-record" "$NODE_DIR/fs/opt-cni-bin/meshcni"
    cl="$(conflist_host)"
    orig="$WORK/conflist.orig"
    cp "$cl" "$orig"
    t0="$(date +%s.%N)"
    jq '.plugins += [{"type": "meshcni", "plugin_log_level": "debug",
                       "kubernetes": {"kubeconfig": "/etc/kubernetes/meshcni-plugin.kubeconfig"},
                       "cni_agent_run_dir": "/run/meshcni", "exclude_namespaces": ["kube-system"]}]' \
        "$orig" >"$cl.tmp" && mv "$cl.tmp" "$cl"
    echo "conflist now: $(jq -c '[.cniVersion, [.plugins[].type]]' "$cl")"

    # STATUS: containerd reloads the conflist and calls STATUS through it on kubelet's polls.
    wait_until 60 has_status_rc_since "$t0" 0 || { calls | tail; fail "no successful STATUS reached meshcni within 60s"; }
    echo "STATUS calls reaching meshcni (via containerd): $(status_calls_since "$t0" | wc -l), e.g.:"
    status_calls_since "$t0" | tail -n 1
    node_is True || fail "node not Ready with meshcni chained"

    # STATUS answers 'not available' when its kubeconfig is gone: containerd reports
    # NetworkReady=false with the plugin's message, the kubelet marks the node NotReady.
    mv "$kd/meshcni-plugin.kubeconfig" "$kd/meshcni-plugin.kubeconfig.away"
    t0="$(date +%s.%N)"
    wait_until 60 has_status_rc_since "$t0" 1 || { calls | tail; fail "no failing STATUS after removing the plugin kubeconfig"; }
    echo "failing STATUS: $(status_calls_since "$t0" | grep ' rc=1 ' | tail -n 1)"
    wait_until 90 node_is False || fail "node stayed Ready although meshcni STATUS fails: $(node_ready_message)"
    echo "node NotReady: $(node_ready_message)"
    node_ready_message | grep -q "plugin kubeconfig is not readable" ||
        fail "node NotReady message does not carry the plugin's STATUS error"
    mv "$kd/meshcni-plugin.kubeconfig.away" "$kd/meshcni-plugin.kubeconfig"
    wait_until 90 node_is True || fail "node not Ready again after restoring the plugin kubeconfig: $(node_ready_message)"
    echo "node Ready again after the kubeconfig came back"

    # GC: two pods through the full chain (bridge, portmap, meshcni ADD); GC with every live
    # sandbox but gcb's as valid: libcni DELs gcb's attachment through the chain, then sends GC
    # with cni.dev/valid-attachments to every plugin (host-local frees gcb's address only).
    pod_json gca '{}' sleep 3600 | k apply -f - >/dev/null
    pod_json gcb '{}' sleep 3600 | k apply -f - >/dev/null
    { wait_running gca && wait_running gcb; } || fail "gc pods not Running"
    local sa sb ipa ipb valid=() s
    sa="$(innode crictl pods --name '^gca$' --state ready -q)"
    sb="$(innode crictl pods --name '^gcb$' --state ready -q)"
    ipa="$(pod_ip gca)" ipb="$(pod_ip gcb)"
    echo "sandboxes: gca=$sa ($ipa) gcb=$sb ($ipb)"
    calls | grep -q "ADD $sa rc=0" || fail "meshcni did not see the ADD of gca"
    for s in $(innode crictl pods --state ready -q); do
        [ "$s" = "$sb" ] || valid+=(--valid "$s/eth0")
    done
    local hl="$NODE_DIR/fs/var-lib-cni/networks/mcni-k8s-pods"
    { [ -f "$hl/$ipa" ] && [ -f "$hl/$ipb" ]; } || fail "host-local has no reservation for $ipa/$ipb"
    t0="$(date +%s.%N)"
    innode cnigc gc --conflist /etc/cni/net.d/10-mcni-bridge.conflist "${valid[@]}" || fail "cnigc gc failed"
    calls_since "$t0"
    calls_since "$t0" | grep -q "DEL $sb rc=0" || fail "GC did not DEL the stale attachment $sb through meshcni"
    if calls_since "$t0" | grep -q "DEL $sa "; then fail "GC deleted the valid attachment $sa"; fi
    calls_since "$t0" | grep -q "GC - rc=0" || fail "meshcni did not answer GC with success"
    local gcin
    gcin="$(innode find /run/cni-record -name 'meshcni.*.GC.stdin.json' | sort | tail -n 1)"
    gcin="$(innode cat "$gcin")"
    jq -e --arg a "$sa" --arg b "$sb" '(."cni.dev/valid-attachments" | map(.containerID)) as $v
        | ($v | index($a)) != null and ($v | index($b)) == null' <<<"$gcin" >/dev/null ||
        fail "GC stdin's cni.dev/valid-attachments is not the live set: $gcin"
    [ -f "$hl/$ipa" ] || fail "host-local released the valid pod's address $ipa"
    [ ! -f "$hl/$ipb" ] || fail "host-local kept the stale attachment's address $ipb"
    echo "GC: stale $sb DELeted through the chain, $ipb released; $sa and $ipa kept; meshcni GC rc=0"
    calls | awk '$2 == "STATUS" { n++; if (!f) f = $1; l = $1 }
        END { if (n > 1) printf "containerd sent %d STATUS calls over %.0f s (one per %.1f s)\n", n, l - f, (l - f) / (n - 1) }'
    k delete pod gca gcb --wait=true --timeout=60s >/dev/null
    # Back to the plain reference chain for the chart tests.
    cp "$orig" "$cl.tmp" && mv "$cl.tmp" "$cl"
    rm -f "$NODE_DIR/fs/opt-cni-bin/meshcni" "$NODE_DIR/fs/opt-cni-bin/meshcni.real"
}

# ---------------------------------------------------------------------------------------------
# Item 3: the chart on the node.
HELM="${MESHCNI_HELM:-/opt/meshcni/bin/helm-v4.3.2}"
helm_() { innode "$HELM" "$@"; }
# cni_state: what the node's CNI dirs hold (file names + sha256 of each), host view.
cni_state() {
    (cd "$NODE_DIR/fs" && find etc-cni-net.d opt-cni-bin -type f -print0 | sort -z | xargs -0 sha256sum)
}

# A pod as Istio's sidecar injector writes it (CNI mode: istio-validation init container, no
# istio-init; istio-proxy runs `proxy sidecar` as uid 1337; sidecar.istio.io/status names what
# was injected). The images are busybox: istio-validation is the capture probe: it listens on
# 15001 (the outbound capture port) and its FIRST outbound connection goes to the node IP, port
# 9 (nothing listens there): with the capture in place before the pod's first packet, the
# connection lands on 15001 and it reads "captured"; without, it is refused and the pod never
# starts (init container fails).
injected_pod_json() {
    local name="$1"
    jq -n --arg name "$name" --arg img "$BUSYBOX_IMAGE" '{
      apiVersion: "v1", kind: "Pod",
      metadata: {name: $name, namespace: "default",
        labels: {app: $name, "security.istio.io/tlsMode": "istio",
                 "service.istio.io/canonical-name": $name, "service.istio.io/canonical-revision": "latest"},
        annotations: {
          "sidecar.istio.io/status": "{\"initContainers\":[\"istio-validation\"],\"containers\":[\"istio-proxy\"],\"volumes\":[\"workload-socket\",\"credential-socket\",\"workload-certs\",\"istio-envoy\",\"istio-data\",\"istio-podinfo\",\"istio-token\",\"istiod-ca-cert\"],\"imagePullSecrets\":null,\"revision\":\"default\"}",
          "kubectl.kubernetes.io/default-container": "app",
          "kubectl.kubernetes.io/default-logs-container": "app",
          "prometheus.io/path": "/stats/prometheus", "prometheus.io/port": "15020", "prometheus.io/scrape": "true",
          "istio.io/rev": "default"}},
      spec: {terminationGracePeriodSeconds: 0,
        initContainers: [{name: "istio-validation", image: $img, imagePullPolicy: "Never",
          command: ["/bin/sh", "-c",
            "nc -l -p 15001 -e echo captured & sleep 0.5; r=$(nc -w 3 10.243.0.1 9); echo \"first connection: ${r:-refused}\"; [ \"$r\" = captured ]"]}],
        containers: [
          {name: "app", image: $img, imagePullPolicy: "Never", command: ["sleep", "3600"]},
          {name: "istio-proxy", image: $img, imagePullPolicy: "Never",
           command: ["/bin/sh", "-c", "exec sleep 3600", "pilot-agent"],
           args: ["proxy", "sidecar", "--domain", "default.svc.cluster.local", "--proxyLogLevel=warning"],
           securityContext: {runAsUser: 1337, runAsGroup: 1337}}]}}'
}

test_helm_lint() {
    [ -x "$HELM" ] || fail "helm missing at $HELM (scripts/setup.sh builds it)"
    "$HELM" lint --strict "$REPO/deploy/helm/meshcni" || fail "helm lint (defaults)"
    "$HELM" lint --strict "$REPO/deploy/helm/meshcni" --set ambient.enabled=true --set ambient.redirectMode=iptables ||
        fail "helm lint (ambient, iptables)"
}

test_helm_install_defaults() {
    [ -x "$HELM" ] || fail "helm missing at $HELM (scripts/setup.sh builds it)"
    cni_state >"$WORK/cni-before"
    helm_ install meshcni "$REPO/deploy/helm/meshcni" -n kube-system || fail "helm install"
    k -n kube-system rollout status ds/meshcni-node --timeout=180s ||
        { k -n kube-system describe pods -l k8s-app=meshcni-node | tail -30; k -n kube-system logs -l k8s-app=meshcni-node --tail=30; fail "DaemonSet not Ready"; }
    k -n kube-system get ds meshcni-node -o wide
    local cl
    cl="$(conflist_host)"
    for ((i = 0; i < 30; i++)); do jq -e '[.plugins[].type] | index("meshcni")' "$cl" >/dev/null && break; sleep 1; done
    echo "conflist: $(jq -c '[.cniVersion, [.plugins[].type]]' "$cl")"
    jq -e '.plugins[-1].type == "meshcni"' "$cl" >/dev/null || fail "meshcni not merged last into $cl"
    [ -x "$NODE_DIR/fs/opt-cni-bin/meshcni" ] || fail "no /opt/cni/bin/meshcni on the node"
}

test_injected_pod_captured_from_first_packet() {
    injected_pod_json injected | k apply -f - || fail "create injected pod"
    wait_running injected 120 || { k describe pod injected | tail -20; k logs injected -c istio-validation; fail "injected pod not Ready"; }
    k logs injected -c istio-validation
    # Only the probe's own line: nc's stderr ("can't connect ...") may come after it in the log.
    [ "$(k logs injected -c istio-validation | grep '^first connection:' | tail -n 1)" = "first connection: captured" ] || fail "first connection not captured"
    # Control: the same probe in a pod that was not injected is refused (not captured).
    injected_pod_json plain | jq 'del(.metadata.annotations."sidecar.istio.io/status")' | k apply -f - || fail "create plain pod"
    local i
    for ((i = 0; i < 60; i++)); do
        k logs plain -c istio-validation 2>/dev/null | grep -q "first connection" && break
        sleep 1
    done
    echo "control pod: $(k logs plain -c istio-validation 2>/dev/null)"
    [ "$(k logs plain -c istio-validation 2>/dev/null | grep '^first connection:' | tail -n 1)" = "first connection: refused" ] || fail "control pod's connection was not refused"
    k delete pod injected plain --wait=true --timeout=60s
}

# helm upgrade to a new image tag: during the rollout, injected pods keep being created; every
# one must start captured (its first connection lands on 15001). Also measured: the longest
# time the node's conflist was without meshcni (polled every 100 ms).
test_helm_upgrade_no_pod_starts_uncaptured() {
    local ref newref cl i n=0 bad=0
    ref="$("$HERE/build-image.sh" --print-ref)" || fail "build-image.sh --print-ref"
    newref="${ref%:*}:e2e-upgrade"
    innode ctr -n k8s.io images tag --force "$ref" "$newref" >/dev/null || fail "tag $ref as $newref"
    cl="$(conflist_host)"
    # conflist watcher: one line per poll, "<time> 1|0" (meshcni present or not).
    (while :; do
        if jq -e '[.plugins[].type] | index("meshcni")' "$cl" >/dev/null 2>&1; then echo "$(date +%s.%N) 1"; else echo "$(date +%s.%N) 0"; fi
        sleep 0.1
    done) >"$WORK/conflist-watch" &
    local watcher=$!
    helm_ upgrade meshcni "$REPO/deploy/helm/meshcni" -n kube-system --reuse-values --set tag=e2e-upgrade >/dev/null ||
        { kill "$watcher"; fail "helm upgrade"; }
    # Pods during the rollout (until it is complete, then two more).
    local done_at=""
    for ((i = 0; i < 60; i++)); do
        injected_pod_json "up$i" | k apply -f - >/dev/null
        n=$((n + 1))
        if [ -z "$done_at" ] && k -n kube-system rollout status ds/meshcni-node --timeout=1s >/dev/null 2>&1; then
            done_at=$i
        fi
        [ -n "$done_at" ] && [ $i -ge $((done_at + 2)) ] && break
        sleep 1
    done
    kill "$watcher"
    [ -n "$done_at" ] || fail "rollout did not complete"
    k -n kube-system get pods -l k8s-app=meshcni-node -o jsonpath='{.items[*].spec.containers[0].image}{"\n"}'
    k -n kube-system get pods -l k8s-app=meshcni-node -o jsonpath='{.items[*].spec.containers[0].image}' | grep -q "$newref" ||
        fail "agent pod not on $newref after the rollout"
    local pods=()
    for ((i = 0; i < n; i++)); do pods+=("pod/up$i"); done
    k wait --for=condition=Ready "${pods[@]}" --timeout=120s >/dev/null 2>&1 || true
    for ((i = 0; i < n; i++)); do
        local r
        r="$(k logs "up$i" -c istio-validation 2>/dev/null | grep "^first connection:" | tail -n 1)"
        [ "$r" = "first connection: captured" ] || { bad=$((bad + 1)); echo "up$i: '${r:-no log}'"; }
    done
    echo "$n pods created during the upgrade: $((n - bad)) started captured, $bad not"
    awk 'BEGIN { w = 0; longest = 0 }
         $2 == 0 && !start { start = $1 } $2 == 1 && start { d = $1 - start; if (d > longest) longest = d; start = 0 }
         END { if (start) { print "conflist still without meshcni at the end"; exit 1 }
               printf "longest window with meshcni absent from the node conflist: %.1f ms (%d polls)\n", longest * 1000, NR }' \
        "$WORK/conflist-watch" || bad=$((bad + 1))
    for ((i = 0; i < n; i++)); do k delete pod "up$i" --wait=false >/dev/null 2>&1; done
    [ $bad = 0 ] || fail "$bad pod(s) started uncaptured during the upgrade (or the conflist lost meshcni)"
}

# Node readiness taint (issue 12 item 2): the node carries cni.istio.io/not-ready (put on here
# with kubectl taint, as kubelet --register-with-taints would at registration); an injected pod
# created now stays Pending (unschedulable). The chart's taint.enabled=true (RBAC get + patch on
# nodes, REMOVE_NODE_TAINT) and a restart of the agents: the agent removes the taint once it is
# ready; the pod is scheduled and starts captured; a taint of another key stays.
test_readiness_taint_removed_by_the_agent() {
    local node=mcni-k8s-node i
    k taint node "$node" cni.istio.io/not-ready=true:NoSchedule --overwrite >/dev/null || fail "taint the node"
    k taint node "$node" example.com/other=keep:PreferNoSchedule --overwrite >/dev/null || fail "second taint"
    injected_pod_json tainted | k apply -f - >/dev/null || fail "create pod"
    for ((i = 0; i < 30; i++)); do
        [ "$(k get pod tainted -o jsonpath='{.status.conditions[?(@.type=="PodScheduled")].reason}')" = Unschedulable ] && break
        sleep 1
    done
    [ "$(k get pod tainted -o jsonpath='{.status.phase}')" = Pending ] || fail "pod not Pending on the tainted node"
    echo "pod Pending: $(k get pod tainted -o jsonpath='{.status.conditions[0].message}')"
    helm_ upgrade meshcni "$REPO/deploy/helm/meshcni" -n kube-system --reuse-values --set taint.enabled=true >/dev/null ||
        fail "helm upgrade taint.enabled=true"
    k -n kube-system rollout restart ds/meshcni-node >/dev/null || fail "rollout restart"
    k -n kube-system rollout status ds/meshcni-node --timeout=180s >/dev/null || fail "rollout"
    for ((i = 0; i < 60; i++)); do
        k get node "$node" -o json | jq -e '[.spec.taints[]?.key] | index("cni.istio.io/not-ready") | not' >/dev/null && break
        sleep 1
    done
    echo "node taints now: $(k get node "$node" -o json | jq -c '[.spec.taints[]? | .key]')"
    k get node "$node" -o json | jq -e '[.spec.taints[]?.key] | index("cni.istio.io/not-ready") | not' >/dev/null ||
        { k -n kube-system logs -l k8s-app=meshcni-node --tail=20; fail "the agent did not remove the taint"; }
    k get node "$node" -o json | jq -e '[.spec.taints[]?.key] | index("example.com/other")' >/dev/null ||
        fail "the other taint was removed"
    k -n kube-system logs -l k8s-app=meshcni-node --tail=200 | grep -q "readiness taint removed" || fail "no log line of the removal"
    wait_running tainted 120 || { k describe pod tainted | tail -20; fail "pod did not start after the taint went"; }
    [ "$(k logs tainted -c istio-validation | grep '^first connection:' | tail -n 1)" = "first connection: captured" ] ||
        fail "pod started uncaptured"
    echo "pod scheduled after the taint went and started captured"
    k taint node "$node" example.com/other- >/dev/null
    k delete pod tainted --wait=false >/dev/null 2>&1
    helm_ upgrade meshcni "$REPO/deploy/helm/meshcni" -n kube-system --reuse-values --set taint.enabled=false >/dev/null ||
        fail "helm upgrade taint.enabled=false"
}

test_helm_uninstall_restores_cni_files() {
    helm_ uninstall meshcni -n kube-system --wait --timeout 300s || fail "helm uninstall"
    local i
    for ((i = 0; i < 60; i++)); do
        k -n kube-system get pods -l k8s-app=meshcni-node -o name 2>/dev/null | grep -q . || break
        sleep 1
    done
    cni_state >"$WORK/cni-after"
    diff "$WORK/cni-before" "$WORK/cni-after" || fail "the node's CNI files differ from before the install"
    echo "CNI files byte-identical to before the install:"
    cat "$WORK/cni-after"
}

# kubectl apply, then kubectl delete of the plain manifest (no Helm hook runs): new pods must
# still start afterwards, and the node's CNI files must be as before.
test_manifest_delete_new_pods_still_start() {
    local m="$REPO/deploy/manifests/meshcni.yaml"
    cni_state >"$WORK/cni-before-manifest"
    k apply -f "$m" >/dev/null || fail "kubectl apply -f $m"
    k -n kube-system rollout status ds/meshcni-node --timeout=180s || fail "DaemonSet not Ready"
    local cl i
    cl="$(conflist_host)"
    for ((i = 0; i < 30; i++)); do jq -e '[.plugins[].type] | index("meshcni")' "$cl" >/dev/null && break; sleep 1; done
    jq -e '[.plugins[].type] | index("meshcni")' "$cl" >/dev/null || fail "plugin not merged after kubectl apply"
    k delete -f "$m" --wait=true --timeout=120s >/dev/null || fail "kubectl delete -f $m"
    for ((i = 0; i < 60; i++)); do
        k -n kube-system get pods -l k8s-app=meshcni-node -o name 2>/dev/null | grep -q . || break
        sleep 1
    done
    echo "after delete, conflist: $(jq -c '[.plugins[].type]' "$cl")"
    pod_json afterdelete '{}' sleep 3600 | k apply -f - >/dev/null
    wait_running afterdelete 90 || { k describe pod afterdelete | tail -8; fail "a new pod does not start after kubectl delete -f"; }
    echo "a new pod started after the manifest was deleted"
    k delete pod afterdelete --wait=true --timeout=60s >/dev/null
    cni_state >"$WORK/cni-after-manifest"
    diff "$WORK/cni-before-manifest" "$WORK/cni-after-manifest" || fail "CNI files differ after kubectl delete -f"
}

# ---------------------------------------------------------------------------------------------
# Ambient (inpod mode) with the ztunnel stand-in deployed as a pod: a namespace labelled
# istio.io/dataplane-mode=ambient gets its RUNNING pods enrolled without a restart, and released
# when the label goes. The stand-in (crates/testkit src/bin/meshcni-ztunnel-standin.rs, image
# localhost/meshcni/ztunnel-standin:test) runs where Istio's chart puts ztunnel (istio-system,
# service account ztunnel, label app=ztunnel), connects to the agent's ZDS socket through the
# same hostPath (/var/run/ztunnel) and logs one JSON line per workload added/released and per
# connection its listeners (opened in the pod's netns through the fd the agent sent) accepted.
AMB_NS=mcni-amb

# ns_pod_json NS NAME ARGS...: a busybox pod in namespace NS running ARGS.
ns_pod_json() {
    local ns="$1"
    shift
    pod_json "$@" | jq --arg ns "$ns" '.metadata.namespace = $ns'
}

ztunnel_standin_json() {
    jq -n --arg img "$ZTUNNEL_STANDIN_IMAGE" '{
      apiVersion: "v1", kind: "Pod",
      metadata: {name: "ztunnel-standin", namespace: "istio-system",
                 labels: {app: "ztunnel", "sidecar.istio.io/inject": "false"},
                 annotations: {"ambient.istio.io/redirection": "disabled"}},
      spec: {serviceAccountName: "ztunnel", automountServiceAccountToken: false,
             terminationGracePeriodSeconds: 5,
             containers: [{name: "istio-proxy", image: $img, imagePullPolicy: "Never",
                           args: ["--uds", "/var/run/ztunnel/ztunnel.sock"],
                           securityContext: {privileged: true},
                           volumeMounts: [{name: "cni-ztunnel-sock-dir", mountPath: "/var/run/ztunnel"}]}],
             volumes: [{name: "cni-ztunnel-sock-dir",
                        hostPath: {path: "/var/run/ztunnel", type: "DirectoryOrCreate"}}]}}'
}

# zt_events [JQ_FILTER]: the stand-in's JSON record lines (kubectl logs), filtered.
zt_events() { k -n istio-system logs ztunnel-standin 2>/dev/null | jq -c "select(${1:-true})" 2>/dev/null; }
zt_has() { [ -n "$(zt_events "$1")" ]; }
pod_uid() { k -n "$1" get pod "$2" -o jsonpath='{.metadata.uid}'; }
# pod_identity NS NAME: uid, sandbox id, container ids and restart counts (must not change).
pod_identity() {
    local sb
    sb="$(innode crictl pods --namespace "$1" --name "^$2\$" --state ready -q)"
    echo "uid=$(pod_uid "$1" "$2") sandbox=$sb $(k -n "$1" get pod "$2" -o jsonpath='{range .status.containerStatuses[*]}{.name}={.containerID},restarts={.restartCount},started={.state.running.startedAt} {end}')"
}
# pod_rules NS NAME: the netfilter rules inside the pod's netns (iptables-nft, -legacy and nft).
pod_rules() {
    local sb pid
    sb="$(innode crictl pods --namespace "$1" --name "^$2\$" --state ready -q)"
    [ -n "$sb" ] || { echo "no ready sandbox for $1/$2"; return 1; }
    pid="$(innode crictl inspectp "$sb" | jq -r '.info.pid')"
    [ -n "$pid" ] && [ "$pid" != null ] || { echo "no pid for sandbox $sb"; return 1; }
    innode nsenter -t "$pid" -n iptables-legacy-save 2>/dev/null
    innode nsenter -t "$pid" -n iptables-nft-save 2>/dev/null
    innode nsenter -t "$pid" -n nft list ruleset 2>/dev/null
    return 0
}
has_inpod_rules() { pod_rules "$1" "$2" | grep -q -- '15001'; }
no_inpod_rules() { ! pod_rules "$1" "$2" | grep -q -- '15001'; }
zt_holds() { zt_has ".event == \"add\" and .uid == \"$1\""; }
zt_released() { zt_has ".event == \"del\" and .uid == \"$1\""; }

test_ambient_namespace_label_enrolls_running_pods() {
    [ -x "$HELM" ] || fail "helm missing at $HELM (scripts/setup.sh builds it)"
    local ids_before ids_labelled ids_after cu wu oip wip got hops
    # The ztunnel stand-in, as a pod (it retries the ZDS socket until the agent listens).
    k create namespace istio-system >/dev/null 2>&1
    k -n istio-system create serviceaccount ztunnel >/dev/null 2>&1
    ztunnel_standin_json | k apply -f - >/dev/null || fail "create the ztunnel stand-in pod"
    k -n istio-system wait --for=condition=Ready pod/ztunnel-standin --timeout=90s >/dev/null ||
        { k -n istio-system describe pod ztunnel-standin | tail -15; fail "ztunnel stand-in pod not Ready"; }
    # The chart with ambient on (redirectMode inpod, the default), on whatever is installed.
    helm_ upgrade --install meshcni "$REPO/deploy/helm/meshcni" -n kube-system --reuse-values \
        --set ambient.enabled=true --set ambient.redirectMode=inpod >/dev/null || fail "helm upgrade --install with ambient.enabled=true"
    # The agent reports Ready in inpod mode only once a ztunnel is connected to its ZDS socket.
    k -n kube-system rollout status ds/meshcni-node --timeout=180s ||
        { k -n kube-system logs -l k8s-app=meshcni-node --tail=30; fail "DaemonSet not Ready with ambient (inpod)"; }
    wait_until 60 zt_has '.event == "snapshot_complete"' ||
        { k -n istio-system logs ztunnel-standin | tail; k -n kube-system logs -l k8s-app=meshcni-node --tail=30;
          fail "the ztunnel stand-in did not connect to the agent's ZDS socket (no snapshot within 60s)"; }
    echo "ztunnel stand-in connected over ZDS: $(zt_events '.event == "connected"' | tail -n 1)"

    # Ordinary pods, running before the namespace is labelled; a server outside the mesh.
    k create namespace "$AMB_NS" >/dev/null || fail "create namespace $AMB_NS"
    ns_pod_json "$AMB_NS" client '{}' sleep 3600 | k apply -f - >/dev/null || fail "create $AMB_NS/client"
    ns_pod_json "$AMB_NS" web '{}' nc -ll -p 8080 -e hostname | k apply -f - >/dev/null || fail "create $AMB_NS/web"
    pod_json outside '{}' nc -ll -p 8080 -e hostname | k apply -f - >/dev/null || fail "create default/outside"
    { k -n "$AMB_NS" wait --for=condition=Ready pod/client pod/web --timeout=90s >/dev/null && wait_running outside >/dev/null; } ||
        fail "test pods not Ready"
    cu="$(pod_uid "$AMB_NS" client)" wu="$(pod_uid "$AMB_NS" web)"
    oip="$(pod_ip outside)" wip="$(k -n "$AMB_NS" get pod web -o jsonpath='{.status.podIP}')"
    ids_before="$(pod_identity "$AMB_NS" client; pod_identity "$AMB_NS" web)"
    echo "before the label:"; sed 's/^/  /' <<<"$ids_before"
    zt_holds "$cu" && fail "the stand-in holds $AMB_NS/client before its namespace is labelled"
    has_inpod_rules "$AMB_NS" client && fail "$AMB_NS/client has in-pod rules before its namespace is labelled"
    got="$(k -n "$AMB_NS" exec client -- nc -w 5 "$oip" 8080)" || fail "client -> outside $oip:8080 failed before the label"
    [ "$got" = outside ] || fail "client -> outside before the label: got '$got'"
    zt_has '.event == "hop"' && fail "the stand-in captured a connection before any pod was enrolled: $(zt_events '.event == "hop"')"

    # Label: both running pods are enrolled in place.
    k label namespace "$AMB_NS" istio.io/dataplane-mode=ambient >/dev/null || fail "label namespace $AMB_NS"
    wait_until 60 zt_holds "$cu" || { k -n kube-system logs -l k8s-app=meshcni-node --tail=30; fail "$AMB_NS/client ($cu) not sent to ztunnel within 60s of the label"; }
    wait_until 30 zt_holds "$wu" || fail "$AMB_NS/web ($wu) not sent to ztunnel within 30s of the label"
    echo "stand-in holds: $(zt_events ".event == \"add\" and (.uid == \"$cu\" or .uid == \"$wu\")" | jq -c '{name, namespace, netns, listening}' | tr '\n' ' ')"
    wait_until 30 has_inpod_rules "$AMB_NS" client || { pod_rules "$AMB_NS" client; fail "no in-pod redirection (15001) in $AMB_NS/client's netns after the label"; }
    has_inpod_rules "$AMB_NS" web || fail "no in-pod redirection (15001) in $AMB_NS/web's netns after the label"
    echo "in-pod rules in client's netns: $(pod_rules "$AMB_NS" client | grep -c -- 15001) line(s) naming 15001"
    # Outbound from an enrolled pod lands on the stand-in's 15001 inside that pod's netns.
    got="$(k -n "$AMB_NS" exec client -- nc -w 5 "$oip" 8080)" || fail "client -> outside $oip:8080 failed while enrolled"
    [ "$got" = outside ] || fail "client -> outside while enrolled: got '$got'"
    wait_until 10 zt_has ".event == \"hop\" and .uid == \"$cu\" and .port == 15001 and .original_dst == \"$oip:8080\"" ||
        { zt_events '.event == "hop"'; fail "client's connection to $oip:8080 was not captured by the stand-in's 15001"; }
    echo "captured outbound: $(zt_events ".event == \"hop\" and .uid == \"$cu\"" | tail -n 1)"
    # Inbound to an enrolled pod lands on 15006.
    got="$(k exec outside -- nc -w 5 "$wip" 8080)" || fail "outside -> web $wip:8080 failed while enrolled"
    [ "$got" = web ] || fail "outside -> web while enrolled: got '$got'"
    wait_until 10 zt_has ".event == \"hop\" and .uid == \"$wu\" and .port == 15006 and .original_dst == \"$wip:8080\"" ||
        { zt_events '.event == "hop"'; fail "outside's connection to web $wip:8080 was not captured by the stand-in's 15006"; }
    echo "captured inbound: $(zt_events ".event == \"hop\" and .uid == \"$wu\"" | tail -n 1)"
    ids_labelled="$(pod_identity "$AMB_NS" client; pod_identity "$AMB_NS" web)"
    [ "$ids_labelled" = "$ids_before" ] || { echo "now:"; echo "$ids_labelled"; fail "pods changed (restarted or recreated) by the enrollment"; }
    echo "no restart: pod UIDs, sandboxes, container IDs and start times unchanged, restarts 0"

    # Unlabel: released, traffic direct again, still no restart.
    k label namespace "$AMB_NS" istio.io/dataplane-mode- >/dev/null || fail "unlabel namespace $AMB_NS"
    wait_until 60 zt_released "$cu" || fail "$AMB_NS/client ($cu) not released (DelWorkload) within 60s of the unlabel"
    wait_until 30 zt_released "$wu" || fail "$AMB_NS/web ($wu) not released within 30s of the unlabel"
    wait_until 30 no_inpod_rules "$AMB_NS" client || { pod_rules "$AMB_NS" client; fail "in-pod rules left in $AMB_NS/client's netns after the unlabel"; }
    no_inpod_rules "$AMB_NS" web || { pod_rules "$AMB_NS" web; fail "in-pod rules left in $AMB_NS/web's netns after the unlabel"; }
    echo "released: $(zt_events '.event == "del"' | tr '\n' ' ')"
    hops="$(zt_events '.event == "hop"' | wc -l)"
    got="$(k -n "$AMB_NS" exec client -- nc -w 5 "$oip" 8080)" || fail "client -> outside failed after the release"
    [ "$got" = outside ] || fail "client -> outside after the release: got '$got'"
    got="$(k exec outside -- nc -w 5 "$wip" 8080)" || fail "outside -> web failed after the release"
    [ "$got" = web ] || fail "outside -> web after the release: got '$got'"
    sleep 1
    [ "$(zt_events '.event == "hop"' | wc -l)" = "$hops" ] ||
        fail "connections were still captured after the release: $(zt_events '.event == "hop"' | tail -n 2)"
    echo "after the release both connections went direct (no new stand-in hop)"
    ids_after="$(pod_identity "$AMB_NS" client; pod_identity "$AMB_NS" web)"
    [ "$ids_after" = "$ids_before" ] || { echo "now:"; echo "$ids_after"; fail "pods changed (restarted or recreated) by the release"; }
    echo "still no restart after the release"
    zt_has '.event == "protocol_error"' && fail "ZDS protocol errors: $(zt_events '.event == "protocol_error"')"

    k delete namespace "$AMB_NS" --wait=true --timeout=60s >/dev/null
    k delete pod outside --wait=true --timeout=60s >/dev/null
    k -n istio-system delete pod ztunnel-standin --wait=true --timeout=60s >/dev/null
}

# Ambient on -> off (`helm upgrade --set ambient.enabled=false`): the new agent pod must become
# Ready. Regression: with ambient off the agent pod used to leave the node's network, so it needed
# a pod sandbox, while the old plugin entry (ambient_enabled) was still in the conflist and the
# plugin's STATUS failed without the agent's socket: once the kubelet saw NetworkReady=false the
# new agent could never start (failed 2 of 4 runs). The agent is now always hostNetwork.
test_ambient_off_agent_comes_back() {
    [ -x "$HELM" ] || fail "helm missing at $HELM (scripts/setup.sh builds it)"
    helm_ upgrade meshcni "$REPO/deploy/helm/meshcni" -n kube-system --reuse-values --set ambient.enabled=false >/dev/null ||
        fail "helm upgrade to ambient.enabled=false"
    k -n kube-system rollout status ds/meshcni-node --timeout=120s || {
        k -n kube-system get pods -l k8s-app=meshcni-node -o wide
        echo "node Ready condition: $(node_ready_message)"
        echo "conflist's meshcni entry: $(jq -c '.plugins[] | select(.type == "meshcni") | {ambient_enabled}' "$(conflist_host)")"
        fail "DaemonSet not Ready after turning ambient off (the new agent pod cannot start)"
    }
}

# ---------------------------------------------------------------------------------------------
main() {
    echo "cluster-e2e: building/checking node binaries"
    "$HERE/k8s-build.sh" >"$WORK/build.log" 2>&1 || { cat "$WORK/build.log"; echo "0 passed, 1 failed"; exit 1; }
    local imgs
    imgs="$(images)" || { echo "cluster-e2e: building test images failed"; echo "0 passed, 1 failed"; exit 1; }
    local t
    t=$(date +%s)
    if ! MCNI_K8S_IMAGES="$imgs" MCNI_K8S_SANDBOX_IMAGE="$PAUSE_IMAGE" "$HERE/k8s-node.sh" up "$NODE_DIR" >"$WORK/up.env" 2>"$WORK/up.log"; then
        cat "$WORK/up.log"
        echo "0 passed, 1 failed"
        exit 1
    fi
    grep -E '^\S+: \[|node up' "$WORK/up.log" | sed 's/^/cluster-e2e: /'
    echo "cluster-e2e: node up in $(($(date +%s) - t))s"

    run_test node_ready
    run_test pod_gets_bridge_ip_and_tcp_works
    run_test cni_status_and_gc_reach_meshcni
    run_test helm_lint
    run_test helm_install_defaults
    run_test injected_pod_captured_from_first_packet
    run_test helm_upgrade_no_pod_starts_uncaptured
    run_test readiness_taint_removed_by_the_agent
    run_test ambient_namespace_label_enrolls_running_pods
    run_test ambient_off_agent_comes_back
    run_test helm_uninstall_restores_cni_files
    # The agent asks at SIGTERM whether its DaemonSet (DAEMONSET_NAME) still exists and removes
    # the plugin when it is gone or its service account is refused (crates/agent/src/owner_check.rs).
    run_test manifest_delete_new_pods_still_start

    echo "cluster-e2e: total $(($(date +%s) - T0))s"
    [ $FAILED = 0 ] || echo "failed: ${FAILED_NAMES[*]}"
    echo "$PASSED passed, $FAILED failed"
    [ $FAILED = 0 ]
}
main
