"""`pycnictl bench podman`: what a real runtime's `podman run --rm <image> true` costs with pycni
as its network, against the Go reference plugins and against no network at all.

podman 4.3 (CNI backend) runs inside a node network namespace of its own per setup, with its
storage, state and CNI config dir private to this run (harness/podman.py):

- none: `--network none`, the floor: everything podman does except networking;
- pycni-agent: pycni's config list (ipMasq on, capability portMappings) naming the socket of a
  `pycnictl agent` the bench starts in that node, so the thin executable forwards to it;
- pycni-standalone: the same config list with `agentSocket: ""`: the plugin runs in-process;
  (both through the Python launcher, or with --launcher native the native executable as
  `pycnictl install --native` writes it, which execs that launcher for in-process work)
- reference: the Go bridge + host-local (ipMasq on, the same /24); for `-p`, a second network
  of the reference node chains the Go portmap plugin after them (podman only sends
  runtimeConfig.portMappings to a config list that advertises the capability).

Each network row is measured without and with one `-p HOST:8080` port mapping. The rows are
interleaved (run i of every row, the starting row rotating), so a noisy moment of the machine
hits them alike; the median of N runs per row is compared with the reference's median for the
same `-p`, and `over none` subtracts the floor: the time the network itself adds.

Before timing, each row is checked for real: a container gets an address from its network's
subnet and, with `-p`, a server in a container answers on 127.0.0.1:HOST in the node. After
timing: nothing may be left (no veth in the node, no address held by pycni's store or by
host-local, the agent still alive). Everything made (containers, agents, namespaces, the
temporary directory, podman's mounts and processes) is removed at the end, also on failure,
Ctrl-C or SIGTERM. Exit status 1 when a run or a check fails.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .common import ratio, run_and_print, show_ratio
from .latency import AgentRunner, BenchError, Launcher, Spaces

if TYPE_CHECKING:
    from ..harness.podman import Podman

DEFAULT_RUNS = 15
HOST_PORT = 18080
CONTAINER_PORT = 8080
CNI_VERSION = "1.0.0"  # podman 4.3's libcni 1.1 cannot parse results of 1.1.0
WARMUP = 2
SERVER_WAIT = 10.0  # seconds for a published server to answer
# The node setups: tag -> (pycni or reference network subnet, its bridge)
SUBNETS = {
    "agent": "10.88.1.0/24",
    "standalone": "10.88.2.0/24",
    "reference": "10.88.3.0/24",
    "reference-portmap": "10.88.4.0/24",
}


@dataclass
class Setup:
    """One node namespace with its own podman (and, for pycni-agent, its agent)."""

    tag: str
    ns: str
    root: str
    podman: Podman
    image: str = ""
    agent: AgentRunner | None = None
    networks: dict[str, str] = field(default_factory=dict)  # network name -> subnet
    problems: list[str] = field(default_factory=list)


@dataclass
class Row:
    name: str
    setup: Setup
    network: str | None  # None: --network none
    publish: bool
    samples: list[float] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def args(self, image: str, *command: str) -> list[str]:
        args = ["run", "--rm", "--network", self.network or "none"]
        if self.publish:
            args += ["-p", f"{HOST_PORT}:{CONTAINER_PORT}"]
        return [*args, image, *(command or ("true",))]


# --- the node setups ---------------------------------------------------------------------------


def _pycni_conflist(name: str, subnet: str, root: str, agent_socket: str) -> dict:
    from ..node_config import node_conflist

    conf = node_conflist(
        name,
        subnet,
        None,
        bridge="cni0",
        dataDir=os.path.join(root, "data"),
        logFile=os.path.join(root, "pycni.log"),
        agentSocket=agent_socket,
    )
    conf["cniVersion"] = CNI_VERSION
    plugin = conf["plugins"][0]
    plugin.setdefault("capabilities", {})["portMappings"] = True
    return conf


def _reference_conflist(name: str, subnet: str, bridge: str, root: str, portmap: bool) -> dict:
    plugins: list[dict] = [
        {
            "type": "bridge",
            "bridge": bridge,
            "isGateway": True,
            "ipMasq": True,
            "ipam": {
                "type": "host-local",
                "ranges": [[{"subnet": subnet}]],
                "routes": [{"dst": "0.0.0.0/0"}],
                "dataDir": os.path.join(root, "ipam"),
            },
        }
    ]
    if portmap:
        plugins.append({"type": "portmap", "capabilities": {"portMappings": True}})
    return {"cniVersion": CNI_VERSION, "name": name, "plugins": plugins}


def _make_setup(tag: str, spaces: Spaces, tmp: str, plugin_dir: str, reference_dir: str) -> Setup:
    from ..harness.podman import Podman
    from ..node_config import write_conflist

    ns = spaces.make(tag)
    spaces.exec(ns, "ip", "link", "set", "lo", "up")
    root = os.path.join(tmp, tag)
    conf_dir = os.path.join(root, "net.d")
    os.makedirs(conf_dir)
    podman = Podman(
        os.path.join(root, "podman"),
        netns=ns,
        cni_plugin_dirs=[plugin_dir, reference_dir],
        cni_config_dir=conf_dir,
    )
    setup = Setup(tag, ns, root, podman)
    if tag in ("agent", "standalone"):
        name = f"bench-{tag}"
        socket = ""
        if tag == "agent":
            setup.agent = AgentRunner(root, os.path.join(root, "data"))
            socket = setup.agent.socket
        write_conflist(
            os.path.join(conf_dir, f"{name}.conflist"),
            _pycni_conflist(name, SUBNETS[tag], root, socket),
        )
        setup.networks[name] = SUBNETS[tag]
    elif tag == "reference":
        for key, bridge, portmap in (
            ("reference", "cni0", False),
            ("reference-portmap", "cni1", True),
        ):
            name = f"bench-{key}"
            write_conflist(
                os.path.join(conf_dir, f"{name}.conflist"),
                _reference_conflist(name, SUBNETS[key], bridge, root, portmap),
            )
            setup.networks[name] = SUBNETS[key]
    return setup


def _rows(setups: dict[str, Setup]) -> list[Row]:
    return [
        Row("none", setups["none"], None, False),
        Row("pycni-agent", setups["agent"], "bench-agent", False),
        Row("pycni-standalone", setups["standalone"], "bench-standalone", False),
        Row("reference", setups["reference"], "bench-reference", False),
        Row("pycni-agent -p", setups["agent"], "bench-agent", True),
        Row("pycni-standalone -p", setups["standalone"], "bench-standalone", True),
        Row("reference -p", setups["reference"], "bench-reference-portmap", True),
    ]


def _reference_of(row: Row) -> str:
    return "reference -p" if row.publish else "reference"


# --- checks ------------------------------------------------------------------------------------


def _verify(row: Row) -> None:
    """The row's network is real: an address from its subnet; with -p, the server answers."""
    import ipaddress

    podman = row.setup.podman
    if row.network is not None:
        out = podman.run(
            *row.args(row.setup.image, "ip", "-o", "-4", "addr", "show", "eth0"), check=False
        )
        subnet = ipaddress.ip_network(row.setup.networks[row.network])
        addresses = [w.split("/")[0] for w in out.stdout.split() if "/" in w]
        if out.returncode != 0 or not any(
            ipaddress.ip_address(a) in subnet for a in addresses if "." in a
        ):
            row.problems.append(
                f"no address from {subnet} in the container: rc "
                f"{out.returncode} {out.stdout.strip()} {out.stderr.strip()}"
            )
    if not row.publish:
        return
    name = f"bench-server-{row.setup.tag}"
    server = [
        "run",
        "-d",
        "--name",
        name,
        "--network",
        row.network,
        "-p",
        f"{HOST_PORT}:{CONTAINER_PORT}",
        row.setup.image,
        "sh",
        "-c",
        f"echo pycni-bench > /var/www/index.html && exec httpd -f -p {CONTAINER_PORT} -h /var/www",
    ]
    started = podman.run(*server, check=False)
    try:
        if started.returncode != 0:
            row.problems.append(f"-p server did not start: {started.stderr.strip()}")
            return
        if fetch(row.setup.ns, f"http://127.0.0.1:{HOST_PORT}/index.html") != "pycni-bench":
            row.problems.append(
                f"nothing answers on 127.0.0.1:{HOST_PORT} in the node with "
                f"-p {HOST_PORT}:{CONTAINER_PORT}"
            )
    finally:
        podman.run("rm", "--force", "--time", "0", name, check=False)


# An HTTP GET from the node. Not the host's static busybox: its wget crashes in glibc's NSS.
FETCH = """
import sys, urllib.request
print(urllib.request.urlopen(sys.argv[1], timeout=2).read().decode().strip())
"""


def fetch(ns: str, url: str, wait: float = SERVER_WAIT) -> str | None:
    """The body of `url` fetched inside netns `ns`, retried for `wait` seconds (a server in a
    container may still be starting); None when nothing answered."""
    deadline = time.monotonic() + wait
    while True:
        out = subprocess.run(
            ["nsenter", f"--net=/run/netns/{ns}", sys.executable, "-I", "-c", FETCH, url],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if out.returncode == 0:
            return out.stdout.strip()
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.2)


def _check_freed(spaces: Spaces, setup: Setup) -> None:
    veths = spaces.exec(setup.ns, "ip", "-o", "link", "show", "type", "veth").splitlines()
    if veths:
        setup.problems.append(f"{len(veths)} veths left in the node")
    if setup.tag in ("agent", "standalone"):
        from ..ipam.store import Store

        if os.path.exists(os.path.join(setup.root, "data", "pycni.db")):
            with Store(os.path.join(setup.root, "data")) as store:
                held = [a.container_id for a in store.list_attachments()]
            if held:
                setup.problems.append(f"pycni's store still holds {len(held)} attachments")
    elif setup.tag == "reference":
        ipam = os.path.join(setup.root, "ipam")
        for name in setup.networks:
            d = os.path.join(ipam, name)
            held = (
                [f for f in os.listdir(d) if f != "lock" and not f.startswith("last_reserved_ip")]
                if os.path.isdir(d)
                else []
            )
            if held:
                setup.problems.append(f"host-local still holds {held} in {name}")
    if setup.agent is not None and not setup.agent.alive():
        setup.problems.append(f"the agent died: {setup.agent.stderr()}")


# --- the run -----------------------------------------------------------------------------------


def bench(runs: int, reference_dir: str, progress=None, plugin_launcher: str = "python") -> dict:
    from ..install.launchers import write_launcher

    for plugin in ("bridge", "host-local", "portmap"):
        if not os.access(os.path.join(reference_dir, plugin), os.X_OK):
            raise BenchError(f"the reference {plugin} plugin is not in {reference_dir}")
    for tool in ("podman", "runc", "conmon", "nsenter"):
        if shutil.which(tool) is None:
            raise BenchError(f"{tool} is not installed (Debian packages podman, runc)")
    if not os.path.exists("/bin/busybox"):
        raise BenchError("/bin/busybox is not installed (Debian package busybox-static)")

    spaces = Spaces()
    tmp = tempfile.mkdtemp(prefix=f"pycni-bench-podman-{os.getpid()}-")
    setups: dict[str, Setup] = {}
    launcher = Launcher("nsenter")
    try:
        import compileall

        import pycni

        compileall.compile_dir(os.path.dirname(pycni.__file__), quiet=1)
        if plugin_launcher == "native":
            from ..install.native import BuildError, write_native

            try:
                plugin = write_native(os.path.join(tmp, "bin", "pycni"))
            except BuildError as exc:
                raise BenchError(f"--launcher native: {exc}") from None
        else:
            plugin = write_launcher(os.path.join(tmp, "bin", "pycni"))
        _say(progress, "making the nodes, podmans and networks")
        for tag in ("none", "agent", "standalone", "reference"):
            setups[tag] = _make_setup(tag, spaces, tmp, os.path.dirname(plugin), reference_dir)
        for setup in setups.values():
            setup.image = setup.podman.import_busybox()
            if setup.agent is not None:
                try:
                    setup.agent.start(launcher, setup.ns)
                except BenchError as exc:
                    raise BenchError(f"the agent did not start: {exc}") from None
        rows = _rows(setups)

        _say(progress, "checking every row's network (addresses, -p servers)")
        for row in rows:
            _verify(row)
            for _ in range(WARMUP):  # page cache, podman's first-run work, the agent's path
                row.setup.podman.run(*row.args(row.setup.image), check=False)

        _say(progress, f"{runs} interleaved `podman run --rm ... true` per row")
        for i in range(runs):
            k = i % len(rows)
            for row in rows[k:] + rows[:k]:
                t0 = time.perf_counter()
                out = row.setup.podman.run(*row.args(row.setup.image), check=False)
                elapsed = (time.perf_counter() - t0) * 1000
                if out.returncode == 0:
                    row.samples.append(elapsed)
                else:
                    row.problems.append(
                        f"run #{i} failed (rc {out.returncode}): {out.stderr.strip()[-300:]}"
                    )
        for setup in setups.values():
            _check_freed(spaces, setup)
        return {**_report(rows, setups, runs), "launcher": plugin_launcher}
    finally:
        old = signal.signal(signal.SIGINT, signal.SIG_IGN)  # no second Ctrl-C mid-cleanup
        try:
            for setup in setups.values():
                setup.podman.cleanup()
                if setup.agent is not None:
                    setup.agent.stop(timeout=5.0)
            launcher.close()
            left = spaces.cleanup()
            shutil.rmtree(tmp, ignore_errors=True)
            if left:
                print(f"pycnictl bench podman: could not remove namespaces {left}", file=sys.stderr)
        finally:
            signal.signal(signal.SIGINT, old)


def _say(progress, msg: str) -> None:
    if progress:
        progress(msg)


def _podman_version() -> str:
    out = subprocess.run(["podman", "--version"], capture_output=True, text=True)
    return out.stdout.strip().rpartition(" ")[2] or "?"


def _stats(samples: list[float]) -> dict:
    if not samples:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {
        "median": round(statistics.median(samples), 1),
        "min": round(min(samples), 1),
        "max": round(max(samples), 1),
        "n": len(samples),
    }


def _report(rows: list[Row], setups: dict[str, Setup], runs: int) -> dict:
    medians = {row.name: _stats(row.samples)["median"] for row in rows}
    floor = medians["none"]
    out_rows = []
    for row in rows:
        stats = _stats(row.samples)
        ref = _reference_of(row)
        over = _minus(stats["median"], floor)
        out_rows.append(
            {
                "row": row.name,
                "network": row.network,
                "publish": row.publish,
                **stats,
                "over_none": over,
                "ratio": ratio(stats["median"], medians[ref]) if row.network else None,
                "cost_ratio": ratio(over, _minus(medians[ref], floor)) if row.network else None,
                "problems": row.problems + row.setup.problems,
                "ok": not row.problems and not row.setup.problems,
                "samples": [round(x, 1) for x in row.samples],
            }
        )
    return {
        "runs": runs,
        "podman": _podman_version(),
        "cniVersion": CNI_VERSION,
        "host_port": HOST_PORT,
        "rows": out_rows,
        "ok": all(r["ok"] for r in out_rows),
    }


def _minus(a: float | None, b: float | None) -> float | None:
    return round(a - b, 1) if a is not None and b is not None else None


def format_table(report: dict) -> str:
    def f(x) -> str:
        return "-" if x is None else f"{x:.0f}"

    lines = [
        f"pycnictl bench podman: `podman run --rm [-p {report['host_port']}:{CONTAINER_PORT}] "
        f"<busybox> true`, {report['runs']} runs per row (rows interleaved); podman "
        f"{report['podman']} with CNI {report['cniVersion']}, ipMasq on; pycni's executable: "
        f"the {report.get('launcher', 'python')} launcher",
        "",
        f"{'row':<20} {'median':>7} {'min':>6} {'max':>6} {'over none':>9} {'ratio':>6} "
        f"{'cost ratio':>10}  ok",
    ]
    for row in report["rows"]:
        lines.append(
            f"{row['row']:<20} {f(row['median']):>7} {f(row['min']):>6} {f(row['max']):>6} "
            f"{f(row['over_none']):>9} {show_ratio(row['ratio']):>6} "
            f"{show_ratio(row['cost_ratio']):>10}  "
            f"{'yes' if row['ok'] else 'NO'}"
        )
    lines += [
        "times in ms (wall time of the podman command); ratio = median / the reference's "
        "median with the same -p;",
        "over none = median - the `--network none` median; cost ratio = over none / the "
        "reference's over none",
    ]
    for row in report["rows"]:
        for problem in row["problems"][:5]:
            lines.append(f"PROBLEM {row['row']}: {problem}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        print("pycnictl bench podman: needs root (network namespaces)", file=sys.stderr)
        return 2
    if args.runs < 1:
        print("pycnictl bench podman: --runs must be at least 1", file=sys.stderr)
        return 2
    return run_and_print(
        "pycnictl bench podman",
        lambda progress: bench(
            args.runs, args.reference_dir, progress=progress, plugin_launcher=args.plugin_launcher
        ),
        format_table,
        args,
        (BenchError, subprocess.SubprocessError, OSError),
        "containers, agents, namespaces and files removed",
    )


__all__ = ["bench", "format_table", "run"]
