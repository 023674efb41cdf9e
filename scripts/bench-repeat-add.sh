#!/usr/bin/env bash
# bench-repeat-add.sh: cost of a repeated CNI ADD (verify-or-repair, issue 7 item 1) against
# the first ADD of the same sidecar pod, per rule backend.
#
#   scripts/bench-repeat-add.sh [--write] [--no-build]
#
#   --write      replace (or append) the "Repeated ADD" section at the end of BENCHMARKS.md
#   --no-build   use target/release/meshcni as is (default: cargo build --release first)
#   N=50         samples per row
#
# Per sample, in a fresh pod netns (veth with an IPv4 address, creation not timed), the real
# binary is exec'd from bash with the CNI env and stdin (wall time from $EPOCHREALTIME):
#   first    ADD into the empty netns (installs the rules);
#   repeat   the same ADD again (rules identical: verified, nothing applied);
#   repair   the same ADD after one capture chain was flushed (`ISTIO_OUTPUT`, or the nft
#            `istio-output` chain): detected and repaired in one transaction.
# Backends: iptables (flavor detected → iptables-nft here), iptables forced to legacy, native
# nftables. `execs` counts the processes one ADD starts (strace, if installed).
#
# Safety: only network namespaces this script creates (mcni-<pid>-…), removed on exit (trap).
# Needs: root, iproute2, iptables-nft, iptables-legacy, nft, jq; strace optional.
set -euo pipefail

ROOT="$(cd "$(dirname "$(readlink -f "$0")")/.." && pwd)"
N="${N:-50}"
WRITE=0
BUILD=1
for arg in "$@"; do
    case "$arg" in
        --write) WRITE=1 ;;
        --no-build) BUILD=0 ;;
        *) echo "usage: $0 [--write] [--no-build]" >&2; exit 2 ;;
    esac
done
[ "$(id -u)" = 0 ] || { echo "bench-repeat-add: must run as root" >&2; exit 1; }
for t in ip iptables-nft iptables-legacy nft jq; do
    command -v "$t" > /dev/null || { echo "bench-repeat-add: $t not found" >&2; exit 1; }
done
if [ "$BUILD" = 1 ]; then
    (cd "$ROOT" && cargo build --release -p meshcni-plugin --bin meshcni >&2)
fi
BIN="$ROOT/target/release/meshcni"
[ -x "$BIN" ] || { echo "bench-repeat-add: $BIN missing (build it or drop --no-build)" >&2; exit 1; }

PFX="mcni-$$"
WORK="$(mktemp -d /tmp/mcni-bench-repeat.XXXXXX)"
declare -a NETNS=()
cleanup() {
    local ns
    for ns in "${NETNS[@]}"; do
        [ -e "/run/netns/$ns" ] && ip netns del "$ns" 2> /dev/null || true
    done
    rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

POD_ADDR="10.252.0.2/24"
new_pod_ns() {
    ip netns add "$1"
    NETNS+=("$1")
    ip -n "$1" link set lo up
    ip -n "$1" link add eth0 type veth peer name peer0
    ip -n "$1" link set eth0 up
    ip -n "$1" link set peer0 up
    ip -n "$1" addr add "$POD_ADDR" dev eth0
}

mkdir -p "$WORK"/{run,md/pods/bench,md/namespaces}
status='{\"initContainers\":[\"istio-validation\"],\"containers\":[\"istio-proxy\"],\"revision\":\"default\"}'
cat > "$WORK/md/pods/bench/sidecar.json" << EOF
{"apiVersion":"v1","kind":"Pod","metadata":{"name":"sidecar","namespace":"bench","uid":"uid-sidecar",
 "annotations":{"sidecar.istio.io/status":"$status"}},
 "spec":{"containers":[{"name":"app","image":"app:1"},
  {"name":"istio-proxy","image":"proxyv2:1.20.0","args":["proxy","sidecar"],
   "securityContext":{"runAsUser":1337,"runAsGroup":1337}}]}}
EOF
echo '{"apiVersion":"v1","kind":"Namespace","metadata":{"name":"bench"}}' > "$WORK/md/namespaces/bench.json"

conf() { # extra-json
    jq -n --argjson extra "$1" --arg md "$WORK/md" --arg run "$WORK/run" --arg addr "$POD_ADDR" \
        '{cniVersion: "1.0.0", name: "bench", type: "meshcni", pod_metadata_dir: $md,
          cni_agent_run_dir: $run, plugin_log_level: "warn",
          prevResult: {cniVersion: "1.0.0", interfaces: [{name: "eth0"}],
                       ips: [{address: $addr, interface: 0}]}} + $extra'
}
conf '{}' > "$WORK/conf-ipt.json"
conf '{"iptables_binary": "legacy"}' > "$WORK/conf-legacy.json"
conf '{"native_nftables": true}' > "$WORK/conf-nft.json"

add() { # conf ns outfile-for-µs [strace-file]
    local t0 t1
    local -a pre=()
    [ -n "${4:-}" ] && pre=(strace -f -qq -e trace=execve -o "$4")
    t0="${EPOCHREALTIME/./}"
    CNI_COMMAND=ADD CNI_CONTAINERID=bench CNI_NETNS="/run/netns/$2" CNI_IFNAME=eth0 \
        CNI_ARGS="IgnoreUnknown=1;K8S_POD_NAMESPACE=bench;K8S_POD_NAME=sidecar" CNI_PATH=/nonexistent \
        "${pre[@]}" "$BIN" < "$1" > "$WORK/out.json" 2> "$WORK/err.txt" \
        || { echo "bench-repeat-add: ADD failed:" >&2; cat "$WORK/out.json" "$WORK/err.txt" >&2; exit 1; }
    t1="${EPOCHREALTIME/./}"
    [ -n "$3" ] && echo $((t1 - t0)) >> "$3"
    return 0
}

drift() { # backend ns
    case "$1" in
        ipt) ip netns exec "$2" iptables-nft -t nat -F ISTIO_OUTPUT ;;
        legacy) ip netns exec "$2" iptables-legacy -t nat -F ISTIO_OUTPUT ;;
        nft) ip netns exec "$2" nft flush chain inet istio-proxy-nat istio-output ;;
    esac
}

dump() { # backend ns
    case "$1" in
        ipt) ip netns exec "$2" iptables-nft-save | grep -v '^#' ;;
        legacy) ip netns exec "$2" iptables-legacy-save | grep -v '^#' ;;
        nft) ip netns exec "$2" nft list ruleset 2> /dev/null ;;
    esac
}

for b in ipt legacy nft; do
    : > "$WORK/t-$b-first"; : > "$WORK/t-$b-repeat"; : > "$WORK/t-$b-repair"
    for i in $(seq 1 "$N"); do
        ns="$PFX-$b$i"
        new_pod_ns "$ns"
        add "$WORK/conf-$b.json" "$ns" "$WORK/t-$b-first"
        fresh="$(dump "$b" "$ns")"
        fresh_handles="$(ip netns exec "$ns" nft -a list ruleset)"
        add "$WORK/conf-$b.json" "$ns" "$WORK/t-$b-repeat"
        # nf_tables flavors: with rule handles, which change when a rule is re-created.
        [ "$(dump "$b" "$ns")" = "$fresh" ] || { echo "bench-repeat-add: repeated ADD changed the rules ($b)" >&2; exit 1; }
        [ "$b" = legacy ] || [ "$(ip netns exec "$ns" nft -a list ruleset)" = "$fresh_handles" ] \
            || { echo "bench-repeat-add: repeated ADD re-created rules ($b)" >&2; exit 1; }
        drift "$b" "$ns"
        add "$WORK/conf-$b.json" "$ns" "$WORK/t-$b-repair"
        [ "$(dump "$b" "$ns")" = "$fresh" ] || { echo "bench-repeat-add: repair did not restore the rules ($b)" >&2; exit 1; }
        ip netns del "$ns"
    done
    if command -v strace > /dev/null; then
        ns="$PFX-$b-strace"
        new_pod_ns "$ns"
        add "$WORK/conf-$b.json" "$ns" "" "$WORK/strace-$b-first"
        add "$WORK/conf-$b.json" "$ns" "" "$WORK/strace-$b-repeat"
        drift "$b" "$ns"
        add "$WORK/conf-$b.json" "$ns" "" "$WORK/strace-$b-repair"
        ip netns del "$ns"
    fi
done

stats() { # file -> "median p90" in ms (nearest rank)
    sort -n "$1" | awk '{v[NR]=$1} END { m=int((NR+1)/2); p=int(NR*0.9+0.999); if (p<1) p=1;
        printf "%.2f %.2f", v[m]/1000, v[p]/1000 }'
}
execs() { # strace file -> "count (prog×n, …)" without the plugin itself
    [ -f "$1" ] || { echo "n/a"; return; }
    local progs
    progs="$(grep -v ENOENT "$1" | grep -o 'execve("[^"]*"' | sed 's/execve("//;s/"$//' \
        | xargs -r -n1 basename | tail -n +2 | sort | uniq -c | awk '{printf "%s%s×%s", sep, $2, $1; sep=", "}')"
    echo "$(($(grep -v ENOENT "$1" | grep -c 'execve(') - 1)) (${progs:-none})"
}
row() { # label backend
    local fm fp rm rp pm pp
    read -r fm fp <<< "$(stats "$WORK/t-$2-first")"
    read -r rm rp <<< "$(stats "$WORK/t-$2-repeat")"
    read -r pm pp <<< "$(stats "$WORK/t-$2-repair")"
    printf '| %s | %s / %s | %s / %s | %s / %s | %s | %s | %s |\n' "$1" "$fm" "$fp" "$rm" "$rp" "$pm" "$pp" \
        "$(execs "$WORK/strace-$2-first")" "$(execs "$WORK/strace-$2-repeat")" "$(execs "$WORK/strace-$2-repair")"
}

section() {
cat << EOF
## Repeated ADD (verify-or-repair)

A runtime retries ADD, kubelet replays it after a restart: the second ADD of a sidecar pod must
succeed and leave exactly one copy of the rules. Wall time of the real \`target/release/meshcni\`
exec'd from bash into a fresh IPv4 pod netns (REDIRECT pod, $N samples, median / p90 ms):
*first* ADD into the empty netns, the same ADD *repeated* (rules verified identical, nothing
applied), and the same ADD after \`ISTIO_OUTPUT\` / \`istio-output\` was flushed (*repair*: drift
detected, expected form confirmed in a scratch netns, one repairing transaction). Each sample
also checks that the repeated and the repairing ADD leave the rule dump byte-identical to the
first one.

\`\`\`
N=$N scripts/bench-repeat-add.sh --write
\`\`\`

Machine: $(nproc) vCPU, Linux $(uname -r), $(iptables-nft --version 2>/dev/null | head -1), nftables $(nft --version | awk '{print $2}'); measured $(date -u +%Y-%m-%d) at $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown).

| backend | first ADD | repeated ADD | repair ADD | execs first | execs repeated | execs repair |
| --- | ---: | ---: | ---: | --- | --- | --- |
$(row "iptables (detected → nft)" ipt)
$(row "iptables, \`iptables_binary: legacy\`" legacy)
$(row "native nftables" nft)

The repeated ADD reads the state (one \`-save\` per family; for nft one \`nft list ruleset\`)
and compares it with the predicted form; iptables needs no restore. The native nft backend
compares listings, so it also lists the fresh text's result in a scratch netns (\`nft -f\` +
\`nft list ruleset\` there): more execs than a plain re-apply would need, but the pod's tables are
left untouched (no rule re-created, counters kept). The repair path costs the comparison, the
scratch-netns confirmation, a snapshot for the rollback and the repairing transaction.
Absolute times depend on the machine's load (the run above shared 2 vCPUs with other jobs);
compare the rows of one run.
EOF
}

OUT="$(section)"
if [ "$WRITE" = 1 ]; then
    FILE="$ROOT/BENCHMARKS.md"
    BEGIN='<!-- BEGIN bench-repeat-add: generated by scripts/bench-repeat-add.sh --write -->'
    END='<!-- END bench-repeat-add -->'
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
    echo "bench-repeat-add: updated $FILE" >&2
fi
printf '%s\n' "$OUT"
