"""The agent's unix-socket server.

Many calls run at once on a thread pool; calls for one container are serialised; GC is kept
exclusive with ADD and DEL by the same node lock the standalone plugin takes (core.locks), so a
plugin falling back to in-process work beside the agent is still safe. All state lives on disk
(the IPAM store) and in the kernel: a restarted agent has nothing to recover.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext

from .. import plugin, version
from ..cni.errors import ACCESS_DENIED, DECODING_FAILURE, NOT_AVAILABLE, CniError
from . import protocol
from .locks import KeyedLocks

log = logging.getLogger("pycni")

READ_TIMEOUT = 30.0
# Seconds between repair passes (the cluster side's --resync when it runs one).
REPAIR_EVERY = 10.0
Observer = Callable[[str, int, float], None]  # (command, code or 0, seconds)


class Agent:
    def __init__(
        self,
        socket_path: str,
        workers: int = 16,
        data_dir: str | None = None,
        test_faults: bool = False,
    ):
        self.socket_path = socket_path
        # `pycnictl agent --test-faults`: honour the fault-injection variables of requests
        # (core.faults). Tests only: they fail, pause or SIGKILL the agent on a caller's word.
        self.test_faults = test_faults
        self.workers = workers
        self.data_dirs: set[str] = {data_dir} if data_dir else set()
        self.observers: list[Observer] = []
        self.locks = KeyedLocks()
        self.started = time.time()
        self.stopping = threading.Event()
        self._inflight = 0
        self._count_lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._inode: int | None = None
        self.cluster = None  # agent.cluster.ClusterNode when the agent runs the cluster side
        self.policy = None  # agent.policy.PolicyController when it enforces NetworkPolicy
        self.repair_every = REPAIR_EVERY

    # --- life cycle ------------------------------------------------------------------------

    def bind(self) -> None:
        """Listen on the socket: root only (0600 in a 0700 directory), replacing a stale one
        atomically so a client never sees the path missing while an old agent is replaced."""
        # Before the socket appears (git may be slow to answer under load): once it is there,
        # callers and tests take the agent as started, and nothing may stand before the log.
        described = version.describe()
        directory = os.path.dirname(self.socket_path) or "."
        os.makedirs(directory, mode=0o700, exist_ok=True)
        tmp = f"{self.socket_path}.{os.getpid()}.tmp"
        if os.path.lexists(tmp):
            os.unlink(tmp)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)
        try:
            sock.bind(tmp)
        finally:
            os.umask(old_umask)
        os.chmod(tmp, 0o600)
        sock.listen(1024)
        os.replace(tmp, self.socket_path)
        self._inode = os.stat(self.socket_path).st_ino
        sock.settimeout(0.5)  # lets serve() notice stop() promptly
        self._listener = sock
        log.info("agent %s listening on %s (pid %d)", described, self.socket_path, os.getpid())

    def serve(self) -> None:
        assert self._listener is not None, "bind() first"
        threading.Thread(target=self._repair_loop, name="repair", daemon=True).start()
        with ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="cni") as pool:
            while not self.stopping.is_set():
                try:
                    conn, _ = self._listener.accept()
                except TimeoutError:
                    continue
                except OSError:
                    if self.stopping.is_set():
                        break
                    raise
                self._enter()
                pool.submit(self._serve_conn, conn)
            self._close_listener()
            self._drain(pool)
            # Leaving the `with` waits for every accepted call: in-flight work completes.
        log.info("agent stopped")

    def _drain(self, pool: ThreadPoolExecutor) -> None:
        """Serve the connections still queued in the listen backlog, then close the listener.

        Their callers connected before stop() unlinked the socket and are waiting for an
        answer; dropping them would hand each a needless "try again". With the path gone no
        new connection can arrive, so this ends."""
        listener, self._listener = self._listener, None
        if listener is None:
            return
        listener.setblocking(False)
        try:
            while True:
                try:
                    conn, _ = listener.accept()
                except OSError:  # BlockingIOError: the backlog is empty
                    break
                conn.setblocking(True)
                self._enter()
                pool.submit(self._serve_conn, conn)
        finally:
            listener.close()

    def stop(self) -> None:
        """Stop accepting; calls already accepted complete. New callers find no socket and run
        the plugin in-process, so nothing waits on a dying agent."""
        self.stopping.set()
        self._close_listener()

    def _close_listener(self) -> None:
        try:
            if self._inode is not None and os.stat(self.socket_path).st_ino == self._inode:
                os.unlink(self.socket_path)  # only our own socket, not a successor's
        except FileNotFoundError:
            pass
        self._inode = None

    @property
    def inflight(self) -> int:
        return self._inflight

    def _enter(self) -> None:
        with self._count_lock:
            self._inflight += 1

    def _leave(self) -> None:
        with self._count_lock:
            self._inflight -= 1

    # --- one connection --------------------------------------------------------------------

    def _serve_conn(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(READ_TIMEOUT)
            uid = peer_uid(conn)
            if uid != 0:
                log.warning("refused a caller with uid %s", uid)
                err = CniError(ACCESS_DENIED, f"the pycni agent serves root only, not uid {uid}")
                conn.sendall(protocol.reply(1, _json(err.to_json("1.1.0"))))
                return
            try:
                call = protocol.read_call(conn, deadline=time.monotonic() + READ_TIMEOUT)
            except (protocol.ProtocolError, OSError) as exc:
                log.warning("bad request: %s", exc)
                err = CniError(DECODING_FAILURE, f"malformed request to the pycni agent: {exc}")
                conn.sendall(protocol.reply(1, _json(err.to_json("1.1.0"))))
                return
            conn.settimeout(READ_TIMEOUT)  # the answer gets its own time, not what is left
            if call.op == "HEALTH":
                conn.sendall(protocol.reply(0, _json(self.health())))
                return
            out, status = self.execute(call.environ, call.stdin)
            conn.sendall(protocol.reply(status, _json(out) if out is not None else b""))
        except OSError as exc:
            log.warning("lost a caller: %s", exc)  # the runtime gave up; its retry or DEL follows
        except Exception:
            log.exception("agent connection handler")
        finally:
            conn.close()
            self._leave()

    def execute(self, environ: dict[str, str], stdin: bytes) -> tuple[dict | None, int]:
        """One CNI call through the same core the standalone plugin runs."""
        command = environ.get("CNI_COMMAND", "")
        cid = environ.get("CNI_CONTAINERID", "")
        started = time.perf_counter()
        not_ready = self.cluster.not_ready_reason() if self.cluster is not None else None
        if command == "STATUS" and not_ready:
            # The node has no subnet yet (or the cluster CIDR is exhausted): say so, as the
            # runtime asks STATUS before it schedules pods here.
            version = plugin.asked_version(stdin)
            out, status = CniError(NOT_AVAILABLE, not_ready).to_json(version), 1
        else:
            with self.locks.hold(cid) if cid else nullcontext():
                out, status = plugin.handle(
                    environ, stdin, on_config=self._seen, faults=self.test_faults
                )
            if command == "ADD" and status == 0 and self.policy is not None:
                self._policy_for_new_pod(environ)
        elapsed = time.perf_counter() - started
        code = int(out.get("code", 0)) if status and isinstance(out, dict) else 0
        for observe in self.observers:
            try:
                observe(command, code, elapsed)
            except Exception:
                log.exception("metrics observer")
        return out, status

    def _policy_for_new_pod(self, environ: dict[str, str]) -> None:
        """A Kubernetes pod's NetworkPolicy rules are in before the runtime hears back (and so
        before its containers start)."""
        from ..cni.env import parse_cni_args

        try:
            args = parse_cni_args(environ.get("CNI_ARGS", ""))
            namespace, name = args.get("K8S_POD_NAMESPACE"), args.get("K8S_POD_NAME")
            if namespace and name and self.policy is not None:
                self.policy.pod_added((namespace, name))
        except Exception:
            # The pod is up; the controller's next pass (at most --resync away) retries.
            log.exception("NetworkPolicy rules for a new pod")

    # --- repair ----------------------------------------------------------------------------

    def _repair_loop(self) -> None:
        every = self.cluster.options.resync if self.cluster is not None else self.repair_every
        while not self.stopping.is_set():
            try:
                self.repair()
            except CniError as exc:  # e.g. a full or damaged store: the message says it all
                log.warning("repair pass: %s", exc.msg)
            except Exception:
                log.exception("repair pass")
            self.stopping.wait(every)

    def repair(self) -> int:
        """Put back pycni's packet rules where someone removed or changed them (an ADD or DEL
        only rewrites them when the wanted set changes), for every data dir this agent knows;
        at start-up too, so a restart repairs at once. Returns how many it applied again."""
        from ..core import masquerade, resources

        dirs = [
            d for d in sorted(self.data_dirs) if os.path.exists(os.path.join(d, "pycni.db"))
        ]  # never create a store
        repaired = 0
        for data_dir in dirs:
            with resources.store(data_dir) as store:
                if masquerade.repair(store):
                    repaired += 1
                    log.warning(
                        "packet rules differed from what %s wants (removed or changed "
                        "by someone else): applied them again",
                        data_dir,
                    )
        return repaired

    def _seen(self, conf) -> None:
        self.data_dirs.add(conf.data_dir)

    def health(self) -> dict:
        return {
            "status": "stopping" if self.stopping.is_set() else "ok",
            "pid": os.getpid(),
            "version": version.version(),
            "commit": version.commit(),
            "uptime": round(time.time() - self.started, 3),
            "inflight": self._inflight,
            "socket": self.socket_path,
            "dataDirs": sorted(self.data_dirs),
            **({"cluster": self.cluster.status()} if self.cluster is not None else {}),
            **({"policy": self.policy.status()} if self.policy is not None else {}),
        }


def peer_uid(conn: socket.socket) -> int:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid


def _json(obj: dict) -> bytes:
    return json.dumps(obj).encode() + b"\n"
