#!/usr/bin/env bash
# bench-agent-idle.sh: idle footprint of meshcni-agent (release build) with no pods: VmRSS,
# threads and CPU over an idle window, on a fake host root (temp dirs standing in for
# /etc/cni/net.d, /opt/cni/bin, the service-account dir). Touches nothing outside its temp dir.
#   IDLE_SECONDS=20 scripts/bench-agent-idle.sh [--no-build]
set -euo pipefail
cd "$(dirname "$(readlink -f "$0")")/.."
IDLE="${IDLE_SECONDS:-20}"
[ "${1:-}" = --no-build ] || cargo build -q --release -p meshcni-agent -p meshcni-plugin
W="$(mktemp -d /tmp/meshcni-idle.XXXXXX)"
pid=""
cleanup() { [ -n "$pid" ] && kill "$pid" 2>/dev/null; wait 2>/dev/null || true; rm -rf "$W"; }
trap cleanup EXIT
mkdir -p "$W"/{net.d,src-bin,host-bin,sa,run,ambient}
cp target/release/meshcni "$W/src-bin/"
printf '{"cniVersion":"1.0.0","name":"k8s-pod-network","plugins":[{"type":"bridge","bridge":"cni0","ipam":{"type":"host-local","subnet":"10.250.0.0/24"}}]}\n' > "$W/net.d/10-bridge.conflist"
echo "token-for-bench" > "$W/sa/token"
echo "not-a-real-ca" > "$W/sa/ca.crt"
KUBERNETES_SERVICE_HOST=127.0.0.1 KUBERNETES_SERVICE_PORT=6443 \
target/release/meshcni-agent \
    --mounted-cni-net-dir "$W/net.d" --cni-net-dir "$W/net.d" \
    --cni-bin-dir "$W/src-bin" --cni-bin-dirs "$W/host-bin" \
    --service-account-dir "$W/sa" --cni-agent-run-dir "$W/run" \
    --ambient-config-dir "$W/ambient" --uninstall-marker-file "$W/no-marker" \
    --monitoring-port 0 --readiness-port 0 --log-level warn > "$W/agent.log" 2>&1 &
pid=$!
sleep 3
hz=$(getconf CLK_TCK)
t0=$(awk '{print $14+$15}' "/proc/$pid/stat")
sleep "$IDLE"
t1=$(awk '{print $14+$15}' "/proc/$pid/stat")
rss=$(awk '/^VmRSS/ {print $2}' "/proc/$pid/status")
hwm=$(awk '/^VmHWM/ {print $2}' "/proc/$pid/status")
thr=$(awk '/^Threads/ {print $2}' "/proc/$pid/status")
cpu=$(awk -v a="$t0" -v b="$t1" -v hz="$hz" -v s="$IDLE" 'BEGIN {printf "%.3f", (b-a)/hz/s*100}')
grep -q '"type": "meshcni"' "$W/net.d/10-bridge.conflist" || { echo "agent did not install the plugin:"; cat "$W/agent.log"; exit 1; }
echo "| idle window | VmRSS | peak RSS (VmHWM) | threads | CPU |"
echo "| --- | ---: | ---: | ---: | ---: |"
echo "| ${IDLE} s after install | $((rss / 1024)).$(( (rss % 1024) * 10 / 1024 )) MiB | $((hwm / 1024)).$(( (hwm % 1024) * 10 / 1024 )) MiB | $thr | ${cpu} % |"
