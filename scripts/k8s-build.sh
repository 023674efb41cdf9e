#!/usr/bin/env bash
# k8s-build.sh: build (once per machine) the real components of the single-node Kubernetes
# that scripts/k8s-node.sh starts, from their Go modules, with the Go on this machine.
# Test infrastructure only: the product stays Rust.
#
#   scripts/k8s-build.sh [COMPONENT...]     default: all
#   scripts/k8s-build.sh --print-dirs      print NAME=DIR for each component's bin dir
#
# Components, versions and where their binaries are cached (outside the repo, keyed by version;
# a component whose dir holds a .complete stamp is not rebuilt; FORCE=1 rebuilds):
#   kubernetes  v1.34.4   $ROOT/kubernetes/v1.34.4/bin   kube-apiserver kube-controller-manager
#                                                       kube-scheduler kubelet kubectl kube-proxy
#               (scripts/k8s/kubernetes/go.mod: k8s.io/kubernetes replaces its staging modules
#               with local paths, so `go install ...@v1.34.4` is refused; that go.mod pins each
#               one to v0.34.4)
#   etcd        v3.6.16   $ROOT/etcd/v3.6.16/bin         etcd (scripts/k8s/etcd/go.mod, same
#               reason; v3.6 is the etcd line Kubernetes 1.34 ships with)
#   containerd  v2.2.9    $ROOT/containerd/v2.2.9/bin    containerd containerd-shim-runc-v2 ctr
#               Debian's containerd is 1.6: its go-cni never sends CNI STATUS. containerd 2.x's
#               CRI Status() calls go-cni Status() -> libcni GetStatusNetworkList (STATUS for
#               cniVersion >= 1.1.0) on every kubelet runtime-status poll. v2.2 is the line
#               released for Kubernetes 1.34 and builds with Go 1.25+ (go.mod: go 1.25.0);
#               2.3/2.4 need Go 1.26.6+/1.26.8 exactly and bring nothing this node needs.
#               runc stays Debian's (1.1.5), which containerd 2.2 accepts.
#   crictl      v1.34.0   $ROOT/cri-tools/v1.34.0/bin    crictl (sigs.k8s.io/cri-tools)
#   cni         v1.10.0   $ROOT/cni-plugins/v1.10.0/bin  bridge host-local loopback portmap
#               (github.com/containernetworking/plugins; the node's primary CNI)
#   cnigc       <hash>    $ROOT/cnigc/<hash>/bin         cnigc (scripts/k8s/cnigc: libcni v1.3.0, the
#               release containerd 2.2 links, driving GC, which no containerd release calls, and
#               STATUS; keyed by a hash of its source)
#
# ROOT is $MESHCNI_K8S_ROOT (default /opt/meshcni). The Go module cache and build cache are
# Go's own (GOMODCACHE, GOCACHE). Builds run under `nice`; each prints its wall time.
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="${MESHCNI_K8S_ROOT:-/opt/meshcni}"
GO="${GO:-/usr/local/go/bin/go}"
[ -x "$GO" ] || GO="$(command -v go || true)"

K8S_VERSION=v1.34.4
ETCD_VERSION=v3.6.16
CONTAINERD_VERSION=v2.2.9
CRICTL_VERSION=v1.34.0
CNI_PLUGINS_VERSION=v1.10.0
CNIGC_KEY="$(cat "$HERE/k8s/cnigc/main.go" "$HERE/k8s/cnigc/go.mod" "$HERE/k8s/cnigc/go.sum" | sha256sum | cut -c1-12)"

dir_of() {
    case "$1" in
        kubernetes) echo "$ROOT/kubernetes/$K8S_VERSION/bin" ;;
        etcd) echo "$ROOT/etcd/$ETCD_VERSION/bin" ;;
        containerd) echo "$ROOT/containerd/$CONTAINERD_VERSION/bin" ;;
        crictl) echo "$ROOT/cri-tools/$CRICTL_VERSION/bin" ;;
        cni) echo "$ROOT/cni-plugins/$CNI_PLUGINS_VERSION/bin" ;;
        cnigc) echo "$ROOT/cnigc/$CNIGC_KEY/bin" ;;
        *) echo "k8s-build.sh: unknown component $1" >&2; return 2 ;;
    esac
}
ALL=(kubernetes etcd containerd crictl cni cnigc)

if [ "${1:-}" = --print-dirs ]; then
    for c in "${ALL[@]}"; do echo "$c=$(dir_of "$c")"; done
    exit 0
fi
case "${1:-}" in -h | --help) sed -n '2,32p' "$0"; exit 0 ;; esac

[ -n "$GO" ] && [ -x "$GO" ] || { echo "k8s-build.sh: no Go toolchain (need Go >= 1.26 at /usr/local/go/bin/go or on PATH)" >&2; exit 1; }
export GOFLAGS="-trimpath -buildvcs=false" CGO_ENABLED=0 GOTOOLCHAIN=local

T0=$(date +%s)
note() { echo "k8s-build: $*"; }

# build_into NAME OUTDIR FUNC: run FUNC with a fresh temporary output dir, then move the
# binaries into OUTDIR and stamp it complete; prints the wall time.
build_component() {
    local c="$1" out tmp t0
    out="$(dir_of "$c")"
    if [ -f "$out/.complete" ] && [ "${FORCE:-0}" != 1 ]; then
        note "$c present ($out)"
        return 0
    fi
    tmp="$out.tmp.$$"
    rm -rf "$tmp"
    mkdir -p "$tmp"
    t0=$(date +%s)
    note "$c: building into $out ($("$GO" env GOVERSION))"
    if ! "build_$c" "$tmp"; then
        rm -rf "$tmp"
        echo "k8s-build.sh: building $c failed" >&2
        return 1
    fi
    rm -rf "$out"
    mv "$tmp" "$out"
    echo "$(date -u +%FT%TZ) built in $(($(date +%s) - t0))s with $("$GO" env GOVERSION)" >"$out/.complete"
    note "$c: built in $(($(date +%s) - t0))s: $(ls "$out" | tr '\n' ' ')"
}

gobuild() { nice -n 10 "$GO" build "$@"; }
goinstall() { # goinstall OUTDIR PKG@VERSION [more flags before]
    local out="$1"
    shift
    (cd "$out" && GOBIN="$out" nice -n 10 "$GO" install "$@")
}

build_kubernetes() {
    local out="$1" ld="-s -w" p
    for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
        ld+=" -X $p.gitVersion=$K8S_VERSION -X $p.gitMajor=1 -X $p.gitMinor=34"
        ld+=" -X $p.gitTreeState=clean -X $p.buildDate=1970-01-01T00:00:00Z"
    done
    (cd "$HERE/k8s/kubernetes" && gobuild -ldflags "$ld" -o "$out/" \
        k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
        k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubelet k8s.io/kubernetes/cmd/kubectl \
        k8s.io/kubernetes/cmd/kube-proxy)
}

build_etcd() {
    local out="$1"
    (cd "$HERE/k8s/etcd" && gobuild -ldflags "-s -w" -o "$out/etcd" go.etcd.io/etcd/server/v3)
}

build_containerd() {
    local out="$1" ld="-s -w -X github.com/containerd/containerd/v2/version.Version=$CONTAINERD_VERSION"
    # no_btrfs: the btrfs snapshotter needs cgo headers; the node uses overlayfs.
    goinstall "$out" -tags no_btrfs -ldflags "$ld" \
        "github.com/containerd/containerd/v2/cmd/containerd@$CONTAINERD_VERSION" \
        "github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2@$CONTAINERD_VERSION" \
        "github.com/containerd/containerd/v2/cmd/ctr@$CONTAINERD_VERSION"
}

build_crictl() {
    local out="$1"
    goinstall "$out" -ldflags "-s -w -X sigs.k8s.io/cri-tools/pkg/version.Version=$CRICTL_VERSION" \
        "sigs.k8s.io/cri-tools/cmd/crictl@$CRICTL_VERSION"
}

build_cni() {
    local out="$1" p
    local pkgs=()
    for p in main/bridge ipam/host-local main/loopback meta/portmap; do
        pkgs+=("github.com/containernetworking/plugins/plugins/$p@$CNI_PLUGINS_VERSION")
    done
    goinstall "$out" -ldflags "-s -w" "${pkgs[@]}"
}

build_cnigc() {
    local out="$1"
    (cd "$HERE/k8s/cnigc" && gobuild -ldflags "-s -w" -o "$out/cnigc" .)
}

want=("$@")
[ ${#want[@]} -gt 0 ] || want=("${ALL[@]}")
for c in "${want[@]}"; do
    dir_of "$c" >/dev/null
    build_component "$c"
done
note "done in $(($(date +%s) - T0))s"
