"""Command lines: ``tcpbridge-frontend``, ``tcpbridge-backend`` and ``tcpbridge``.

Exit statuses: 0 success; 1 runtime failure (a port in use, ...); 2 usage
errors and invalid configuration.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any

from bridge import __version__, config, connect, control, protocol
from bridge.backend import Backend
from bridge.config import ConfigError
from bridge.frontend import Frontend
from bridge.listen import ListenError
from bridge.service import Daemon, Service, setup_logging
from bridge.tunnel import TunnelRegistry

EXIT_FAILURE = 1
EXIT_USAGE = 2

log = logging.getLogger("tcpbridge")


def _parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description, allow_abbrev=False)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def _port(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number from 1 to 65535")
    return int(text)


def _daemon_arguments(parser: argparse.ArgumentParser, default_config: str) -> None:
    parser.add_argument("--config", metavar="PATH",
                        help=f"YAML configuration (default {default_config} when no Go-style flags are given)")
    parser.add_argument("--log-level", choices=config.LOG_LEVELS, help="overrides log_level from the YAML")
    parser.add_argument("--frontend-port", "-frontend-port", type=_port, metavar="PORT",
                        help="Go-compatible single-tunnel mode: the port to listen on")
    parser.add_argument("--bind", metavar="ADDRESS", default=config.DEFAULT_HOST,
                        help="with --frontend-port: the address to listen on (default %(default)s; "
                             "the Go binaries listen on all interfaces, this does not unless asked)")


def frontend_config(args: argparse.Namespace) -> config.FrontendConfig:
    if args.frontend_port is None and args.backend is None:
        return config.load_frontend(args.config or config.DEFAULT_FRONTEND_CONFIG)
    if args.config:
        raise ConfigError(["--config cannot be combined with --frontend-port/--backend"])
    if args.frontend_port is None or args.backend is None:
        raise ConfigError(["Go-compatible mode needs both --frontend-port PORT and --backend URL"])
    return config.parse_frontend({
        "tunnels": [{"name": "default", "listen": _listen(args), "backend": args.backend}],
    }, "command line")


def backend_config(args: argparse.Namespace) -> config.BackendConfig:
    if args.frontend_port is None and args.backend_port is None:
        return config.load_backend(args.config or config.DEFAULT_BACKEND_CONFIG)
    if args.config:
        raise ConfigError(["--config cannot be combined with --frontend-port/--backend-port"])
    if args.frontend_port is None or args.backend_port is None:
        raise ConfigError(["Go-compatible mode needs both --frontend-port PORT and --backend-port PORT"])
    return config.parse_backend({
        "listeners": [{
            "name": "default",
            "listen": _listen(args),
            "routes": {protocol.DEFAULT_ROUTE: f"localhost:{args.backend_port}"},
            # Like the Go backend: every request that is not a bridge upgrade goes to the same port as HTTP.
            "passthrough": f"http://localhost:{args.backend_port}",
        }],
    }, "command line")


def _listen(args: argparse.Namespace) -> str:
    host = args.bind.strip("[]")
    return f"[{host}]:{args.frontend_port}" if ":" in host else f"{host}:{args.frontend_port}"


def frontend_main(argv: Sequence[str] | None = None) -> int:
    parser = _parser("tcpbridge-frontend", "Accept TCP connections and carry each over its own websocket.")
    _daemon_arguments(parser, config.DEFAULT_FRONTEND_CONFIG)
    parser.add_argument("--backend", "-backend", metavar="URL",
                        help="Go-compatible single-tunnel mode: the backend's ws:// or wss:// base URL")
    args = parser.parse_args(argv)
    return _run_daemon("tcpbridge-frontend", args, frontend_config, Frontend)


def backend_main(argv: Sequence[str] | None = None) -> int:
    parser = _parser("tcpbridge-backend", "Accept tcpbridge websockets and connect each to a TCP target.")
    _daemon_arguments(parser, config.DEFAULT_BACKEND_CONFIG)
    parser.add_argument("--backend-port", "-backend-port", type=_port, metavar="PORT",
                        help="Go-compatible single-route mode: the target port on localhost, which is also "
                             "the HTTP origin every request that is not a bridge upgrade is passed through to")
    args = parser.parse_args(argv)
    return _run_daemon("tcpbridge-backend", args, backend_config, Backend)


def _run_daemon(
    name: str,
    args: argparse.Namespace,
    load: Callable[[argparse.Namespace], config.Config],
    daemon_class: Callable[[Any, TunnelRegistry], Daemon],
) -> int:
    try:
        cfg = load(args)
    except ConfigError as exc:
        setup_logging("info")
        for problem in exc.problems:
            log.error("invalid configuration: %s", problem)
        return EXIT_USAGE
    setup_logging(args.log_level or cfg.log_level)
    registry = TunnelRegistry()
    service = Service(daemon_class(cfg, registry), registry, name=name,
                      load=lambda: load(args), log_level_flag=args.log_level)
    try:
        return service.run(cfg)
    except ListenError as exc:
        log.error("%s", exc)
        return EXIT_FAILURE


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser("tcpbridge", "Tools for tcpbridge configurations.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    check = commands.add_parser("check-config", help="validate frontend/backend YAML files without starting anything")
    check.add_argument("files", nargs="+", metavar="FILE")
    reload = commands.add_parser(
        "reload", help="validate FILE, then ask the daemon with process id PID to reload it (SIGHUP)",
        description="What systemd's ExecReload runs: a bad edit fails here, visibly, and the daemon is not "
                    "signalled. Needs no /bin/kill.")
    reload.add_argument("--pid", type=int, required=True, help="the daemon's process id ($MAINPID in a unit)")
    reload.add_argument("file", metavar="FILE")
    control.add_status_arguments(commands.add_parser(
        "status", help="show a running daemon's listeners, live tunnels and counters (its control socket)"))
    connect.add_arguments(commands.add_parser(
        "connect", help="carry stdin/stdout over one websocket (ssh's ProxyCommand)",
        description="Carry stdin/stdout over one websocket to a backend route, e.g. "
                    "ssh -o ProxyCommand='tcpbridge connect wss://host/ --route ssh' user@host. "
                    "Exit status: 0 clean end, 1 cannot connect or aborted, 2 usage or configuration error."))
    args = parser.parse_args(argv)
    if args.command == "reload":
        return reload_daemon(args.pid, args.file)
    if args.command == "status":
        return control.run_status(args.daemon, args.socket, args.json)
    if args.command == "connect":
        return connect.run(args)
    return check_config(args.files)


def reload_daemon(pid: int, path: str) -> int:
    status = check_config([path])
    if status != 0:
        print(f"{path}: not reloading process {pid}: fix the problems above first", file=sys.stderr)
        return status
    try:
        os.kill(pid, signal.SIGHUP)
    except OSError as exc:
        print(f"cannot signal process {pid}: {exc.strerror}", file=sys.stderr)
        return EXIT_FAILURE
    return 0


def check_config(files: Sequence[str]) -> int:
    """Print every problem of every file; exit 0 only if all are valid."""
    status = 0
    for path in files:
        try:
            loaded = config.load(path)
        except ConfigError as exc:
            for problem in exc.problems:
                print(problem, file=sys.stderr)
            status = EXIT_USAGE
            continue
        if isinstance(loaded, config.FrontendConfig):
            print(f"{path}: OK (frontend, {len(loaded.tunnels)} tunnels)")
        else:
            print(f"{path}: OK (backend, {len(loaded.listeners)} listeners)")
    return status
