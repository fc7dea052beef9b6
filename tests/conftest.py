"""Fixtures: an echo target, and a frontend+backend pair built from dicts, all on loopback."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import Daemon, TcpServer, backend, echo_handler, free_port, frontend, write_yaml


@pytest.fixture
def echo() -> Iterator[TcpServer]:
    server = TcpServer(echo_handler)
    yield server
    server.close()


@dataclass
class Pair:
    frontend: Daemon
    backend: Daemon
    frontend_port: int
    backend_port: int

    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.frontend_port)


def start_pair(tmp_path: Path, target: str, *, frontend_extra: dict[str, Any] | None = None,
               backend_extra: dict[str, Any] | None = None, tunnel_extra: dict[str, Any] | None = None,
               listener_extra: dict[str, Any] | None = None) -> Pair:
    """A backend with route ``default`` -> ``target`` and a frontend tunnel ``t`` to it."""
    backend_port, frontend_port = free_port(), free_port()
    backend_cfg = write_yaml(tmp_path, "backend.yaml", {
        **(backend_extra or {}),
        "listeners": [{"name": "main", "listen": f"127.0.0.1:{backend_port}",
                       "routes": {"default": target}, **(listener_extra or {})}],
    })
    frontend_cfg = write_yaml(tmp_path, "frontend.yaml", {
        "backend": f"ws://127.0.0.1:{backend_port}/",
        **(frontend_extra or {}),
        "tunnels": [{"name": "t", "listen": f"127.0.0.1:{frontend_port}", **(tunnel_extra or {})}],
    })
    back = backend(backend_cfg).wait_ready()
    try:
        front = frontend(frontend_cfg).wait_ready()
    except BaseException:
        back.stop()
        raise
    return Pair(front, back, frontend_port, backend_port)


@pytest.fixture
def pair(tmp_path: Path, echo: TcpServer) -> Iterator[Pair]:
    """A frontend+backend pair whose default route leads to an echo server."""
    started = start_pair(tmp_path, echo.address)
    yield started
    started.frontend.stop()
    started.backend.stop()
