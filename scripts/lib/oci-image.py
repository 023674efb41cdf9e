#!/usr/bin/env python3
"""oci-image.py: write a container image archive from directories, deterministically.

Stdlib only, no container daemon. The output is one tar that is at the same time

  * an OCI image layout (oci-layout, index.json, blobs/sha256/...): `ctr images import FILE`,
    `podman load -i FILE`, `skopeo copy oci-archive:FILE ...`;
  * a docker-archive (manifest.json naming config and layers, same blobs): `docker load`,
    `podman load` (docker-archive path).

Usage:
  oci-image.py --rootfs DIR [--rootfs DIR ...] --name NAME [--tag TAG] --out FILE
               [--entrypoint ARG ...] [--cmd ARG ...] [--env K=V ...] [--workdir DIR]
               [--label K=V ...] [--arch amd64] [--epoch SECONDS]
  oci-image.py --busybox /bin/busybox --name NAME ... --out FILE
               (rootfs = that static busybox at /bin/busybox + applet symlinks, made in a temp dir)

  --rootfs DIR    one layer per --rootfs, in the order given (the first is the bottom layer).
  --name NAME     e.g. ghcr.io/meshcni/meshcni-agent or localhost/pause:3.10. A tag inside NAME
                  is used when --tag is absent; neither given: "latest". Docker Hub short names
                  are not expanded: pass the full name the runtime will be asked for.
  --epoch S       every timestamp (layer entries, archive entries, config "created"); default
                  $SOURCE_DATE_EPOCH, else 0.
  -o is an alias of --out.

Stdout: one JSON object: name (NAME:TAG), digest (the manifest digest, what `ctr images ls`
shows), config, layers [{digest, size, diff_id, uncompressed_size}], size_compressed (sum of
blob sizes), size_uncompressed (sum of layer tar sizes), out.

Determinism (same input tree + same --epoch -> the same bytes, hence the same digest):
entries are sorted by path; uid/gid 0 with empty user/group names; every mtime = epoch; modes
normalised (directories 0755, files 0755 if any execute bit is set else 0644, symlinks as
they are); no device files, sockets or fifos (refused); hard links are stored as separate
files; gzip without a file name and with mtime 0 at level 9; JSON with sorted keys.
"""
import argparse
import gzip
import hashlib
import io
import json
import os
import shutil
import stat
import sys
import tarfile
import tempfile
import time

BUSYBOX_APPLETS = ("sh", "ip", "ping", "sleep", "cat", "ls", "nc", "hostname", "echo", "wget")
DEFAULT_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class ImageError(Exception):
    pass


def sha(b):
    return "sha256:" + hashlib.sha256(b).hexdigest()


def canon_json(obj):
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def busybox_rootfs(busybox, into, applets=BUSYBOX_APPLETS):
    """A minimal rootfs: bin/busybox (must be static) and applet symlinks."""
    for d in ("bin", "etc", "proc", "sys", "dev", "tmp", "run"):
        os.makedirs(os.path.join(into, d), exist_ok=True)
    shutil.copy(busybox, os.path.join(into, "bin", "busybox"))
    for a in applets:
        os.symlink("busybox", os.path.join(into, "bin", a))


def walk_sorted(rootfs):
    """Every path under rootfs (relative, '/'-separated), sorted, parents before children."""
    out = []
    for root, dirs, files in os.walk(rootfs):
        dirs.sort()
        for n in dirs + files:
            out.append(os.path.relpath(os.path.join(root, n), rootfs))
    # os.walk does not descend into symlinked dirs (followlinks=False): they are listed as dirs
    # by name only; lstat below stores them as symlinks.
    return sorted(out, key=lambda p: p.split(os.sep))


def layer_tar(rootfs, epoch):
    """The uncompressed, deterministic tar of rootfs."""
    if not os.path.isdir(rootfs):
        raise ImageError(f"--rootfs {rootfs}: not a directory")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for rel in walk_sorted(rootfs):
            p = os.path.join(rootfs, rel)
            st = os.lstat(p)
            ti = tarfile.TarInfo(rel.replace(os.sep, "/"))
            ti.uid = ti.gid = 0
            ti.uname = ti.gname = ""
            ti.mtime = epoch
            if stat.S_ISLNK(st.st_mode):
                ti.type = tarfile.SYMTYPE
                ti.linkname = os.readlink(p)
                ti.mode = 0o777
                t.addfile(ti)
            elif stat.S_ISDIR(st.st_mode):
                ti.type = tarfile.DIRTYPE
                ti.mode = 0o755
                t.addfile(ti)
            elif stat.S_ISREG(st.st_mode):
                ti.type = tarfile.REGTYPE
                ti.mode = 0o755 if st.st_mode & 0o111 else 0o644
                ti.size = st.st_size
                with open(p, "rb") as f:
                    t.addfile(ti, f)
            else:
                raise ImageError(f"{p}: not a file, directory or symlink (mode {st.st_mode:o})")
    return buf.getvalue()


def parse_kv(items, what):
    out = {}
    for it in items or []:
        if "=" not in it:
            raise ImageError(f"{what} {it!r}: want KEY=VALUE")
        k, v = it.split("=", 1)
        out[k] = v
    return out


def split_name(name, tag):
    last = name.rsplit("/", 1)[-1]
    if ":" in last:
        repo, in_tag = name.rsplit(":", 1)
        if tag and tag != in_tag:
            raise ImageError(f"--name {name} carries tag {in_tag!r} but --tag is {tag!r}")
        return repo, in_tag
    return name, tag or "latest"


def build(rootfs_dirs, name, tag, out, entrypoint=None, cmd=None, env=None, workdir="/",
          labels=None, arch="amd64", epoch=0):
    repo, tag = split_name(name, tag)
    ref = f"{repo}:{tag}"
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))
    layers = []
    for d in rootfs_dirs:
        raw = layer_tar(d, epoch)
        gz = gzip.compress(raw, compresslevel=9, mtime=0)
        layers.append({"raw_size": len(raw), "diff_id": sha(raw), "gz": gz})

    cfg = {"Env": env or [DEFAULT_ENV], "WorkingDir": workdir or "/"}
    if entrypoint:
        cfg["Entrypoint"] = entrypoint
    if cmd:
        cfg["Cmd"] = cmd
    if labels:
        cfg["Labels"] = labels
    config = {
        "architecture": arch,
        "os": "linux",
        "created": created,
        "config": cfg,
        "rootfs": {"type": "layers", "diff_ids": [l["diff_id"] for l in layers]},
        # Layer numbers only: a --rootfs path is often a temporary directory.
        "history": [{"created": created, "created_by": f"scripts/lib/oci-image.py layer {i}"}
                    for i in range(len(rootfs_dirs))],
    }
    config_b = canon_json(config)
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": sha(config_b), "size": len(config_b)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": sha(l["gz"]), "size": len(l["gz"])} for l in layers],
    }
    manifest_b = canon_json(manifest)
    index = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": sha(manifest_b), "size": len(manifest_b),
            "platform": {"architecture": arch, "os": "linux"},
            # ctr import reads the full name; podman/skopeo read ref.name (the tag, or a full ref).
            "annotations": {"io.containerd.image.name": ref,
                            "org.opencontainers.image.ref.name": tag},
        }],
    }
    blob = lambda b: "blobs/sha256/" + hashlib.sha256(b).hexdigest()
    docker_manifest = [{
        "Config": blob(config_b),
        "RepoTags": [ref],
        "Layers": [blob(l["gz"]) for l in layers],
    }]

    entries = [("oci-layout", canon_json({"imageLayoutVersion": "1.0.0"})),
               ("index.json", canon_json(index)),
               ("manifest.json", canon_json(docker_manifest)),
               (blob(config_b), config_b),
               (blob(manifest_b), manifest_b)]
    seen = {blob(config_b), blob(manifest_b)}
    for l in layers:
        if blob(l["gz"]) not in seen:
            seen.add(blob(l["gz"]))
            entries.append((blob(l["gz"]), l["gz"]))

    def add_dir(t, n):
        ti = tarfile.TarInfo(n)
        ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, 0o755, epoch
        t.addfile(ti)

    tmp = out + ".tmp"
    with open(tmp, "wb") as f:
        with tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as t:
            add_dir(t, "blobs")
            add_dir(t, "blobs/sha256")
            for n, data in sorted(entries):
                ti = tarfile.TarInfo(n)
                ti.size, ti.mode, ti.mtime = len(data), 0o644, epoch
                t.addfile(ti, io.BytesIO(data))
    os.replace(tmp, out)
    return {
        "name": ref,
        "digest": sha(manifest_b),
        "config": sha(config_b),
        "layers": [{"digest": sha(l["gz"]), "size": len(l["gz"]), "diff_id": l["diff_id"],
                    "uncompressed_size": l["raw_size"]} for l in layers],
        "size_compressed": len(config_b) + len(manifest_b) + sum(len(l["gz"]) for l in layers),
        "size_uncompressed": sum(l["raw_size"] for l in layers),
        "out": out,
    }


def main(argv=None):
    ap = argparse.ArgumentParser(
        description="Write a deterministic OCI (+ docker-archive) image tar from directories.")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--rootfs", action="append", help="directory packed as one layer (repeatable)")
    src.add_argument("--busybox", help="static busybox binary to build the rootfs from")
    ap.add_argument("--name", required=True, help="image name, e.g. ghcr.io/meshcni/meshcni-agent")
    ap.add_argument("--tag", default="", help="tag (default: the one in --name, else latest)")
    ap.add_argument("--entrypoint", nargs="*", default=[])
    ap.add_argument("--cmd", nargs="*", default=[])
    ap.add_argument("--env", action="append", default=[], help="KEY=VALUE (repeatable; default PATH only)")
    ap.add_argument("--workdir", default="/")
    ap.add_argument("--label", action="append", default=[], help="KEY=VALUE (repeatable)")
    ap.add_argument("--arch", default="amd64")
    ap.add_argument("--epoch", type=int, default=None,
                    help="timestamp of every entry (default $SOURCE_DATE_EPOCH, else 0)")
    ap.add_argument("-o", "--out", "--output", dest="out", required=True)
    a = ap.parse_args(argv)
    epoch = a.epoch
    if epoch is None:
        sde = os.environ.get("SOURCE_DATE_EPOCH", "")
        try:
            epoch = int(sde) if sde else 0
        except ValueError:
            ap.error(f"SOURCE_DATE_EPOCH={sde!r} is not an integer")
    try:
        env = a.env or None
        parse_kv(a.env, "--env")
        labels = parse_kv(a.label, "--label")
        if a.busybox:
            with tempfile.TemporaryDirectory(prefix="oci-image.") as d:
                busybox_rootfs(a.busybox, d)
                res = build([d], a.name, a.tag, a.out, a.entrypoint, a.cmd, env, a.workdir,
                            labels, a.arch, epoch)
        else:
            res = build(a.rootfs, a.name, a.tag, a.out, a.entrypoint, a.cmd, env, a.workdir,
                        labels, a.arch, epoch)
    except (ImageError, OSError) as e:
        print(f"oci-image.py: {e}", file=sys.stderr)
        return 1
    print(json.dumps(res, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
