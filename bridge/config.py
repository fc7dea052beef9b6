"""YAML configuration: parsing, validation, and the typed objects the daemons run from.

Every problem found is reported, not just the first, as a line that names the file,
the tunnel or listener, the field, and what was expected. Loading never touches the
network; :func:`load` is what ``tcpbridge check-config`` and both daemons call.

Why this module is over 450 lines: it is one schema. The typed objects, the YAML reading and the
check of each field share one error collector (every problem is reported, with where it is) and
one set of field checkers; split by section, each part would reach into the others' private helpers.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import math
import os
import re
import shlex
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import SplitResult, urlsplit

import yaml

from bridge import protocol
from bridge.resume import AFFINITY_HEADER, DEFAULT_BUFFER, RESUME_HEADER, SESSION_HEADER

DEFAULT_HOST = "127.0.0.1"
DEFAULT_FRONTEND_CONFIG = "/etc/tcpbridge/frontend.yaml"
DEFAULT_BACKEND_CONFIG = "/etc/tcpbridge/backend.yaml"
LOG_LEVELS = ("debug", "info", "warning", "error")
#: ``log_target``: where log lines go (see :func:`bridge.service.setup_logging`).
LOG_TARGETS = ("auto", "journal", "stderr")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
#: Headers that tcpbridge's own handshake sets; a user value would break it.
RESERVED_HEADERS = frozenset(
    {"host", "upgrade", "connection", "sec-websocket-key", "sec-websocket-version",
     "sec-websocket-extensions", "sec-websocket-accept", "content-length", "transfer-encoding"}
) | protocol.RESERVED_HEADERS | {RESUME_HEADER.lower(), SESSION_HEADER.lower(), AFFINITY_HEADER.lower()}
#: ``resume_buffer`` bounds: below 64 KiB a sender waits for acknowledgements all the time; the top
#: keeps one tunnel from taking the machine's memory.
MIN_RESUME_BUFFER = 64 * 1024
MAX_RESUME_BUFFER = 1024 * 1024 * 1024
#: ``frames``: ``auto`` negotiates binary messages with a tcpbridge peer; ``text`` keeps hex always.
FRAMES = ("auto", "text")
WILDCARD_HOSTS = frozenset({"0.0.0.0", "::", ""})
#: sun_path holds 108 bytes, the terminating NUL included.
MAX_SOCKET_PATH = 107
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
#: The most worker processes ``workers`` may ask for.
MAX_WORKERS = 256

#: ``workers``: how many worker processes the daemon runs, or ``"auto"``: one per CPU the daemon
#: may run on (``os.sched_getaffinity(0)``), resolved by the main process at start, not when parsing.
Workers = int | Literal["auto"]
#: ``cpu_affinity``: ``"auto"`` pins each worker to one CPU of those the daemon may run on, in turn,
#: when there is more than one worker; ``False`` never pins; a tuple of distinct CPU numbers pins
#: worker i to ``cpus[i % len(cpus)]``, even a single worker. :func:`worker_cpus` applies it.
CpuAffinity = Literal["auto", False] | tuple[int, ...]


class ConfigError(Exception):
    """A configuration is invalid; :attr:`problems` holds one message per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class Address:
    """A TCP host and port; IPv6 literals are held without brackets."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class TunnelOptions:
    """Per-tunnel behaviour shared by both daemons (all durations in seconds; 0 turns a timer off)."""

    half_close: bool = True
    half_close_timeout: float = 60.0
    connect_timeout: float = 10.0
    max_message_bytes: int = protocol.DEFAULT_MAX_MESSAGE_BYTES
    ping_interval: float = 30.0
    ping_timeout: float = 30.0
    idle_timeout: float = 0.0
    frames: str = "auto"
    #: Whether a tunnel outlives a dropped websocket between two tcpbridge ends (:mod:`bridge.resume`);
    #: negotiated, so a Go peer never sees the difference. ``false`` turns it off.
    resume: bool = True
    #: The bytes each side keeps for replay per direction; a full buffer stops reading the TCP side.
    resume_buffer: int = DEFAULT_BUFFER
    #: How long a tunnel whose websocket dropped waits for a new one (the frontend redials meanwhile).
    resume_timeout: float = 60.0


@dataclass(frozen=True)
class Secret:
    """A header value or shared secret, given literally or read when it is used.

    Exactly one of ``value``, ``env``, ``file`` and ``command`` is set. A file is
    re-read on every new connection (token rotation); a command's output is cached
    for ``cache_seconds``. ``prefix`` (e.g. ``"Bearer "``) goes before what was read.
    The value itself is never logged; :meth:`describe` says where it comes from.
    """

    value: str | None = None
    env: str | None = None
    file: str | None = None
    command: tuple[str, ...] = ()
    cache_seconds: float = 300.0
    prefix: str = ""

    @classmethod
    def literal(cls, value: str) -> Secret:
        return cls(value=value)

    def describe(self) -> str:
        if self.env is not None:
            return f"environment variable {self.env}"
        if self.file is not None:
            return f"file {self.file}"
        if self.command:
            return f"command {self.command[0]}"
        return "literal value"


Headers = tuple[tuple[str, Secret], ...]


@dataclass(frozen=True)
class BasicAuth:
    """HTTP basic auth for the upgrade request (sent as an ``Authorization`` header)."""

    username: str
    password: Secret


@dataclass(frozen=True)
class TlsOptions:
    """How a ``wss://`` backend is verified, and the client certificate offered (mTLS)."""

    verify: bool = True
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    server_name: str | None = None


@dataclass(frozen=True)
class RouteOptions:
    """Per-route limits and secrets on the backend (a route's long form in YAML)."""

    token: Secret | None = None
    max_tunnels: int = 0


@dataclass(frozen=True)
class FrontendTunnel:
    """One local listening port whose connections are carried to one backend route."""

    name: str
    listen: Address
    backend: str
    route: str = protocol.DEFAULT_ROUTE
    headers: tuple[tuple[str, Secret], ...] = ()
    options: TunnelOptions = TunnelOptions()
    basic_auth: BasicAuth | None = None
    tls: TlsOptions = TlsOptions()
    proxy: str = "env"
    max_connections: int = 0

    @property
    def url(self) -> str:
        """The websocket URL each connection of this tunnel opens."""
        return protocol.bridge_url(self.backend, self.route)


@dataclass(frozen=True)
class FrontendConfig:
    tunnels: tuple[FrontendTunnel, ...]
    log_level: str = "info"
    drain_timeout: float = 10.0
    source: str = "<flags>"
    #: Where the Prometheus endpoint listens (None: off), and the control socket's path (None: default).
    metrics: Address | None = None
    control_socket: str | None = None
    #: Worker processes and their CPU pinning (:data:`Workers`, :data:`CpuAffinity`); read at start only.
    workers: Workers = "auto"
    cpu_affinity: CpuAffinity = "auto"
    #: Where log lines go (:data:`LOG_TARGETS`); read at start only.
    log_target: str = "auto"


@dataclass(frozen=True)
class Listener:
    """One websocket listening port and the TCP targets its routes lead to."""

    name: str
    listen: Address
    routes: Mapping[str, Address]
    options: TunnelOptions = TunnelOptions()
    token: Secret | None = None
    allowed_origins: tuple[str, ...] = ()
    max_tunnels: int = 0
    route_options: Mapping[str, RouteOptions] = field(default_factory=dict)
    #: ``http://host[:port]`` of the HTTP origin every non-bridge request is reverse-proxied to (None: 404).
    passthrough: str | None = None

    def token_for(self, route: str) -> Secret | None:
        """The shared secret a route demands: its own, else the listener's, else none."""
        own = self.route_options.get(route)
        return own.token if own and own.token else self.token


@dataclass(frozen=True)
class BackendConfig:
    listeners: tuple[Listener, ...]
    log_level: str = "info"
    drain_timeout: float = 10.0
    source: str = "<flags>"
    metrics: Address | None = None
    control_socket: str | None = None
    workers: Workers = "auto"
    cpu_affinity: CpuAffinity = "auto"
    log_target: str = "auto"


Config = FrontendConfig | BackendConfig


def parse_address(text: object, default_host: str = DEFAULT_HOST) -> Address:
    """Parse ``host:port``, ``[v6]:port`` or a bare port; raise ValueError naming what is wrong."""
    if isinstance(text, bool) or not isinstance(text, (str, int)):
        raise ValueError(f"expected host:port or a port number, got {_kind(text)}")
    raw = str(text).strip()
    host, sep, port_text = raw.rpartition(":")
    if not sep:
        host, port_text = default_host, raw
    elif host.startswith("["):
        if not host.endswith("]"):
            raise ValueError(f"{raw!r}: an IPv6 address goes in brackets, like [::1]:8080")
        host = host[1:-1]
        _check_ipv6(host, raw)
    elif ":" in host:
        raise ValueError(f"{raw!r}: write an IPv6 address in brackets, like [::1]:8080")
    if not host:
        raise ValueError(f"{raw!r}: missing host before ':'")
    if not (port_text.isascii() and port_text.isdigit()):
        raise ValueError(f"{raw!r}: port must be a number from 1 to 65535")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise ValueError(f"{raw!r}: port {port} is out of range (expected 1-65535)")
    return Address(host, port)


def _check_ipv6(host: str, raw: str) -> None:
    try:
        ipaddress.IPv6Address(host)
    except ValueError:
        raise ValueError(f"{raw!r}: {host!r} is not an IPv6 address") from None


def _split_url(url: object, schemes: tuple[str, ...], expected: str) -> tuple[SplitResult, str, int | None]:
    """(parts, host, port) of ``url``, or ValueError if it is not ``expected`` with a host and a valid port."""
    if not isinstance(url, str) or not url:
        raise ValueError(f"expected {expected}, got {_kind(url)}")
    parts = urlsplit(url)
    if parts.scheme not in schemes:
        allowed = " or ".join(f"{scheme}://" for scheme in schemes)
        rule = f"only {allowed} URLs are supported" if len(schemes) == 1 else f"scheme must be {allowed}"
        raise ValueError(f"{url!r}: {rule}, not {parts.scheme or 'none'}")
    try:
        host, port = parts.hostname, parts.port
    except ValueError as exc:
        raise ValueError(f"{url!r}: {exc}") from None
    if not host:
        raise ValueError(f"{url!r}: missing host")
    if port == 0:
        raise ValueError(f"{url!r}: port 0 is out of range (expected 1-65535)")
    return parts, host, port


def check_backend_url(url: object) -> str:
    """Return ``url`` if it is a usable backend base URL, else raise ValueError saying why."""
    parts, _host, _port = _split_url(url, ("ws", "wss"), "a ws:// or wss:// URL")
    assert isinstance(url, str)
    if parts.fragment:
        raise ValueError(f"{url!r}: a URL fragment (#...) has no meaning here")
    return url


def changed_fields(old: FrontendTunnel | Listener, new: FrontendTunnel | Listener) -> list[str]:
    """Names of the settings that differ between two versions of a tunnel or listener.

    Only names, never values: headers may hold secrets. Options are listed one by one.
    """
    names = []
    for field_ in dataclasses.fields(old):
        before, after = getattr(old, field_.name), getattr(new, field_.name)
        if isinstance(before, TunnelOptions):
            names += [f.name for f in dataclasses.fields(before) if getattr(before, f.name) != getattr(after, f.name)]
        elif before != after:
            names.append(field_.name)
    return names


def redact_url(url: str) -> str:
    """The URL without user info or query, which may hold secrets: safe to log."""
    parts = urlsplit(url)
    netloc = parts.netloc.rpartition("@")[2]
    return f"{parts.scheme}://{netloc}{parts.path}"


# ---------------------------------------------------------------------------
# Loading


class _UniqueKeyLoader(yaml.SafeLoader):
    """A safe loader that rejects duplicate mapping keys instead of silently keeping the last."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: dict[Any, Any] = {}
    for key_node, _value_node in node.value:
        key = loader.construct_object(key_node)
        if key in seen:
            mark = key_node.start_mark
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (line {mark.line + 1})", mark
            )
        seen[key] = True
    return loader.construct_mapping(node)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def read_yaml(path: str | Path) -> object:
    """Read one YAML document; raise ConfigError naming the file and line on any failure."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read config file: {exc.strerror or exc}"]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})"]) from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise ConfigError([f"{where}: YAML syntax error: {exc.problem or exc}"]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([f"{path}: YAML error: {exc}"]) from None


def load(path: str | Path) -> Config:
    """Load a frontend file (it has ``tunnels``) or a backend file (it has ``listeners``)."""
    data = read_yaml(path)
    if isinstance(data, dict) and "tunnels" in data and "listeners" not in data:
        return parse_frontend(data, str(path))
    if isinstance(data, dict) and "listeners" in data and "tunnels" not in data:
        return parse_backend(data, str(path))
    raise ConfigError([
        f"{path}: cannot tell which daemon this file is for: a frontend config has a "
        "'tunnels' list, a backend config a 'listeners' list (exactly one of them)"
    ])


def load_frontend(path: str | Path) -> FrontendConfig:
    return parse_frontend(read_yaml(path), str(path))


def load_backend(path: str | Path) -> BackendConfig:
    return parse_backend(read_yaml(path), str(path))


# ---------------------------------------------------------------------------
# Validation

T = TypeVar("T")

_OPTION_KEYS = ("half_close", "half_close_timeout", "connect_timeout", "max_message_bytes",
                "ping_interval", "ping_timeout", "idle_timeout", "frames", "resume", "resume_buffer",
                "resume_timeout")
_DIAL_KEYS = ("headers", "basic_auth", "tls", "proxy", "max_connections")
_SERVICE_KEYS = ("metrics", "control_socket", "workers", "cpu_affinity", "log_target")
_FRONTEND_KEYS = ("backend", "log_level", "drain_timeout", "tunnels", *_SERVICE_KEYS, *_DIAL_KEYS, *_OPTION_KEYS)
_TUNNEL_KEYS = ("name", "listen", "backend", "route", *_DIAL_KEYS, *_OPTION_KEYS)
_BACKEND_KEYS = ("listeners", "log_level", "drain_timeout", *_SERVICE_KEYS, *_OPTION_KEYS)
_LISTENER_KEYS = ("name", "listen", "routes", "token", "allowed_origins", "max_tunnels", "passthrough",
                  *_OPTION_KEYS)
_ROUTE_KEYS = ("target", "token", "max_tunnels")
_SECRET_SOURCES = ("value", "env", "file", "command")
_TLS_KEYS = ("verify", "ca_file", "cert_file", "key_file", "server_name")


@dataclass
class _Checker:
    """Collects problems while walking one file, each prefixed with where it was found."""

    source: str
    problems: list[str] = field(default_factory=list)

    def report(self, where: str, message: str) -> None:
        self.problems.append(f"{self.source}: {where}{': ' if where else ''}{message}")

    def mapping(self, where: str, value: object, what: str) -> dict[str, Any] | None:
        if isinstance(value, dict):
            return value
        self.report(where, f"expected {what} (a mapping of key: value), got {_kind(value)}")
        return None

    def known_keys(self, where: str, data: Mapping[str, Any], allowed: tuple[str, ...]) -> None:
        for key in data:
            if key not in allowed:
                hint = difflib.get_close_matches(str(key), allowed, n=1)
                suggestion = f"; did you mean {hint[0]!r}?" if hint else f"; allowed: {', '.join(allowed)}"
                self.report(where, f"unknown key {key!r}{suggestion}")

    def field(self, where: str, data: Mapping[str, Any], key: str, parse: Callable[[Any], T], default: T) -> T:
        if key not in data:
            return default
        try:
            return parse(data[key])
        except ValueError as exc:
            self.report(_join(where, key), str(exc))
            return default

    def raise_if_any(self) -> None:
        if self.problems:
            raise ConfigError(self.problems)


def _join(where: str, key: str) -> str:
    return f"{where}: {key}" if where else key


def _kind(value: object) -> str:
    if value is None:
        return "nothing"
    return f"{type(value).__name__} {value!r}" if isinstance(value, (int, float, str, bool)) else type(value).__name__


def _boolean(value: object) -> bool:
    if isinstance(value, bool):
        return value
    raise ValueError(f"expected true or false, got {_kind(value)}")


def _seconds(value: object) -> float:
    try:
        valid = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value) \
            and value >= 0
    except OverflowError:  # an integer too large for a float
        valid = False
    if not valid:
        raise ValueError(f"expected a number of seconds >= 0, got {_kind(value)}")
    return float(value)  # type: ignore[arg-type]


def _positive_seconds(value: object) -> float:
    seconds = _seconds(value)
    if seconds <= 0:
        raise ValueError(f"expected a number of seconds > 0, got {_kind(value)}")
    return seconds


def _message_bytes(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"expected a whole number of bytes, got {_kind(value)}")
    if value < protocol.GO_FRONTEND_MESSAGE_BYTES:
        raise ValueError(
            f"{value} is too small: the Go frontend sends messages of "
            f"{protocol.GO_FRONTEND_MESSAGE_BYTES} bytes (minimum)"
        )
    return value


def _resume_buffer(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"expected a whole number of bytes, got {_kind(value)}")
    if not MIN_RESUME_BUFFER <= value <= MAX_RESUME_BUFFER:
        raise ValueError(f"{value} is out of range: between {MIN_RESUME_BUFFER} (64 KiB) and "
                         f"{MAX_RESUME_BUFFER} (1 GiB) bytes per direction and tunnel")
    return value


def _frames(value: object) -> str:
    if isinstance(value, str) and value.lower() in FRAMES:
        return value.lower()
    raise ValueError(f"expected auto (binary messages when both ends are tcpbridge) or text (always hex), "
                     f"got {_kind(value)}")


def _log_level(value: object) -> str:
    if isinstance(value, str) and value.lower() in LOG_LEVELS:
        return value.lower()
    raise ValueError(f"expected one of {', '.join(LOG_LEVELS)}, got {_kind(value)}")


def _log_target(value: object) -> str:
    if isinstance(value, str) and value.lower() in LOG_TARGETS:
        return value.lower()
    raise ValueError(f"expected auto (the journal with fields when stderr is the journal, else stderr), journal or "
                     f"stderr, got {_kind(value)}")


def _name(value: object) -> str:
    if isinstance(value, str) and NAME.fullmatch(value):
        return value
    raise ValueError(
        f"expected a name of letters, digits, '.', '_' or '-' (starting with a letter or digit), got {_kind(value)}"
    )


def _route(value: object) -> str:
    if isinstance(value, str) and protocol.ROUTE_NAME.fullmatch(value):
        return value
    raise ValueError(
        f"expected a route name of letters, digits, '.', '_' or '-' (starting with a letter or digit), "
        f"got {_kind(value)}"
    )


def _count(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"expected a whole number >= 0 (0 = no limit), got {_kind(value)}")
    return value


def _text(value: object) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError(f"expected a text value, got {_kind(value)}")
    text = str(value)
    if any(c in text for c in "\r\n\0"):
        raise ValueError("value contains a line break or NUL")
    return text


def _secret(value: object) -> Secret:
    """A literal, or a mapping naming exactly one source: value, env, file or command."""
    if not isinstance(value, dict):
        return Secret.literal(_text(value))
    unknown = set(value) - {*_SECRET_SOURCES, "prefix", "cache_seconds"}
    if unknown:
        raise ValueError(f"unknown key {sorted(unknown, key=str)[0]!r}; a secret takes one of "
                         f"{', '.join(_SECRET_SOURCES)}, plus prefix (and cache_seconds for command)")
    sources = [key for key in _SECRET_SOURCES if key in value]
    if len(sources) != 1:
        raise ValueError(f"expected exactly one of {', '.join(_SECRET_SOURCES)}, got {len(sources)}")
    source = sources[0]
    prefix = _text(value.get("prefix", ""))
    if source == "value":
        return Secret(value=_text(value["value"]), prefix=prefix)
    if source == "env":
        name = value["env"]
        if not isinstance(name, str) or not ENV_NAME.fullmatch(name):
            raise ValueError(f"env: expected an environment variable name, got {_kind(name)}")
        if name not in os.environ:
            raise ValueError(f"environment variable {name} is not set")
        return Secret(env=name, prefix=prefix)
    if "cache_seconds" in value and source != "command":
        raise ValueError("cache_seconds only applies to a command")
    if source == "file":
        path = value["file"]
        if not isinstance(path, str) or not path.startswith("/"):
            raise ValueError(f"file: expected an absolute path, got {_kind(path)}")
        return Secret(file=path, prefix=prefix)
    command = value["command"]
    if isinstance(command, str):
        argv = tuple(shlex.split(command))
    elif isinstance(command, list) and all(isinstance(arg, str) for arg in command):
        argv = tuple(command)
    else:
        argv = ()
    if not argv:
        raise ValueError(f"command: expected a command line or a list of arguments, got {_kind(command)}")
    cache = _seconds(value.get("cache_seconds", 300))
    return Secret(command=argv, cache_seconds=cache, prefix=prefix)


def _basic_auth(value: object) -> BasicAuth:
    if not isinstance(value, dict) or set(value) != {"username", "password"}:
        raise ValueError("expected a mapping with exactly 'username' and 'password'")
    username = _text(value["username"])
    if ":" in username:
        raise ValueError("the username cannot contain ':'")
    return BasicAuth(username=username, password=_secret(value["password"]))


def _tls(value: object) -> TlsOptions:
    if not isinstance(value, dict):
        raise ValueError(f"expected a mapping of {', '.join(_TLS_KEYS)}, got {_kind(value)}")
    unknown = sorted(set(value) - set(_TLS_KEYS), key=str)
    if unknown:
        hint = difflib.get_close_matches(str(unknown[0]), _TLS_KEYS, n=1)
        raise ValueError(f"unknown key {unknown[0]!r}" + (f"; did you mean {hint[0]!r}?" if hint else ""))
    files = {}
    for key in ("ca_file", "cert_file", "key_file"):
        if key in value:
            path = value[key]
            if not isinstance(path, str) or not os.access(path, os.R_OK) or not os.path.isfile(path):
                raise ValueError(f"{key}: {path!r} is not a readable file")
            files[key] = path
    if "key_file" in files and "cert_file" not in files:
        raise ValueError("key_file needs cert_file (the client certificate it belongs to)")
    server_name = value.get("server_name")
    if server_name is not None and (not isinstance(server_name, str) or not server_name):
        raise ValueError(f"server_name: expected a host name, got {_kind(server_name)}")
    return TlsOptions(verify=_boolean(value.get("verify", True)), server_name=server_name, **files)


def _proxy(value: object) -> str:
    if value in ("env", "none"):
        return str(value)
    if isinstance(value, str):
        parts = urlsplit(value)
        try:
            port = parts.port
        except ValueError:
            port = None
        if parts.scheme == "http" and parts.hostname and port:
            return value
    raise ValueError(f"expected 'env', 'none' or http://host:port, got {_kind(value)}")


def _passthrough(value: object) -> str:
    """An ``http://host[:port]`` origin URL, returned as ``http://host:port`` (IPv6 in brackets)."""
    parts, host, port = _split_url(value, ("http",), "an http://host:port URL")
    if parts.username is not None or parts.password is not None:
        raise ValueError(f"{value!r}: user info is not supported")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"{value!r}: only scheme, host and port: requests keep their own path")
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port or 80}"


def _origins(value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(item, str) and item for item in value):
        raise ValueError(f"expected a list of origins like https://example.com, got {_kind(value)}")
    return tuple(origin.rstrip("/").lower() for origin in value)


def _headers(value: object) -> Headers:
    if not isinstance(value, dict):
        raise ValueError(f"expected a mapping of header name: value, got {_kind(value)}")
    headers = []
    for name, text in value.items():
        if not isinstance(name, str) or not HEADER_NAME.fullmatch(name):
            raise ValueError(f"{name!r} is not a valid HTTP header name")
        if name.lower() in RESERVED_HEADERS:
            raise ValueError(f"{name!r} is set by tcpbridge's handshake and cannot be configured")
        try:
            headers.append((name, _secret(text)))
        except ValueError as exc:
            raise ValueError(f"header {name!r}: {exc}") from None
    return tuple(headers)


def _merge_headers(defaults: Headers, overrides: Headers) -> Headers:
    """``defaults`` with ``overrides`` added or replacing them; names compare case-insensitively."""
    merged = {name.lower(): (name, value) for name, value in defaults}
    merged.update({name.lower(): (name, value) for name, value in overrides})
    return tuple(merged.values())


def _options(check: _Checker, where: str, data: Mapping[str, Any], base: TunnelOptions) -> TunnelOptions:
    return TunnelOptions(
        half_close=check.field(where, data, "half_close", _boolean, base.half_close),
        half_close_timeout=check.field(where, data, "half_close_timeout", _seconds, base.half_close_timeout),
        connect_timeout=check.field(where, data, "connect_timeout", _positive_seconds, base.connect_timeout),
        max_message_bytes=check.field(where, data, "max_message_bytes", _message_bytes, base.max_message_bytes),
        ping_interval=check.field(where, data, "ping_interval", _seconds, base.ping_interval),
        ping_timeout=check.field(where, data, "ping_timeout", _positive_seconds, base.ping_timeout),
        idle_timeout=check.field(where, data, "idle_timeout", _seconds, base.idle_timeout),
        frames=check.field(where, data, "frames", _frames, base.frames),
        resume=check.field(where, data, "resume", _boolean, base.resume),
        resume_buffer=check.field(where, data, "resume_buffer", _resume_buffer, base.resume_buffer),
        resume_timeout=check.field(where, data, "resume_timeout", _positive_seconds, base.resume_timeout),
    )


def _items(check: _Checker, data: Mapping[str, Any], key: str, what: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield (where, mapping) for each entry of the list ``data[key]``, reporting bad shapes."""
    entries = data.get(key)
    if not isinstance(entries, list) or not entries:
        check.report(key, f"expected a non-empty list of {what}s, got {_kind(entries)}")
        return
    for index, entry in enumerate(entries):
        label = f"{key}[{index}]"
        if isinstance(entry, dict) and isinstance(entry.get("name"), str):
            label += f" {entry['name']!r}"
        mapping = check.mapping(label, entry, f"a {what}")
        if mapping is not None:
            yield label, mapping


def _require(check: _Checker, where: str, data: Mapping[str, Any], key: str, what: str) -> bool:
    if key in data:
        return True
    check.report(where, f"missing {key!r} ({what})")
    return False


def _metrics(value: object) -> Address:
    """The Prometheus endpoint's address; only valid where prometheus-client can be imported."""
    address = parse_address(value)
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        raise ValueError(f"{address} needs the prometheus-client package: pip install 'tcpbridge[metrics]'") \
            from None
    return address


def _socket_path(value: object) -> str:
    if not isinstance(value, str) or not value.startswith("/"):
        raise ValueError(f"expected an absolute path for a Unix socket, got {_kind(value)}")
    if len(os.fsencode(value)) > MAX_SOCKET_PATH:
        raise ValueError(f"{value!r}: longer than {MAX_SOCKET_PATH} bytes, the most a Unix socket path may have")
    return value


def _service_keys(check: _Checker, top: Mapping[str, Any], names: list[tuple[str, str, Address]]) -> dict[str, Any]:
    """The :data:`_SERVICE_KEYS`, by field name; the metrics address joins the check for colliding listen addresses."""
    metrics = check.field("", top, "metrics", _metrics, None)
    _check_listen_conflicts(check, [("metrics", "(metrics)", metrics), *names] if metrics else names)
    default_workers: Workers = "auto"  # typed, so that check.field's result type is the union
    auto: CpuAffinity = "auto"
    return {
        "metrics": metrics,
        "control_socket": check.field("", top, "control_socket", _socket_path, None),
        "workers": check.field("", top, "workers", parse_workers, default_workers),
        "cpu_affinity": check.field("", top, "cpu_affinity", parse_cpu_affinity, auto),
        "log_target": check.field("", top, "log_target", _log_target, "auto"),
    }


def parse_workers(value: object) -> Workers:
    """A ``workers`` value: a whole number from 1 to :data:`MAX_WORKERS`, or ``auto`` (any case).

    ``true``/``false`` are not numbers here (YAML's ``true`` is not 1). Raise ValueError saying what is accepted.
    """
    if isinstance(value, str) and value.lower() == "auto":
        return "auto"
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_WORKERS:
        return value
    raise ValueError(f"expected a whole number from 1 to {MAX_WORKERS}, or auto (one worker per CPU this "
                     f"daemon may run on), got {_kind(value)}")


def parse_cpu_affinity(value: object) -> CpuAffinity:
    """A ``cpu_affinity`` value: ``auto`` (any case), ``false``, or a non-empty list of distinct CPU numbers >= 0.

    A list comes back as a tuple in the order written. Raise ValueError naming the value at fault.
    """
    if isinstance(value, str) and value.lower() == "auto":
        return "auto"
    if value is False:
        return False
    accepted = "auto (pin each of several workers to its own CPU), false (never pin) or a list of CPU numbers"
    if value is True:
        raise ValueError(f"true is not accepted: write {accepted}, like [0, 1]")
    if not isinstance(value, list):
        raise ValueError(f"expected {accepted}, like [0, 1], got {_kind(value)}")
    if not value:
        raise ValueError("expected at least one CPU number, like [0, 1] (false: never pin)")
    cpus: list[int] = []
    for cpu in value:
        if isinstance(cpu, bool) or not isinstance(cpu, int):
            raise ValueError(f"expected a list of CPU numbers (whole numbers >= 0), but it holds {_kind(cpu)}")
        if cpu < 0:
            raise ValueError(f"CPU {cpu} is negative; CPUs are numbered from 0")
        if cpu in cpus:
            raise ValueError(f"CPU {cpu} is listed twice; list each CPU once (worker i is pinned to the "
                             "i-th CPU of the list, in turn)")
        cpus.append(cpu)
    return tuple(cpus)


def worker_cpus(cpu_affinity: CpuAffinity, workers: int, available: Sequence[int]) -> list[int | None]:
    """For each worker index 0..``workers``-1, the CPU to pin that worker to, or None: do not pin it.

    ``workers`` is the resolved count (>= 1; ``auto`` already replaced by the main process), and
    ``available`` the CPUs the daemon may run on (``os.sched_getaffinity(0)``; order and repeats do
    not matter). ``"auto"``: no pinning for a single worker, else worker i gets the i-th of the sorted
    available CPUs, in turn; ``False``: no pinning; a tuple: worker i gets ``cpu_affinity[i % len]``,
    whether or not it is in ``available`` (pinning to a CPU the process may not use fails there).
    Raise ValueError if ``workers`` < 1, if the tuple is empty, or if ``available`` is empty where it is needed.
    """
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    if cpu_affinity == ():
        raise ValueError("cpu_affinity: an empty list of CPUs pins nothing; use false (never pin) instead")
    if isinstance(cpu_affinity, tuple):
        return [cpu_affinity[index % len(cpu_affinity)] for index in range(workers)]
    if cpu_affinity is False or workers == 1:
        return [None] * workers
    cpus = sorted(set(available))
    if not cpus:
        raise ValueError("cpu_affinity auto needs at least one available CPU, got none")
    return [cpus[index % len(cpus)] for index in range(workers)]


def _check_listen_conflicts(check: _Checker, entries: list[tuple[str, str, Address]]) -> None:
    """Report duplicate names, and listen addresses that would collide on bind."""
    seen_names: dict[str, str] = {}
    seen_ports: list[tuple[str, Address]] = []
    for where, name, address in entries:
        if name in seen_names:
            check.report(where, f"duplicate name {name!r} (also used by {seen_names[name]})")
        seen_names.setdefault(name, where)
        for other_where, other in seen_ports:
            if address.port == other.port and _hosts_overlap(address.host, other.host):
                check.report(where, f"listen: {address} is already used by {other_where}")
        seen_ports.append((where, address))


def _hosts_overlap(a: str, b: str) -> bool:
    """Whether listening on both hosts at one port would collide (an IPv6 wildcard is IPv6-only here)."""
    if a == b:
        return True
    families = {_family(a), _family(b)}
    if len(families) != 1 or None in families:
        return False
    return a in WILDCARD_HOSTS or b in WILDCARD_HOSTS


def _family(host: str) -> int | None:
    try:
        return ipaddress.ip_address(host).version
    except ValueError:
        return None


def parse_frontend(data: object, source: str = "<frontend config>") -> FrontendConfig:
    """Validate a frontend document; raise ConfigError listing every problem."""
    check = _Checker(source)
    top = check.mapping("", data, "a frontend config")
    if top is None:
        raise ConfigError(check.problems)
    check.known_keys("", top, _FRONTEND_KEYS)
    default_backend = check.field("", top, "backend", check_backend_url, "")
    no_headers: Headers = ()
    default_headers = check.field("", top, "headers", _headers, no_headers)
    defaults = _options(check, "", top, TunnelOptions())
    dial_defaults = _dial(check, "", top, FrontendTunnel(name="", listen=Address(DEFAULT_HOST, 0), backend=""))
    tunnels: list[FrontendTunnel] = []
    names: list[tuple[str, str, Address]] = []
    for where, entry in _items(check, top, "tunnels", "tunnel"):
        check.known_keys(where, entry, _TUNNEL_KEYS)
        ok = _require(check, where, entry, "name", "a unique name for logs and reloads")
        ok &= _require(check, where, entry, "listen", "host:port to accept connections on")
        name = check.field(where, entry, "name", _name, "")
        listen = check.field(where, entry, "listen", parse_address, None)
        backend = check.field(where, entry, "backend", check_backend_url, default_backend)
        if not backend and "backend" not in entry and "backend" not in top:
            check.report(where, "no backend URL: set 'backend' here or at the top level")
        tunnel_headers = check.field(where, entry, "headers", _headers, no_headers)
        tunnel = _dial(check, where, entry, dataclasses.replace(
            dial_defaults,
            name=name,
            listen=listen or Address(DEFAULT_HOST, 0),
            backend=backend,
            route=check.field(where, entry, "route", _route, protocol.DEFAULT_ROUTE),
            headers=_merge_headers(default_headers, tunnel_headers),
            options=_options(check, where, entry, defaults),
        ))
        if tunnel.basic_auth and any(header.lower() == "authorization" for header, _ in tunnel.headers):
            check.report(where, "basic_auth and an Authorization header cannot both be set")
        if ok and name and listen:
            names.append((where, name, listen))
        tunnels.append(tunnel)
    service = _service_keys(check, top, names)
    log_level = check.field("", top, "log_level", _log_level, "info")
    drain_timeout = check.field("", top, "drain_timeout", _seconds, 10.0)
    check.raise_if_any()
    return FrontendConfig(tunnels=tuple(tunnels), log_level=log_level, drain_timeout=drain_timeout, source=source,
                          **service)


def _dial(check: _Checker, where: str, data: Mapping[str, Any], base: FrontendTunnel) -> FrontendTunnel:
    """``base`` with the connection settings (auth, TLS, proxy, cap) that ``data`` sets."""
    return dataclasses.replace(
        base,
        basic_auth=check.field(where, data, "basic_auth", _basic_auth, base.basic_auth),
        tls=check.field(where, data, "tls", _tls, base.tls),
        proxy=check.field(where, data, "proxy", _proxy, base.proxy),
        max_connections=check.field(where, data, "max_connections", _count, base.max_connections),
    )


def parse_backend(data: object, source: str = "<backend config>") -> BackendConfig:
    """Validate a backend document; raise ConfigError listing every problem."""
    check = _Checker(source)
    top = check.mapping("", data, "a backend config")
    if top is None:
        raise ConfigError(check.problems)
    check.known_keys("", top, _BACKEND_KEYS)
    defaults = _options(check, "", top, TunnelOptions())
    listeners: list[Listener] = []
    names: list[tuple[str, str, Address]] = []
    for where, entry in _items(check, top, "listeners", "listener"):
        check.known_keys(where, entry, _LISTENER_KEYS)
        ok = _require(check, where, entry, "name", "a unique name for logs and reloads")
        ok &= _require(check, where, entry, "listen", "host:port to accept websocket upgrades on")
        ok &= _require(check, where, entry, "routes", "route name: host:port of the TCP target")
        name = check.field(where, entry, "name", _name, "")
        listen = check.field(where, entry, "listen", parse_address, None)
        routes, route_options = _routes(check, where, entry.get("routes")) if "routes" in entry else ({}, {})
        listeners.append(Listener(
            name=name,
            listen=listen or Address(DEFAULT_HOST, 0),
            routes=routes,
            options=_options(check, where, entry, defaults),
            token=check.field(where, entry, "token", _secret, None),
            allowed_origins=check.field(where, entry, "allowed_origins", _origins, ()),
            max_tunnels=check.field(where, entry, "max_tunnels", _count, 0),
            route_options=route_options,
            passthrough=check.field(where, entry, "passthrough", _passthrough, None),
        ))
        if ok and name and listen:
            names.append((where, name, listen))
    service = _service_keys(check, top, names)
    log_level = check.field("", top, "log_level", _log_level, "info")
    drain_timeout = check.field("", top, "drain_timeout", _seconds, 10.0)
    check.raise_if_any()
    return BackendConfig(listeners=tuple(listeners), log_level=log_level, drain_timeout=drain_timeout, source=source,
                         **service)


def _routes(check: _Checker, where: str, value: object) -> tuple[dict[str, Address], dict[str, RouteOptions]]:
    """Routes in short form (``name: host:port``) or long form (``name: {target, token, max_tunnels}``)."""
    where = _join(where, "routes")
    mapping = check.mapping(where, value, "routes")
    routes: dict[str, Address] = {}
    options: dict[str, RouteOptions] = {}
    if not mapping:
        if mapping is not None:
            check.report(where, "expected at least one route, e.g. default: 127.0.0.1:22")
        return routes, options
    for name, spec in mapping.items():
        route_where = f"{where}: {name!r}"
        try:
            name = _route(name)
        except ValueError as exc:
            check.report(route_where, str(exc))
            continue
        if isinstance(spec, dict):
            check.known_keys(route_where, spec, _ROUTE_KEYS)
            if not _require(check, route_where, spec, "target", "host:port of the TCP target"):
                continue
            target = spec["target"]
            options[name] = RouteOptions(
                token=check.field(route_where, spec, "token", _secret, None),
                max_tunnels=check.field(route_where, spec, "max_tunnels", _count, 0),
            )
        else:
            target = spec
        try:
            routes[name] = parse_address(target, default_host="localhost")
        except ValueError as exc:
            check.report(route_where, str(exc))
    return routes, options
