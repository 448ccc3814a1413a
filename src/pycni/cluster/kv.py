"""The small key-value contract the lease datastores are built on.

Subnet leases (cluster/leases.py) are written once, against this interface, and run on etcd
(cluster/etcd.py) or on a SQLite file (cluster/sqlite.py). Each KV client holds one lease: every
key it creates is bound to it, ``keepalive`` renews them all at once, and when the lease expires
(the agent was gone for longer than the TTL) the keys disappear for every reader.
"""

from __future__ import annotations

from abc import ABC, abstractmethod


class KVError(Exception):
    """The datastore cannot be reached or answered with an error; the caller retries later."""


class KV(ABC):
    """Keys are ``/``-separated strings, values are strings (JSON in practice)."""

    ttl: float  # seconds a key outlives the last keepalive of the lease it is bound to

    @abstractmethod
    def list(self, prefix: str) -> tuple[dict[str, str], int]:
        """Every live key under ``prefix`` with its value, and the store's revision at the read.
        Keys whose lease expired are never returned."""

    @abstractmethod
    def create(self, key: str, value: str) -> bool:
        """Store ``value`` under ``key``, bound to this client's lease, only if the key is
        absent (or expired). Atomic: of two clients creating one key, exactly one wins."""

    @abstractmethod
    def put(self, key: str, value: str) -> None:
        """Store ``value`` under ``key`` unconditionally and bound to no lease: it stays until
        deleted, whoever wrote it (objects an operator applies, e.g. NetworkPolicies)."""

    @abstractmethod
    def replace(self, key: str, old: str, new: str) -> bool:
        """Compare-and-swap: set ``new`` (bound to this client's lease) only if the key holds
        exactly ``old``."""

    @abstractmethod
    def delete(self, key: str, old: str | None = None) -> bool:
        """Remove ``key`` (only if it holds ``old``, when given). True if something was removed."""

    @abstractmethod
    def keepalive(self) -> bool:
        """Renew this client's lease. False when it had expired since the last keepalive (also
        when a create or replace in between found it gone and moved to a fresh lease): its keys
        were lost. True before the first create: there was nothing to lose."""

    @abstractmethod
    def wait(self, prefix: str, revision: int, timeout: float) -> int:
        """Block until something under ``prefix`` changes after ``revision`` (a value from
        ``list``) or ``timeout`` seconds pass; return the newer revision, or ``revision`` itself
        on a timeout without change. Expiry of another client's lease counts as a change, at
        the latest when it is noticed by a ``list``. (etcd rounds TTLs up to whole seconds, at
        least 2.)"""

    def close(self) -> None:  # noqa: B027 (optional hook, not abstract)
        """Release connections; the lease is left to expire (a restarting agent keeps it)."""
