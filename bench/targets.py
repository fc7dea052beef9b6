"""The benchmark's TCP targets, run as their own process so they never take the measuring process's GIL.

Three services on 127.0.0.1, ports printed as one JSON line on stdout once listening:

* **sink**: reads an 8-byte big-endian length N, then N bytes, hashing them; answers with the
  32-byte sha256 and the 8-byte count it received, then waits for EOF and closes.
* **source**: reads an 8-byte length N and sends the first N bytes of the shared payload
  (``payload(size, seed)``), then half-closes and waits for EOF.
* **echo**: echoes until EOF, then closes. One asyncio loop, so thousands of held connections
  cost no threads here (the daemons' threads are what is being measured).

Sink and source are a thread per connection (blocking I/O, hashlib releases the GIL).
Every blocking call has a timeout; the process exits when its stdin closes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import random
import resource
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


class _Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)

    def eof_received(self) -> bool:
        return False  # close once what was written is flushed


def _serve_echo(sock: socket.socket) -> None:
    loop = asyncio.new_event_loop()

    async def main() -> None:
        server = await loop.create_server(_Echo, sock=sock, backlog=4096)
        await server.serve_forever()

    with contextlib.suppress(Exception):
        loop.run_until_complete(main())


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
    threading.Thread(target=_serve_threads, args=(sink, _sink), daemon=True).start()
    threading.Thread(target=_serve_threads, args=(source, _source, data), daemon=True).start()
    threading.Thread(target=_serve_echo, args=(echo,), daemon=True).start()
    ports = {name: s.getsockname()[1] for name, s in (("sink", sink), ("source", source), ("echo", echo))}
    print(json.dumps(ports), flush=True)
    sys.stdin.read()  # until the benchmark exits or closes our stdin


if __name__ == "__main__":
    main()
