"""`pycnictl install`: the arguments; the work is pycni.install.node's."""

from __future__ import annotations

from ..install.launchers import DEFAULT_BIN_DIR, DEFAULT_CONF_DIR, STANDALONE_PYTHON
from ..native import FALLBACK_NAME
from ..node_config import CONFLIST_NAME


def register(sub) -> None:
    p = sub.add_parser(
        "install",
        help="install the plugin executable (and, with --subnet, a network config)",
        description="Write the plugin executable into --bin-dir and, with --subnet, the node's "
        f"config list {CONFLIST_NAME} into --conf-dir. The executable is native (compiled "
        "from C: no Python start-up per call) wherever a C compiler (cc) is found, else the "
        "Python launcher, and the output says which. Idempotent; refuses to overwrite files "
        "pycni did not write. This is the one way to install the executable runtimes exec: "
        "never copy a pip-made script there.",
    )
    p.add_argument("--bin-dir", default=DEFAULT_BIN_DIR, help="where runtimes look for plugins")
    p.add_argument("--conf-dir", default=DEFAULT_CONF_DIR, help="where runtimes find configs")
    p.add_argument("--subnet", help="this node's pod CIDR; with it a config list is written")
    p.add_argument("--network", help="the cluster CIDR (never masqueraded); needs --subnet")
    p.add_argument("--name", default="pycni", help="network name")
    p.add_argument(
        "--data-dir",
        default=None,
        help="the config's dataDir (default: the plugin's, /var/lib/pycni)",
    )
    p.add_argument(
        "--fast-path-dir",
        metavar="DIR",
        help="also compile the eBPF fast path (needs clang and libbpf-dev) into DIR, where "
        "the agent looks for it (its data dir's bpf/, or /opt/pycni/bpf as in the image); "
        "without it the agent compiles on its first start",
    )
    p.add_argument(
        "--standalone",
        action="store_true",
        help="an executable that only forwards to the node agent (for hosts without pycni's "
        f"packages): native, or with --python a self-contained file for {STANDALONE_PYTHON}",
    )
    p.add_argument(
        "--native",
        action="store_true",
        help="insist on the native executable (the default where cc is found; refuses "
        "without one): without --standalone, when no agent listens it runs the plugin "
        f"through the Python launcher it writes as <bin-dir>/{FALLBACK_NAME}",
    )
    p.add_argument(
        "--python",
        action="store_true",
        help="write the Python launcher even where a C compiler is found (slower: "
        "Python's start-up on every call)",
    )
    p.add_argument(
        "--native-from",
        metavar="PATH",
        help="install this prebuilt native executable (made by `pycnictl install "
        "--native --standalone`, as the pycni image carries it) instead",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="overwrite an executable or config list pycni did not write",
    )
    p.set_defaults(func=_install)


def _install(args) -> int:
    from ..install.node import install

    return install(args)
