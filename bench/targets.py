"""The benchmark's TCP targets, run as their own process so they never take the measuring process's GIL.

Three services on 127.0.0.1, ports printed as one JSON line on stdout once listening:

* **sink**: reads an 8-byte big-endian length N, then N bytes, hashing them; answers with the
  32-byte sha256 and the 8-byte count it received, then waits for EOF and closes.
* **source**: reads an 8-byte length N and sends the first N bytes of the shared payload
  (``payload(size, seed)``), then half-closes and waits for EOF.
* **echo**: echoes until EOF, then closes. One epoll loop, so thousands of held connections cost
  no threads here (the daemons' threads are what is being measured), and a small request costs
  a few microseconds, so the request/response benchmark measures the relays, not this target.
* **flood**: sends zeros until the client closes (the mixed benchmark's endless downloads).

Sink, source and flood are a thread per connection (blocking I/O, hashlib releases the GIL).
Every blocking call has a timeout; the process exits when its stdin closes.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import random
import resource
import select
import socket
import struct
import sys
import threading
from collections.abc import Callable
from typing import Any

IO_TIMEOUT = 60.0
CHUNK = 1 << 20


def payload(size: int, seed: int) -> bytes:
    """The bulk payload: pseudo-random bytes, identical in every process for one (size, seed)."""
    rng = random.Random(seed)
    block = 16 << 20  # randbytes() of more than 256 MiB overflows
    return b"".join(rng.randbytes(min(block, size - offset)) for offset in range(0, size, block))


def _recv_exactly(conn: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        data = conn.recv(n - len(buf))
        if not data:
            raise EOFError
        buf += data
    return bytes(buf)


def _drain_to_eof(conn: socket.socket) -> None:
    for _ in range(1000):
        if not conn.recv(65536):
            return


def _sink(conn: socket.socket) -> None:
    (n,) = struct.unpack("!Q", _recv_exactly(conn, 8))
    digest = hashlib.sha256()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = conn.recv_into(view, min(CHUNK, n - got))
        if not k:
            break
        digest.update(view[:k])
        got += k
    conn.sendall(digest.digest() + struct.pack("!Q", got))
    _drain_to_eof(conn)


def _source(conn: socket.socket, data: bytes) -> None:
    (n,) = struct.unpack("!Q", _recv_exactly(conn, 8))
    view = memoryview(data)[:min(n, len(data))]
    for offset in range(0, len(view), CHUNK):
        conn.sendall(view[offset:offset + CHUNK])
    conn.shutdown(socket.SHUT_WR)
    _drain_to_eof(conn)


def _serve_threads(sock: socket.socket, handler: Callable[..., None], *args: Any) -> None:
    def handle(conn: socket.socket) -> None:
        conn.settimeout(IO_TIMEOUT)
        with contextlib.suppress(OSError, EOFError, struct.error):
            handler(conn, *args)
        conn.close()

    while True:
        try:
            conn, _ = sock.accept()
        except OSError:
            return
        threading.Thread(target=handle, args=(conn,), daemon=True).start()


def _flood(conn: socket.socket) -> None:
    block = bytes(CHUNK)
    while True:
        conn.sendall(block)  # until the client closes (an OSError ends the handler)


class _EchoLoop:
    """Echo on every connection from one epoll loop: a few microseconds per message, no thread each.

    A connection whose echo cannot be written in full stops being read until it drains, so a
    client that does not read holds at most one message here. EOF closes once the echo is out.
    """

    def __init__(self, listener: socket.socket) -> None:
        self.listener = listener
        self.poller = select.epoll()
        self.conns: dict[int, socket.socket] = {}
        self.unsent: dict[int, bytes] = {}

    def serve(self) -> None:
        self.listener.setblocking(False)
        self.poller.register(self.listener.fileno(), select.EPOLLIN)
        while True:
            for fd, events in self.poller.poll():
                if fd == self.listener.fileno():
                    self._accept()
                elif events & select.EPOLLOUT:
                    self._flush(fd)
                else:
                    self._echo(fd)

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except BlockingIOError:
                return
            conn.setblocking(False)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.conns[conn.fileno()] = conn
            self.poller.register(conn.fileno(), select.EPOLLIN)

    def _echo(self, fd: int) -> None:
        try:
            data = self.conns[fd].recv(65536)
        except BlockingIOError:
            return
        except OSError:
            self._close(fd)
            return
        if not data:
            self._close(fd)
            return
        self._send(fd, data)

    def _send(self, fd: int, data: bytes) -> None:
        try:
            sent = self.conns[fd].send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            self._close(fd)
            return
        if sent < len(data):
            self.unsent[fd] = data[sent:]
            self.poller.modify(fd, select.EPOLLOUT)
        elif fd in self.unsent:
            del self.unsent[fd]
            self.poller.modify(fd, select.EPOLLIN)

    def _flush(self, fd: int) -> None:
        self._send(fd, self.unsent[fd])

    def _close(self, fd: int) -> None:
        self.poller.unregister(fd)
        self.unsent.pop(fd, None)
        self.conns.pop(fd).close()


def _serve_echo(sock: socket.socket) -> None:
    with contextlib.suppress(Exception):
        _EchoLoop(sock).serve()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, required=True)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    data = payload(args.size, args.seed)
    sink = socket.create_server(("127.0.0.1", 0), backlog=1024)
    source = socket.create_server(("127.0.0.1", 0), backlog=1024)
    echo = socket.create_server(("127.0.0.1", 0), backlog=4096)
    flood = socket.create_server(("127.0.0.1", 0), backlog=1024)
    threading.Thread(target=_serve_threads, args=(sink, _sink), daemon=True).start()
    threading.Thread(target=_serve_threads, args=(flood, _flood), daemon=True).start()
    threading.Thread(target=_serve_threads, args=(source, _source, data), daemon=True).start()
    threading.Thread(target=_serve_echo, args=(echo,), daemon=True).start()
    services = (("sink", sink), ("source", source), ("echo", echo), ("flood", flood))
    ports = {name: s.getsockname()[1] for name, s in services}
    print(json.dumps(ports), flush=True)
    sys.stdin.read()  # until the benchmark exits or closes our stdin


if __name__ == "__main__":
    main()
