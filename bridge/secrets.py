"""Resolving :class:`~bridge.config.Secret` values when a connection needs them.

Literals and environment variables are read directly; a file is re-read on every
call (so a rotated token is picked up by the next connection); a command's output
is cached for its ``cache_seconds`` and re-run by one caller at a time. Errors
name the source but never include a value.
"""

from __future__ import annotations

import base64
import contextlib
import os
import signal
import subprocess
import threading
import time

from bridge.config import BasicAuth, Secret

COMMAND_TIMEOUT = 30.0
MAX_SECRET_BYTES = 64 * 1024


class SecretError(Exception):
    """A secret could not be read; the message says from where and why, never the value."""


class SecretResolver:
    """Reads secrets; shared by all connections of a daemon (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._command_locks: dict[tuple[str, ...], threading.Lock] = {}
        self._cache: dict[tuple[str, ...], tuple[float, str]] = {}

    def resolve(self, secret: Secret) -> str:
        return secret.prefix + self._read(secret)

    def basic_auth(self, auth: BasicAuth) -> str:
        """The ``Authorization`` header value for ``auth``."""
        credentials = f"{auth.username}:{self.resolve(auth.password)}".encode()
        return "Basic " + base64.b64encode(credentials).decode("ascii")

    def _read(self, secret: Secret) -> str:
        if secret.value is not None:
            return secret.value
        if secret.env is not None:
            value = os.environ.get(secret.env)
            if value is None:
                raise SecretError(f"environment variable {secret.env} is not set")
            return _one_line(value, secret)
        if secret.file is not None:
            return _one_line(_read_file(secret.file), secret)
        return self._run_cached(secret)

    def _run_cached(self, secret: Secret) -> str:
        with self._lock:
            lock = self._command_locks.setdefault(secret.command, threading.Lock())
        with lock:  # one run at a time; waiters then find the fresh value in the cache
            cached = self._cache.get(secret.command)
            if cached and time.monotonic() - cached[0] < secret.cache_seconds:
                return cached[1]
            value = _one_line(_run(secret.command), secret)
            self._cache[secret.command] = (time.monotonic(), value)
            return value


def _read_file(path: str) -> str:
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_SECRET_BYTES + 1)
    except OSError as exc:
        raise SecretError(f"cannot read file {path}: {exc.strerror or exc}") from None
    if len(data) > MAX_SECRET_BYTES:
        raise SecretError(f"file {path} is larger than {MAX_SECRET_BYTES} bytes")
    return data.decode("utf-8", "replace")


def _run(command: tuple[str, ...]) -> str:
    """Run a token command; its stdout is the value. Bounded by COMMAND_TIMEOUT.

    The command gets its own process group, killed whole on timeout: a shell script
    whose child still holds the output pipe cannot hang the caller.
    """
    try:
        proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=True)
    except FileNotFoundError:
        raise SecretError(f"command {command[0]} not found") from None
    except OSError as exc:
        raise SecretError(f"cannot run command {command[0]}: {exc.strerror or exc}") from None
    with proc:
        try:
            stdout, stderr = proc.communicate(timeout=COMMAND_TIMEOUT)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(OSError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.communicate(timeout=5)
            raise SecretError(f"command {command[0]} did not finish in {COMMAND_TIMEOUT:g} s") from None
    if len(stdout) > MAX_SECRET_BYTES:
        raise SecretError(f"command {command[0]} printed more than {MAX_SECRET_BYTES} bytes")
    if proc.returncode != 0:
        # stderr of a failing token command explains the failure; it holds no token.
        detail = stderr.decode("utf-8", "replace").strip().splitlines()
        reason = f": {detail[-1][:200]}" if detail else ""
        status = f"was killed by signal {-proc.returncode}" if proc.returncode < 0 else \
            f"exited with status {proc.returncode}"
        raise SecretError(f"command {command[0]} {status}{reason}")
    return stdout.decode("utf-8", "replace")


def _one_line(value: str, secret: Secret) -> str:
    value = value.strip()
    if not value:
        raise SecretError(f"{secret.describe()} is empty")
    if any(c in value for c in "\r\n\0"):
        raise SecretError(f"{secret.describe()} holds more than one line")
    return value
