"""wss:// for real: a private nginx terminates TLS (throwaway CA) and load-balances two of our backends.

Checks the frontend's ``tls`` settings (ca_file, server_name, cert_file/key_file for mTLS, verify)
and that every refusal is one log line naming the URL and the reason. Loopback only.
"""

from __future__ import annotations

import os
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bridge.config import TlsOptions
from bridge.transport import tls_context
from tests.helpers import (
    Daemon,
    TcpServer,
    backend,
    echo_handler,
    free_port,
    frontend,
    pattern,
    recv_all,
    send_then_shutdown,
    sha256,
    write_yaml,
)
from tests.pki import Issued, NginxSite, Pki, Server, nginx, require_tools, stopping, tinyproxy

BRIDGE_PATH = "/tcp-over-websocket-bridge/"


@dataclass
class Site:
    """nginx in front of two backends: ``port`` plain TLS, ``mtls_port`` demanding a client certificate."""

    nginx: Server
    port: int
    mtls_port: int
    backends: list[Daemon]
    ca: Pki
    other_ca: Pki
    client: Issued
    stranger: Issued  # a client certificate from a CA nginx does not trust


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    require_tools("openssl", "nginx")
    root = tmp_path_factory.mktemp("tls")
    ca = Pki(root / "ca")
    other_ca = Pki(root / "other-ca", name="some other CA")
    server_cert = ca.issue("server", dns=["localhost", "backend.test"])  # no IP SAN: by IP needs server_name
    client = ca.issue("client", client=True)
    stranger = other_ca.issue("stranger", client=True)
    echo = TcpServer(echo_handler)
    backends: list[Daemon] = []
    try:
        ports = []
        for index in range(2):
            port = free_port()
            config = write_yaml(root, f"backend{index}.yaml", {"listeners": [
                {"name": f"b{index}", "listen": f"127.0.0.1:{port}", "routes": {"default": echo.address}}]})
            backends.append(backend(config).wait_ready())
            ports.append(port)
        port, mtls_port = free_port(), free_port()
        with stopping(nginx(root / "nginx", ports, server_cert,
                            [NginxSite(port), NginxSite(mtls_port, client_ca=ca.ca_cert)])) as server:
            yield Site(server, port, mtls_port, backends, ca, other_ca, client, stranger)
    finally:
        for daemon in backends:
            daemon.stop()
        echo.close()


StartFrontend = Callable[..., tuple[Daemon, int]]


@pytest.fixture
def start_frontend(tmp_path: Path) -> Iterator[StartFrontend]:
    started: list[Daemon] = []

    def start(backend_url: str, env: dict[str, str] | None = None, **tunnel: Any) -> tuple[Daemon, int]:
        listen = free_port()
        config = write_yaml(tmp_path, f"frontend{len(started)}.yaml", {
            "connect_timeout": 5,
            "tunnels": [{"name": "t", "listen": f"127.0.0.1:{listen}", "backend": backend_url, **tunnel}]})
        daemon = frontend(config, env=env).wait_ready()
        started.append(daemon)
        return daemon, listen

    yield start
    for daemon in started:
        daemon.stop()


def roundtrip(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
        send_then_shutdown(client, data)
        return recv_all(client, timeout=20)


def assert_refused(daemon: Daemon, port: int, url: str, reason: str) -> None:
    """The client is reset, and the log has one line naming the URL and the reason."""
    with pytest.raises((ConnectionResetError, BrokenPipeError)), \
            socket.create_connection(("127.0.0.1", port), timeout=10) as client:
        client.sendall(b"hello")
        recv_all(client, timeout=15)
    assert daemon.wait_for_log("cannot open"), daemon.log  # the reason may also be in a start-up line
    lines = [line for line in daemon.log.splitlines() if "cannot open" in line]
    assert len(lines) == 1, daemon.log
    assert f"cannot open {url}{BRIDGE_PATH}" in lines[0] and reason in lines[0], lines[0]


def test_bytes_cross_nginx_tls_to_both_backends(site: Site, start_frontend: StartFrontend) -> None:
    daemon, port = start_frontend(f"wss://localhost:{site.port}/", tls={"ca_file": str(site.ca.ca_cert)})
    payload = os.urandom(3 << 20)
    results: dict[int, bytes] = {}

    def run(index: int) -> None:
        results[index] = roundtrip(port, payload)

    threads = [threading.Thread(target=run, args=(index,)) for index in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sorted(results) == [0, 1]
    for data in results.values():
        assert sha256(data) == sha256(payload)
    # Round robin: one connection per backend.
    for daemon_ in site.backends:
        assert daemon_.wait_for_log("] open: "), daemon_.log
    assert daemon.wait_for_log("closed (clean)")


@pytest.mark.parametrize("tls", [pytest.param("other", id="wrong-ca"), pytest.param(None, id="system-cas")])
def test_an_untrusted_certificate_is_refused(site: Site, start_frontend: StartFrontend, tls: str | None) -> None:
    options = {"ca_file": str(site.other_ca.ca_cert)} if tls else {}
    url = f"wss://localhost:{site.port}"
    daemon, port = start_frontend(url + "/", tls=options)
    assert_refused(daemon, port, url, "TLS certificate verification failed: unable to get local issuer certificate")
    checked = f"(checked against tls ca_file {site.other_ca.ca_cert})" if tls else "(checked against the system CAs"
    assert checked in daemon.log


def test_a_name_the_certificate_does_not_hold_is_refused(site: Site, start_frontend: StartFrontend) -> None:
    url = f"wss://127.0.0.1:{site.port}"
    daemon, port = start_frontend(url + "/", tls={"ca_file": str(site.ca.ca_cert)})
    assert_refused(daemon, port, url, "TLS certificate verification failed: IP address mismatch")


def test_a_server_name_the_certificate_does_not_hold_is_refused(site: Site, start_frontend: StartFrontend) -> None:
    url = f"wss://127.0.0.1:{site.port}"
    daemon, port = start_frontend(url + "/", tls={"ca_file": str(site.ca.ca_cert), "server_name": "other.test"})
    assert_refused(daemon, port, url, "TLS certificate verification failed: Hostname mismatch")


def test_server_name_verifies_a_name_while_connecting_by_ip(site: Site, start_frontend: StartFrontend) -> None:
    _, port = start_frontend(f"wss://127.0.0.1:{site.port}/",
                             tls={"ca_file": str(site.ca.ca_cert), "server_name": "backend.test"})
    data = pattern(100_000)
    assert roundtrip(port, data) == data


def test_verify_false_connects_without_a_ca_and_warns_at_start(site: Site, start_frontend: StartFrontend) -> None:
    daemon, port = start_frontend(f"wss://127.0.0.1:{site.port}/", tls={"verify": False})
    assert "tunnel t: tls verify is off" in daemon.log
    assert roundtrip(port, b"insecure but working") == b"insecure but working"


def test_mtls_without_a_client_certificate_is_refused(site: Site, start_frontend: StartFrontend) -> None:
    url = f"wss://localhost:{site.mtls_port}"
    daemon, port = start_frontend(url + "/", tls={"ca_file": str(site.ca.ca_cert)})
    assert_refused(daemon, port, url, "HTTP 400 Bad Request (400 No required SSL certificate was sent)")


def test_mtls_with_a_certificate_from_another_ca_is_refused(site: Site, start_frontend: StartFrontend) -> None:
    url = f"wss://localhost:{site.mtls_port}"
    daemon, port = start_frontend(url + "/", tls={"ca_file": str(site.ca.ca_cert), "cert_file": str(site.stranger.cert),
                                                  "key_file": str(site.stranger.key)})
    assert_refused(daemon, port, url, "HTTP 400 Bad Request (400 The SSL certificate error)")


def test_mtls_with_a_client_certificate_is_accepted(site: Site, start_frontend: StartFrontend) -> None:
    _, port = start_frontend(f"wss://localhost:{site.mtls_port}/", tls={
        "ca_file": str(site.ca.ca_cert), "cert_file": str(site.client.cert), "key_file": str(site.client.key)})
    data = pattern(1 << 20)
    assert sha256(roundtrip(port, data)) == sha256(data)


def test_a_key_that_does_not_match_its_certificate_is_reported_at_start(
    site: Site, start_frontend: StartFrontend
) -> None:
    daemon, port = start_frontend(f"wss://localhost:{site.mtls_port}/", tls={
        "ca_file": str(site.ca.ca_cert), "cert_file": str(site.client.cert), "key_file": str(site.stranger.key)})
    assert daemon.wait_for_log(f"tunnel t: cannot use tls cert_file {site.client.cert}")
    assert daemon.wait_for_log("key values mismatch")
    assert_refused(daemon, port, f"wss://localhost:{site.mtls_port}", "key values mismatch")


def test_wss_through_an_http_connect_proxy(site: Site, start_frontend: StartFrontend,
                                           tmp_path: Path) -> None:
    require_tools("tinyproxy")
    with stopping(tinyproxy(tmp_path / "proxy", [site.port])) as proxy:
        _, port = start_frontend(f"wss://localhost:{site.port}/", tls={"ca_file": str(site.ca.ca_cert)},
                                 proxy=f"http://127.0.0.1:{proxy.port}")
        data = pattern(1 << 20)
        assert sha256(roundtrip(port, data)) == sha256(data)
        assert f"CONNECT localhost:{site.port} HTTP/1.1" in proxy.log(), proxy.log()


def test_the_tls_context_is_built_once_per_setting_and_again_when_a_file_changes(tmp_path: Path) -> None:
    require_tools("openssl")
    ca = Pki(tmp_path / "ca")
    client = ca.issue("client", client=True)
    options = TlsOptions(ca_file=str(ca.ca_cert), cert_file=str(client.cert), key_file=str(client.key))
    context = tls_context(options)
    assert tls_context(TlsOptions(ca_file=str(ca.ca_cert), cert_file=str(client.cert),
                                  key_file=str(client.key))) is context  # equal settings share it
    assert tls_context(TlsOptions(ca_file=str(ca.ca_cert))) is not context
    renewed = ca.issue("client-renewed", client=True)
    os.replace(renewed.cert, client.cert)
    os.replace(renewed.key, client.key)
    fresh = tls_context(options)
    assert fresh is not context and tls_context(options) is fresh
    insecure = tls_context(TlsOptions(verify=False))
    assert insecure.verify_mode == ssl.CERT_NONE and not insecure.check_hostname
