"""The cluster: which pod subnet this node owns and how to reach every other node's pods.

A datastore (kubernetes | etcd | sqlite) gives this node its subnet and lists the others as
NodeRecords; the backends (pycni.backends) turn that list into routes, neighbours and FDB
entries; the agent's reconcile loop (pycni.agent.cluster) keeps the kernel equal to it.
"""
