"""A real systemd, booted as PID 1 in throwaway namespaces, for tests (root only).

:class:`SystemdMachine` boots ``/lib/systemd/systemd`` inside new PID, mount, UTS, IPC and cgroup
namespaces, on an overlay of the host's ``/`` whose upper layer lives on a tmpfs: whatever the
machine writes disappears with it. It shares the host's network namespace (so tests reach its
services on 127.0.0.1) and nothing else that it could change:

* its own cgroup2 folder (created below the caller's cgroup, found in ``/proc/self/mounts`` so a
  hybrid layout with cgroup2 at ``/sys/fs/cgroup/unified`` works too), which is also how everything
  is killed at the end (``cgroup.kill``);
* a fresh ``/proc`` with ``/proc/sys`` read-only, a read-only sysfs, its own cgroup2 mount;
* a private ``/dev`` holding only null, zero, full, random, urandom and tty (binding the host's /dev
  would let journald's ``/dev/log`` links leak onto the host), tmpfs ``/run``, ``/tmp`` and
  ``/var/log/journal`` (so a host journal never mixes in), a fresh ``/etc/machine-id``;
* the directories in ``binds`` (e.g. the repository) bound read-only, each at its own path or at
  the path it is paired with.

The caller talks to it with :meth:`SystemdMachine.run` (``nsenter -t <pid> -a``), reads and writes
its files through ``/proc/<pid>/root`` (:meth:`SystemdMachine.path`), waits for unit states and
reads the journal as JSON. Every wait is bounded; :meth:`SystemdMachine.close` kills every process
of the machine, waits for the cgroup to empty, removes it and the temporary directory. The mounts
live only in the machine's mount namespace and go with its last process.

Use it as a context manager::

    with SystemdMachine(binds=[repo]) as machine:
        machine.write("/etc/systemd/system/hello.service", UNIT)
        machine.systemctl("daemon-reload")
        machine.systemctl("start", "hello.service")
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

SYSTEMD = "/lib/systemd/systemd"
TOOLS = ("unshare", "nsenter", "mount", "pivot_root", "umount", "tar", "systemctl", "journalctl")
INNER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

#: Units a test machine does not need: they slow the boot down or touch things a test must not.
DEFAULT_MASKS = (
    "timers.target", "getty.target", "console-getty.service", "systemd-timesyncd.service",
    "systemd-pstore.service", "systemd-modules-load.service", "e2scrub_reap.service",
    "postgresql.service", "cron.service", "ssh.service", "systemd-logind.service",
    "sys-kernel-debug.mount", "sys-kernel-tracing.mount", "sys-kernel-config.mount",
    "sys-fs-fuse-connections.mount", "dev-hugepages.mount", "systemd-networkd-wait-online.service",
    "ifupdown-wait-online.service", "NetworkManager-wait-online.service", "apt-daily.service",
    "apt-daily-upgrade.service", "man-db.service",
)

# Runs as PID 1 of the new namespaces, then becomes systemd. $1 temp dir, $2 stage dir, then pairs of
# (host directory, path in the machine) to bind.
_INNER = r"""
set -eu
T=$1; STAGE=$2; shift 2
mount -t tmpfs -o mode=755 tcpbridge-test "$T"
mkdir -p "$T/upper" "$T/work" "$T/root"
mount -t overlay overlay -o "lowerdir=/,upperdir=$T/upper,workdir=$T/work" "$T/root"
R=$T/root
tar -C "$STAGE" -cf - . | tar -C "$R" -xf - --no-overwrite-dir
mount -t proc -o nosuid,nodev,noexec proc "$R/proc"
mount --bind "$R/proc/sys" "$R/proc/sys"
mount -o remount,bind,ro,nosuid,nodev,noexec "$R/proc/sys"
mount -t sysfs -o ro,nosuid,nodev,noexec sysfs "$R/sys"
mount -t cgroup2 -o nosuid,nodev,noexec cgroup2 "$R/sys/fs/cgroup"
mount -t tmpfs -o mode=755,nosuid tmpfs "$R/dev"
for d in null zero full random urandom tty; do
    touch "$R/dev/$d"; mount --bind "/dev/$d" "$R/dev/$d"
done
mkdir -p "$R/dev/shm" "$R/dev/pts"
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs "$R/dev/shm"
ln -s /proc/self/fd "$R/dev/fd"
ln -s pts/ptmx "$R/dev/ptmx"  # as in nspawn; PrivateDevices= fails without a /dev/ptmx
ln -s /proc/self/fd/0 "$R/dev/stdin"; ln -s /proc/self/fd/1 "$R/dev/stdout"; ln -s /proc/self/fd/2 "$R/dev/stderr"
mount -t tmpfs -o mode=755,nosuid,nodev tmpfs "$R/run"
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs "$R/tmp"
mkdir -p "$R/var/log/journal"
mount -t tmpfs -o mode=2755,nosuid,nodev tmpfs "$R/var/log/journal"
while [ $# -gt 1 ]; do
    src=$1; dst=$2; shift 2
    mkdir -p "$R$dst"; mount --bind "$src" "$R$dst"; mount -o remount,bind,ro "$R$dst"
done
mkdir -p "$R/.oldroot"
cd "$R"
pivot_root . .oldroot
umount -l /.oldroot
rmdir /.oldroot
exec env -i container=tcpbridge-test PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    /lib/systemd/systemd --unit=basic.target --show-status=no
"""


class MachineUnavailable(Exception):
    """The environment cannot run a systemd machine (not root, tools missing, boot failed)."""


def cgroup2_mount() -> Path | None:
    """Where cgroup2 is mounted here (``/sys/fs/cgroup`` or, in a hybrid layout, ``…/unified``)."""
    with open("/proc/self/mounts") as mounts:
        for line in mounts:
            fields = line.split()
            if len(fields) > 2 and fields[2] == "cgroup2":
                return Path(fields[1].replace("\\040", " "))
    return None


def unavailable_reason() -> str | None:
    """Why :class:`SystemdMachine` cannot work here, or None when it may."""
    if os.geteuid() != 0:
        return "needs root (namespaces, mounts, cgroups)"
    if not os.access(SYSTEMD, os.X_OK):
        return f"{SYSTEMD} is missing (apt-get install systemd)"
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        return f"missing tools: {', '.join(missing)}"
    if cgroup2_mount() is None:
        return "no cgroup2 hierarchy is mounted"
    return None


class SystemdMachine:
    """A systemd booted as PID 1 in private namespaces over a throwaway overlay of ``/``.

    ``files`` maps absolute paths in the machine to contents (str or bytes, mode 0644) written
    before boot; ``masks`` are unit names masked before boot; ``binds`` are host directories bound
    read-only at the same path, or ``(host directory, path in the machine)`` pairs.
    """

    def __init__(self, *, files: Mapping[str, str | bytes] | None = None, masks: Iterable[str] = DEFAULT_MASKS,
                 binds: Sequence[str | os.PathLike[str] | tuple[str, str]] = (),
                 boot_timeout: float = 20.0) -> None:
        self.files = dict(files or {})
        self.masks = list(masks)
        self.binds = [(os.path.realpath(b[0]), b[1]) if isinstance(b, tuple) else (os.path.realpath(b),) * 2
                      for b in binds]
        self.boot_timeout = boot_timeout
        self.pid = 0  #: systemd's process id, as the host sees it
        self.boot_seconds = 0.0  #: from spawning unshare to ``is-system-running`` answering running/degraded
        self._proc: subprocess.Popen[bytes] | None = None
        self._cgroup: Path | None = None
        self._tmp: Path | None = None
        self._output_path: Path | None = None

    # -- lifecycle ---------------------------------------------------------------------------------

    def __enter__(self) -> SystemdMachine:
        self.boot()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def boot(self) -> None:
        """Boot and wait until systemd reports running (or degraded). Raises :class:`MachineUnavailable`."""
        reason = unavailable_reason()
        if reason:
            raise MachineUnavailable(reason)
        atexit.register(self.close)  # a test run that dies of an exception still cleans up
        try:
            self._boot()
        except BaseException:
            self.close()
            raise

    def _boot(self) -> None:
        self._tmp = Path(tempfile.mkdtemp(prefix="tcpbridge-systemd-"))
        mnt, stage = self._tmp / "mnt", self._tmp / "stage"
        mnt.mkdir()
        self._stage(stage)
        self._cgroup = self._make_cgroup()
        self._output_path = self._tmp / "console.log"
        started = time.monotonic()
        with open(self._output_path, "wb") as output:
            self._proc = subprocess.Popen(
                ["/bin/sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', str(self._cgroup),
                 "unshare", "--pid", "--fork", "--mount", "--uts", "--ipc", "--cgroup",
                 "--propagation", "private", "/bin/sh", "-c", _INNER, "inner", str(mnt), str(stage),
                 *(path for pair in self.binds for path in pair)],
                stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT, start_new_session=True,
            )
        deadline = started + self.boot_timeout
        while not self.pid:
            self.pid = self._find_systemd()
            if not self.pid:
                self._check_alive()
                if time.monotonic() > deadline:
                    raise MachineUnavailable(f"systemd did not start in {self.boot_timeout} s: {self.console()}")
                time.sleep(0.02)
        state = ""
        while state not in ("running", "degraded"):
            self._check_alive()
            if time.monotonic() > deadline:
                raise MachineUnavailable(f"systemd did not finish booting in {self.boot_timeout} s "
                                         f"(is-system-running: {state!r}): {self.console()}")
            state = self.run("systemctl", "is-system-running", timeout=5).stdout.strip()
            if state not in ("running", "degraded"):
                time.sleep(0.05)
        self.boot_seconds = time.monotonic() - started

    def _stage(self, stage: Path) -> None:
        """Files copied over the overlay before boot (existing directories keep their metadata)."""
        stage.mkdir(mode=0o755)
        stage.chmod(0o755)
        entries: dict[str, str | bytes] = {"/etc/machine-id": uuid.uuid4().hex + "\n", **self.files}
        for name, content in entries.items():
            target = self._stage_path(stage, name)
            if isinstance(content, bytes):
                target.write_bytes(content)
            else:
                target.write_text(content)
            target.chmod(0o644)
        for unit in self.masks:
            link = self._stage_path(stage, f"/etc/systemd/system/{unit}")
            link.symlink_to("/dev/null")

    @staticmethod
    def _stage_path(stage: Path, name: str) -> Path:
        if not name.startswith("/"):
            raise ValueError(f"not an absolute path: {name}")
        target = stage / name.lstrip("/")
        for parent in reversed(target.parents):
            if parent != stage and stage in parent.parents and not parent.exists():
                parent.mkdir()
                parent.chmod(0o755)
        return target

    def _make_cgroup(self) -> Path:
        mount = cgroup2_mount()
        assert mount is not None
        own = "/"
        with open("/proc/self/cgroup") as groups:
            for line in groups:
                if line.startswith("0::"):
                    own = line[3:].strip()
        folder = mount / own.lstrip("/") / f"tcpbridge-systemd-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            folder.mkdir()
        except OSError as exc:
            raise MachineUnavailable(f"cannot create a cgroup2 folder {folder}: {exc.strerror}") from exc
        return folder

    def _find_systemd(self) -> int:
        """The child of unshare, once it has exec'd systemd."""
        assert self._proc is not None
        try:
            children = Path(f"/proc/{self._proc.pid}/task/{self._proc.pid}/children").read_text().split()
            for child in children:
                if Path(f"/proc/{child}/comm").read_text().strip() == "systemd":
                    return int(child)
        except OSError:
            pass
        return 0

    def _check_alive(self) -> None:
        assert self._proc is not None
        if self._proc.poll() is not None:
            raise MachineUnavailable(f"the namespace exited with {self._proc.returncode}: {self.console()}")

    def console(self) -> str:
        """What the setup script and systemd wrote to their stdout/stderr (the machine's console)."""
        if self._output_path is None or not self._output_path.exists():
            return ""
        return self._output_path.read_text(errors="replace")[-4000:]

    def close(self, timeout: float = 15.0) -> None:
        """Kill every process of the machine and remove everything it created on the host. Idempotent."""
        atexit.unregister(self.close)
        deadline = time.monotonic() + timeout
        if self._cgroup is not None and self._cgroup.exists():
            self._kill_cgroup(deadline)
        if self._proc is not None:
            if self._proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self._proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(max(0.1, deadline - time.monotonic()))
        if self._cgroup is not None:
            self._remove_cgroup(deadline)
            self._cgroup = None
        if self._tmp is not None:
            mnt = self._tmp / "mnt"
            # The tmpfs on mnt lives only in the machine's mount namespace: on the host, mnt is empty.
            if not os.path.ismount(mnt):
                shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None
        self.pid = 0

    def _kill_cgroup(self, deadline: float) -> None:
        assert self._cgroup is not None
        kill = self._cgroup / "cgroup.kill"
        while time.monotonic() < deadline:
            pids = self._cgroup_pids()
            if not pids:
                return
            if kill.exists():
                with contextlib.suppress(OSError):
                    kill.write_text("1")
            else:  # kernels before 5.14: kill what is there, again until nothing is left
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)
        raise RuntimeError(f"processes left in {self._cgroup}: {self._cgroup_pids()}")

    def _cgroup_pids(self) -> list[int]:
        assert self._cgroup is not None
        pids: list[int] = []
        for procs in self._cgroup.rglob("cgroup.procs"):
            with contextlib.suppress(OSError):
                pids += [int(p) for p in procs.read_text().split()]
        return pids

    def _remove_cgroup(self, deadline: float) -> None:
        assert self._cgroup is not None
        while self._cgroup.exists():
            folders = sorted((p for p in self._cgroup.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts))
            for folder in [*folders, self._cgroup]:
                with contextlib.suppress(OSError):
                    folder.rmdir()
            if self._cgroup.exists():
                if time.monotonic() > deadline:
                    raise RuntimeError(f"cannot remove cgroup {self._cgroup}")
                time.sleep(0.05)

    # -- talking to the machine -------------------------------------------------------------------

    def run(self, *args: str, timeout: float = 15.0, check: bool = False,
            stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run a command in all of the machine's namespaces, with a clean environment."""
        if not self.pid:
            raise RuntimeError("the machine is not running")
        argv = ["nsenter", "-t", str(self.pid), "-a", "env", "-i", f"PATH={INNER_PATH}", "SYSTEMD_PAGER=",
                "SYSTEMD_COLORS=0", "LANG=C.UTF-8", *args]
        result = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(args)} exited with {result.returncode}:\n{result.stdout}{result.stderr}")
        return result

    def systemctl(self, *args: str, timeout: float = 20.0, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run("systemctl", "--no-ask-password", *args, timeout=timeout, check=check)

    def path(self, name: str) -> Path:
        """The host's view of a path inside the machine (through ``/proc/<pid>/root``)."""
        if not name.startswith("/"):
            raise ValueError(f"not an absolute path: {name}")
        return Path(f"/proc/{self.pid}/root") / name.lstrip("/")

    def write(self, name: str, content: str | bytes, mode: int = 0o644) -> None:
        """Write a file in the machine (parents created 0755), atomically replacing an existing one."""
        target = self.path(name)
        for parent in reversed(target.parents):
            if not parent.exists():
                parent.mkdir()
                parent.chmod(0o755)
        temporary = target.with_name(f".{target.name}.tmp")
        if isinstance(content, bytes):
            temporary.write_bytes(content)
        else:
            temporary.write_text(content)
        temporary.chmod(mode)
        temporary.replace(target)

    def show(self, unit: str, *properties: str) -> dict[str, str]:
        """``systemctl show`` properties of a unit."""
        args = [arg for prop in properties for arg in ("-p", prop)]
        out = self.systemctl("show", unit, *args).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def wait_for(self, predicate: Callable[[], bool], timeout: float, interval: float = 0.1) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return True
            time.sleep(interval)
        return predicate()

    def wait_for_state(self, unit: str, active_state: str, timeout: float = 10.0,
                       sub_state: str | None = None) -> dict[str, str]:
        """Wait until the unit's ActiveState (and SubState) match; return its main properties."""
        props: dict[str, str] = {}

        def reached() -> bool:
            nonlocal props
            props = self.show(unit, "ActiveState", "SubState", "Result", "MainPID", "NRestarts",
                              "ExecMainStatus", "ExecMainCode")
            return props.get("ActiveState") == active_state and sub_state in (None, props.get("SubState"))

        if not self.wait_for(reached, timeout):
            raise AssertionError(f"{unit} did not reach {active_state}/{sub_state or '*'} in {timeout} s: {props}\n"
                                 + self.journal_text(unit))
        return props

    def journal(self, unit: str | None = None, *, since: float | None = None) -> list[dict[str, Any]]:
        """Journal entries (of one unit) as parsed JSON objects.

        ``since`` is a ``time.monotonic()`` reading of this process: the machine shares the kernel's
        CLOCK_MONOTONIC, so entries journald received before it are left out. (Filtering here, not
        with ``--after-cursor``: on systemd 252, ``-u UNIT --after-cursor`` can skip the first match.)
        """
        args = ["journalctl", "--no-pager", "-o", "json", "--all"]
        if unit:
            args += ["-u", unit]
        out = self.run(*args, check=True).stdout
        entries = [json.loads(line) for line in out.splitlines() if line.strip()]
        if since is not None:
            entries = [e for e in entries if int(e["__MONOTONIC_TIMESTAMP"]) >= since * 1e6]
        return entries

    def wait_for_journal(self, unit: str, predicate: Callable[[dict[str, Any]], bool], timeout: float = 10.0,
                         since: float | None = None) -> dict[str, Any]:
        """Wait for an entry of ``unit`` matching ``predicate`` (received after ``since``); return it."""
        found: list[dict[str, Any]] = []

        def seen() -> bool:
            found[:] = [e for e in self.journal(unit, since=since) if predicate(e)]
            return bool(found)

        if not self.wait_for(seen, timeout, interval=0.2):
            raise AssertionError(f"no matching journal entry for {unit} in {timeout} s:\n{self.journal_text(unit)}")
        return found[0]

    def journal_text(self, unit: str, lines: int = 60) -> str:
        """The tail of a unit's journal as text, for failure messages."""
        try:
            return self.run("journalctl", "--no-pager", "-u", unit, "-n", str(lines), "-o", "short-monotonic").stdout
        except (subprocess.TimeoutExpired, RuntimeError) as exc:
            return f"(journal unavailable: {exc})"


def message(entry: Mapping[str, Any]) -> str:
    """An entry's MESSAGE as text (journalctl gives non-UTF-8 messages as byte lists)."""
    value = entry.get("MESSAGE", "")
    if isinstance(value, list):
        return bytes(value).decode(errors="replace")
    return str(value)
