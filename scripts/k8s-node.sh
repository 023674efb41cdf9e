#!/usr/bin/env bash
# k8s-node.sh: a real single-node Kubernetes (etcd, kube-apiserver, kube-controller-manager,
# kube-scheduler, containerd 2.x + runc, kubelet, kube-proxy; reference CNI plugins as the
# primary CNI) inside a network namespace and a private mount namespace this script creates.
# The host's network, /etc/cni, /opt/cni, /var/lib/kubelet, /run/containerd ... are never
# touched: inside the private mount namespace those paths are bind mounts of a scratch dir.
#
#   scripts/k8s-node.sh up [DIR]      start the node; DIR (default /var/tmp/mcni-k8s-<pid>) holds
#                                    everything; prints `export MCNI_K8S_DIR=DIR` on stdout
#   scripts/k8s-node.sh down [DIR]    stop every process of the node, remove its cgroups, netns, DIR
#   scripts/k8s-node.sh env [DIR]     print the node's variables (shell exports)
#   scripts/k8s-node.sh exec [DIR] -- CMD...   run CMD inside the node's namespaces with
#                                    KUBECONFIG=admin and the node binaries first on PATH
#                                    (kubectl, crictl, ctr, helm ...)
#   scripts/k8s-node.sh import [DIR] -- ARCHIVE...   ctr -n k8s.io images import each archive
#
# DIR may also come from $MCNI_K8S_DIR. Binaries come from scripts/k8s-build.sh (built once per
# machine). `up` removes everything it made when any step fails (its logs are printed first).
#
# Layout of the node netns (names unique per DIR):
#   netns  mcni-k8s-<id>;  node IP 10.243.0.1/32 on lo (apiserver advertise address, kubelet
#   node IP); a blackhole default route (nothing leaves the netns; there is no link out of it);
#   10.96.0.0/24 (services) routed to lo, so kube-proxy's OUTPUT DNAT applies to the node's
#   own connections; pods 10.244.0.0/24 on bridge mcni-cni0;
#   services 10.96.0.0/24 (kube-proxy, iptables mode, in the netns only).
# Kernel tunables: kubelet runs with protectKernelDefaults=true (it never writes the host's
# vm./kernel. sysctls, which are not per netns); the values it checks are bind-mounted read-only
# over /proc/sys/... inside the private mount namespace only.
# cgroups (v1 here, kubelet failCgroupV1=false, cgroupfs driver): every pod lives under
# /mcni-k8s-<id> in each hierarchy, removed at `down`.
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"
NODE_NAME=mcni-k8s-node
NODE_IP=10.243.0.1
POD_CIDR=10.244.0.0/24
SVC_CIDR=10.96.0.0/24
SVC_APISERVER_IP=10.96.0.1
SANDBOX_IMAGE="${MCNI_K8S_SANDBOX_IMAGE:-localhost/meshcni/pause:1.0}"

log() { echo "k8s-node: $*" >&2; }
die() { echo "k8s-node.sh: $*" >&2; exit 1; }

eval "$("$HERE/k8s-build.sh" --print-dirs | sed 's/^\([a-z]*\)=/BIN_\1=/')"
NODE_PATH="$BIN_kubernetes:$BIN_etcd:$BIN_containerd:$BIN_crictl:$BIN_cnigc:/opt/meshcni/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

cmd="${1:-}"
[ -n "$cmd" ] || { sed -n '2,30p' "$0"; exit 2; }
shift
DIR="${MCNI_K8S_DIR:-}"
if [ $# -gt 0 ] && [ "$1" != -- ]; then DIR="$1"; shift; fi
[ "${1:-}" = -- ] && shift

load_state() {
    [ -n "$DIR" ] || die "no node dir: pass DIR or set MCNI_K8S_DIR"
    [ -f "$DIR/state" ] || die "$DIR/state missing: no node started there"
    # shellcheck disable=SC1091
    . "$DIR/state"
}

# in_node CMD...: run CMD in the node's mount + network namespaces.
in_node() {
    nsenter -t "$HOLDER" -m -n -- env PATH="$NODE_PATH" KUBECONFIG="$DIR/pki/admin.kubeconfig" \
        CONTAINER_RUNTIME_ENDPOINT=unix:///run/containerd/containerd.sock \
        IMAGE_SERVICE_ENDPOINT=unix:///run/containerd/containerd.sock CRI_CONFIG_FILE="$DIR/conf/crictl.yaml" "$@"
}

# start NAME CMD...: start a daemon in the node, log to $DIR/log/NAME.log, remember its pid.
start() {
    local name="$1"
    shift
    setsid nsenter -t "$HOLDER" -m -n -- env PATH="$NODE_PATH" "$@" >"$DIR/log/$name.log" 2>&1 </dev/null &
    echo "$!" >"$DIR/pid/$name"
    echo "PID_${name//-/_}=$!" >>"$DIR/state"
}

alive() { kill -0 "$(cat "$DIR/pid/$1")" 2>/dev/null; }

# wait_for WHAT SECONDS DAEMON CMD...: poll CMD until it succeeds; fail early if DAEMON died.
wait_for() {
    local what="$1" secs="$2" daemon="$3" i
    shift 3
    for ((i = 0; i < secs * 5; i++)); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        if [ -n "$daemon" ] && ! alive "$daemon"; then
            log "$daemon exited while waiting for $what; its log:"
            tail -n 40 "$DIR/log/$daemon.log" >&2
            return 1
        fi
        sleep 0.2
    done
    log "timed out after ${secs}s waiting for $what"
    [ -n "$daemon" ] && tail -n 40 "$DIR/log/$daemon.log" >&2
    return 1
}

# ---------------------------------------------------------------------------------------------
gen_pki() {
    local p="$DIR/pki"
    mkdir -p "$p"
    openssl ecparam -name prime256v1 -genkey -noout -out "$p/ca.key" 2>/dev/null
    openssl req -x509 -new -key "$p/ca.key" -subj "/CN=mcni-k8s-ca" -days 2 -out "$p/ca.crt" 2>/dev/null
    # cert NAME SUBJECT EXT: key + cert signed by the CA.
    cert() {
        local name="$1" subj="$2" ext="$3"
        openssl ecparam -name prime256v1 -genkey -noout -out "$p/$name.key" 2>/dev/null
        openssl req -new -key "$p/$name.key" -subj "$subj" -out "$p/$name.csr" 2>/dev/null
        printf '%s\n' "$ext" >"$p/$name.ext"
        openssl x509 -req -in "$p/$name.csr" -CA "$p/ca.crt" -CAkey "$p/ca.key" -CAcreateserial \
            -days 2 -extfile "$p/$name.ext" -out "$p/$name.crt" 2>/dev/null
        rm -f "$p/$name.csr" "$p/$name.ext"
    }
    local client="keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=clientAuth"
    local server="keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth"
    cert apiserver "/CN=kube-apiserver" "$server
subjectAltName=DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local,DNS:localhost,DNS:$NODE_NAME,IP:$SVC_APISERVER_IP,IP:$NODE_IP,IP:127.0.0.1"
    cert kubelet-serving "/CN=$NODE_NAME" "$server
subjectAltName=DNS:$NODE_NAME,IP:$NODE_IP"
    cert apiserver-kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client" "$client"
    cert admin "/O=system:masters/CN=mcni-k8s-admin" "$client"
    cert controller-manager "/CN=system:kube-controller-manager" "$client"
    cert scheduler "/CN=system:kube-scheduler" "$client"
    cert kubelet "/O=system:nodes/CN=system:node:$NODE_NAME" "$client"
    cert kube-proxy "/CN=system:kube-proxy" "$client"
    openssl ecparam -name prime256v1 -genkey -noout -out "$p/sa.key" 2>/dev/null
    openssl ec -in "$p/sa.key" -pubout -out "$p/sa.pub" 2>/dev/null
    local n
    for n in admin controller-manager scheduler kubelet kube-proxy; do
        cat >"$p/$n.kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: mcni-k8s
  cluster:
    certificate-authority: $p/ca.crt
    server: https://$NODE_IP:6443
users:
- name: $n
  user:
    client-certificate: $p/$n.crt
    client-key: $p/$n.key
contexts:
- name: $n@mcni-k8s
  context: {cluster: mcni-k8s, user: $n}
current-context: $n@mcni-k8s
EOF
    done
}

write_configs() {
    local c="$DIR/conf"
    # CAP_SYS_RESOURCE is bit 24 of the bounding set.
    local bnd RESTRICT_OOM=false
    bnd="$(awk '/^CapBnd:/ {print $2}' /proc/self/status)"
    (( (16#$bnd >> 24) & 1 )) || RESTRICT_OOM=true
    mkdir -p "$c"
    # containerd 2.x, config version 3. Paths are the standard ones: inside the node's mount
    # namespace they are bind mounts of $DIR/fs/*.
    cat >"$c/containerd.toml" <<EOF
version = 3
root = "/var/lib/containerd"
state = "/run/containerd"
[grpc]
  address = "/run/containerd/containerd.sock"
[plugins."io.containerd.cri.v1.images"]
  snapshotter = "overlayfs"
  [plugins."io.containerd.cri.v1.images".pinned_images]
    sandbox = "$SANDBOX_IMAGE"
[plugins."io.containerd.cri.v1.runtime"]
  enable_selinux = false
  # This machine's capability bounding set lacks CAP_SYS_RESOURCE, so no process may lower an
  # oom_score_adj (runc's nsexec fails "failed to update /proc/self/oom_score_adj: Permission
  # denied" for the sandbox's -998): clamp to containerd's own value, containerd's option for
  # exactly that case (rootless/nested runtimes).
  restrict_oom_score_adj = $RESTRICT_OOM
  [plugins."io.containerd.cri.v1.runtime".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc.options]
        BinaryName = "$(command -v runc)"
        SystemdCgroup = false
  [plugins."io.containerd.cri.v1.runtime".cni]
    bin_dirs = ["/opt/cni/bin"]
    conf_dir = "/etc/cni/net.d"
    max_conf_num = 1
EOF
    cat >"$c/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $DIR/pki/ca.crt}
authorization: {mode: Webhook}
tlsCertFile: $DIR/pki/kubelet-serving.crt
tlsPrivateKeyFile: $DIR/pki/kubelet-serving.key
containerRuntimeEndpoint: unix:///run/containerd/containerd.sock
cgroupDriver: cgroupfs
cgroupRoot: /$ID
failCgroupV1: false
failSwapOn: false
protectKernelDefaults: true
clusterDomain: cluster.local
resolvConf: $DIR/conf/resolv.conf
healthzBindAddress: 127.0.0.1
healthzPort: 10248
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {memory.available: "100Mi", nodefs.available: "1%", imagefs.available: "1%", nodefs.inodesFree: "1%"}
serializeImagePulls: false
maxPods: 250
EOF
    : >"$c/resolv.conf"
    printf 'runtime-endpoint: unix:///run/containerd/containerd.sock\nimage-endpoint: unix:///run/containerd/containerd.sock\ntimeout: 30\n' >"$c/crictl.yaml"
    cat >"$c/kube-proxy.yaml" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {kubeconfig: $DIR/pki/kube-proxy.kubeconfig}
hostnameOverride: $NODE_NAME
mode: iptables
clusterCIDR: $POD_CIDR
bindAddress: $NODE_IP
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
conntrack: {maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}
EOF
    # The primary CNI: reference plugins v1.10 at cniVersion 1.1.0.
    cat >"$DIR/fs/etc-cni-net.d/10-mcni-bridge.conflist" <<EOF
{
  "cniVersion": "1.1.0",
  "name": "mcni-k8s-pods",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "mcni-cni0",
      "isGateway": true,
      "ipMasq": true,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "ranges": [[{"subnet": "$POD_CIDR"}]],
        "routes": [{"dst": "0.0.0.0/0"}]
      }
    },
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
EOF
}

# The mount layout inside the node's private mount namespace.
# /run (= /var/run) is a fresh tmpfs: /run/containerd, /run/netns (pod netns), /run/meshcni,
# /run/ztunnel, /run/xtables.lock of the node are its own.
BINDS=(etc-cni-net.d:/etc/cni/net.d opt-cni-bin:/opt/cni/bin var-lib-cni:/var/lib/cni
       var-lib-kubelet:/var/lib/kubelet var-lib-containerd:/var/lib/containerd
       var-log-pods:/var/log/pods var-log-containers:/var/log/containers
       etc-kubernetes:/etc/kubernetes etc-ambient-config:/etc/ambient-config)
KERNEL_TUNABLES=(vm/overcommit_memory=1 vm/panic_on_oom=0 kernel/panic=10 kernel/panic_on_oops=1)

setup_namespaces() {
    ip netns add "$ID"
    NETNS=$ID
    echo "NETNS=$ID" >>"$DIR/state"
    # The holder: the process whose namespaces every daemon enters. A private mount namespace
    # (nothing propagates to or from the host) joined to the node netns.
    setsid unshare -m --propagation private -- nsenter --net="/run/netns/$ID" -- sleep infinity \
        </dev/null >/dev/null 2>&1 &
    HOLDER=$!
    echo "HOLDER=$HOLDER" >>"$DIR/state"
    local i want
    want="$(stat -L -c %i "/run/netns/$ID")"
    for ((i = 0; i < 50; i++)); do
        [ "$(stat -L -c %i "/proc/$HOLDER/ns/net" 2>/dev/null)" = "$want" ] && break
        sleep 0.1
    done
    [ "$(stat -L -c %i "/proc/$HOLDER/ns/net" 2>/dev/null)" = "$want" ] ||
        die "namespace holder $HOLDER did not join netns $ID"
    MNTNS="$(readlink "/proc/$HOLDER/ns/mnt")"
    [ "$MNTNS" != "$(readlink /proc/self/ns/mnt)" ] ||
        die "namespace holder $HOLDER shares the host mount namespace"
    echo "MNTNS=$MNTNS" >>"$DIR/state"
    local n="nsenter -t $HOLDER -m -n --"
    # sysfs of the node netns (so /sys/class/net shows the node's links), then the cgroup
    # hierarchies again on top of it (same hierarchies as the host's: pods go under /$ID).
    $n mount -t sysfs sysfs /sys
    $n mount -t tmpfs -o mode=755 cgroup-root /sys/fs/cgroup
    local line dev mp fstype opts
    while read -r dev mp fstype opts _; do
        case "$fstype" in
            cgroup)
                local o keep=() x
                IFS=, read -ra o <<<"$opts"
                for x in "${o[@]}"; do
                    case "$x" in rw | ro | relatime | nosuid | nodev | noexec) ;; *) keep+=("$x") ;; esac
                done
                $n mkdir -p "$mp"
                $n mount -t cgroup -o "$(IFS=,; echo "${keep[*]}")" cgroup "$mp" ;;
            cgroup2)
                $n mkdir -p "$mp"
                $n mount -t cgroup2 cgroup2 "$mp" ;;
        esac
    done < <(awk '$2 ~ "^/sys/fs/cgroup/" {print}' /proc/self/mounts)
    # Mounts of the host's under /run (its /run/netns and netns files, ...) were copied into this
    # namespace; under the node's /run tmpfs they would stay hidden but listed in mountinfo, and
    # mount lookups by path (containerd's propagation check of a hostPath volume on /run/netns)
    # pick the hidden copy. Detach them here, in the private namespace only (deepest first).
    local m
    for m in $(awk '$5 ~ "^/run/" {print $5}' "/proc/$HOLDER/mountinfo" | sort -r); do
        $n umount -l "$m" 2>/dev/null || true
    done
    # Every mount shared inside the node's own mount namespace (new peer groups of its own:
    # nothing reaches the host, whose mounts stay private to it), as on a systemd host: containerd
    # refuses a hostPath with mountPropagation HostToContainer (the chart's /var/run/netns with
    # ambient on) whose mount is private, and it also looks at mounts hidden under /run's tmpfs
    # (the host's /run/netns bind mount, copied into this namespace).
    $n mount --make-rshared /
    $n mount -t tmpfs -o mode=755 mcni-k8s-run /run
    local b src dst
    for b in "${BINDS[@]}"; do
        src="$DIR/fs/${b%%:*}" dst="${b#*:}"
        mkdir -p "$src"
        $n mkdir -p "$dst"
        $n mount --bind "$src" "$dst"
    done
    # kubelet checks these (protectKernelDefaults): the node sees the values it expects, the
    # host's are unchanged.
    local t f
    for t in "${KERNEL_TUNABLES[@]}"; do
        f="$DIR/fs/sysctl-$(echo "${t%%=*}" | tr / .)"
        echo "${t#*=}" >"$f"
        $n mount --bind "$f" "/proc/sys/${t%%=*}"
        $n mount -o remount,bind,ro "/proc/sys/${t%%=*}"
    done
    $n ip link set lo up
    $n ip addr add "$NODE_IP/32" dev lo
    $n ip route add blackhole default
    # Service IPs: a route so that a connect() from the node netns gets past routing (a
    # blackholed destination fails with EINVAL before kube-proxy's OUTPUT DNAT can apply).
    $n ip route add "$SVC_CIDR" dev lo src "$NODE_IP"
    $n sysctl -qw net.ipv4.ip_forward=1
}

install_cni_plugins() {
    local p
    for p in bridge host-local loopback portmap; do
        install -m 0755 "$BIN_cni/$p" "$DIR/fs/opt-cni-bin/$p"
    done
}

node_up() {
    local t0 tstep
    t0=$(date +%s.%N)
    [ "$(id -u)" = 0 ] || die "run as root (network + mount namespaces, cgroups)"
    local c b
    for c in kubernetes etcd containerd crictl cni; do
        b="BIN_$c"
        [ -f "${!b}/.complete" ] || die "${!b} not built: run scripts/k8s-build.sh"
    done
    for b in runc ip unshare nsenter openssl iptables mount; do
        command -v "$b" >/dev/null || die "$b not found (scripts/setup.sh installs it)"
    done
    [ -n "$DIR" ] || DIR="/var/tmp/mcni-k8s-$$"
    [ ! -e "$DIR/state" ] || die "$DIR already holds a node (down it first)"
    mkdir -p "$DIR"/{log,pid,fs,conf,etcd}
    DIR="$(cd "$DIR" && pwd)"
    ID="mcni-k8s-$(printf '%s' "$DIR" | sha256sum | cut -c1-8)"
    printf 'DIR=%s\nID=%s\n' "$DIR" "$ID" >"$DIR/state"
    trap 'rc=$?; if [ $rc != 0 ]; then log "up failed (rc=$rc): tearing down"; node_down || true; fi' EXIT
    tstep=$(date +%s.%N)
    step() { local now; now=$(date +%s.%N); log "$(awk -v a="$now" -v b="$tstep" 'BEGIN{printf "[+%.1fs]", a-b}') $*"; tstep=$now; }
    local bd
    for bd in "${BINDS[@]}"; do mkdir -p "$DIR/fs/${bd%%:*}"; done
    gen_pki
    write_configs
    setup_namespaces
    install_cni_plugins
    step "pki, configs, netns $ID, mount namespace (holder $HOLDER)"

    start etcd etcd --name "$NODE_NAME" --data-dir "$DIR/etcd" \
        --listen-client-urls http://127.0.0.1:2379 --advertise-client-urls http://127.0.0.1:2379 \
        --listen-peer-urls http://127.0.0.1:2380 --initial-advertise-peer-urls http://127.0.0.1:2380 \
        --initial-cluster "$NODE_NAME=http://127.0.0.1:2380" --listen-metrics-urls http://127.0.0.1:2381 \
        --unsafe-no-fsync --log-level warn
    wait_for "etcd health" 60 etcd in_node curl -fsS http://127.0.0.1:2381/health
    step "etcd ready"

    local p="$DIR/pki"
    start kube-apiserver kube-apiserver --etcd-servers=http://127.0.0.1:2379 \
        --advertise-address="$NODE_IP" --bind-address=0.0.0.0 --secure-port=6443 \
        --service-cluster-ip-range="$SVC_CIDR" --allow-privileged=true \
        --client-ca-file="$p/ca.crt" --tls-cert-file="$p/apiserver.crt" --tls-private-key-file="$p/apiserver.key" \
        --kubelet-client-certificate="$p/apiserver-kubelet-client.crt" --kubelet-client-key="$p/apiserver-kubelet-client.key" \
        --kubelet-certificate-authority="$p/ca.crt" --kubelet-preferred-address-types=InternalIP \
        --service-account-issuer=https://kubernetes.default.svc.cluster.local \
        --service-account-key-file="$p/sa.pub" --service-account-signing-key-file="$p/sa.key" \
        --authorization-mode=Node,RBAC --enable-admission-plugins=NodeRestriction \
        --profiling=false --v=1
    wait_for "kube-apiserver /readyz" 120 kube-apiserver in_node kubectl get --raw /readyz
    step "kube-apiserver ready"

    start kube-controller-manager kube-controller-manager --kubeconfig="$p/controller-manager.kubeconfig" \
        --authentication-kubeconfig="$p/controller-manager.kubeconfig" --authorization-kubeconfig="$p/controller-manager.kubeconfig" \
        --bind-address=127.0.0.1 --leader-elect=false --use-service-account-credentials=true \
        --service-account-private-key-file="$p/sa.key" --root-ca-file="$p/ca.crt" \
        --cluster-signing-cert-file="$p/ca.crt" --cluster-signing-key-file="$p/ca.key" \
        --service-cluster-ip-range="$SVC_CIDR" --v=1
    start kube-scheduler kube-scheduler --kubeconfig="$p/scheduler.kubeconfig" \
        --authentication-kubeconfig="$p/scheduler.kubeconfig" --authorization-kubeconfig="$p/scheduler.kubeconfig" \
        --bind-address=127.0.0.1 --leader-elect=false --v=1
    start containerd containerd --config "$DIR/conf/containerd.toml" --log-level info
    wait_for "containerd" 60 containerd in_node ctr version
    step "containerd ready (controller-manager, scheduler started)"

    local img
    for img in "${MCNI_K8S_IMAGES[@]}"; do
        in_node ctr -n k8s.io images import "$img" >/dev/null ||
            die "importing $img into the node's containerd failed"
    done
    [ ${#MCNI_K8S_IMAGES[@]} -eq 0 ] || step "imported ${#MCNI_K8S_IMAGES[@]} image archive(s)"

    # kubelet's cgroupRoot must exist in every hierarchy (cpuset: with the root's cpus/mems).
    local h
    for h in /sys/fs/cgroup/*/; do
        [ -f "${h}cgroup.procs" ] && [ "$h" != /sys/fs/cgroup/unified/ ] || continue
        mkdir -p "$h$ID"
    done
    if [ -d "/sys/fs/cgroup/cpuset/$ID" ]; then
        cat /sys/fs/cgroup/cpuset/cpuset.cpus >"/sys/fs/cgroup/cpuset/$ID/cpuset.cpus"
        cat /sys/fs/cgroup/cpuset/cpuset.mems >"/sys/fs/cgroup/cpuset/$ID/cpuset.mems"
    fi
    start kubelet kubelet --config="$DIR/conf/kubelet.yaml" --kubeconfig="$p/kubelet.kubeconfig" \
        --hostname-override="$NODE_NAME" --node-ip="$NODE_IP" --v=1
    start kube-proxy kube-proxy --config="$DIR/conf/kube-proxy.yaml" --v=1
    wait_for "node $NODE_NAME Ready" 180 kubelet in_node kubectl wait --for=condition=Ready "node/$NODE_NAME" --timeout=1s
    wait_for "default service account" 60 kube-controller-manager in_node kubectl get serviceaccount default
    step "kubelet: node $NODE_NAME Ready"
    trap - EXIT
    log "$(awk -v a="$(date +%s.%N)" -v b="$t0" 'BEGIN{printf "node up in %.1fs", a-b}')"
    node_env
}

node_env() {
    cat <<EOF
export MCNI_K8S_DIR=$DIR
export MCNI_K8S_NETNS=$NETNS
export MCNI_K8S_HOLDER=$HOLDER
export MCNI_K8S_NODE=$NODE_NAME
export MCNI_K8S_NODE_IP=$NODE_IP
export MCNI_K8S_KUBECONFIG=$DIR/pki/admin.kubeconfig
EOF
}

# pids_of_node: every process in the node's mount namespace, its netns, or its cgroups.
pids_of_node() {
    local pid mnt net cg
    local netino=""
    [ -n "${NETNS:-}" ] && [ -e "/run/netns/$NETNS" ] && netino="$(stat -L -c %i "/run/netns/$NETNS")"
    for pid in /proc/[0-9]*; do
        pid="${pid#/proc/}"
        [ "$pid" = "$$" ] && continue
        mnt="$(readlink "/proc/$pid/ns/mnt" 2>/dev/null)" || continue
        if [ -n "${MNTNS:-}" ] && [ "$mnt" = "$MNTNS" ]; then echo "$pid"; continue; fi
        if [ -n "$netino" ]; then
            net="$(stat -L -c %i "/proc/$pid/ns/net" 2>/dev/null)" || continue
            [ "$net" = "$netino" ] && { echo "$pid"; continue; }
        fi
        if cg="$(grep -m1 ":/$ID/" "/proc/$pid/cgroup" 2>/dev/null)" && [ -n "$cg" ]; then echo "$pid"; fi
    done
    return 0
}

node_down() {
    [ -n "${DIR:-}" ] && [ -n "${ID:-}" ] || return 0
    log "down: $DIR ($ID)"
    # Pods first, through the runtime: CNI DEL runs for each sandbox.
    if [ -n "${HOLDER:-}" ] && kill -0 "$HOLDER" 2>/dev/null; then
        [ -f "$DIR/pid/kubelet" ] && kill "$(cat "$DIR/pid/kubelet")" 2>/dev/null || true
        if [ -f "$DIR/pid/containerd" ] && alive containerd; then
            timeout 60 nsenter -t "$HOLDER" -m -n -- env PATH="$NODE_PATH" \
                crictl --runtime-endpoint unix:///run/containerd/containerd.sock rmp -fa >/dev/null 2>&1 ||
                log "crictl rmp -fa failed (continuing)"
        fi
    fi
    local name
    for name in kube-proxy kubelet containerd kube-scheduler kube-controller-manager kube-apiserver etcd; do
        [ -f "$DIR/pid/$name" ] && kill "$(cat "$DIR/pid/$name")" 2>/dev/null || true
    done
    local i pids
    for ((i = 0; i < 50; i++)); do
        pids="$(pids_of_node | grep -vx "${HOLDER:-x}" || true)"
        [ -z "$pids" ] && break
        [ "$i" = 25 ] && kill -9 $pids 2>/dev/null
        [ "$i" -lt 25 ] && kill $pids 2>/dev/null
        sleep 0.2
    done
    [ -n "${HOLDER:-}" ] && kill "$HOLDER" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do
        pids="$(pids_of_node)"
        [ -z "$pids" ] && break
        kill -9 $pids 2>/dev/null || true
        sleep 0.2
    done
    [ -z "$pids" ] || log "processes of the node still alive: $pids"
    # cgroups: every hierarchy's /$ID subtree, deepest first.
    local h
    for h in /sys/fs/cgroup/*/; do
        [ -d "$h$ID" ] || continue
        find "$h$ID" -depth -type d -exec rmdir {} + 2>/dev/null || true
        [ -d "$h$ID" ] && log "cgroup $h$ID not removed"
    done
    [ -n "${NETNS:-}" ] && ip netns del "$NETNS" 2>/dev/null || true
    if [ "${MCNI_K8S_KEEP_DIR:-0}" = 1 ]; then
        rm -f "$DIR/state"
        log "kept $DIR (MCNI_K8S_KEEP_DIR=1)"
    else
        rm -rf "$DIR"
    fi
}

case "$cmd" in
    up)
        IFS=: read -ra MCNI_K8S_IMAGES <<<"${MCNI_K8S_IMAGES:-}"
        node_up ;;
    down) load_state; node_down ;;
    env) load_state; node_env ;;
    exec)
        load_state
        [ $# -gt 0 ] || die "exec: no command"
        in_node "$@" ;;
    import)
        load_state
        for a in "$@"; do in_node ctr -n k8s.io images import "$a" >/dev/null || die "import $a failed"; done ;;
    *) die "unknown command $cmd (up|down|env|exec|import)" ;;
esac
