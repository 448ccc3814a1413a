"""`pycnictl agent`: the per-node daemon that serves the thin plugin executable."""

from __future__ import annotations

import signal

from ..cni.netconf import DEFAULT_DATA_DIR
from ..shim import DEFAULT_SOCKET

DEFAULT_LOG = "/var/log/pycni-agent.log"
DEFAULT_METRICS_PORT = 9654


def register(sub) -> None:
    p = sub.add_parser("agent", help="run the node agent (serves CNI calls on a unix socket)")
    p.add_argument("--socket", default=DEFAULT_SOCKET, help="unix socket to serve on")
    p.add_argument("--data-dir", default=DEFAULT_DATA_DIR,
                   help="the plugin's dataDir (for metrics and status before any call)")
    p.add_argument("--workers", type=int, default=32, help="calls served at once")
    p.add_argument("--log-file", default=DEFAULT_LOG, help="'' logs to stderr")
    p.add_argument("--log-level", default="info",
                   choices=("debug", "info", "warning", "error"))
    p.add_argument("--metrics-addr", default=None,
                   help="metrics and health listen address (default 127.0.0.1; a non-loopback "
                   "address serves them unauthenticated beyond this host)")
    p.add_argument("--metrics-port", type=int, default=DEFAULT_METRICS_PORT,
                   help="Prometheus /metrics and /healthz port; 0 turns them off")
    p.set_defaults(func=run_agent)


def run_agent(args) -> int:
    from .. import log
    from ..agent.server import Agent

    log.setup(args.log_file, args.log_level)
    # Import every command's code now, not on the first pod's clock.
    from ..cni import netconf  # noqa: F401
    from ..core import add, check, delete, gc, resources, status  # noqa: F401

    resources.keep_warm()

    agent = Agent(args.socket, workers=args.workers, data_dir=args.data_dir)
    if args.metrics_port:
        from ..agent import metrics

        metrics.start(agent, args.metrics_addr or "127.0.0.1", args.metrics_port,
                      allow_remote=args.metrics_addr is not None)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: agent.stop())
    agent.bind()
    agent.serve()
    return 0
