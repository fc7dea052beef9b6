"""A TCP relay on loopback that cuts its connections on demand: the network between a frontend and a
backend, as the resume tests need it to fail.

Each accepted connection is joined to a new connection to ``upstream`` by two copying threads.
:meth:`CuttingRelay.cut` ends every live connection one of two ways:

* ``reset``: a RST to both sides (a crashed proxy, a NAT that forgot the flow and answers with RST);
* ``close``: a FIN to both sides (a proxy restarting gracefully, without websocket close frames).

A silent black hole (segments dropped, never acknowledged) cannot be played by a relay in user space:
its kernel acknowledges whatever it receives, which the tunnels rightly take for a live, slow peer.

New connections are relayed as usual after a cut (the path is back), unless :attr:`refusing` is set:
they are then reset at once.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from dataclasses import dataclass

from bridge.tunnel import reset_now

HOWS = ("reset", "close")


@dataclass
class _Link:
    """One relayed connection: ``down`` is the accepted side, ``up`` the one to upstream."""

    down: socket.socket
    up: socket.socket
    cut: bool = False


class CuttingRelay:
    def __init__(self, upstream_port: int, host: str = "127.0.0.1") -> None:
        self.upstream = (host, upstream_port)
        self.server = socket.create_server((host, 0))
        self.port = int(self.server.getsockname()[1])
        self.refusing = False
        #: Connections accepted so far, cut or not.
        self.accepted = 0
        self._links: list[_Link] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True, name="relay-accept").start()

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/"

    def live(self) -> int:
        """Connections relayed now (not cut)."""
        with self._lock:
            return sum(1 for link in self._links if not link.cut)

    def cut(self, how: str) -> int:
        """Cut every live connection ``how`` (one of :data:`HOWS`); how many were cut."""
        assert how in HOWS
        with self._lock:
            links = [link for link in self._links if not link.cut]
            for link in links:
                link.cut = True
        for link in links:
            if how == "reset":
                reset_now(link.down), reset_now(link.up)
            else:
                for sock in (link.down, link.up):
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_RDWR)
        return len(links)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.server.shutdown(socket.SHUT_RDWR)
        self.server.close()
        with self._lock:
            links, self._links = self._links, []
        for link in links:
            for sock in (link.down, link.up):
                reset_now(sock)
                sock.close()

    def _accept(self) -> None:
        while True:
            try:
                down, _ = self.server.accept()
            except OSError:
                return
            self.accepted += 1
            if self.refusing:
                reset_now(down)
                down.close()
                continue
            try:
                up = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                reset_now(down)
                down.close()
                continue
            up.settimeout(None)
            for sock in (down, up):  # as nginx does (tcp_nodelay): small frames are not held back
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            link = _Link(down, up)
            with self._lock:
                self._links.append(link)
            for source, sink in ((down, up), (up, down)):
                threading.Thread(target=self._copy, args=(source, sink), daemon=True, name="relay-copy").start()

    @staticmethod
    def _copy(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(1 << 16):
                sink.sendall(data)
            sink.shutdown(socket.SHUT_WR)
