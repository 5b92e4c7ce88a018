#!/usr/bin/env python3
"""Builds a one-layer container image as a `docker save` tarball, without a Docker engine.

    hack/image.py --tag docker.io/library/busybox:1.35 --out busybox.tar \
        --file /bin/busybox:/bin/busybox:0755 --link /bin/sh:busybox --dir /tmp:1777 \
        --cmd '["sh"]'

`ctr -n k8s.io images import busybox.tar` (containerd) and `docker load` read it. The layer is
reproducible: files are owned by root, timestamps are zero and entries sorted, so the same
inputs give the same image digest (hack/node.sh skips an import whose digest is already there).

Entries:
  --file SRC:DEST[:MODE]   a regular file (symlinks in SRC are followed)
  --dir DEST[:MODE[:UID]]  a directory (owned by UID, default root)
  --link DEST:TARGET       a symbolic link
  --libs-of BINARY         the shared libraries `ldd BINARY` lists, at the same paths, and the
                           dynamic loader: what a glibc-linked binary needs on an empty base
Image settings: --entrypoint JSON, --cmd JSON, --env K=V, --user UID[:GID], --workdir DIR,
--label K=V, --expose PORT.
"""

import argparse
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tarfile


def die(msg):
    print(f"image.py: {msg}", file=sys.stderr)
    sys.exit(1)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tag", required=True, action="append", help="repository:tag (repeatable)")
    p.add_argument("--out", required=True)
    p.add_argument("--file", action="append", default=[])
    p.add_argument("--dir", action="append", default=[])
    p.add_argument("--link", action="append", default=[])
    p.add_argument("--libs-of", action="append", default=[])
    p.add_argument("--entrypoint")
    p.add_argument("--cmd")
    p.add_argument("--env", action="append", default=[])
    p.add_argument("--user")
    p.add_argument("--workdir")
    p.add_argument("--label", action="append", default=[])
    p.add_argument("--expose", action="append", default=[])
    return p.parse_args()


def ldd_paths(binary):
    """The absolute paths of the libraries and the loader `ldd` lists for `binary`."""
    try:
        out = subprocess.run(["ldd", binary], check=True, capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        die(f"ldd {binary}: {e}")
    paths = []
    for line in out.splitlines():
        line = line.strip()
        m = re.search(r"=>\s+(/\S+)", line) or re.match(r"(/\S+)\s+\(", line)
        if m:
            paths.append(m.group(1))
    return paths


class Layer:
    def __init__(self):
        self.entries = {}  # path (no leading /) -> TarInfo, bytes or None

    def _parents(self, path):
        parts = path.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d and d not in self.entries:
                self.add_dir(d, 0o755)

    def add_dir(self, path, mode, uid=0):
        path = path.strip("/")
        self._parents(path)
        info = tarfile.TarInfo(path)
        info.type = tarfile.DIRTYPE
        info.mode = mode
        info.uid = info.gid = uid
        self.entries[path] = (info, None)

    def add_file(self, src, dest, mode=None):
        dest = dest.strip("/")
        self._parents(dest)
        try:
            with open(src, "rb") as f:
                data = f.read()
            st = os.stat(src)
        except OSError as e:
            die(f"reading {src}: {e}")
        info = tarfile.TarInfo(dest)
        info.size = len(data)
        info.mode = mode if mode is not None else (st.st_mode & 0o7777)
        self.entries[dest] = (info, data)

    def add_link(self, dest, target):
        dest = dest.strip("/")
        self._parents(dest)
        info = tarfile.TarInfo(dest)
        info.type = tarfile.SYMTYPE
        info.linkname = target
        info.mode = 0o777
        self.entries[dest] = (info, None)

    def tar_bytes(self):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for path in sorted(self.entries):
                info, data = self.entries[path]
                if info.uid == 0:
                    info.uname = info.gname = "root"
                info.mtime = 0
                tar.addfile(info, io.BytesIO(data) if data is not None else None)
        return buf.getvalue()


def add_tar(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    info.mtime = 0
    tar.addfile(info, io.BytesIO(data))


def main():
    args = parse_args()
    layer = Layer()
    for spec in args.dir:
        parts = spec.split(":")
        mode = int(parts[1], 8) if len(parts) > 1 and parts[1] else 0o755
        layer.add_dir(parts[0], mode, int(parts[2]) if len(parts) > 2 else 0)
    for spec in args.file:
        parts = spec.split(":")
        if len(parts) < 2:
            die(f"--file {spec}: want SRC:DEST[:MODE]")
        layer.add_file(parts[0], parts[1], int(parts[2], 8) if len(parts) > 2 else None)
    for binary in args.libs_of:
        for lib in ldd_paths(binary):
            layer.add_file(lib, lib, 0o755)
    for spec in args.link:
        dest, _, target = spec.partition(":")
        if not target:
            die(f"--link {spec}: want DEST:TARGET")
        layer.add_link(dest, target)

    layer_tar = layer.tar_bytes()
    layer_id = hashlib.sha256(layer_tar).hexdigest()
    config = {"Env": args.env or ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]}
    if args.entrypoint:
        config["Entrypoint"] = json.loads(args.entrypoint)
    if args.cmd:
        config["Cmd"] = json.loads(args.cmd)
    if args.user:
        config["User"] = args.user
    if args.workdir:
        config["WorkingDir"] = args.workdir
    if args.label:
        config["Labels"] = dict(kv.split("=", 1) for kv in args.label)
    if args.expose:
        config["ExposedPorts"] = {f"{p}/tcp": {} for p in args.expose}
    image_config = {
        "architecture": {"x86_64": "amd64", "aarch64": "arm64"}.get(os.uname().machine, os.uname().machine),
        "os": "linux",
        "created": "1970-01-01T00:00:00Z",
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": [f"sha256:{layer_id}"]},
        "history": [{"created": "1970-01-01T00:00:00Z", "created_by": "hack/image.py"}],
    }
    config_bytes = json.dumps(image_config, sort_keys=True, separators=(",", ":")).encode()
    config_id = hashlib.sha256(config_bytes).hexdigest()
    manifest = [{"Config": f"{config_id}.json", "RepoTags": args.tag, "Layers": [f"{layer_id}/layer.tar"]}]

    tmp = args.out + ".tmp"
    with tarfile.open(tmp, mode="w", format=tarfile.PAX_FORMAT) as tar:
        add_tar(tar, f"{layer_id}/layer.tar", layer_tar)
        add_tar(tar, f"{config_id}.json", config_bytes)
        add_tar(tar, "manifest.json", json.dumps(manifest).encode())
    os.replace(tmp, args.out)
    print(f"sha256:{config_id}")


if __name__ == "__main__":
    main()
