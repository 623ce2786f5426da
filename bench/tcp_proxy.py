"""A TCP proxy in front of PostgreSQL that can cut or stall it, as an outage would: used by the
tests (tests/gateway/test_database_outage.py) and by bench/soak.py."""

from __future__ import annotations

import contextlib
import select
import socket
import threading


class TcpProxy:
    """Forwards 127.0.0.1:<port> to `target`. cut(): open connections dropped, new ones closed
    at once. stall(): connections accepted, nothing forwarded. restore(): forwarding again
    (connections stalled before are dropped: their peers gave up on them)."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.server.getsockname()[1])
        self.mode = "forward"
        self.accepted = 0
        self._forwarding = threading.Event()
        self._forwarding.set()
        self._lock = threading.Lock()
        self._pairs: list[tuple[socket.socket, socket.socket | None]] = []
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            with self._lock:
                mode = self.mode
                self.accepted += 1
            if mode == "cut":
                client.close()
                continue
            if mode == "stall":
                with self._lock:
                    self._pairs.append((client, None))
                continue
            try:
                upstream = self._connect()
            except OSError:
                client.close()
                continue
            with self._lock:
                self._pairs.append((client, upstream))
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()

    def _connect(self) -> socket.socket:
        host, port = self.target
        if host.startswith("/"):  # PostgreSQL's unix socket directory (the embedded server)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(f"{host}/.s.PGSQL.{port}")
            return sock
        return socket.create_connection(self.target, timeout=5)

    def _pump(self, client: socket.socket, upstream: socket.socket) -> None:
        sockets = [client, upstream]
        try:
            while True:
                readable, _, _ = select.select(sockets, [], [], 0.5)
                with self._lock:
                    mode = self.mode
                if mode == "cut":
                    return
                if mode == "stall":
                    self._forwarding.wait(0.5)
                    continue
                for sock in readable:
                    data = sock.recv(65536)
                    if not data:
                        return
                    (upstream if sock is client else client).sendall(data)
        except (OSError, ValueError):
            return
        finally:
            with self._lock:
                with contextlib.suppress(ValueError):
                    self._pairs.remove((client, upstream))
            for sock in sockets:
                with contextlib.suppress(OSError):
                    sock.close()

    def _drop_all(self) -> int:
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for client, upstream in pairs:
            for sock in (client, upstream):
                if sock is not None:
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_RDWR)
                    with contextlib.suppress(OSError):
                        sock.close()
        return len(pairs)

    def cut(self) -> int:
        with self._lock:
            self.mode = "cut"
        return self._drop_all()

    def stall(self) -> int:
        with self._lock:
            self.mode = "stall"
            self._forwarding.clear()
            return len(self._pairs)

    def restore(self) -> int:
        with self._lock:
            was = self.mode
            self.mode = "forward"
            self._forwarding.set()
        return self._drop_all() if was == "stall" else 0

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self.server.close()
        self.cut()
