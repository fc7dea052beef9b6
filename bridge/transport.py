"""How the frontend reaches a backend's host: directly or through an HTTP CONNECT proxy, then TLS.

Pure decisions (which proxy, if any) are kept apart from the socket work so
they can be tested on their own. Loopback backends never go through a proxy
taken from the environment.
"""

from __future__ import annotations

import base64
import enum
import ipaddress
import math
import os
import select
import socket
import ssl
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from bridge.config import TlsOptions, redact_url
from bridge.sockets import describe_error


class DialFailure(enum.StrEnum):
    """Why a dial failed, for code (the message is for people). Values are metric labels."""

    #: The backend answered the upgrade with another status than 101 (``DialError.status``).
    REFUSED = "refused"
    #: ``connect_timeout`` passed (connecting, at the proxy, during TLS or the upgrade).
    TIMEOUT = "timeout"
    TLS = "tls"
    #: The backend's host name did not resolve.
    DNS = "dns"
    #: The backend's host (or the proxy's tunnel to it) refused the TCP connection.
    CONNECT_REFUSED = "connect_refused"
    #: Any other failure to reach the backend (unreachable, reset, dropped after the 101).
    CONNECT_ERROR = "connect_error"
    #: The HTTP proxy was misconfigured, unreachable, or refused CONNECT.
    PROXY = "proxy"
    #: A header secret (file, command, environment variable) could not be read.
    SECRET = "secret"
    #: The backend's answer was not a valid websocket handshake.
    HANDSHAKE = "handshake"


class DialError(Exception):
    """The websocket to the backend could not be opened: ``reason`` says why for code, the message for people.

    ``status``: the HTTP status of a refusal (``reason`` REFUSED), else None.
    """

    def __init__(self, message: str, reason: DialFailure, status: int | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.status = status

    @property
    def label(self) -> str:
        """The reason as the metrics count it: ``http_NNN`` for a refusal, else the reason's value."""
        if self.reason is DialFailure.REFUSED and self.status is not None:
            return f"http_{self.status}"
        return self.reason.value


class DialTimeout(DialError):
    """The dial's deadline (``connect_timeout``) passed during ``step``.

    ``step`` says what was being waited for (``connecting to host:443``, ``during the
    TLS handshake with host:443``, ...); ``at_proxy``: the step names the proxy itself,
    so a "via proxy" suffix would repeat it. :func:`bridge.frontend.dial` turns this
    into ``timed out after N s (connect_timeout) <step>``.
    """

    def __init__(self, step: str, *, at_proxy: bool = False) -> None:
        super().__init__(f"timed out {step}", DialFailure.TIMEOUT)
        self.step = step
        self.at_proxy = at_proxy


def time_left(deadline: float, step: str, *, at_proxy: bool = False) -> float:
    """Seconds until ``deadline`` (a ``time.monotonic()`` value); DialTimeout(``step``) if it has passed.

    Never 0, so a socket timeout set from it never means "non-blocking".
    """
    left = deadline - time.monotonic()
    if left <= 0:
        raise DialTimeout(step, at_proxy=at_proxy)
    return left


#: Largest CONNECT reply head (status line and headers) read from a proxy.
MAX_PROXY_REPLY_BYTES = 16 * 1024
#: Host names that always mean this machine: never sent through an environment proxy.
LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"})
#: OpenSSL's X509_V_ERR_HOSTNAME_MISMATCH, _EMAIL_MISMATCH and _IP_ADDRESS_MISMATCH.
NAME_MISMATCH_CODES = frozenset({62, 63, 64})
#: TLS contexts kept (one per distinct ``tls`` setting and version of its files).
MAX_TLS_CONTEXTS = 64


@dataclass(frozen=True)
class ProxyChoice:
    """An HTTP proxy to reach a backend through, and where that choice came from."""

    url: str  #: ``http://[user:password@]host:port``; never logged as is
    source: str  #: e.g. ``proxy setting`` or ``environment variable https_proxy``

    def __str__(self) -> str:
        return f"{redact_url(self.url).rstrip('/')} (from {self.source})"


def choose_proxy(url: str, setting: str, environ: Mapping[str, str]) -> ProxyChoice | None:
    """The proxy to CONNECT through for backend ``url``, or None to connect directly.

    ``setting`` is the tunnel's ``proxy``: ``none``; an ``http://host:port`` URL
    (always used); or ``env``: ``https_proxy``/``HTTPS_PROXY`` for ``wss://`` and
    ``http_proxy``/``HTTP_PROXY`` for ``ws://`` (lower case first), unless ``no_proxy``
    (or ``NO_PROXY``) matches the host, or the host is loopback (``localhost``,
    127.0.0.0/8, ``::1``), which is never proxied. A pure function: no DNS.
    """
    if setting == "none":
        return None
    if setting != "env":
        return ProxyChoice(setting, "proxy setting")
    parts = urlsplit(url)
    host = (parts.hostname or "").lower().rstrip(".")
    secure = parts.scheme == "wss"
    port = parts.port or (443 if secure else 80)
    if is_loopback(host):
        return None
    for name in ("https_proxy", "HTTPS_PROXY") if secure else ("http_proxy", "HTTP_PROXY"):
        value = environ.get(name, "").strip()
        if value:
            break
    else:
        return None
    if no_proxy_matches(host, port, environ.get("no_proxy") or environ.get("NO_PROXY") or ""):
        return None
    if "://" not in value:
        value = "http://" + value
    return ProxyChoice(value, f"environment variable {name}")


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an IP literal, no brackets) names this machine."""
    host = host.lower().rstrip(".")
    if host in LOOPBACK_NAMES or host.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def no_proxy_matches(host: str, port: int, no_proxy: str) -> bool:
    """Whether a ``no_proxy`` list exempts ``host:port``.

    Comma-separated entries: ``*`` (everything); a domain, which also matches its
    subdomains (``example.com``, ``.example.com`` and ``*.example.com`` alike); an IP
    address or CIDR block (``10.0.0.0/8``, ``[::1]``); each optionally with ``:port``.
    """
    for raw in no_proxy.split(","):
        entry = raw.strip().lower()
        if not entry:
            continue
        if entry == "*":
            return True
        entry_host, entry_port = _split_no_proxy_entry(entry)
        if entry_port is not None and entry_port != port:
            continue
        if _host_matches(host, entry_host):
            return True
    return False


def _split_no_proxy_entry(entry: str) -> tuple[str, int | None]:
    if entry.startswith("["):
        inside, _, rest = entry[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
        return inside, int(port_text) if port_text.isdigit() else None
    if entry.count(":") == 1:
        name, _, port_text = entry.partition(":")
        return name, int(port_text) if port_text.isdigit() else -1  # a bad port matches nothing
    return entry, None


def _host_matches(host: str, entry: str) -> bool:
    try:
        network = ipaddress.ip_network(entry, strict=False)
    except ValueError:
        network = None
    if network is not None:
        try:
            return ipaddress.ip_address(host) in network
        except ValueError:
            return False
    domain = entry.lstrip("*").lstrip(".").rstrip(".")
    return bool(domain) and (host == domain or host.endswith("." + domain))


def _authority(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def connect_tcp(host: str, port: int, deadline: float, step: str, *, at_proxy: bool = False) -> socket.socket:
    """A TCP connection to ``host:port``, each address tried with only the time left until ``deadline``.

    Like ``socket.create_connection``, whose timeout applies to each address anew:
    here all of them together get one deadline (DialTimeout(``step``) when it passes).
    The name lookup itself cannot be bounded (``getaddrinfo`` blocks); socket.gaierror
    and the first connect error propagate as they are.
    """
    infos = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)
    first_error: OSError | None = None
    for family, kind, proto, _, address in infos:
        left = time_left(deadline, step, at_proxy=at_proxy)
        sock: socket.socket | None = None
        try:
            sock = socket.socket(family, kind, proto)
            sock.settimeout(left)
            sock.connect(address)
        except TimeoutError:
            _close(sock)
            raise DialTimeout(step, at_proxy=at_proxy) from None
        except OSError as exc:
            _close(sock)
            first_error = first_error or exc
            continue
        except BaseException:
            _close(sock)
            raise
        return sock
    raise first_error or OSError(f"no address for {_authority(host, port)}")


def _close(sock: socket.socket | None) -> None:
    if sock is not None:
        sock.close()


def _connect_via_proxy(proxy: ProxyChoice, host: str, port: int, deadline: float) -> socket.socket:
    """A TCP connection to ``host:port`` tunnelled through ``proxy`` with HTTP CONNECT, done by ``deadline``."""
    parts = urlsplit(proxy.url)
    if parts.scheme != "http":
        raise DialError(f"proxy {proxy}: only http:// proxies are supported, not {parts.scheme}://",
                        DialFailure.PROXY)
    try:
        proxy_host, proxy_port = parts.hostname, parts.port or 80
    except ValueError as exc:
        raise DialError(f"proxy {proxy}: {exc}", DialFailure.PROXY) from None
    if not proxy_host:
        raise DialError(f"proxy {proxy}: missing host", DialFailure.PROXY)
    try:
        sock = connect_tcp(proxy_host, proxy_port, deadline, f"connecting to proxy {proxy}", at_proxy=True)
    except socket.gaierror as exc:
        raise DialError(f"cannot resolve proxy {proxy}: {exc.strerror}", DialFailure.PROXY) from None
    except OSError as exc:
        raise DialError(f"cannot connect to proxy {proxy}: {describe_error(exc)}", DialFailure.PROXY) from None
    step = f"waiting for proxy {proxy} to answer CONNECT"
    try:
        target = _authority(host, port)
        lines = [f"CONNECT {target} HTTP/1.1", f"Host: {target}"]
        if parts.username is not None:
            credentials = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
            lines.append("Proxy-Authorization: Basic " + base64.b64encode(credentials).decode("ascii"))
        sock.settimeout(time_left(deadline, step, at_proxy=True))
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("utf-8"))
        status, reason = _read_proxy_reply(sock, proxy, deadline, step)
        if not 200 <= status < 300:
            raise DialError(f"proxy {proxy} refused CONNECT {target}: HTTP {status} {reason}".rstrip(),
                            DialFailure.PROXY)
    except TimeoutError:
        sock.close()
        raise DialTimeout(step, at_proxy=True) from None
    except OSError as exc:
        sock.close()
        raise DialError(f"proxy {proxy} failed during CONNECT: {describe_error(exc)}", DialFailure.PROXY) from None
    except BaseException:
        sock.close()
        raise
    return sock


def _read_proxy_reply(sock: socket.socket, proxy: ProxyChoice, deadline: float, step: str) -> tuple[int, str]:
    """Read the CONNECT reply head, and not one byte past it, by ``deadline``; return (status, reason).

    Each recv waits only for the time left, so a proxy trickling its reply cannot
    stretch the dial (TimeoutError, or DialTimeout(``step``) once no time is left).
    """
    head = b""
    while True:
        sock.settimeout(time_left(deadline, step, at_proxy=True))
        peeked = sock.recv(MAX_PROXY_REPLY_BYTES + 1 - len(head), socket.MSG_PEEK)
        if not peeked:
            raise DialError(f"proxy {proxy} closed the connection before answering CONNECT", DialFailure.PROXY)
        end = (head + peeked).find(b"\r\n\r\n")
        take = len(peeked) if end < 0 else end + 4 - len(head)
        sock.settimeout(time_left(deadline, step, at_proxy=True))
        head += sock.recv(take)
        if end >= 0:
            break
        if len(head) > MAX_PROXY_REPLY_BYTES:
            raise DialError(f"proxy {proxy} sent a CONNECT reply head over {MAX_PROXY_REPLY_BYTES} bytes",
                            DialFailure.PROXY)
    status_line = head.split(b"\r\n", 1)[0].decode("latin-1")
    version, _, rest = status_line.partition(" ")
    code, _, reason = rest.partition(" ")
    if not version.startswith("HTTP/") or not (len(code) == 3 and code.isdigit()):
        raise DialError(f"proxy {proxy} sent no HTTP reply to CONNECT: {status_line[:80]!r}", DialFailure.PROXY)
    return int(code), reason.strip()[:200]


_tls_lock = threading.Lock()
_tls_contexts: dict[tuple[TlsOptions, tuple[tuple[int, int, int] | None, ...]], ssl.SSLContext] = {}


def tls_context(options: TlsOptions) -> ssl.SSLContext:
    """The client TLS context for ``options``: built once, then shared by every connection.

    Cached by the options and the version (inode, size, mtime) of the files they
    name, so replaced certificate or key files are picked up by new connections.
    Raise DialError naming the file and what is wrong with it.
    """
    key = (options, tuple(_file_version(path) for path in (options.ca_file, options.cert_file, options.key_file)))
    with _tls_lock:
        context = _tls_contexts.get(key)
    if context is not None:
        return context
    context = _build_tls_context(options)
    with _tls_lock:
        for stale in [k for k in _tls_contexts if k[0] == options]:
            del _tls_contexts[stale]
        while len(_tls_contexts) >= MAX_TLS_CONTEXTS:
            del _tls_contexts[next(iter(_tls_contexts))]
        return _tls_contexts.setdefault(key, context)


def _file_version(path: str | None) -> tuple[int, int, int] | None:
    if path is None:
        return None
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


def _build_tls_context(options: TlsOptions) -> ssl.SSLContext:
    try:
        context = ssl.create_default_context(cafile=options.ca_file)
    except (ssl.SSLError, OSError) as exc:
        raise DialError(f"cannot use tls ca_file {options.ca_file}: {describe_error(exc)}", DialFailure.TLS) from None
    if options.cert_file:
        try:
            context.load_cert_chain(options.cert_file, options.key_file, password=_no_password)
        except (ssl.SSLError, OSError, ValueError) as exc:
            files = f"{options.cert_file}" + (f" and key_file {options.key_file}" if options.key_file else "")
            raise DialError(f"cannot use tls cert_file {files}: {describe_error(exc)}", DialFailure.TLS) from None
    if not options.verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def _no_password() -> str:
    # Without a callback OpenSSL would prompt for a pass phrase on the terminal.
    raise ValueError("the private key is encrypted; give an unencrypted key_file")


def open_transport(url: str, tls: TlsOptions, proxy: ProxyChoice | None, deadline: float) -> socket.socket:
    """Connect the TCP (and TLS, for wss://) connection a websocket URL needs, directly or through ``proxy``.

    Everything is done by ``deadline`` (a ``time.monotonic()`` value: the dial's one
    ``connect_timeout``): the TCP connect, the proxy's CONNECT answer and the TLS
    handshake each get only the time left, and DialTimeout says which step it ran out
    in. The socket is returned in blocking mode with a timeout; callers set their own
    from the deadline before each further operation.
    """
    parts = urlsplit(url)
    host = parts.hostname or ""
    secure = parts.scheme == "wss"
    port = parts.port or (443 if secure else 80)
    context = tls_context(tls) if secure else None  # a bad file fails before connecting
    if proxy is None:
        sock = connect_tcp(host, port, deadline, f"connecting to {_authority(host, port)}")
    else:
        sock = _connect_via_proxy(proxy, host, port, deadline)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if context is not None:
            sock = _tls_handshake(sock, context, tls.server_name or host, deadline,
                                  f"during the TLS handshake with {_authority(host, port)}")
    except BaseException:
        sock.close()
        raise
    return sock


def _tls_handshake(sock: socket.socket, context: ssl.SSLContext, server_name: str, deadline: float,
                   step: str) -> ssl.SSLSocket:
    """Wrap ``sock`` in TLS and finish the handshake by ``deadline`` (DialTimeout(``step``) if not).

    The handshake is driven on a non-blocking socket, waiting with poll() for only
    the time left, so a server trickling its answer cannot stretch it (a socket
    timeout would be per read). SSL errors (verification, protocol) propagate. The
    socket gets its previous timeout back when done; it is closed on failure.
    """
    timeout = sock.gettimeout()
    tls_sock = context.wrap_socket(sock, server_hostname=server_name, do_handshake_on_connect=False)
    try:
        tls_sock.setblocking(False)
        poller = select.poll()
        registered = False
        while True:
            try:
                tls_sock.do_handshake()
                break
            except ssl.SSLWantReadError:
                events = select.POLLIN
            except ssl.SSLWantWriteError:
                events = select.POLLOUT
            left = time_left(deadline, step)
            if registered:
                poller.modify(tls_sock, events)
            else:
                poller.register(tls_sock, events)
                registered = True
            if not poller.poll(math.ceil(left * 1000)):
                time_left(deadline, step)  # raises once the deadline has passed; else poll again
        tls_sock.settimeout(timeout)
    except BaseException:
        tls_sock.close()
        raise
    return tls_sock
