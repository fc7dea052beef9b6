"""Admission on the backend: who may open a tunnel (Origin, token) and whether there is room (caps).

Every check raises :class:`UpgradeRefused` with the answer to give and the reason to log; the front
door (:mod:`bridge.frontdoor`) runs them in its documented order before the target is dialled.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable
from http import HTTPStatus

from bridge.caps import Counts, LocalCounts
from bridge.config import Listener, RouteOptions
from bridge.http1 import Headers
from bridge.secrets import SecretError, SecretResolver

#: The header carrying a listener's or route's shared secret. Not ``Authorization``:
#: the inverting proxy's agent uses that one for its own OAuth.
TOKEN_HEADER = "X-Tcpbridge-Token"
#: Seconds a client refused by a full ``max_tunnels`` is told to wait (``Retry-After``).
RETRY_AFTER_SECONDS = 5


class UpgradeRefused(Exception):
    """An upgrade request is answered with ``status``.

    ``detail`` goes in the log line (at ``level``) and, unless ``body`` is given, in the
    text/plain body too; ``body`` keeps what only the operator should see out of the answer.
    """

    def __init__(self, status: HTTPStatus, detail: str, headers: dict[str, str] | None = None, *,
                 body: str | None = None, level: int = logging.WARNING) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.headers = headers or {}
        self.body = detail if body is None else body
        self.level = level


class TunnelCounter:
    """Live tunnels of one listener or one route, counted from admission until the tunnel ends."""

    def __init__(self, counts: Counts, key: str) -> None:
        self._counts = counts
        self._key = key

    @property
    def count(self) -> int:
        return self._counts.count(self._key)

    def try_acquire(self, limit: int) -> bool:
        """Count one more tunnel unless ``limit`` (0: none) is reached; return whether it was."""
        return self._counts.try_acquire(self._key, limit)

    def release(self) -> None:
        self._counts.release(self._key)


class TunnelCounters:
    """A :class:`TunnelCounter` per listener name and per (listener, route), over ``counts``.

    One instance serves every :class:`ListenerServer` of a daemon, so counts survive
    reloads, including a listener re-bound to a new address; the limits themselves
    are read from the listener's current configuration at each request. With worker
    processes ``counts`` is shared, so ``max_tunnels`` is the daemon's, not each worker's.
    """

    def __init__(self, counts: Counts | None = None) -> None:
        self._counts: Counts = counts or LocalCounts()

    def get(self, listener: str, route: str | None = None) -> TunnelCounter:
        return TunnelCounter(self._counts, listener if route is None else f"{listener}/{route}")


def check_origin(listener: Listener, headers: Headers) -> None:
    """With ``allowed_origins`` set, an Origin outside it is refused; no Origin at all is fine."""
    if not listener.allowed_origins:
        return
    for origin in headers.get_all("Origin"):
        if origin.strip().rstrip("/").lower() not in listener.allowed_origins:
            # The value is not logged: no header value ever is.
            raise UpgradeRefused(HTTPStatus.FORBIDDEN, "Origin header not in allowed_origins")


def check_token(listener: Listener, route: str, headers: Headers, secrets: SecretResolver) -> None:
    """Demand the route's token (or else the listener's) in :data:`TOKEN_HEADER`.

    The expected value is read now, so a rotated token file applies to the next
    request. Compared in constant time, as bytes: the header as received on the
    wire, the secret as UTF-8. No value is ever logged.
    """
    secret = listener.token_for(route)
    if secret is None:
        return
    own = route in listener.route_options and listener.route_options[route].token is not None
    whose = "its own token" if own else "the listener's token"
    given = headers.get_all(TOKEN_HEADER)
    if len(given) > 1:
        raise UpgradeRefused(HTTPStatus.BAD_REQUEST, f"more than one {TOKEN_HEADER} header")
    value = given[0].strip() if given else ""
    if not value:
        raise UpgradeRefused(HTTPStatus.UNAUTHORIZED, f"missing {TOKEN_HEADER} header (route {route!r} "
                             f"requires {whose})")
    try:
        expected = secrets.resolve(secret).strip()
        if not expected:
            raise SecretError(f"{secret.describe()} is empty")
    except SecretError as exc:
        raise UpgradeRefused(HTTPStatus.SERVICE_UNAVAILABLE, f"cannot check {TOKEN_HEADER} for route "
                             f"{route!r}: {whose} is unavailable: {exc}", body="the backend cannot read its token",
                             level=logging.ERROR) from None
    # Header values are decoded as ISO-8859-1 (http1.Headers): encoding back gives the bytes sent.
    if not hmac.compare_digest(value.encode("latin-1"), expected.encode("utf-8")):
        raise UpgradeRefused(HTTPStatus.FORBIDDEN, f"wrong {TOKEN_HEADER} (route {route!r} requires {whose})")


def admit(listener: Listener, route: str, counters: TunnelCounters) -> Callable[[], None]:
    """Count the tunnel against the listener's and the route's ``max_tunnels``; return its release."""
    whole, one = counters.get(listener.name), counters.get(listener.name, route)
    route_limit = listener.route_options.get(route, RouteOptions()).max_tunnels
    retry = {"Retry-After": str(RETRY_AFTER_SECONDS)}
    if not whole.try_acquire(listener.max_tunnels):
        raise UpgradeRefused(HTTPStatus.SERVICE_UNAVAILABLE,
                             f"listener is full: max_tunnels {listener.max_tunnels} live tunnels", retry)
    if not one.try_acquire(route_limit):
        whole.release()
        raise UpgradeRefused(HTTPStatus.SERVICE_UNAVAILABLE,
                             f"route {route!r} is full: max_tunnels {route_limit} live tunnels", retry)

    released = False

    def release() -> None:  # idempotent: called early on a refusal, and always at the end
        nonlocal released
        if not released:
            released = True
            one.release()
            whole.release()
    return release
