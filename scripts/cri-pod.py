#!/usr/bin/env python3
"""Minimal kubelet-like CRI client (a crictl stand-in) for CNI end-to-end tests.

Needs the PyPI package container-runtime-interface-api==2.0.1 (compiled CRI v1 stubs; pulls
grpcio + protobuf); scripts/setup.sh installs it into a venv (default /opt/meshcni/cri-venv), so
run it as /opt/meshcni/cri-venv/bin/python scripts/cri-pod.py ... Talks CRI v1 to containerd
>= 1.6 (Debian bookworm).

  cri-pod.py -r unix:///path/containerd.sock version
  cri-pod.py -r ... runp --name web --namespace default [--uid UID] [--port 8080:80]
                                        -> prints the pod sandbox id
  cri-pod.py -r ... create-start POD_ID --image localhost/meshcni-busybox:latest -- sh -c 'sleep 3600'
                                        -> prints the container id
  cri-pod.py -r ... exec CONTAINER_ID -- ip addr
  cri-pod.py -r ... inspectp POD_ID     (JSON: state, ip, netns path, cniResult)
  cri-pod.py -r ... pods                (one line per sandbox)
  cri-pod.py -r ... stopp POD_ID        (StopPodSandbox: CNI DEL)
  cri-pod.py -r ... rmp POD_ID          (RemovePodSandbox)

RunPodSandbox makes containerd's CRI plugin call CNI ADD exactly as under kubelet:
CNI_ARGS="K8S_POD_INFRA_CONTAINER_ID=..;K8S_POD_UID=..;IgnoreUnknown=1;K8S_POD_NAMESPACE=..;K8S_POD_NAME=.."
and runtimeConfig from the capabilities the plugins declare (portMappings, dns, ...).
"""
import argparse
import json
import sys
import uuid

import grpc
from cri_api.v1 import api_pb2 as api
from cri_api.v1 import api_pb2_grpc as rpc


def stubs(addr):
    ch = grpc.insecure_channel(addr)
    return rpc.RuntimeServiceStub(ch), rpc.ImageServiceStub(ch)


def sandbox_config(a):
    ports = []
    for p in a.port or []:
        host, cont = p.split(":")
        ports.append(api.PortMapping(protocol=api.TCP, container_port=int(cont), host_port=int(host)))
    return api.PodSandboxConfig(
        metadata=api.PodSandboxMetadata(name=a.name, namespace=a.namespace,
                                        uid=a.uid or str(uuid.uuid4()), attempt=0),
        hostname=a.name,
        log_directory=a.log_dir or "",
        port_mappings=ports,
        labels=dict(kv.split("=", 1) for kv in (a.label or [])),
        annotations=dict(kv.split("=", 1) for kv in (a.annotation or [])),
        linux=api.LinuxPodSandboxConfig(
            security_context=api.LinuxSandboxSecurityContext(
                namespace_options=api.NamespaceOption(network=api.POD, pid=api.CONTAINER, ipc=api.POD))),
    )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("-r", "--runtime-endpoint", required=True, help="unix:///path/to/containerd.sock")
    ap.add_argument("-t", "--timeout", type=float, default=60.0)
    sp = ap.add_subparsers(dest="cmd", required=True)
    sp.add_parser("version")
    p = sp.add_parser("runp")
    p.add_argument("--name", required=True)
    p.add_argument("--namespace", default="default")
    p.add_argument("--uid")
    p.add_argument("--port", action="append", help="HOST:CONTAINER (tcp)")
    p.add_argument("--label", action="append", help="k=v")
    p.add_argument("--annotation", action="append", help="k=v")
    p.add_argument("--log-dir")
    p = sp.add_parser("create-start")
    p.add_argument("pod")
    p.add_argument("--image", required=True)
    p.add_argument("--cname", default="main")
    p = sp.add_parser("exec")
    p.add_argument("container")
    for n in ("inspectp", "stopp", "rmp"):
        sp.add_parser(n).add_argument("pod")
    sp.add_parser("pods")
    argv = sys.argv[1:]
    cmdline = []
    if "--" in argv:
        i = argv.index("--")
        argv, cmdline = argv[:i], argv[i + 1:]
    a = ap.parse_args(argv)
    a.argv = cmdline
    rt, _img = stubs(a.runtime_endpoint)
    to = a.timeout

    if a.cmd == "version":
        v = rt.Version(api.VersionRequest(), timeout=to)
        print(v.runtime_name, v.runtime_version, v.runtime_api_version)
    elif a.cmd == "runp":
        r = rt.RunPodSandbox(api.RunPodSandboxRequest(config=sandbox_config(a)), timeout=to)
        print(r.pod_sandbox_id)
    elif a.cmd == "create-start":
        argv = a.argv
        st = rt.PodSandboxStatus(api.PodSandboxStatusRequest(pod_sandbox_id=a.pod), timeout=to).status
        pcfg = api.PodSandboxConfig(metadata=st.metadata, labels=st.labels, annotations=st.annotations)
        cfg = api.ContainerConfig(
            metadata=api.ContainerMetadata(name=a.cname, attempt=0),
            image=api.ImageSpec(image=a.image),
            command=argv[:1], args=argv[1:],
            log_path="",
            linux=api.LinuxContainerConfig(),
        )
        c = rt.CreateContainer(api.CreateContainerRequest(pod_sandbox_id=a.pod, config=cfg,
                                                          sandbox_config=pcfg), timeout=to)
        rt.StartContainer(api.StartContainerRequest(container_id=c.container_id), timeout=to)
        print(c.container_id)
    elif a.cmd == "exec":
        argv = a.argv
        r = rt.ExecSync(api.ExecSyncRequest(container_id=a.container, cmd=argv, timeout=int(to)), timeout=to + 5)
        sys.stdout.write(r.stdout.decode(errors="replace"))
        sys.stderr.write(r.stderr.decode(errors="replace"))
        sys.exit(r.exit_code)
    elif a.cmd == "inspectp":
        r = rt.PodSandboxStatus(api.PodSandboxStatusRequest(pod_sandbox_id=a.pod, verbose=True), timeout=to)
        info = {k: json.loads(v) for k, v in r.info.items()}
        spec = info.get("info", {}).get("runtimeSpec", {})
        netns = [n.get("path", "") for n in spec.get("linux", {}).get("namespaces", [])
                 if n.get("type") == "network"]
        out = {
            "id": r.status.id,
            "state": api.PodSandboxState.Name(r.status.state),
            "name": r.status.metadata.name, "namespace": r.status.metadata.namespace,
            "uid": r.status.metadata.uid,
            "ip": r.status.network.ip,
            "netns": netns[0] if netns else "",
            "cniResult": info.get("info", {}).get("cniResult"),
        }
        print(json.dumps(out, indent=2))
    elif a.cmd == "pods":
        for s in rt.ListPodSandbox(api.ListPodSandboxRequest(), timeout=to).items:
            print(s.id, api.PodSandboxState.Name(s.state), f"{s.metadata.namespace}/{s.metadata.name}")
    elif a.cmd == "stopp":
        rt.StopPodSandbox(api.StopPodSandboxRequest(pod_sandbox_id=a.pod), timeout=to)
    elif a.cmd == "rmp":
        rt.RemovePodSandbox(api.RemovePodSandboxRequest(pod_sandbox_id=a.pod), timeout=to)


if __name__ == "__main__":
    try:
        main()
    except grpc.RpcError as e:
        print(f"CRI error: {e.code().name}: {e.details()}", file=sys.stderr)
        sys.exit(1)
