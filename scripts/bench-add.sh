#!/usr/bin/env bash
# bench-add.sh: CNI ADD latency of the meshcni plugin for a sidecar pod, measured against the
# reference `bridge` plugin's own ADD in the same run.
#
#   scripts/bench-add.sh [--write] [--no-build]
#
#   --write      replace the "CNI ADD latency" section of BENCHMARKS.md with the results
#                (otherwise the section is printed on stdout)
#   --no-build   use target/release/meshcni as is (default: cargo build --release first)
#   N=50         samples per measurement (>= 50 recommended)
#
# What is measured (wall time of the whole exec, from bash's $EPOCHREALTIME, median and p90):
#   (a) cnitool ADD, conflist bridge + host-local
#   (b) cnitool ADD, conflist bridge + host-local -> meshcni (sidecar-injected pod)
#       plugin share = (b) - (a)
#   (c) as (b) with `iptables_binary: nft` in the meshcni entry (no per-pod flavor detection)
#   the bridge plugin exec'd directly (reference for the direct meshcni rows)
#   meshcni exec'd directly with env + stdin (a prevResult captured from (a)), into a fresh pod
#   netns each time: sidecar pod with the iptables backend (flavor auto-detected, which picks
#   iptables-nft here), the same with `iptables_binary: nft` (no detection), the native nft
#   backend, and a non-injected pod (pure pass-through);
#   the floor: `iptables-nft-restore --noflush` / `nft -f` of the same rule text (from
#   `meshcni iptables --dry-run`) into a fresh netns via nsenter, and `nsenter --net=X true`.
#
# Safety: everything happens in network namespaces this script creates (names mcni-<pid>-…):
# a "node" netns holds the bridge; cnitool runs there (`ip netns exec`), in the private mount
# namespace `ip netns exec` creates, with a private directory bind-mounted over /var/lib/cni.
# All namespaces and the work dir are removed on exit (trap). Pod traffic is never sent.
# Needs: root, cnitool, /usr/lib/cni/{bridge,host-local}, iproute2, iptables-nft, nft, jq,
# strace (optional: exec counts).
set -euo pipefail

ROOT="$(cd "$(dirname "$(readlink -f "$0")")/.." && pwd)"
SELF="$ROOT/scripts/bench-add.sh"
N="${N:-50}"
REF_PLUGINS="${REF_PLUGINS:-/usr/lib/cni}"

# ---------------------------------------------------------------------------------------------
# Inner mode: runs inside the node netns (ip netns exec) with env prepared by the outer script.
if [ "${1:-}" = "__inner" ]; then
    mount --bind "$WORK/var-lib-cni" /var/lib/cni
    export CNI_PATH="$WORK/bin"
    # cnitool_add NET CONFDIR POD OUTFILE -> appends elapsed µs to OUTFILE
    cnitool_add() {
        local net="$1" conf="$2" pod="$3" out="$4" t0 t1
        t0="${EPOCHREALTIME/./}"
        NETCONFPATH="$conf" CNI_ARGS="IgnoreUnknown=1;K8S_POD_NAMESPACE=bench;K8S_POD_NAME=sidecar;K8S_POD_INFRA_CONTAINER_ID=${pod//-/};K8S_POD_UID=uid-$pod" \
            cnitool add "$net" "/run/netns/$pod" > "$WORK/last-$net.json"
        t1="${EPOCHREALTIME/./}"
        echo $((t1 - t0)) >> "$out"
    }
    cnitool_del() {
        NETCONFPATH="$2" CNI_ARGS="IgnoreUnknown=1;K8S_POD_NAMESPACE=bench;K8S_POD_NAME=sidecar;K8S_POD_INFRA_CONTAINER_ID=${3//-/};K8S_POD_UID=uid-$3" \
            cnitool del "$1" "/run/netns/$3" > /dev/null
    }
    for i in $(seq 1 "$N"); do
        # interleaved so that drift hits both equally
        cnitool_add bencha "$WORK/conf-a" "$PFX-a$i" "$WORK/t-a"
        [ "$i" = 1 ] && cp "$WORK/last-bencha.json" "$WORK/prev-result.json"
        cnitool_add benchb "$WORK/conf-b" "$PFX-b$i" "$WORK/t-b"
        if [ "$i" = 1 ]; then
            cp "$WORK/last-benchb.json" "$WORK/chain-result.json"
            nsenter --net="/run/netns/$PFX-b$i" iptables-save > "$WORK/rules-chain-b.txt"
        fi
        cnitool_add benchc "$WORK/conf-c" "$PFX-c$i" "$WORK/t-c"
        cnitool_del bencha "$WORK/conf-a" "$PFX-a$i"
        cnitool_del benchb "$WORK/conf-b" "$PFX-b$i"
        cnitool_del benchc "$WORK/conf-c" "$PFX-c$i"
        # the bridge plugin exec'd directly (same method as the meshcni direct rows)
        for cmd in ADD DEL; do
            t0="${EPOCHREALTIME/./}"
            CNI_COMMAND=$cmd CNI_CONTAINERID="d$i" CNI_NETNS="/run/netns/$PFX-d$i" CNI_IFNAME=eth0 \
                "$WORK/bin/bridge" < "$WORK/bridge-direct.json" > /dev/null
            t1="${EPOCHREALTIME/./}"
            [ "$cmd" = ADD ] && echo $((t1 - t0)) >> "$WORK/t-d"
        done
    done
    exit 0
fi

# ---------------------------------------------------------------------------------------------
WRITE=0
BUILD=1
for arg in "$@"; do
    case "$arg" in
        --write) WRITE=1 ;;
        --no-build) BUILD=0 ;;
        *) echo "usage: $0 [--write] [--no-build]" >&2; exit 2 ;;
    esac
done
[ "$(id -u)" = 0 ] || { echo "bench-add: must run as root" >&2; exit 1; }
for t in cnitool ip nsenter iptables-nft-restore nft jq; do
    command -v "$t" >/dev/null || { echo "bench-add: $t not found" >&2; exit 1; }
done
for p in bridge host-local; do
    [ -x "$REF_PLUGINS/$p" ] || { echo "bench-add: $REF_PLUGINS/$p not found" >&2; exit 1; }
done

if [ "$BUILD" = 1 ]; then
    (cd "$ROOT" && cargo build --release -p meshcni-plugin --bin meshcni >&2)
fi
BIN="$ROOT/target/release/meshcni"
[ -x "$BIN" ] || { echo "bench-add: $BIN missing (build it or drop --no-build)" >&2; exit 1; }

export PFX="mcni-$$"
export WORK N
WORK="$(mktemp -d /tmp/mcni-bench-add.XXXXXX)"
NODE="$PFX-node"
CREATED_VAR_LIB_CNI=0
declare -a NETNS=()

cleanup() {
    local ns
    for ns in "${NETNS[@]}"; do
        [ -e "/run/netns/$ns" ] && ip netns del "$ns" 2>/dev/null || true
    done
    rm -rf "$WORK"
    if [ "$CREATED_VAR_LIB_CNI" = 1 ]; then rmdir /var/lib/cni 2>/dev/null || true; fi
}
trap cleanup EXIT INT TERM

new_ns() { # name [v4addr]
    ip netns add "$1"
    NETNS+=("$1")
    ip -n "$1" link set lo up
    if [ -n "${2:-}" ]; then
        ip -n "$1" link add eth0 type veth peer name peer0
        ip -n "$1" link set eth0 up
        ip -n "$1" link set peer0 up
        ip -n "$1" addr add "$2" dev eth0
    fi
}

# --- fixtures ----------------------------------------------------------------------------------
mkdir -p "$WORK"/{bin,conf-a,conf-b,conf-c,var-lib-cni,ipam,run,md/pods/bench,md/namespaces}
[ -d /var/lib/cni ] || { mkdir -p /var/lib/cni; CREATED_VAR_LIB_CNI=1; }
ln -s "$REF_PLUGINS/bridge" "$WORK/bin/bridge"
ln -s "$REF_PLUGINS/host-local" "$WORK/bin/host-local"
ln -s "$BIN" "$WORK/bin/meshcni"

proxy='{"name":"istio-proxy","image":"proxyv2:1.20.0","args":["proxy","sidecar"],"securityContext":{"runAsUser":1337,"runAsGroup":1337}}'
status='{\"initContainers\":[\"istio-validation\"],\"containers\":[\"istio-proxy\"],\"revision\":\"default\"}'
cat > "$WORK/md/pods/bench/sidecar.json" <<EOF
{"apiVersion":"v1","kind":"Pod","metadata":{"name":"sidecar","namespace":"bench","uid":"uid-sidecar",
 "annotations":{"sidecar.istio.io/status":"$status"}},
 "spec":{"containers":[{"name":"app","image":"app:1"},$proxy]}}
EOF
cat > "$WORK/md/pods/bench/plain.json" <<EOF
{"apiVersion":"v1","kind":"Pod","metadata":{"name":"plain","namespace":"bench","uid":"uid-plain"},
 "spec":{"containers":[{"name":"app","image":"app:1"}]}}
EOF
echo '{"apiVersion":"v1","kind":"Namespace","metadata":{"name":"bench"}}' > "$WORK/md/namespaces/bench.json"

bridge_plugin() { # bridge subnet
    jq -n --arg br "$1" --arg subnet "$2" --arg ipam "$WORK/ipam" '{type: "bridge", bridge: $br,
        isGateway: true, ipMasq: false,
        ipam: {type: "host-local", dataDir: $ipam, ranges: [[{subnet: $subnet}]], routes: [{dst: "0.0.0.0/0"}]}}'
}
MESH_ENTRY="$(jq -n --arg md "$WORK/md" --arg run "$WORK/run" \
    '{type: "meshcni", pod_metadata_dir: $md, cni_agent_run_dir: $run, plugin_log_level: "warn"}')"
jq -n --argjson b "$(bridge_plugin mcnib-a 10.251.1.0/24)" \
    '{cniVersion: "1.0.0", name: "bencha", plugins: [$b]}' > "$WORK/conf-a/10-bencha.conflist"
jq -n --argjson b "$(bridge_plugin mcnib-b 10.251.2.0/24)" --argjson m "$MESH_ENTRY" \
    '{cniVersion: "1.0.0", name: "benchb", plugins: [$b, $m]}' > "$WORK/conf-b/10-benchb.conflist"
jq -n --argjson b "$(bridge_plugin mcnib-c 10.251.3.0/24)" --argjson m "$MESH_ENTRY" \
    '{cniVersion: "1.0.0", name: "benchc", plugins: [$b, $m + {iptables_binary: "nft"}]}' > "$WORK/conf-c/10-benchc.conflist"

# --- (a) and (b) via cnitool in the node netns ------------------------------------------------
new_ns "$NODE"
ip netns exec "$NODE" sysctl -qw net.ipv4.ip_forward=1
for i in $(seq 1 "$N"); do new_ns "$PFX-a$i"; new_ns "$PFX-b$i"; new_ns "$PFX-c$i"; new_ns "$PFX-d$i"; done
jq -n --argjson b "$(bridge_plugin mcnib-d 10.251.4.0/24)" '{cniVersion: "1.0.0", name: "benchd"} + $b' \
    > "$WORK/bridge-direct.json"
ip netns exec "$NODE" "$SELF" __inner
cp "$WORK/chain-result.json" "$WORK/chain-result.keep"

# Sanity: (b) really captured, and passed the bridge's result on.
grep -q 'ISTIO_OUTPUT' "$WORK/rules-chain-b.txt" || { echo "bench-add: (b) applied no capture" >&2; exit 1; }
jq -e '.ips[0].address' "$WORK/chain-result.json" > /dev/null

# --- meshcni exec'd directly -------------------------------------------------------------------
PREV="$(cat "$WORK/prev-result.json")"
direct_conf() { # extra-json
    jq -n --argjson prev "$PREV" --argjson extra "$1" --arg md "$WORK/md" --arg run "$WORK/run" \
        '{cniVersion: "1.0.0", name: "benchb", type: "meshcni", pod_metadata_dir: $md,
          cni_agent_run_dir: $run, plugin_log_level: "warn", prevResult: $prev} + $extra'
}
direct_conf '{}' > "$WORK/direct-iptables.json"
direct_conf '{"iptables_binary": "nft"}' > "$WORK/direct-forced.json"
direct_conf '{"native_nftables": true}' > "$WORK/direct-nft.json"
POD_ADDR="$(jq -r '.ips[0].address' "$WORK/prev-result.json")"

# run_direct LABEL CONF POD(sidecar|plain)
run_direct() {
    local label="$1" conf="$2" pod="$3" i ns t0 t1
    : > "$WORK/t-$label"
    for i in $(seq 1 "$N"); do
        ns="$PFX-$label$i"
        new_ns "$ns" "$POD_ADDR"
        t0="${EPOCHREALTIME/./}"
        CNI_COMMAND=ADD CNI_CONTAINERID="c$i" CNI_NETNS="/run/netns/$ns" CNI_IFNAME=eth0 \
            CNI_ARGS="IgnoreUnknown=1;K8S_POD_NAMESPACE=bench;K8S_POD_NAME=$pod" CNI_PATH="$WORK/bin" \
            "$BIN" < "$conf" > "$WORK/out-$label.json" 2> "$WORK/err-$label.txt" \
            || { echo "bench-add: meshcni ADD failed ($label):" >&2; cat "$WORK/out-$label.json" "$WORK/err-$label.txt" >&2; exit 1; }
        t1="${EPOCHREALTIME/./}"
        echo $((t1 - t0)) >> "$WORK/t-$label"
        if [ "$i" = 1 ]; then
            case "$pod/$label" in
                sidecar/dnft) ip netns exec "$ns" nft list ruleset > "$WORK/rules-$label.txt" ;;
                *) ip netns exec "$ns" iptables-save > "$WORK/rules-$label.txt" ;;
            esac
        fi
        ip netns del "$ns"
    done
}
run_direct dipt "$WORK/direct-iptables.json" sidecar
run_direct dforced "$WORK/direct-forced.json" sidecar
run_direct dnft "$WORK/direct-nft.json" sidecar
run_direct dplain "$WORK/direct-iptables.json" plain
grep -q 'ISTIO_OUTPUT' "$WORK/rules-dipt.txt" || { echo "bench-add: no capture applied (iptables)" >&2; exit 1; }
grep -q 'ISTIO_OUTPUT\|istio' "$WORK/rules-dnft.txt" || { echo "bench-add: no capture applied (nft)" >&2; exit 1; }
if grep -q 'ISTIO' "$WORK/rules-dplain.txt"; then echo "bench-add: plain pod was captured" >&2; exit 1; fi

# --- floor: the kernel transaction alone --------------------------------------------------------
# The rule text of the sidecar pod above, from the init-mode dry run in a v4-only netns.
new_ns "$PFX-dry" "$POD_ADDR"
DRY_ARGS=(-p 15001 -z 15006 -u 1337 -g 1337 -m REDIRECT -i '*' -b '*' -d 15020,15021,15090 -o 15020)
ip netns exec "$PFX-dry" "$BIN" iptables -n "${DRY_ARGS[@]}" > "$WORK/rules.v4"
ip netns exec "$PFX-dry" "$BIN" iptables -n --native-nftables "${DRY_ARGS[@]}" > "$WORK/rules.nft"
want="$(grep -c '^-A' "$WORK/rules-dipt.txt")"
have="$(grep -c '^-A' "$WORK/rules.v4")"
[ "$want" = "$have" ] || echo "bench-add: note: dry-run text has $have rules, the plugin applied $want" >&2

run_floor() { # LABEL program args... (stdin file in FLOOR_IN)
    local label="$1" i ns t0 t1; shift
    : > "$WORK/t-$label"
    for i in $(seq 1 "$N"); do
        ns="$PFX-$label$i"
        new_ns "$ns" "$POD_ADDR"
        if [ "${FLOOR_PRE:-}" = probe-rule ]; then
            nsenter --net="/run/netns/$ns" iptables-nft -t nat -A INPUT -p 255 -j RETURN
        fi
        t0="${EPOCHREALTIME/./}"
        nsenter --net="/run/netns/$ns" "$@" < "$FLOOR_IN" > /dev/null
        t1="${EPOCHREALTIME/./}"
        echo $((t1 - t0)) >> "$WORK/t-$label"
        ip netns del "$ns"
    done
}
FLOOR_IN="$WORK/rules.v4" run_floor fipt iptables-nft-restore --noflush
FLOOR_IN="$WORK/rules.nft" run_floor fnft nft -f -
FLOOR_IN=/dev/null run_floor ftrue true
# The single commands the iptables flavor detection runs (netx `detect_here`), one fresh netns each.
PROBE=(-t nat -A INPUT -p 255 -j RETURN)
FLOOR_IN=/dev/null run_floor s4legacy iptables-legacy-save
FLOOR_IN=/dev/null run_floor s6legacy ip6tables-legacy-save
FLOOR_IN=/dev/null run_floor s4nft iptables-nft-save
FLOOR_IN=/dev/null run_floor sprobeadd iptables-nft "${PROBE[@]}"
FLOOR_IN=/dev/null FLOOR_PRE=probe-rule run_floor sprobedel iptables-nft -t nat -D INPUT -p 255 -j RETURN

# --- process count per ADD (strace, optional) ---------------------------------------------------
execs() { # conf pod -> number of execve in the plugin and its children (minus the plugin itself)
    local ns="$PFX-strace$RANDOM"
    new_ns "$ns" "$POD_ADDR"
    CNI_COMMAND=ADD CNI_CONTAINERID=c1 CNI_NETNS="/run/netns/$ns" CNI_IFNAME=eth0 \
        CNI_ARGS="IgnoreUnknown=1;K8S_POD_NAMESPACE=bench;K8S_POD_NAME=$2" CNI_PATH="$WORK/bin" \
        strace -f -qq -e trace=execve -o "$WORK/strace.txt" "$BIN" < "$1" > /dev/null 2>&1
    ip netns del "$ns"
    local progs
    progs="$(grep -v ENOENT "$WORK/strace.txt" | grep -o 'execve("[^"]*"' | sed 's/execve("//;s/"$//' \
        | xargs -r -n1 basename | tail -n +2 | sort | uniq -c | awk '{printf "%s%s×%s", sep, $2, $1; sep=", "}')"
    echo "$(($(grep -v ENOENT "$WORK/strace.txt" | grep -c 'execve(') - 1)) (${progs:-none})"
}
EXEC_IPT="n/a"; EXEC_FORCED="n/a"; EXEC_NFT="n/a"; EXEC_PLAIN="n/a"
if command -v strace > /dev/null; then
    EXEC_IPT="$(execs "$WORK/direct-iptables.json" sidecar)"
    EXEC_FORCED="$(execs "$WORK/direct-forced.json" sidecar)"
    EXEC_NFT="$(execs "$WORK/direct-nft.json" sidecar)"
    EXEC_PLAIN="$(execs "$WORK/direct-iptables.json" plain)"
fi

# --- report ---------------------------------------------------------------------------------------
# stats FILE -> "median p90 min" in ms (nearest-rank percentiles)
stats() {
    sort -n "$1" | awk '{v[NR]=$1} END {
        m=int((NR+1)/2); p=int(NR*0.9+0.999); if (p<1) p=1;
        printf "%.2f %.2f %.2f", v[m]/1000, v[p]/1000, v[1]/1000 }'
}
read -r A_MED A_P90 A_MIN <<< "$(stats "$WORK/t-a")"
read -r B_MED B_P90 B_MIN <<< "$(stats "$WORK/t-b")"
read -r C_MED C_P90 C_MIN <<< "$(stats "$WORK/t-c")"
row() { # label file note
    local med p90 min; read -r med p90 min <<< "$(stats "$2")"
    printf '| %s | %s | %s | %s | %s |\n' "$1" "$med" "$p90" "$min" "$3"
}
SHARE="$(awk -v a="$A_MED" -v b="$B_MED" 'BEGIN{printf "%.2f", b-a}')"
RATIO="$(awk -v a="$A_MED" -v b="$B_MED" 'BEGIN{printf "%.2f", (b-a)/a}')"
SHARE_C="$(awk -v a="$A_MED" -v b="$C_MED" 'BEGIN{printf "%.2f", b-a}')"
RATIO_C="$(awk -v a="$A_MED" -v b="$C_MED" 'BEGIN{printf "%.2f", (b-a)/a}')"
read -r D_MED _ _ <<< "$(stats "$WORK/t-d")"
ratio_d() { # file -> median / bridge-direct median
    awk -v d="$D_MED" -v m="$(stats "$1" | cut -d' ' -f1)" 'BEGIN{printf "%.2f", m/d}'
}

MACHINE="$(nproc) vCPU $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//'), \
$(awk '/MemTotal/{printf "%.0f GiB", $2/1048576}' /proc/meminfo), Linux $(uname -r), \
$(iptables-nft --version 2>/dev/null | head -1), nftables $(nft --version | awk '{print $2}'), \
reference plugins $(dpkg-query -W -f='containernetworking-plugins ${Version}' containernetworking-plugins 2>/dev/null || echo "in $REF_PLUGINS")"

section() {
cat <<EOF
## CNI ADD latency

Wall time of one CNI ADD for a sidecar-injected pod, $N samples per row, median / p90 / min in
milliseconds. (a), (b), (c) and "bridge direct" run interleaved through \`cnitool\` inside a
throw-away node netns ((a)–(c) include cnitool's own start-up); the meshcni direct rows exec
\`target/release/meshcni\` from bash with the CNI env and a stdin whose \`prevResult\` was captured
from (a), into a fresh pod netns each time (pod netns creation not timed); the floor rows feed the
same rule text (\`meshcni iptables --dry-run\`) to the kernel through \`nsenter\`.

Reproduce (root; builds the release binary first):

\`\`\`
N=$N scripts/bench-add.sh --write
\`\`\`

Machine: $MACHINE. Measured $(date -u +%Y-%m-%d) at $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown) (+ working tree).

| measurement | median ms | p90 ms | min ms | notes |
| --- | ---: | ---: | ---: | --- |
| (a) cnitool ADD: bridge + host-local | $A_MED | $A_P90 | $A_MIN | reference plugin's own ADD |
| (b) cnitool ADD: bridge + host-local → meshcni | $B_MED | $B_P90 | $B_MIN | sidecar pod |
| **meshcni share = (b) − (a)** | **$SHARE** | | | **$RATIO × (a)**; target ≤ 0.5 × (a) |
| (c) as (b), meshcni with \`iptables_binary: nft\` | $C_MED | $C_P90 | $C_MIN | no per-pod flavor detection |
| meshcni share without detection = (c) − (a) | $SHARE_C | | | $RATIO_C × (a) |
$(row "bridge (+ host-local) exec'd directly" "$WORK/t-d" "reference for the direct rows below")
$(row "meshcni direct: sidecar, iptables backend (flavor detected → nft)" "$WORK/t-dipt" "$(ratio_d "$WORK/t-dipt") × bridge direct; execs: $EXEC_IPT")
$(row "meshcni direct: sidecar, iptables backend, \`iptables_binary: nft\`" "$WORK/t-dforced" "$(ratio_d "$WORK/t-dforced") × bridge direct; no flavor detection; execs: $EXEC_FORCED")
$(row "meshcni direct: sidecar, native nftables backend" "$WORK/t-dnft" "$(ratio_d "$WORK/t-dnft") × bridge direct; execs: $EXEC_NFT")
$(row "meshcni direct: non-injected pod (pass-through)" "$WORK/t-dplain" "$(ratio_d "$WORK/t-dplain") × bridge direct; execs: $EXEC_PLAIN")
$(row "floor: \`iptables-nft-restore --noflush\` of the v4 text" "$WORK/t-fipt" "via nsenter; $(grep -c '^-A' "$WORK/rules.v4") rules")
$(row "floor: \`nft -f\` of the nft text" "$WORK/t-fnft" "via nsenter")
$(row "floor: \`nsenter --net=<pod> true\`" "$WORK/t-ftrue" "exec overhead included in every nsenter row")

Cost of each command a naive per-pod flavor detection (Istio's, and meshcni's before the
optimisation described below) runs on every ADD (same method as the floor rows: one fresh netns
per sample, timed through \`nsenter\`). meshcni now runs none of them on a fresh pod netns: it
reads \`/proc/thread-self/net/ip{,6}_tables_names\` and asks nf_tables over netlink instead, and
the probe only runs if a restore fails:

| detection step | median ms | p90 ms | min ms | notes |
| --- | ---: | ---: | ---: | --- |
$(row "\`iptables-legacy-save\`" "$WORK/t-s4legacy" "legacy rule count, v4")
$(row "\`ip6tables-legacy-save\`" "$WORK/t-s6legacy" "legacy rule count, v6")
$(row "\`iptables-nft-save\`" "$WORK/t-s4nft" "nft usable? (then run again as the v4 snapshot)")
$(row "\`iptables-nft -t nat -A INPUT -p 255 -j RETURN\`" "$WORK/t-sprobeadd" "probe, in a scratch netns")
$(row "\`iptables-nft -t nat -D INPUT -p 255 -j RETURN\`" "$WORK/t-sprobedel" "probe cleanup: an nf_tables deletion commit")
EOF
}

OUT="$(section)"
if [ "$WRITE" = 1 ]; then
    FILE="$ROOT/BENCHMARKS.md"
    BEGIN='<!-- BEGIN bench-add: generated by scripts/bench-add.sh --write -->'
    END='<!-- END bench-add -->'
    [ -f "$FILE" ] || printf '# Benchmarks\n' > "$FILE"
    if grep -qF "$BEGIN" "$FILE"; then
        printf '%s\n' "$OUT" > "$WORK/section.md"
        awk -v begin="$BEGIN" -v end="$END" -v body="$WORK/section.md" '
            $0 == begin { print; while ((getline l < body) > 0) print l; skip = 1; next }
            $0 == end { skip = 0 }
            !skip { print }' "$FILE" > "$WORK/bench.new"
        cat "$WORK/bench.new" > "$FILE"
    else
        printf '\n%s\n%s\n%s\n' "$BEGIN" "$OUT" "$END" >> "$FILE"
    fi
    echo "bench-add: updated $FILE" >&2
fi
printf '%s\n' "$OUT"
