#!/usr/bin/env bash
# build-image.sh: meshcni's container image, built from this repository without a container
# daemon, on Debian 12 (bookworm, merged /usr), amd64.
#
#   scripts/build-image.sh [--out FILE]         the meshcni image (default
#                                               target/images/meshcni-agent.tar)
#   scripts/build-image.sh --print-ref          print its name:tag and exit
#   scripts/build-image.sh --test-images OUTDIR the test images for a registry-less kubelet:
#                                               OUTDIR/pause.tar, OUTDIR/busybox.tar,
#                                               OUTDIR/ztunnel-standin.tar
#
# Name and tag: <hub>/<image>:<tag> read from deploy/helm/meshcni/values.yaml, i.e. the chart's
# default (ghcr.io/meshcni/meshcni-agent:<Chart appVersion>), so `helm install` with defaults
# uses what this script built. crates/agent/tests/image.rs checks that values.yaml, Chart.yaml
# appVersion, the workspace version and deploy/manifests/meshcni.yaml agree.
#
# Contents (two layers; `ctr images import FILE`, `podman load -i FILE`, `docker load -i FILE`):
#   layer 0, from the host's Debian packages (iptables, nftables, ipset, libc6, netbase):
#     /usr/sbin/xtables-legacy-multi, xtables-nft-multi and the iptables{,-save,-restore},
#     ip6tables{,…} links for -legacy, -nft and the plain names (plain = nft, Debian's default
#     alternative); /usr/sbin/nft, /usr/sbin/ipset; every shared library they and the xtables
#     modules (/usr/lib/x86_64-linux-gnu/xtables, all of them) load, found with ldd, plus ld.so;
#     /etc/protocols, /etc/services, /etc/ethertypes (read by iptables/nft), a minimal
#     /etc/nsswitch.conf, /etc/passwd, /etc/group; /tmp, /run (/var/run -> ../run).
#   layer 1, release builds from this repository (cargo build --release --locked):
#     /usr/local/bin/meshcni-agent (the entrypoint), /opt/cni/bin/meshcni (the plugin the agent
#     installs on the node; CNI_BIN_DIR's default).
#   No shell, no package manager, no iproute2: the agent and the plugin use netlink for links,
#   routes and rules, and exec only iptables*/ip6tables*, nft and ipset.
#
# Test images (--test-images), fixed names:
#   localhost/meshcni/pause:1.0        scripts/lib/pause/pause.c built with gcc -static: sleeps
#                                      until SIGTERM/SIGINT, reaps children (the pod sandbox)
#   localhost/meshcni/busybox:1.35.0   Debian's busybox-static at /bin/busybox + applet links
#                                      (sh, nc, wget, sleep, ip, …), entrypoint /bin/sh
#   localhost/meshcni/ztunnel-standin:test  the in-pod ztunnel stand-in of crates/testkit
#                                      (src/bin/meshcni-ztunnel-standin.rs, a ZDS client that
#                                      opens ztunnel's listeners in each enrolled pod's netns and
#                                      logs what it holds and captures), release build, with the
#                                      libraries ldd lists; entrypoint the binary
#
# Reproducible: the same sources and the same Debian packages give the same image digest.
# Every timestamp is SOURCE_DATE_EPOCH (default: the last git commit's time); the archive writer
# is scripts/lib/oci-image.py (sorted entries, uid/gid 0, normalised modes, gzip without
# timestamp). Stdout: one JSON line from oci-image.py per image (name, digest, sizes);
# progress on stderr.
#
# Env: SOURCE_DATE_EPOCH, CARGO_TARGET_DIR (where the release binaries are built).
set -euo pipefail
ROOT="$(cd "$(dirname "$(readlink -f "$0")")/.." && pwd)"
cd "$ROOT"
OCI_IMAGE="$ROOT/scripts/lib/oci-image.py"
PAUSE_REF=localhost/meshcni/pause:1.0
BUSYBOX_REF=localhost/meshcni/busybox:1.35.0
ZTUNNEL_STANDIN_REF=localhost/meshcni/ztunnel-standin:test
BUSYBOX_APPLETS=(sh ash cat chmod cp date echo env false grep head hostname id ip kill ln ls
                 mkdir mv nc netstat nslookup ping printenv printf ps pwd rm seq sleep sort tail
                 tee test timeout touch tr true uname wc wget)
MULTIARCH=x86_64-linux-gnu

die() { echo "build-image.sh: $*" >&2; exit 1; }
log() { echo "build-image.sh: $*" >&2; }

# values.yaml top-level scalar KEY (the chart's image coordinates are plain `key: value` lines).
value_of() {
    local v
    v="$(sed -n "s/^$1:[[:space:]]*\"\{0,1\}\([^\"#[:space:]]*\)\"\{0,1\}[[:space:]]*\(#.*\)\{0,1\}$/\1/p" \
        deploy/helm/meshcni/values.yaml)"
    [ -n "$v" ] || die "deploy/helm/meshcni/values.yaml: no top-level \`$1:\` value"
    printf '%s' "$v"
}
image_ref() { printf '%s/%s:%s\n' "$(value_of hub)" "$(value_of image)" "$(value_of tag)"; }

OUT="" TEST_DIR="" MODE=image
while [ $# -gt 0 ]; do
    case "$1" in
        --out) [ $# -ge 2 ] || die "--out needs a file"; OUT="$2"; shift 2 ;;
        --print-ref) image_ref; exit 0 ;;
        --test-images) [ $# -ge 2 ] || die "--test-images needs a directory"; MODE=test; TEST_DIR="$2"; shift 2 ;;
        -h | --help) sed -n '2,48p' "$0"; exit 0 ;;
        *) echo "build-image.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

if [ -z "${SOURCE_DATE_EPOCH:-}" ]; then
    SOURCE_DATE_EPOCH="$(git -C "$ROOT" log -1 --format=%ct 2>/dev/null)" ||
        die "SOURCE_DATE_EPOCH unset and $ROOT is not a git checkout (set it to a fixed time)"
fi
export SOURCE_DATE_EPOCH
[ "$(uname -m)" = x86_64 ] || die "only x86_64 hosts are supported (found $(uname -m))"
[ -L /lib ] && [ -L /lib64 ] || die "the host is not merged-/usr (/lib, /lib64 must be symlinks into /usr)"
command -v python3 >/dev/null || die "python3 missing"

W="$(mktemp -d /tmp/meshcni-image.XXXXXX)"
trap 'rm -rf "$W"' EXIT

# Base directories of a merged-/usr root.
base_rootfs() {
    local r="$1"
    mkdir -p "$r"/usr/{bin,sbin,lib/$MULTIARCH,lib64} "$r"/{etc,tmp,run,proc,sys,dev,var}
    ln -s usr/bin "$r/bin"
    ln -s usr/sbin "$r/sbin"
    ln -s usr/lib "$r/lib"
    ln -s usr/lib64 "$r/lib64"
    ln -s ../run "$r/var/run"
}

# add_file ROOTFS HOSTPATH: the file at its real path (symlinks on the way resolved) and, if
# HOSTPATH's own name differs (a soname or ld.so link), that name as a relative symlink.
add_file() {
    local r="$1" p="$2" real linkdir
    real="$(readlink -f "$p")"
    [ -f "$real" ] || die "$p: not found on this host (is its Debian package installed?)"
    [ -f "$r$real" ] || install -D -m "$( [ -x "$real" ] && echo 0755 || echo 0644)" "$real" "$r$real"
    linkdir="$(readlink -f "$(dirname "$p")")"
    if [ "$linkdir/$(basename "$p")" != "$real" ] && [ ! -e "$r$linkdir/$(basename "$p")" ]; then
        mkdir -p "$r$linkdir"
        ln -sr "$r$real" "$r$linkdir/$(basename "$p")"
    fi
}

# add_with_libs ROOTFS FILE...: the files and every library ldd lists for them (+ ld.so).
add_with_libs() {
    local r="$1" f lib
    shift
    for f in "$@"; do
        add_file "$r" "$f"
        while read -r lib; do
            add_file "$r" "$lib"
        done < <(ldd "$f" | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}')
    done
}

tools_layer() {
    local r="$1" n fam
    base_rootfs "$r"
    add_with_libs "$r" /usr/sbin/xtables-legacy-multi /usr/sbin/xtables-nft-multi \
        /usr/sbin/nft /usr/sbin/ipset /usr/lib/$MULTIARCH/xtables/*.so
    for fam in iptables ip6tables; do
        for n in "" -save -restore; do
            ln -s xtables-legacy-multi "$r/usr/sbin/$fam-legacy$n"
            ln -s xtables-nft-multi "$r/usr/sbin/$fam-nft$n"
            # The plain names: Debian's default alternative (nft).
            ln -s xtables-nft-multi "$r/usr/sbin/$fam$n"
        done
    done
    local e
    for e in protocols services ethertypes; do
        install -m 0644 "/etc/$e" "$r/etc/$e"
    done
    printf 'passwd: files\ngroup: files\nhosts: files\nprotocols: files\nservices: files\n' \
        > "$r/etc/nsswitch.conf"
    printf 'root:x:0:0:root:/:/usr/sbin/nologin\n' > "$r/etc/passwd"
    printf 'root:x:0:\n' > "$r/etc/group"
    chmod 0644 "$r/etc/nsswitch.conf" "$r/etc/passwd" "$r/etc/group"
    chmod 1777 "$r/tmp"
}

meshcni_layer() {
    local r="$1" target
    log "cargo build --release --locked -p meshcni-agent -p meshcni-plugin"
    cargo build --release --locked -p meshcni-agent -p meshcni-plugin >&2
    target="${CARGO_TARGET_DIR:-$ROOT/target}"
    install -D -m 0755 "$target/release/meshcni-agent" "$r/usr/local/bin/meshcni-agent"
    install -D -m 0755 "$target/release/meshcni" "$r/opt/cni/bin/meshcni"
    # Every library the two binaries need must already be in the tools layer.
    local lib
    for lib in $(ldd "$r/usr/local/bin/meshcni-agent" "$r/opt/cni/bin/meshcni" |
                 awk '$2 == "=>" && $3 ~ /^\// {print $3}' | sort -u); do
        [ -e "$W/tools$(readlink -f "$(dirname "$lib")")/$(basename "$lib")" ] ||
            add_file "$W/tools" "$lib"
    done
}

summary() { # JSON line -> human line on stderr
    python3 -c 'import json,sys; j=json.loads(sys.argv[1]); print("build-image.sh: %s %s  %s  compressed %.1f MiB, uncompressed %.1f MiB" % (j["name"], j["digest"], j["out"], j["size_compressed"]/1048576, j["size_uncompressed"]/1048576), file=sys.stderr)' "$1"
}

if [ "$MODE" = test ]; then
    command -v gcc >/dev/null || die "gcc missing (apt-get install gcc libc6-dev)"
    [ -x /bin/busybox ] && /bin/busybox --help >/dev/null 2>&1 || die "/bin/busybox missing (busybox-static)"
    file_type="$(LC_ALL=C readelf -l /bin/busybox 2>/dev/null | grep -c INTERP || true)"
    [ "$file_type" = 0 ] || die "/bin/busybox is not static (install busybox-static)"
    mkdir -p "$TEST_DIR"
    mkdir -p "$W/pause/bin"
    gcc -static -Os -s -Wall -Wextra -Werror -ffile-prefix-map="$ROOT"=. \
        -o "$W/pause/bin/pause" scripts/lib/pause/pause.c
    j="$(python3 "$OCI_IMAGE" --rootfs "$W/pause" --name "$PAUSE_REF" --entrypoint /bin/pause \
        --out "$TEST_DIR/pause.tar")"
    echo "$j"; summary "$j"
    mkdir -p "$W/busybox"/{bin,etc,tmp,proc,sys,dev,run}
    install -m 0755 /bin/busybox "$W/busybox/bin/busybox"
    for a in "${BUSYBOX_APPLETS[@]}"; do ln -s busybox "$W/busybox/bin/$a"; done
    printf 'root:x:0:0:root:/:/bin/sh\n' > "$W/busybox/etc/passwd"
    printf 'root:x:0:\n' > "$W/busybox/etc/group"
    j="$(python3 "$OCI_IMAGE" --rootfs "$W/busybox" --name "$BUSYBOX_REF" --entrypoint /bin/sh \
        --out "$TEST_DIR/busybox.tar")"
    echo "$j"; summary "$j"
    log "cargo build --release --locked -p meshcni-testkit --bin meshcni-ztunnel-standin"
    cargo build --release --locked -p meshcni-testkit --bin meshcni-ztunnel-standin >&2
    zbin="${CARGO_TARGET_DIR:-$ROOT/target}/release/meshcni-ztunnel-standin"
    base_rootfs "$W/ztunnel"
    install -D -m 0755 "$zbin" "$W/ztunnel/usr/local/bin/meshcni-ztunnel-standin"
    while read -r lib; do
        add_file "$W/ztunnel" "$lib"
    done < <(ldd "$zbin" | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}')
    chmod 1777 "$W/ztunnel/tmp"
    j="$(python3 "$OCI_IMAGE" --rootfs "$W/ztunnel" --name "$ZTUNNEL_STANDIN_REF" \
        --entrypoint /usr/local/bin/meshcni-ztunnel-standin --out "$TEST_DIR/ztunnel-standin.tar")"
    echo "$j"; summary "$j"
    exit 0
fi

REF="$(image_ref)"
OUT="${OUT:-$ROOT/target/images/meshcni-agent.tar}"
mkdir -p "$(dirname "$OUT")"
tools_layer "$W/tools"
meshcni_layer "$W/meshcni"
log "writing $REF (SOURCE_DATE_EPOCH=$SOURCE_DATE_EPOCH)"
j="$(python3 "$OCI_IMAGE" --rootfs "$W/tools" --rootfs "$W/meshcni" --name "$REF" \
    --entrypoint /usr/local/bin/meshcni-agent \
    --label "org.opencontainers.image.source=https://example.invalid/meshcni" \
    --label "org.opencontainers.image.version=$(value_of tag)" \
    --label "org.opencontainers.image.revision=$(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)" \
    --out "$OUT")"
echo "$j"
summary "$j"
