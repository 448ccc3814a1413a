"""A node's own filesystem paths, for a runtime started on a sandboxed node, then exec.

Run as ``python -m pycni.harness.nodefs HOST_MNT ROOT DIR... -- COMMAND...`` inside a mount
namespace of its own whose mounts are slaves of the host's (``unshare --mount --propagation
slave``): each DIR (e.g. /run, /var/lib, /etc/cni, /opt) is replaced by ROOT/DIR with a bind
mount, made shared, so that everything started from here (containerd, its shims, runc, the
containers, the CNI plugins) sees the node's /etc/cni/net.d, /opt/cni/bin, /run/pycni,
/var/lib/pycni and /run/netns at their real paths, and a container's HostToContainer mount
receives what the runtime mounts there later (pod network namespaces). Nothing propagates back
to the host: it sees the node's files under ROOT only. Then COMMAND is exec'd (its pid is this
process's). HOST_MNT is the inode of the caller's mount namespace (/proc/self/ns/mnt): if this
process is still in it, nothing is bound.
"""

from __future__ import annotations

import os
import subprocess
import sys


def mount_namespace() -> int:
    return os.stat("/proc/self/ns/mnt").st_ino


def main(argv: list[str]) -> int:
    if "--" not in argv or argv.index("--") < 3:
        print("usage: nodefs HOST_MNT ROOT DIR... -- COMMAND...", file=sys.stderr)
        return 2
    split = argv.index("--")
    host_mnt, root, dirs, command = argv[0], argv[1], argv[2:split], argv[split + 1 :]
    # Binding in the caller's namespace would hide the host's own directories.
    if mount_namespace() == int(host_mnt):
        print("nodefs: refusing to bind over the host's own directories", file=sys.stderr)
        return 1
    for directory in dirs:
        source = os.path.join(root, directory.lstrip("/"))
        os.makedirs(source, exist_ok=True)
        for step in (["--bind", source, directory], ["--make-rshared", directory]):
            proc = subprocess.run(["mount", *step], capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"nodefs: mount {' '.join(step)}: {proc.stderr.strip()}", file=sys.stderr)
                return 1
    os.execvp(command[0], command)
    return 127  # not reached


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
