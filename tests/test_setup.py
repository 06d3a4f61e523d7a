"""Reproducible set-up: every install path takes the locks, and drift from pyproject is caught."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: Everything that installs notifier or its dependencies (scripts/lock only writes the locks).
INSTALLERS = [
    "scripts/_bootstrap.sh",
    "scripts/serve",
    "scripts/test",
    ".ci/run",
    "Dockerfile",
    "bench/run",
]


def test_every_install_path_takes_a_lock() -> None:
    installs = []
    for name in INSTALLERS:
        text = (ROOT / name).read_text()
        for line in re.findall(r"^.*\bpip install\b.*$", text, re.M):
            installs.append(line)
            # dependencies only from a hash-checked lock; the project itself without any
            assert "--require-hashes -r " in line or "--no-deps" in line, f"{name}: {line}"
    assert len(installs) >= 4
    assert "install_locked requirements.lock -e ." in (ROOT / "scripts/serve").read_text()
    assert "install_locked requirements-test.lock -e ." in (ROOT / "scripts/test").read_text()
    docker = (ROOT / "Dockerfile").read_text()
    assert "--require-hashes -r requirements.lock" in docker
    ci = (ROOT / ".ci/run").read_text()
    assert "scripts/test" in ci and "--require-hashes -r requirements.lock" in ci


def test_every_pin_carries_its_hashes() -> None:
    for lock in ("requirements.lock", "requirements-test.lock"):
        text = (ROOT / lock).read_text()
        pins = re.findall(r"^([a-z0-9][a-z0-9._-]*)==(\S+)", text, re.M)
        hashed = re.findall(r"^[a-z0-9][^\n]*==[^\n]*\\\n\s+--hash=sha256:[0-9a-f]{64}", text, re.M)
        assert pins and len(hashed) == len(pins), lock
        assert ("babel", "2.19.0") in pins  # the CLDR the tests' expectations come from


def lock_check(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "check_lock.py"), "--root", str(root)],
        capture_output=True,
        text=True,
    )


def test_the_lock_check_fails_when_pyproject_moves_on(tmp_path: Path) -> None:
    for name in ("pyproject.toml", "requirements.lock", "requirements-test.lock"):
        shutil.copy(ROOT / name, tmp_path / name)
    assert lock_check(tmp_path).returncode == 0, lock_check(tmp_path).stderr
    pyproject = tmp_path / "pyproject.toml"
    original = pyproject.read_text()

    # a new dependency, and a range the pin no longer satisfies
    pyproject.write_text(
        original.replace('"pyyaml>=6,<7",', '"pyyaml>=6,<7",\n    "tomli-w>=1",').replace(
            '"babel>=2.14,<3"', '"babel>=2.14,<2.19"'
        )
    )
    out = lock_check(tmp_path)
    assert out.returncode == 1
    assert "requirements.lock: pyproject.toml needs tomli-w>=1, which is not pinned" in (out.stderr)
    assert "needs babel<2.19,>=2.14, the pin is 2.19.0" in out.stderr
    assert "run scripts/lock" in out.stderr

    # a dependency dropped: its pin (and what only it needed) is stale
    pyproject.write_text(original.replace('"pytest-timeout>=2.3,<3",', ""))
    out = lock_check(tmp_path)
    assert out.returncode == 1
    assert re.search(
        r"pytest-timeout==\S+ is pinned but nothing in pyproject.toml needs it", out.stderr
    )
