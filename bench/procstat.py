"""What /proc says about the processes under test: CPU time, memory, threads, process trees, limits."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str]:
    """Fields of /proc/PID/stat after the command name (field 3, the state, is index 0)."""
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2:].split()


def cpu_seconds(pid: int) -> float:
    """utime + stime of the process (all its threads) + cutime + cstime of its reaped children.

    socat's fork-per-connection children count once they have exited and been reaped, so
    callers wait for the children to go before reading the end value.
    """
    try:
        fields = _stat_fields(pid)
    except OSError:
        return 0.0
    # utime, stime, cutime, cstime are stat fields 14..17: indexes 11..14 here.
    return sum(int(v) for v in fields[11:15]) / CLK_TCK


def start_time(pid: int) -> int | None:
    """The process's start time (stat field 22), to tell it from a later process reusing its pid."""
    try:
        return int(_stat_fields(pid)[19])
    except (OSError, ValueError, IndexError):
        return None


def descendants(roots: list[int]) -> list[int]:
    """``roots`` and every process below them (scans /proc: kernels without .../children)."""
    parent_of: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            parent_of[int(entry.name)] = int(_stat_fields(int(entry.name))[1])
    children: dict[int, list[int]] = {}
    for pid, ppid in parent_of.items():
        children.setdefault(ppid, []).append(pid)
    found: list[int] = []
    stack = [pid for pid in roots if pid in parent_of]
    while stack and len(found) < 1_000_000:
        pid = stack.pop()
        found.append(pid)
        stack.extend(children.get(pid, []))
    return found


def threads(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Threads:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def memory_kib(pids: list[int]) -> dict[str, int]:
    """Sum of Rss and Pss (KiB) from /proc/PID/smaps_rollup over ``pids``."""
    total = {"rss_kib": 0, "pss_kib": 0}
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                key, _, rest = line.partition(":")
                if key == "Rss":
                    total["rss_kib"] += int(rest.split()[0])
                elif key == "Pss":
                    total["pss_kib"] += int(rest.split()[0])
    return total


def read_int(path: str) -> int | None:
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    if text == "max":
        return None
    try:
        return int(text)
    except ValueError:
        return None


def tasks_now() -> int:
    """Threads on the whole machine (the 4th field of /proc/loadavg is running/total)."""
    return int(Path("/proc/loadavg").read_text().split()[3].split("/")[1])


def cgroup_pids_limit() -> tuple[int | None, int | None, str]:
    """(pids.max, pids.current, where) of this process's cgroup, v2 or v1; None when unlimited/unknown."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None, None, ""
    for line in lines:
        hid, controllers, path = line.split(":", 2)
        if hid == "0" and controllers == "":
            base = f"/sys/fs/cgroup{path}".rstrip("/")
        elif "pids" in controllers.split(","):
            base = f"/sys/fs/cgroup/pids{path}".rstrip("/")
        else:
            continue
        limit = read_int(f"{base}/pids.max")
        current = read_int(f"{base}/pids.current")
        if limit is not None or current is not None:
            return limit, current, base
    return None, None, ""
