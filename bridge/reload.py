"""Applying a reloaded configuration to running listeners: one algorithm for both daemons.

Listeners are matched by name. New ones are bound and started; removed ones stop
accepting (their live tunnels finish normally); a changed listen address re-binds;
any other change is swapped in place, so new connections get the new settings
while live tunnels keep what they started with. Every port that must be bound is
bound before anything changes: if one fails, ListenError propagates and the
running configuration is untouched.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TypeVar

from bridge.config import FrontendTunnel, Listener, changed_fields

#: The running object of one listener (a socket and its thread, or a server).
Running = TypeVar("Running")
#: Its configuration: a frontend tunnel or a backend listener.
Settings = TypeVar("Settings", FrontendTunnel, Listener)


def reconcile(
    running: dict[str, Running],
    wanted: Mapping[str, Settings],
    *,
    kind: str,
    settings_of: Callable[[Running], Settings],
    replace: Callable[[Running, Settings], None],
    bind_all: Callable[[dict[str, Settings]], dict[str, Running]],
    start: Callable[[Running], None],
    stop: Callable[[Running], None],
) -> list[str]:
    """Bring ``running`` (updated in place) to ``wanted``; return one log line per change.

    ``bind_all`` binds all it is given or raises having bound none.
    """
    fresh = bind_all({name: new for name, new in wanted.items()
                      if name not in running or settings_of(running[name]).listen != new.listen})
    changes = []
    for name in [name for name in running if name not in wanted]:
        stop(running.pop(name))
        changes.append(f"{kind} {name}: removed (live tunnels finish normally)")
    for name, started in fresh.items():
        if name in running:
            old = running.pop(name)
            stop(old)
            changes.append(f"{kind} {name}: moved from {settings_of(old).listen} to {wanted[name].listen}")
        else:
            changes.append(f"{kind} {name}: added")
        running[name] = started
        start(started)
    for name, current in running.items():
        changed = changed_fields(settings_of(current), wanted[name])
        if changed:
            replace(current, wanted[name])
            changes.append(f"{kind} {name}: {', '.join(changed)} changed for new connections")
    return changes
