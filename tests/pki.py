"""Test support: a throwaway PKI made with the ``openssl`` CLI, and the system tools the TLS
and proxy tests run for real (nginx, tinyproxy, sshd), each run privately from a temporary directory.

Nothing here touches the system's own configuration: every server gets its own config, pid and
log files under the test's directory and listens on 127.0.0.1 only. The Debian packages are
installed on first use when missing (``apt-get``, as root), else the tests skip saying why.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import socket
import subprocess
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import free_port, wait_until

#: binary -> the Debian package that provides it
PACKAGES = {"openssl": "openssl", "nginx": "nginx-light", "tinyproxy": "tinyproxy", "sshd": "openssh-server",
            "ssh": "openssh-client", "ssh-keygen": "openssh-client"}
APT_TIMEOUT = 300.0
START_TIMEOUT = 10.0


def require_tools(*binaries: str) -> None:
    """Make sure ``binaries`` are on PATH, installing their Debian packages if needed; else skip."""
    missing = [name for name in binaries if not _which(name)]
    if not missing:
        return
    packages = sorted({PACKAGES[name] for name in missing})
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip(f"needs {', '.join(missing)} (Debian packages {' '.join(packages)}); not root with apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    # One installer at a time (parallel test runs), and the lists fetched if apt has none yet.
    with open("/tmp/tcpbridge-tests-apt.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if [name for name in binaries if not _which(name)]:
            steps = [["apt-get", "update", "-qq"],
                     ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages]]
            for step in steps:
                try:
                    result = subprocess.run(step, env=env, capture_output=True, text=True, timeout=APT_TIMEOUT,
                                            check=False, stdin=subprocess.DEVNULL)
                except subprocess.TimeoutExpired:
                    pytest.skip(f"needs {' '.join(packages)}: {' '.join(step)} timed out")
                if result.returncode != 0:
                    detail = (result.stderr.strip().splitlines() or ["no output"])[-1]
                    pytest.skip(f"needs {' '.join(packages)}: {' '.join(step)} failed: {detail}")
    still = [name for name in binaries if not _which(name)]
    if still:
        pytest.skip(f"needs {', '.join(still)}: not found after installing {' '.join(packages)}")


def _which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin")


def openssl(*args: str, cwd: Path) -> None:
    result = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=30, check=False,
                            stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        raise AssertionError(f"openssl {' '.join(args)} failed:\n{result.stderr}")


@dataclass(frozen=True)
class Issued:
    cert: Path
    key: Path


class Pki:
    """A throwaway certificate authority (EC P-256 keys, valid for two days)."""

    def __init__(self, directory: Path, name: str = "tcpbridge test CA") -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        slug = name.replace(" ", "-")
        self.ca_cert = self.dir / f"{slug}.pem"
        self.ca_key = self.dir / f"{slug}.key"
        openssl("req", "-x509", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                "-keyout", str(self.ca_key), "-out", str(self.ca_cert), "-days", "2", "-subj", f"/CN={name}",
                "-addext", "basicConstraints=critical,CA:TRUE",
                "-addext", "keyUsage=critical,keyCertSign,cRLSign",
                "-addext", "subjectKeyIdentifier=hash", cwd=self.dir)

    def issue(self, name: str, *, dns: Iterable[str] = (), ips: Iterable[str] = (), client: bool = False) -> Issued:
        """A leaf certificate signed by this CA, for a server (SANs) or a client (``client=True``)."""
        cert, key, csr, ext = (self.dir / f"{name}.{suffix}" for suffix in ("pem", "key", "csr", "ext"))
        sans = [f"DNS:{host}" for host in dns] + [f"IP:{ip}" for ip in ips]
        lines = ["basicConstraints=critical,CA:FALSE", "keyUsage=critical,digitalSignature",
                 f"extendedKeyUsage={'clientAuth' if client else 'serverAuth'}",
                 "subjectKeyIdentifier=hash", "authorityKeyIdentifier=keyid"]
        if sans:
            lines.append("subjectAltName=" + ",".join(sans))
        ext.write_text("\n".join(lines) + "\n")
        openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={name}", cwd=self.dir)
        openssl("x509", "-req", "-in", str(csr), "-CA", str(self.ca_cert), "-CAkey", str(self.ca_key),
                "-set_serial", str(int.from_bytes(os.urandom(8), "big")), "-days", "2", "-out", str(cert),
                "-extfile", str(ext), cwd=self.dir)
        return Issued(cert, key)


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


class Server:
    """A system server run in the foreground from a private directory, stopped by its pid."""

    def __init__(self, argv: list[str], port: int, log_file: Path, directory: Path) -> None:
        self.port = port
        self.log_file = log_file
        output = open(directory / f"{Path(argv[0]).name}.out", "w")  # noqa: SIM115 - closed in stop()
        self._output = output
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
                                     cwd=directory, start_new_session=True)
        self._output_path = Path(output.name)
        if not wait_until(lambda: self.proc.poll() is not None or _port_open(port), START_TIMEOUT):
            self.stop()
            raise AssertionError(f"{argv[0]} not listening on {port} in {START_TIMEOUT} s:\n{self.output()}")
        if self.proc.poll() is not None:
            self.stop()
            raise AssertionError(f"{argv[0]} exited with {self.proc.returncode}:\n{self.output()}")

    def output(self) -> str:
        text = self._output_path.read_text(errors="replace") if self._output_path.exists() else ""
        if self.log_file.exists():
            text += self.log_file.read_text(errors="replace")
        return text

    def log(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)  # its own session: master and workers
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self._output.close()


NGINX_SERVER = """
    server {{
        listen 127.0.0.1:{port} ssl;
        server_name backend.test;
        ssl_certificate {cert};
        ssl_certificate_key {key};
{client_auth}
        location / {{
            proxy_pass http://tcpbridge_backends;
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection "upgrade";
            proxy_read_timeout 3600s;
            proxy_send_timeout 3600s;
        }}
    }}
"""


@dataclass
class NginxSite:
    """One TLS server block: its port and, if set, the CA it demands client certificates from."""

    port: int
    client_ca: Path | None = None


def nginx(directory: Path, backends: list[int], cert: Issued, sites: list[NginxSite], *,
          hash_key: str | None = None) -> Server:
    """A private nginx terminating TLS on each site and load-balancing to ``backends``: round robin, or
    by the consistent hash of ``hash_key`` (an nginx variable; requests where it is empty go round robin)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tmp").mkdir(exist_ok=True)
    servers = "".join(NGINX_SERVER.format(
        port=site.port, cert=cert.cert, key=cert.key,
        client_auth=(f"        ssl_client_certificate {site.client_ca};\n        ssl_verify_client on;"
                     if site.client_ca else ""),
    ) for site in sites)
    upstream = "".join(f"        server 127.0.0.1:{port};\n" for port in backends)
    if hash_key is not None:
        upstream = f"        hash {hash_key} consistent;\n{upstream}"
    temp = " ".join(f"{kind}_temp_path {directory}/tmp/{kind};"
                    for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    config = directory / "nginx.conf"
    config.write_text(f"""
{'user root;' if os.geteuid() == 0 else ''}
worker_processes 1;
daemon off;
pid {directory}/nginx.pid;
error_log {directory}/error.log info;
events {{ worker_connections 512; }}
http {{
    access_log {directory}/access.log;
    {temp}
    upstream tcpbridge_backends {{
{upstream}    }}
{servers}
}}
""")
    nginx_bin = _which("nginx") or "nginx"
    argv = [nginx_bin, "-p", str(directory), "-c", str(config), "-e", str(directory / "error.log")]
    check = subprocess.run([*argv, "-t"], capture_output=True, text=True, timeout=30, check=False)
    if check.returncode != 0:
        raise AssertionError(f"nginx -t failed:\n{check.stderr}")
    return Server(argv, sites[0].port, directory / "error.log", directory)


def tinyproxy(directory: Path, connect_ports: list[int], *, auth: tuple[str, str] | None = None) -> Server:
    """A private tinyproxy on 127.0.0.1 allowing CONNECT only to ``connect_ports``."""
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log_file = directory / "tinyproxy.log"
    lines = [f"Port {port}", "Listen 127.0.0.1", "Timeout 60", "Syslog Off", f'LogFile "{log_file}"',
             "LogLevel Connect", f'PidFile "{directory}/tinyproxy.pid"', "MaxClients 50", "Allow 127.0.0.1",
             *(f"ConnectPort {p}" for p in connect_ports)]
    if os.geteuid() == 0:
        lines += ["User root", "Group root"]
    if auth:
        lines.append(f"BasicAuth {auth[0]} {auth[1]}")
    config = directory / "tinyproxy.conf"
    config.write_text("\n".join(lines) + "\n")
    return Server([_which("tinyproxy") or "tinyproxy", "-d", "-c", str(config)], port, log_file, directory)


@contextlib.contextmanager
def stopping(server: Server) -> Iterator[Server]:
    try:
        yield server
    finally:
        server.stop()
