"""Command lines: ``tcpbridge-frontend``, ``tcpbridge-backend`` and ``tcpbridge``.

Exit statuses: 0 success; 1 runtime failure (a port in use, ...); 2 usage
errors and invalid configuration.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import TypeVar

from bridge import __version__, config, connect, control, protocol
from bridge.arbiter import Arbiter, DaemonClass, pin, worker_cpus_available
from bridge.backend import Backend
from bridge.config import ConfigError
from bridge.frontend import Frontend
from bridge.listen import ListenError
from bridge.registry import TunnelRegistry
from bridge.service import Service, setup_logging

EXIT_FAILURE = 1
EXIT_USAGE = 2

log = logging.getLogger("tcpbridge")

C = TypeVar("C", config.FrontendConfig, config.BackendConfig)


def _parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description, allow_abbrev=False)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def _port(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number from 1 to 65535")
    return int(text)


def _workers(text: str) -> config.Workers:
    """``--workers``: what :func:`config.parse_workers` accepts, written on a command line."""
    try:
        return config.parse_workers(int(text) if text.isascii() and text.isdigit() else text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a number of workers: expected a whole number from 1 to {config.MAX_WORKERS}, "
            "or auto (one worker per CPU this daemon may run on)") from None


def _daemon_arguments(parser: argparse.ArgumentParser, default_config: str) -> None:
    parser.add_argument("--config", metavar="PATH",
                        help=f"YAML configuration (default {default_config} when no Go-style flags are given)")
    parser.add_argument("--log-level", choices=config.LOG_LEVELS, help="overrides log_level from the YAML")
    parser.add_argument("--workers", type=_workers, metavar="N|auto",
                        help=f"overrides workers from the YAML: worker processes, 1 to {config.MAX_WORKERS}, "
                             "or auto (one per CPU this daemon may run on)")
    parser.add_argument("--frontend-port", "-frontend-port", type=_port, metavar="PORT",
                        help="Go-compatible single-tunnel mode: the port to listen on")
    parser.add_argument("--bind", metavar="ADDRESS", default=config.DEFAULT_HOST,
                        help="with --frontend-port: the address to listen on (default %(default)s; "
                             "the Go binaries listen on all interfaces, this does not unless asked)")


def _with_flags(cfg: C, args: argparse.Namespace) -> C:
    """``cfg`` with what the command line overrides (``--workers``) in place of the YAML's value.

    Applied by the loaders themselves, so a reload (which calls them again) keeps the override.
    """
    return cfg if args.workers is None else dataclasses.replace(cfg, workers=args.workers)


def frontend_config(args: argparse.Namespace) -> config.FrontendConfig:
    """The frontend's configuration: the YAML file, or Go-compatible flags; then the command line's overrides."""
    if args.frontend_port is None and args.backend is None:
        return _with_flags(config.load_frontend(args.config or config.DEFAULT_FRONTEND_CONFIG), args)
    if args.config:
        raise ConfigError(["--config cannot be combined with --frontend-port/--backend"])
    if args.frontend_port is None or args.backend is None:
        raise ConfigError(["Go-compatible mode needs both --frontend-port PORT and --backend URL"])
    return _with_flags(config.parse_frontend({
        "tunnels": [{"name": "default", "listen": _listen(args), "backend": args.backend}],
    }, "command line"), args)


def backend_config(args: argparse.Namespace) -> config.BackendConfig:
    """The backend's configuration: the YAML file, or Go-compatible flags; then the command line's overrides."""
    if args.frontend_port is None and args.backend_port is None:
        return _with_flags(config.load_backend(args.config or config.DEFAULT_BACKEND_CONFIG), args)
    if args.config:
        raise ConfigError(["--config cannot be combined with --frontend-port/--backend-port"])
    if args.frontend_port is None or args.backend_port is None:
        raise ConfigError(["Go-compatible mode needs both --frontend-port PORT and --backend-port PORT"])
    return _with_flags(config.parse_backend({
        "listeners": [{
            "name": "default",
            "listen": _listen(args),
            "routes": {protocol.DEFAULT_ROUTE: f"localhost:{args.backend_port}"},
            # Like the Go backend: every request that is not a bridge upgrade goes to the same port as HTTP.
            "passthrough": f"http://localhost:{args.backend_port}",
        }],
    }, "command line"), args)


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
    daemon_class: DaemonClass,
) -> int:
    try:
        cfg = load(args)
    except ConfigError as exc:
        setup_logging("info", identifier=name)
        for problem in exc.problems:
            log.error("invalid configuration: %s", problem)
        return EXIT_USAGE
    setup_logging(args.log_level or cfg.log_level, target=cfg.log_target, identifier=name)
    available = worker_cpus_available()
    workers = len(available) if cfg.workers == "auto" else cfg.workers
    cpus = config.worker_cpus(cfg.cpu_affinity, workers, available)
    runner: Service | Arbiter
    if workers == 1:
        pin(cpus[0])
        registry = TunnelRegistry()
        runner = Service(daemon_class(cfg, registry), registry, name=name, load=lambda: load(args),
                         log_level_flag=args.log_level)
    else:
        runner = Arbiter(daemon_class, name=name, load=lambda: load(args),
                         log_level_flag=args.log_level, cpus=cpus)
    try:
        return runner.run(cfg)
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
