#!/usr/bin/env bash
# setup.sh: install what meshcni's tests need on Debian 12 (bookworm), as root. Idempotent:
# every step checks first and skips what is present; `apt-get update` runs at most once, and
# only when a package is missing. Prints the time each step took.
#
#   scripts/setup.sh            packages, cnitool, CRI client venv, rustfmt + clippy
#   scripts/setup.sh --fuzz     ... and cargo-fuzz (+ a C++ compiler for libFuzzer)
#
# What it installs:
#   apt     iptables nftables ipset iproute2 conntrack jq      (rules, netns, assertions)
#           containernetworking-plugins                          (/usr/lib/cni: bridge, host-local, portmap, ...)
#           containerd runc busybox-static python3-venv          (containerd CRI runtime test)
#           podman catatonit                                     (podman CNI-backend runtime test)
#           golang-go golang-github-appc-cni-dev dpkg-dev        (to build cnitool, see below)
#           openssl curl                                         (real_apiserver test: PKI, etcd compaction)
#           gcc libc6-dev binutils                               (scripts/build-image.sh: the static
#                                                                 pause of --test-images, readelf)
#           clang libbpf-dev linux-libc-dev                      (crates/ebpf: BPF programs compiled with
#                                                                 clang -target bpf at build time)
#           libelf-dev zlib1g-dev make pkg-config                (libbpf-sys builds its vendored libbpf)
#           bpftool                                              (crates/ebpf tests: nothing of ours left)
#   cnitool $CNITOOL (default /usr/local/bin/cnitool), built from Debian's *source* package golang-github-appc-cni
#           (the -dev package ships libcni but not cnitool) with Debian's Go in GOPATH mode: no Go
#           module is downloaded. The deb-src index goes to a private temporary apt state dir;
#           the system's apt sources are not touched.
#   venv    $MESHCNI_CRI_VENV (default /opt/meshcni/cri-venv) with the PyPI package
#           container-runtime-interface-api==2.0.1 (CRI v1 gRPC stubs) for scripts/cri-pod.py.
#   helm    $MESHCNI_HELM (default /opt/meshcni/bin/helm-v4.3.2), built from the helm.sh/helm/v4
#           module with the Go on PATH; used to render the chart in the tests.
#   k8s     scripts/k8s-build.sh: the real single-node Kubernetes of scripts/cluster-e2e.sh
#           (k8s v1.34.4, etcd v3.6.16, containerd v2.2.9, crictl v1.34.0, CNI plugins v1.10.0)
#           built from their Go modules with /usr/local/go (Go 1.26), cached in /opt/meshcni.
#   rust    rustfmt + clippy components (rustup); cargo-fuzz only with --fuzz.
set -euo pipefail

WANT_FUZZ=0
for a in "$@"; do
    case "$a" in
        --fuzz) WANT_FUZZ=1 ;;
        -h | --help) sed -n '2,20p' "$0"; exit 0 ;;
        *) echo "setup.sh: unknown option $a" >&2; exit 2 ;;
    esac
done
[ "$(id -u)" = 0 ] || { echo "setup.sh: run as root (installs packages)" >&2; exit 1; }

CRI_VENV="${MESHCNI_CRI_VENV:-/opt/meshcni/cri-venv}"
CNITOOL="${CNITOOL:-/usr/local/bin/cnitool}"
export DEBIAN_FRONTEND=noninteractive
T0=$(date +%s)
step_t=$T0
ts() { local now; now=$(date +%s); echo "setup: [+$((now - step_t))s, total $((now - T0))s] $*"; step_t=$now; }

# ---- Debian packages ---------------------------------------------------------------------
pkgs=(iptables nftables ipset iproute2 conntrack jq util-linux
      containernetworking-plugins containerd runc busybox-static python3 python3-venv
      podman catatonit
      golang-go golang-github-appc-cni-dev dpkg-dev ca-certificates openssl curl
      gcc libc6-dev binutils
      clang libbpf-dev linux-libc-dev libelf-dev zlib1g-dev make pkg-config bpftool)
[ $WANT_FUZZ = 1 ] && pkgs+=(g++)
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    ts "apt-get installed: ${missing[*]}"
else
    ts "Debian packages present"
fi

# ---- cnitool -----------------------------------------------------------------------------
if [ -x "$CNITOOL" ] && [ "${FORCE_CNITOOL:-0}" != 1 ]; then
    ts "cnitool present ($CNITOOL; FORCE_CNITOOL=1 rebuilds)"
else
    W="$(mktemp -d /tmp/meshcni-cnitool.XXXXXX)"
    trap 'rm -rf "$W"' EXIT
    . /etc/os-release
    codename="${VERSION_CODENAME:-bookworm}"
    # Reuse the mirror(s) the system already uses for this release.
    mapfile -t sites < <(apt-get indextargets --format '$(SITE) $(RELEASE)' 'Identifier: Packages' 2>/dev/null |
        awk -v c="$codename" '$2==c || $2==c"-updates" {print $1" "$2}' | sort -u)
    [ ${#sites[@]} -gt 0 ] || sites=("http://deb.debian.org/debian $codename")
    mkdir -p "$W/lists/partial" "$W/parts" "$W/src"
    for s in "${sites[@]}"; do
        echo "deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] ${s% *} ${s#* } main"
    done > "$W/sources.list"
    APTSRC=(-o Dir::Etc::SourceList="$W/sources.list" -o Dir::Etc::SourceParts="$W/parts"
            -o Dir::State::Lists="$W/lists" -o Dir::Cache::pkgcache= -o Dir::Cache::srcpkgcache=
            -o APT::Sandbox::User=root -o Debug::NoLocking=1)
    apt-get "${APTSRC[@]}" update -qq
    ver="$(dpkg-query -W -f='${source:Version}' golang-github-appc-cni-dev)"
    (cd "$W/src" && apt-get "${APTSRC[@]}" source -qq "golang-github-appc-cni=$ver" >/dev/null)
    srcdir="$(find "$W/src" -maxdepth 1 -type d -name 'golang-github-appc-cni-*' | head -1)"
    [ -f "$srcdir/cnitool/cnitool.go" ] || { echo "setup.sh: cnitool.go not found in $srcdir" >&2; exit 1; }
    # GOPATH mode: libcni and pkg/* come from the source tree itself, placed at its import path.
    mkdir -p "$W/gopath/src/github.com/containernetworking"
    mv "$srcdir" "$W/gopath/src/github.com/containernetworking/cni"
    # Debian's Go explicitly (golang-go, /usr/lib/go): GOPATH mode against Debian's
    # /usr/share/gocode is what that package is built for; a newer Go earlier on PATH (e.g.
    # /usr/local/go) is for the Go module builds of the test infrastructure, not this one.
    DEBIAN_GO=/usr/lib/go/bin/go
    [ -x "$DEBIAN_GO" ] || { echo "setup.sh: $DEBIAN_GO missing (golang-go)" >&2; exit 1; }
    (cd "$W/gopath/src/github.com/containernetworking/cni/cnitool" &&
        env GO111MODULE=off GOTOOLCHAIN=local GOPATH="$W/gopath:/usr/share/gocode" GOCACHE="$W/gocache" \
            GOFLAGS= GOPROXY=off CGO_ENABLED=0 "$DEBIAN_GO" build -ldflags "-s -w" -o "$W/cnitool" .)
    install -m 0755 "$W/cnitool" "$CNITOOL"
    ts "built $CNITOOL from Debian source golang-github-appc-cni $ver"
fi

# ---- helm (the chart rendered by a real helm in crates/agent/tests/helm_render.rs) ----------
# Built from the helm.sh/helm/v4 module with the Go toolchain on PATH (Go >= 1.24; the module
# proxy supplies a newer toolchain if helm's go.mod asks for one). The build and module caches
# are private to the build and removed with it (disk: CI shares one), the binary goes outside the
# repo keyed by version: only the first run on a machine pays.
HELM_VERSION="${MESHCNI_HELM_VERSION:-v4.3.2}"
HELM="${MESHCNI_HELM:-/opt/meshcni/bin/helm-$HELM_VERSION}"
if [ -x "$HELM" ] && "$HELM" version --short >/dev/null 2>&1; then
    ts "helm present ($HELM)"
else
    GO_BIN="$(command -v go || true)"
    [ -x /usr/local/go/bin/go ] && GO_BIN=/usr/local/go/bin/go
    [ -n "$GO_BIN" ] || { echo "setup.sh: no Go toolchain for building helm (need Go >= 1.24)" >&2; exit 1; }
    HW="$(mktemp -d /tmp/meshcni-helm.XXXXXX)"
    (cd "$HW" && env GOBIN="$HW/bin" GOFLAGS=-buildvcs=false CGO_ENABLED=0 \
        GOCACHE="$HW/cache" GOMODCACHE="$HW/mod" \
        "$GO_BIN" install -trimpath -ldflags "-s -w" "helm.sh/helm/v4/cmd/helm@$HELM_VERSION")
    install -D -m 0755 "$HW/bin/helm" "$HELM"
    chmod -R u+w "$HW"
    rm -rf "$HW"
    ts "built $HELM from helm.sh/helm/v4@$HELM_VERSION ($("$GO_BIN" env GOVERSION))"
fi

# ---- single-node Kubernetes (scripts/cluster-e2e.sh) ---------------------------------------
# kube-apiserver, controller-manager, scheduler, kubelet, kubectl, kube-proxy v1.34.4, etcd,
# containerd 2.2, crictl, CNI plugins v1.10, built from their Go modules into /opt/meshcni/<name>/
# <version>/bin (only the first run on a machine builds; see scripts/k8s-build.sh for the times).
bash "$(dirname "$0")/k8s-build.sh" | sed 's/^/setup: /'
[ "${PIPESTATUS[0]}" = 0 ] || { echo "setup.sh: scripts/k8s-build.sh failed" >&2; exit 1; }
ts "Kubernetes node binaries present (scripts/k8s-build.sh)"

# ---- CRI client venv ---------------------------------------------------------------------
if "$CRI_VENV/bin/python" -c 'import cri_api.v1.api_pb2_grpc' 2>/dev/null; then
    ts "CRI client venv present ($CRI_VENV)"
else
    python3 -m venv "$CRI_VENV"
    "$CRI_VENV/bin/pip" install -q --disable-pip-version-check 'container-runtime-interface-api==2.0.1'
    ts "created CRI client venv $CRI_VENV (container-runtime-interface-api==2.0.1)"
fi

# ---- Rust --------------------------------------------------------------------------------
command -v cargo >/dev/null || { echo "setup.sh: cargo not found; install Rust (rustup, stable)" >&2; exit 1; }
if cargo fmt --version >/dev/null 2>&1 && cargo clippy --version >/dev/null 2>&1; then
    ts "rustfmt + clippy present ($(rustc --version))"
else
    rustup component add rustfmt clippy
    ts "added rustfmt + clippy"
fi
if [ $WANT_FUZZ = 1 ]; then
    if cargo fuzz --version >/dev/null 2>&1; then
        ts "cargo-fuzz present ($(cargo fuzz --version))"
    else
        cargo install --locked cargo-fuzz
        ts "installed cargo-fuzz ($(cargo fuzz --version))"
    fi
fi
echo "setup: done in $(( $(date +%s) - T0 ))s"
