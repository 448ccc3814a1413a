"""Kernel work through netlink (pyroute2): bridge, veth pair, pod interface, sysctls.

Each step is small and idempotent where it can be, and raises NotFound where DEL and GC are
meant to ignore "already gone".
"""
