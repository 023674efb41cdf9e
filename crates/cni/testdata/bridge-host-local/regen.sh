#!/usr/bin/env bash
# Regenerates the `bridge`+`host-local` results used by the meshcni-cni conversion tests.
# Runs the reference plugins (/usr/lib/cni) directly, dual-stack, once per cniVersion, inside two
# throw-away network namespaces (a "node" and a "pod"); the host network is never touched and both
# namespaces plus the IPAM data dir are removed on exit. Needs root.
#   usage: crates/cni/testdata/bridge-host-local/regen.sh
set -euo pipefail
OUT="$(cd "$(dirname "$(readlink -f "$0")")" && pwd)"
CNI_BIN="${CNI_BIN:-/usr/lib/cni}"
NODE="mcni-fx-node-$$" POD="mcni-fx-pod-$$"
DATA="$(mktemp -d)"
cleanup() { ip netns del "$POD" 2>/dev/null || true; ip netns del "$NODE" 2>/dev/null || true; rm -rf "$DATA"; }
trap cleanup EXIT
ip netns add "$NODE"
ip netns add "$POD"
for v in 0.2.0 0.3.0 0.3.1 0.4.0 1.0.0; do
  conf=$(cat <<JSON
{"cniVersion":"$v","name":"fxnet","type":"bridge","bridge":"mcnifx0","isGateway":true,"ipMasq":false,
 "ipam":{"type":"host-local","dataDir":"$DATA",
   "ranges":[[{"subnet":"10.88.0.0/16","gateway":"10.88.0.1"}],[{"subnet":"fd00:88::/64","gateway":"fd00:88::1"}]],
   "routes":[{"dst":"0.0.0.0/0"},{"dst":"::/0"}]},
 "dns":{"nameservers":["10.96.0.10"],"domain":"cluster.local","search":["default.svc.cluster.local","svc.cluster.local"],"options":["ndots:5"]}}
JSON
)
  # 0.1.0/0.2.0 have no multi-range dual-stack in host-local output; keep only the v4 range there
  if [ "$v" = 0.2.0 ]; then
    conf=$(echo "$conf" | sed 's/,\[{"subnet":"fd00:88::\/64","gateway":"fd00:88::1"}\]//; s/,{"dst":"::\/0"}//')
  fi
  env_common=(CNI_CONTAINERID=fx-$v CNI_NETNS=/run/netns/$POD CNI_IFNAME=eth0 CNI_PATH=$CNI_BIN
              "CNI_ARGS=IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=fx")
  echo "$conf" | ip netns exec "$NODE" env CNI_COMMAND=ADD "${env_common[@]}" "$CNI_BIN/bridge" > "$OUT/$v.json"
  echo "$conf" | ip netns exec "$NODE" env CNI_COMMAND=DEL "${env_common[@]}" "$CNI_BIN/bridge" >/dev/null
  echo "wrote $OUT/$v.json"
done
