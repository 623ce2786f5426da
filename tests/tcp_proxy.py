"""A TCP proxy in front of PostgreSQL that a test can cut or stall, as an outage would."""

from __future__ import annotations

import select
import socket
import threading
from contextlib import suppress


class TcpProxy:
    """Forwards 127.0.0.1:<port> to `target`.

    - `cut()`: every open connection is dropped and new ones are refused (closed at once).
    - `stall()`: connections stay open and new ones are accepted, but nothing is forwarded
      (a database that accepted TCP and answers nothing).
    - `restore()`: forwarding resumes for new connections.
    """

    def __init__(self, target: tuple[str, int]) -> None:
        # A host that is a directory is PostgreSQL's unix socket directory (the embedded server).
        self.target = target
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.server.getsockname()[1])
        self.mode = "forward"
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
        if host.startswith("/"):
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
                    # Hold every byte: the peer waits for an answer that never comes.
                    self._forwarding.wait(0.5)
                    continue
                for sock in readable:
                    data = sock.recv(65536)
                    if not data:
                        return
                    (upstream if sock is client else client).sendall(data)
        except (OSError, ValueError):  # ValueError: select() on a socket cut() closed
            return
        finally:
            for sock in sockets:
                with suppress(OSError):
                    sock.close()

    def _drop_all(self) -> None:
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for client, upstream in pairs:
            for sock in (client, upstream):
                if sock is not None:
                    with suppress(OSError):
                        sock.shutdown(socket.SHUT_RDWR)
                    with suppress(OSError):
                        sock.close()

    def cut(self) -> None:
        with self._lock:
            self.mode = "cut"
        self._drop_all()

    def stall(self) -> None:
        with self._lock:
            self.mode = "stall"
            self._forwarding.clear()

    def restore(self) -> None:
        with self._lock:
            was = self.mode
            self.mode = "forward"
            self._forwarding.set()
        if was == "stall":
            self._drop_all()  # stalled connections are unusable: their peers gave up on them

    def close(self) -> None:
        self._closed = True
        with suppress(OSError):
            self.server.close()
        self.cut()
