"""The files a node's runtime and operators read: the CNI config list and subnet.env.

Both are written atomically (temporary file, then rename), so a runtime never reads half a
config: containerd and CRI-O report the network ready as soon as a config appears.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence

CONFLIST_NAME = "10-pycni.conflist"  # "10-" sorts before most others: runtimes use the first
SUBNET_ENV_PREFIX = "PYCNI_"
# What the runtime fills into runtimeConfig: it sends a capability only to plugins that ask.
CAPABILITIES: dict[str, bool] = {"bandwidth": True, "portMappings": True}


def atomic_write(path: str, text: str, mode: int) -> None:
    """Write via a temporary file and rename, so a runtime never execs or reads half a file."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".pycni-")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def node_conflist(
    name: str, subnets: str | Sequence[str], network: str | Sequence[str] | None, **extra
) -> dict:
    """The config list for a node: one subnet (the seed's `subnet` key) or, dual stack, one
    range set per subnet; `network` is the cluster CIDR(s), never masqueraded."""
    plugin: dict = {"type": "pycni"}
    if isinstance(subnets, str) or len(subnets) == 1:
        plugin["subnet"] = subnets if isinstance(subnets, str) else subnets[0]
    else:
        plugin["ranges"] = [[{"subnet": s}] for s in subnets]
    # hairpinMode is the plugin's default; written out so the config says what pods get.
    plugin.update(
        {
            "ipMasq": True,
            "isDefaultGateway": True,
            "hairpinMode": True,
            "capabilities": dict(CAPABILITIES),
        }
    )
    if network:
        plugin["network"] = network if isinstance(network, str) or len(network) > 1 else network[0]
    plugin.update(extra)
    # CNI 1.1's way to serve every runtime: libcni >= 1.2 picks the highest of `cniVersions`,
    # older ones (containerd 1.6, podman 4.3) read `cniVersion` and reject 1.1.0 results.
    return {
        "cniVersion": "1.0.0",
        "cniVersions": ["1.0.0", "1.1.0"],
        "name": name,
        "plugins": [plugin],
    }


def write_conflist(path: str, conf: dict) -> None:
    atomic_write(path, json.dumps(conf, indent=2) + "\n", 0o644)


def write_subnet_env(path: str, values: dict[str, str]) -> None:
    """flannel's subnet.env, with PYCNI_ names: KEY=value lines a shell can source."""
    lines = [f"{SUBNET_ENV_PREFIX}{k}={v}" for k, v in values.items()]
    atomic_write(path, "\n".join(lines) + "\n", 0o644)


def read_subnet_env(path: str) -> dict[str, str]:
    """What write_subnet_env wrote (prefix stripped); {} when the file is missing or garbled."""
    out = {}
    try:
        with open(path) as f:
            for line in f:
                key, sep, value = line.strip().partition("=")
                if sep and key.startswith(SUBNET_ENV_PREFIX):
                    out[key[len(SUBNET_ENV_PREFIX) :]] = value
    except OSError:
        return {}
    return out
