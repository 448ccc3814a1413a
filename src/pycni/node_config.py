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
DEFAULT_CONF_DIR = "/etc/cni/net.d"
CONFIG_SUFFIXES = (".conf", ".conflist", ".json")  # what libcni reads from a conf dir
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


def find_pycni_config(conf_dir: str) -> tuple[dict, str] | None:
    """(plugin entry, config file) of the first pycni config in `conf_dir`, by name as
    runtimes pick; None when there is none."""
    try:
        files = sorted(f for f in os.listdir(conf_dir) if f.endswith(CONFIG_SUFFIXES))
    except OSError:
        return None
    for name in files:
        path = os.path.join(conf_dir, name)
        try:
            with open(path) as f:
                conf = json.load(f)
        except (OSError, ValueError):
            continue
        if not isinstance(conf, dict):
            continue
        plugins = conf.get("plugins") if "plugins" in conf else [conf]
        for plugin in plugins if isinstance(plugins, list) else ():
            if isinstance(plugin, dict) and plugin.get("type") == "pycni":
                return plugin, path
    return None


def find_agent_socket(conf_dir: str) -> tuple[str, str] | None:
    """(agent socket, config file) when the first pycni config in `conf_dir` names an
    `agentSocket` ("" = the config never uses an agent); None when it names none (the plugin
    then tries the default socket)."""
    found = find_pycni_config(conf_dir)
    if found is None:
        return None
    socket = found[0].get("agentSocket")
    # As the plugin reads it: anything but an absolute path or "" is the default.
    if isinstance(socket, str) and (socket == "" or socket.startswith("/")):
        return socket, found[1]
    return None


def find_data_dir(conf_dir: str) -> str | None:
    """The dataDir the first pycni config in `conf_dir` names (top level, else in its ipam
    section, as the plugin reads it); None when it names no absolute one."""
    found = find_pycni_config(conf_dir)
    if found is None:
        return None
    plugin = found[0]
    ipam = plugin.get("ipam")
    value = plugin.get("dataDir", ipam.get("dataDir") if isinstance(ipam, dict) else None)
    return value if isinstance(value, str) and value.startswith("/") else None
