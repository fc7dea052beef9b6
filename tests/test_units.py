"""systemd packaging: the four units pass ``systemd-analyze verify`` and ``security``, and ``make
install`` / ``make uninstall`` into a DESTDIR build a tree that works once moved to its PREFIX.

The install test builds one real venv (pip needs PyPI, or the configured index) per session.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
UNIT_DIR = ROOT / "systemd"
UNITS = ("tcpbridge-frontend.service", "tcpbridge-backend.service",
         "tcpbridge-frontend@.service", "tcpbridge-backend@.service")
COMMANDS = ("tcpbridge", "tcpbridge-frontend", "tcpbridge-backend")
SHIPPED_BIN = "/usr/local/bin/"
PREFIX = "/usr/local"
APP_VENV = f"{PREFIX}/lib/tcpbridge/venv"
MAX_EXPOSURE = 1.5
DEFAULT_DRAIN_TIMEOUT = 10.0

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed (Debian package: systemd)")
ANALYZE_ENV = {**os.environ, "SYSTEMD_COLORS": "0", "SYSTEMD_PAGER": "", "SYSTEMD_LOG_COLOR": "0"}


def unit_settings(text: str) -> list[tuple[str, str, str]]:
    """(section, key, value) for every assignment, in order (keys may repeat, so no configparser)."""
    settings, section = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        settings.append((section, key.strip(), value.strip()))
    return settings


def setting(text: str, key: str) -> list[str]:
    return [value for _, name, value in unit_settings(text) if name == key]


def run_analyze(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    assert SYSTEMD_ANALYZE is not None
    return subprocess.run([SYSTEMD_ANALYZE, *args], cwd=cwd, env=ANALYZE_ENV,
                          capture_output=True, text=True, timeout=60, check=False)


@pytest.fixture(scope="module")
def rendered_units(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped units with ExecStart/ExecReload pointing at this venv's console scripts:
    ``systemd-analyze verify`` checks that executables exist."""
    scripts = Path(sysconfig.get_path("scripts"))
    for command in COMMANDS:
        assert (scripts / command).exists(), f"{scripts / command} missing: is the package installed in this venv?"
    out = tmp_path_factory.mktemp("units")
    for unit in UNITS:
        text = (UNIT_DIR / unit).read_text()
        assert SHIPPED_BIN + "tcpbridge" in text, unit
        (out / unit).write_text(text.replace(SHIPPED_BIN, f"{scripts}/"))
    return out


# --- the unit files themselves -------------------------------------------------------------------------------

@pytest.mark.parametrize("unit", UNITS)
def test_unit_settings(unit: str) -> None:
    text = (UNIT_DIR / unit).read_text()
    role = "frontend" if "frontend" in unit else "backend"
    config = f"/etc/tcpbridge/{role}-%i.yaml" if "@" in unit else f"/etc/tcpbridge/{role}.yaml"
    assert setting(text, "Type") == ["notify"]
    assert setting(text, "NotifyAccess") == ["main"]
    assert setting(text, "ExecStart") == [f"/usr/local/bin/tcpbridge-{role} --config {config}"]
    assert setting(text, "ExecReload") == [f"/usr/local/bin/tcpbridge reload --pid $MAINPID {config}"]
    assert setting(text, "Restart") == ["on-failure"]
    assert setting(text, "WatchdogSec") == [], "the watchdog is opt-in, through a drop-in"
    (timeout,) = setting(text, "TimeoutStopSec")
    assert float(timeout.removesuffix("s")) > DEFAULT_DRAIN_TIMEOUT
    assert setting(text, "DynamicUser") == ["yes"]
    assert setting(text, "CapabilityBoundingSet") == [""]
    assert setting(text, "AmbientCapabilities") == [""]
    assert setting(text, "RestrictAddressFamilies") == ["AF_INET AF_INET6 AF_UNIX"]
    assert int(setting(text, "LimitNOFILE")[0]) >= 65536
    assert int(setting(text, "TasksMax")[0]) >= 8192  # two threads per tunnel
    assert "LoadCredential=" in text, "a commented LoadCredential= example is expected"
    assert setting(text, "LoadCredential") == [], "credentials are opt-in"


@needs_analyze
@pytest.mark.parametrize("unit", UNITS)
def test_systemd_analyze_verify_is_clean(rendered_units: Path, unit: str) -> None:
    # An unknown key or a bad value is only a warning (exit 0): stderr must be empty too.
    result = run_analyze("verify", "--man=no", str(rendered_units / unit), cwd=rendered_units)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


@needs_analyze
def test_verify_check_catches_a_bad_key(tmp_path: Path) -> None:
    """The check above has teeth: a typo gives exit 0 but a warning on stderr."""
    scripts = Path(sysconfig.get_path("scripts"))
    text = (UNIT_DIR / UNITS[0]).read_text().replace(SHIPPED_BIN, f"{scripts}/")
    (tmp_path / UNITS[0]).write_text(text.replace("\nUMask=", "\nUMaskk=0077\nUMask="))
    result = run_analyze("verify", "--man=no", str(tmp_path / UNITS[0]), cwd=tmp_path)
    assert "UMaskk" in result.stderr


@needs_analyze
@pytest.mark.parametrize("unit", UNITS)
def test_systemd_analyze_security_exposure(rendered_units: Path, unit: str) -> None:
    result = run_analyze("security", "--offline=yes", "--no-pager", str(rendered_units / unit), cwd=rendered_units)
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", result.stdout)
    assert match, result.stdout + result.stderr
    exposure = float(match.group(1))
    assert exposure <= MAX_EXPOSURE, result.stdout


# --- make install / uninstall into a DESTDIR -----------------------------------------------------------------

def make(*args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["make", "--no-print-directory", "-C", str(ROOT), *args],
                            capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, f"make {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result


def staged_target(destdir: Path, link: Path) -> Path:
    """Where a symlink in DESTDIR points once the tree is moved to /: absolute targets live under DESTDIR."""
    target = os.readlink(link)
    if os.path.isabs(target):
        return destdir / target.lstrip("/")
    return link.parent / target


def tree_files(root: Path) -> set[str]:
    return {str(path.relative_to(root)) for path in root.rglob("*") if path.is_file() or path.is_symlink()}


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    if not Path("/usr/bin/python3").exists():
        pytest.skip("make install builds its venv with /usr/bin/python3, which is missing")
    destdir = tmp_path_factory.mktemp("destdir")
    make("install", f"DESTDIR={destdir}")
    yield destdir


@pytest.mark.timeout(600)
def test_install_tree(installed: Path) -> None:
    venv = installed / APP_VENV.lstrip("/")
    for command in COMMANDS:
        link = installed / PREFIX.lstrip("/") / "bin" / command
        assert link.is_symlink(), link
        target = staged_target(installed, link).resolve()
        assert target == (venv / "bin" / command).resolve(), (link, os.readlink(link))
        assert target.is_relative_to(installed.resolve())
        assert os.access(target, os.X_OK)
    for unit in UNITS:
        text = (installed / "etc/systemd/system" / unit).read_text()
        assert f"ExecStart={PREFIX}/bin/tcpbridge-" in text
    for conf in ("frontend.yaml", "backend.yaml"):
        installed_conf = installed / "etc/tcpbridge" / conf
        assert installed_conf.read_text() == (ROOT / "conf" / conf).read_text()
        assert installed_conf.stat().st_mode & 0o777 == 0o644  # the dynamic user must read it


@pytest.mark.timeout(600)
def test_install_mentions_no_destdir(installed: Path) -> None:
    """Scripts, activate files, pyvenv.cfg, units, even bytecode: nothing names the staging directory."""
    needle = str(installed).encode()
    offenders = [str(path) for path in installed.rglob("*")
                 if path.is_file() and not path.is_symlink() and needle in path.read_bytes()]
    assert offenders == []
    venv = installed / APP_VENV.lstrip("/")
    assert (venv / "bin/tcpbridge").read_text().splitlines()[0] == f"#!{APP_VENV}/bin/python"
    assert re.search(rf"^VIRTUAL_ENV=\"?{re.escape(APP_VENV)}\"?$", (venv / "bin/activate").read_text(), re.M)


@pytest.mark.timeout(600)
def test_installed_venv_runs_in_place(installed: Path) -> None:
    """The staged interpreter runs the staged scripts: the venv is self-contained."""
    venv = installed / APP_VENV.lstrip("/")
    for command in COMMANDS:
        result = subprocess.run([str(venv / "bin/python"), str(venv / "bin" / command), "--version"],
                                capture_output=True, text=True, timeout=60, check=False)
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith(f"{command} ")
    result = subprocess.run([str(venv / "bin/python"), str(venv / "bin/tcpbridge"), "check-config",
                             str(installed / "etc/tcpbridge/frontend.yaml"),
                             str(installed / "etc/tcpbridge/backend.yaml")],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    # The optional extras are installed: numpy (masking) and prometheus-client (metrics: only a YAML edit away).
    result = subprocess.run([str(venv / "bin/python"), "-c", "import numpy, prometheus_client"],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr


def can_unshare_mounts() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "true"],
                           capture_output=True, timeout=30, check=False)
    return probe.returncode == 0


@pytest.mark.timeout(600)
def test_installed_tree_works_once_moved_to_prefix(installed: Path) -> None:
    """Mount DESTDIR's /usr/local over /usr/local in a private mount namespace, then exec the scripts
    directly (their shebangs name PREFIX), through the PREFIX/bin symlinks and from DESTDIR."""
    if not can_unshare_mounts():
        pytest.skip("needs root and `unshare --mount` to place the tree at its PREFIX")
    staged = installed / PREFIX.lstrip("/")
    frontend_conf = installed / "etc/tcpbridge/frontend.yaml"
    script = f"""set -e
mount --bind {staged} {PREFIX}
{PREFIX}/bin/tcpbridge --version
{PREFIX}/bin/tcpbridge-frontend --version
{PREFIX}/bin/tcpbridge-backend --version
{staged}/lib/tcpbridge/venv/bin/tcpbridge --version
{PREFIX}/bin/tcpbridge check-config {frontend_conf}
"""
    result = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert [line.split()[0] for line in result.stdout.splitlines()[:4]] == [
        "tcpbridge", "tcpbridge-frontend", "tcpbridge-backend", "tcpbridge"]


@pytest.mark.timeout(600)
def test_install_configs_never_overwrites(installed: Path, tmp_path: Path) -> None:
    destdir = tmp_path / "destdir"
    shutil.copytree(installed / "etc", destdir / "etc", symlinks=True)
    edited = destdir / "etc/tcpbridge/frontend.yaml"
    edited.write_text("# edited by the admin\n" + edited.read_text())
    (destdir / "etc/tcpbridge/backend.yaml").unlink()
    result = make("install-configs", f"DESTDIR={destdir}")
    assert edited.read_text().startswith("# edited by the admin\n")
    assert "keeping existing" in result.stdout
    assert (destdir / "etc/tcpbridge/backend.yaml").read_text() == (ROOT / "conf/backend.yaml").read_text()


def test_install_units_substitutes_prefix(tmp_path: Path) -> None:
    make("install-units", f"DESTDIR={tmp_path}", "PREFIX=/opt/tcpbridge")
    for unit in UNITS:
        text = (tmp_path / "etc/systemd/system" / unit).read_text()
        assert setting(text, "ExecStart")[0].startswith("/opt/tcpbridge/bin/tcpbridge-")
        assert setting(text, "ExecReload")[0].startswith("/opt/tcpbridge/bin/tcpbridge reload --pid $MAINPID ")
        assert "/usr/local/bin/" not in text


@pytest.mark.timeout(600)
def test_uninstall_removes_all_but_configs(installed: Path, tmp_path: Path) -> None:
    destdir = tmp_path / "destdir"
    shutil.copytree(installed, destdir, symlinks=True)
    wants = destdir / "etc/systemd/system/multi-user.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    (wants / "tcpbridge-frontend@east.service").symlink_to("/etc/systemd/system/tcpbridge-frontend@.service")
    (wants / "unrelated.service").symlink_to("/etc/systemd/system/unrelated.service")
    result = make("uninstall", f"DESTDIR={destdir}")
    assert tree_files(destdir) == {"etc/tcpbridge/frontend.yaml", "etc/tcpbridge/backend.yaml",
                                   "etc/systemd/system/multi-user.target.wants/unrelated.service"}
    assert "left" in result.stdout and "/etc/tcpbridge" in result.stdout
