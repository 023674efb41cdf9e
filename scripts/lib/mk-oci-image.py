#!/usr/bin/env python3
"""Build a single-layer OCI image archive (oci-layout tar) from a rootfs folder.

Stdlib only. The result loads with `ctr -n k8s.io images import FILE` (containerd),
`podman load -i FILE`, or `skopeo copy oci-archive:FILE ...`.

Usage:
  mk-oci-image.py --rootfs DIR --name localhost/meshcni-pause:latest \
      --entrypoint /bin/sleep --cmd 2147483647 -o pause.tar
  mk-oci-image.py --busybox /bin/busybox --name localhost/meshcni-pause:latest \
      --entrypoint /bin/sleep --cmd 2147483647 -o pause.tar
      (--busybox: the rootfs is just that static busybox plus applet links, built in a temp dir)

The image name goes into the index annotations io.containerd.image.name (read by
ctr import) and org.opencontainers.image.ref.name (the tag, read by podman/skopeo).
"""
import argparse
import gzip
import hashlib
import io
import json
import os
import shutil
import tarfile
import tempfile
import time

APPLETS = ("sh", "ip", "ping", "sleep", "cat", "ls", "nc", "hostname", "echo", "wget")


def busybox_rootfs(busybox, into):
    """A minimal rootfs: bin/busybox (must be static) and applet symlinks."""
    for d in ("bin", "etc", "proc", "sys", "dev", "tmp", "run"):
        os.makedirs(os.path.join(into, d), exist_ok=True)
    shutil.copy(busybox, os.path.join(into, "bin", "busybox"))
    for a in APPLETS:
        os.symlink("busybox", os.path.join(into, "bin", a))


def sha(b):
    return "sha256:" + hashlib.sha256(b).hexdigest()


def main():
    ap = argparse.ArgumentParser()
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--rootfs", help="directory to pack as the single layer")
    src.add_argument("--busybox", help="static busybox binary to build the rootfs from")
    ap.add_argument("--name", required=True, help="e.g. localhost/meshcni-pause:latest")
    ap.add_argument("--entrypoint", nargs="*", default=[])
    ap.add_argument("--cmd", nargs="*", default=[])
    ap.add_argument("--arch", default="amd64")
    ap.add_argument("-o", "--output", required=True)
    a = ap.parse_args()
    if a.busybox:
        with tempfile.TemporaryDirectory(prefix="mk-oci-image.") as d:
            busybox_rootfs(a.busybox, d)
            a.rootfs = d
            build(a)
    else:
        build(a)


def build(a):

    # Layer: deterministic-ish uncompressed tar of rootfs, numeric owner root.
    lbuf = io.BytesIO()
    with tarfile.open(fileobj=lbuf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for root, dirs, files in os.walk(a.rootfs):
            dirs.sort()
            for n in sorted(dirs) + sorted(files):
                p = os.path.join(root, n)
                arc = os.path.relpath(p, a.rootfs)
                ti = t.gettarinfo(p, arcname=arc)
                ti.uid = ti.gid = 0
                ti.uname = ti.gname = "root"
                ti.mtime = 0
                if ti.isreg():
                    with open(p, "rb") as f:
                        t.addfile(ti, f)
                else:
                    t.addfile(ti)
    layer = lbuf.getvalue()
    diff_id = sha(layer)
    layer_gz = gzip.compress(layer, mtime=0)

    config = {
        "architecture": a.arch,
        "os": "linux",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(0)),
        "config": {
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "Entrypoint": a.entrypoint or None,
            "Cmd": a.cmd or None,
            "WorkingDir": "/",
        },
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created_by": "scripts/lib/mk-oci-image.py"}],
    }
    config_b = json.dumps(config, separators=(",", ":")).encode()
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": sha(config_b), "size": len(config_b)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": sha(layer_gz), "size": len(layer_gz)}],
    }
    manifest_b = json.dumps(manifest, separators=(",", ":")).encode()
    tag = a.name.rsplit(":", 1)[1] if ":" in a.name.rsplit("/", 1)[-1] else "latest"
    index = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": sha(manifest_b), "size": len(manifest_b),
            "platform": {"architecture": a.arch, "os": "linux"},
            "annotations": {"io.containerd.image.name": a.name,
                            "org.opencontainers.image.ref.name": tag},
        }],
    }

    def add(t, name, data):
        ti = tarfile.TarInfo(name)
        ti.size = len(data)
        ti.mode = 0o644
        t.addfile(ti, io.BytesIO(data))

    with tarfile.open(a.output, "w") as t:
        add(t, "oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
        add(t, "index.json", json.dumps(index).encode())
        for blob in (config_b, manifest_b, layer_gz):
            add(t, "blobs/sha256/" + hashlib.sha256(blob).hexdigest(), blob)
    print(a.output)


if __name__ == "__main__":
    main()
