"""`make run`'s demo: it starts the pair from YAML, shows bytes crossing, and stops cleanly."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from tests.helpers import free_port

ROOT = Path(__file__).resolve().parent.parent


def test_demo_runs_the_shipped_configs_on_free_ports(tmp_path: Path) -> None:
    """The shipped conf/ files, with only their ports moved so the test cannot collide."""
    front = yaml.safe_load((ROOT / "conf/frontend.yaml").read_text())
    back = yaml.safe_load((ROOT / "conf/backend.yaml").read_text())
    backend_port, echo_port = free_port(), free_port()
    front["backend"] = f"ws://127.0.0.1:{backend_port}/"
    for tunnel in front["tunnels"]:
        tunnel["listen"] = f"127.0.0.1:{free_port()}"
    back["listeners"][0]["listen"] = f"127.0.0.1:{backend_port}"
    back["listeners"][0]["routes"]["echo"] = f"127.0.0.1:{echo_port}"
    (tmp_path / "f.yaml").write_text(yaml.safe_dump(front))
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(back))

    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts/demo.py"), "--once",
         "--frontend-config", str(tmp_path / "f.yaml"), "--backend-config", str(tmp_path / "b.yaml")],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "got back b'hello through tcpbridge\\n'" in result.stdout
    assert "sha256 matches" in result.stdout
    assert "tunnel echo: listening on" in result.stderr
