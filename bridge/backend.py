"""The backend daemon: serves every configured listener, applies reloads, takes handed-over re-attaches.

A listener is :class:`bridge.frontdoor.ListenerServer` (accept, parse, route, admit); a tunnel's
websocket is :mod:`bridge.server_end`'s; the pump is :class:`bridge.tunnel.Tunnel`. Frames are read
and written with blocking reads: the reader does not read the websocket again until the target
accepted the last bytes, which is the backpressure that keeps memory bounded when a target stalls.
"""

from __future__ import annotations

import logging
import socket
import threading
from typing import Any

from bridge import protocol
from bridge.admission import TunnelCounters
from bridge.caps import Counts
from bridge.config import Address, BackendConfig, Listener
from bridge.frontdoor import ListenerServer
from bridge.handoff import Handoff, Reattach
from bridge.listen import Binder, ListenError, bind_fresh
from bridge.registry import TunnelRegistry
from bridge.reload import reconcile
from bridge.secrets import SecretResolver
from bridge.server_end import NO_SUCH_SESSION, ServerEndpoint, bridge_upgrade_response, reattach, refuse_reattach

log = logging.getLogger("tcpbridge.backend")


class Backend:
    """Serves every configured listener until stopped."""

    def __init__(self, config: BackendConfig, registry: TunnelRegistry, binder: Binder = bind_fresh,
                 counts: Counts | None = None) -> None:
        self.config = config
        self.registry = registry
        self.binder = binder
        self.secrets = SecretResolver()
        self.counters = TunnelCounters(counts)  # kept across reloads: live tunnels still count
        self._servers: dict[str, ListenerServer] = {}
        #: With workers: how re-attaching connections reach the worker that holds their session.
        self.handoff: Handoff | None = None

    def use_handoff(self, handoff: Handoff) -> None:
        """Take this worker's side of the handoff (before :meth:`bind`); see :mod:`bridge.handoff`."""
        self.handoff = handoff

    def bind(self) -> None:
        """Bind every listener, or none: raise ListenError on the first that fails."""
        self._servers = self._bind_all({listener.name: listener for listener in self.config.listeners})

    def start(self) -> None:
        for server in self._servers.values():
            self._start(server)
        if self.handoff is not None:
            threading.Thread(target=self._take_handoffs, args=(self.handoff,), name="handoff", daemon=True).start()

    def _take_handoffs(self, handoff: Handoff) -> None:
        """Answer, each on a pooled thread, the connections other workers hand to this one."""
        while True:
            try:
                record, sock = handoff.receive()
            except OSError:
                return
            try:
                self.registry.workers.submit(self._serve_handoff, record, sock, name="handoff")
            except RuntimeError:
                sock.close()

    def _serve_handoff(self, record: Reattach, sock: socket.socket) -> None:
        """A re-attach another worker accepted and checked: attach it here, or refuse it in band as any
        unknown session is (:func:`~bridge.server_end.refuse_reattach`)."""
        server = self._servers.get(record.listener)
        tunnel = self.registry.resumable(record.session_id)
        max_message_bytes = server.listener.options.max_message_bytes if server is not None else \
            protocol.DEFAULT_MAX_MESSAGE_BYTES
        try:
            sock.sendall(bridge_upgrade_response(record.key, record.binary))
            sock.settimeout(None)
            endpoint = ServerEndpoint(sock, b"", max_message_bytes, binary_consented=record.binary, resume=True)
        except OSError as exc:
            log.debug("listener %s: %s left while re-attaching: %s", record.listener, record.peer, exc)
            sock.close()
            return
        if server is None or tunnel is None or tunnel.label != f"{record.listener}/{record.route}":
            log.info("listener %s: refused %s: %s", record.listener, record.peer, NO_SUCH_SESSION)
            refuse_reattach(endpoint)
            return
        reattach(tunnel, endpoint)

    def apply(self, config: BackendConfig) -> list[str]:
        """Switch to ``config`` (a reload); return one line per change.

        All new ports are bound before anything changes: if one fails, ListenError
        is raised and the running configuration is untouched. Route and option
        changes apply to new upgrades; live tunnels keep what they started with.
        """
        changes = reconcile(
            self._servers, {listener.name: listener for listener in config.listeners},
            kind="listener", settings_of=lambda server: server.listener, replace=_replace_listener,
            bind_all=self._bind_all, start=self._start, stop=_stop,
        )
        self.config = config
        return changes

    @staticmethod
    def listening(config: BackendConfig) -> list[tuple[str, Address, str]]:
        """The ports ``config`` listens on: (listener name, address, what to call it in errors)."""
        return [(listener.name, listener.listen, f"listener {listener.name!r}") for listener in config.listeners]

    def describe(self) -> str:
        return f"{len(self._servers)} listeners"

    def listeners(self) -> list[dict[str, Any]]:
        """Each listener, for ``tcpbridge status`` (``labels``: its routes' labels in stats and metrics)."""
        shown = []
        for name, server in list(self._servers.items()):
            listener = server.listener
            routes = ", ".join(f"{route} -> {target}" for route, target in listener.routes.items())
            shown.append({"name": name, "listen": str(listener.listen), "to": routes,
                          "labels": [f"{name}/{route}" for route in listener.routes]})
        return shown

    def close_listeners(self) -> None:
        """Stop accepting; live tunnels carry on."""
        for server in self._servers.values():
            _stop(server)
        self._servers.clear()

    def _bind_all(self, listeners: dict[str, Listener]) -> dict[str, ListenerServer]:
        bound: dict[str, ListenerServer] = {}
        try:
            for name, listener in listeners.items():
                sock = self.binder(name, listener.listen, f"listener {name!r}")
                bound[name] = ListenerServer(listener, self.registry, sock, secrets=self.secrets,
                                             counters=self.counters, handoff=self.handoff)
        except ListenError:
            for server in bound.values():
                server.server_close()
            raise
        return bound

    def _start(self, server: ListenerServer) -> None:
        listener = server.listener
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.5},
                         name=f"listener-{listener.name}", daemon=True).start()
        routes = ", ".join(f"{name} -> {target}" for name, target in listener.routes.items())
        host, port = server.socket.getsockname()[:2]
        other = f"passed through to {listener.passthrough}" if listener.passthrough else "404"
        log.info("listener %s: listening on %s; routes: %s; other requests: %s", listener.name,
                 Address(host, port), routes, other)


def _replace_listener(server: ListenerServer, listener: Listener) -> None:
    server.listener = listener


def _stop(server: ListenerServer) -> None:
    """Stop accepting on ``server``; its live tunnels carry on."""
    server.shutdown()
    server.server_close()
