"""The benchmarks: how fast pycni is, beside a baseline and the Go reference plugins, each in
namespaces of its own and printing ratios measured in the same run (the commands' arguments
are in pycni.ctl.bench). latency: ADD/DEL and storms; throughput: TCP through pod paths;
convergence and reconcile: the agent's cluster loop and the route backends; cri and podman:
real runtimes; soak: random calls with the agent killed now and then; watch: the agent's
Kubernetes watches against the fake API server; common: what they share.
"""
