"""Fail when a lock no longer matches pyproject.toml, or this venv does not match the lock.

Run with the test venv's Python after `scripts/test` installed it (scripts/test does): for
each lock, walk from what pyproject.toml asks for (dependencies, extras, build backend)
through the installed packages' own requirements, evaluating markers for this machine, and
check that every package reached is pinned in the lock, the pin satisfies every range that
asks for it, it is the version installed, and nothing pinned for this machine is unreached.
Offline and deterministic: a new release upstream never turns it red; an edit to pyproject
without `scripts/lock` always does.
"""

from __future__ import annotations

import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING or __name__ != "__main__" or sys.argv[1:] != ["--build-requirements"]:
    # (scripts/lock asks for the build requirements with a bare python3, without packaging)
    from packaging.markers import Marker, default_environment
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
    from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
#: Installing the package itself without an isolated build environment needs these beside
#: pyproject's build backend: hatchling asks for editables to build an editable install.
BUILD_TOOLS = ["pip", "editables"]
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)\s*(?:;\s*([^\\]+?))?\s*\\?$")


def read_lock(path: Path) -> dict[str, Version]:
    """The pins of ``path`` whose markers hold on this machine, by canonical name."""
    pins: dict[str, Version] = {}
    for line in path.read_text().splitlines():
        m = PIN.match(line)
        if m and (m[3] is None or Marker(m[3]).evaluate()):
            pins[canonicalize_name(m[1])] = Version(m[2])
    return pins


def project(root: Path = ROOT) -> dict[str, Any]:
    return tomllib.loads((root / "pyproject.toml").read_text())


def build_requirements(root: Path = ROOT) -> list[str]:
    """What the locks hold for building and installing the package itself."""
    return [*project(root)["build-system"]["requires"], *BUILD_TOOLS]


def roots(root: Path, extras: list[str]) -> list[Requirement]:
    wanted = [*project(root)["project"]["dependencies"], *build_requirements(root)]
    optional = project(root)["project"].get("optional-dependencies", {})
    for extra in extras:
        wanted += optional[extra]
    return [Requirement(r) for r in wanted]


def _env(extra: str) -> dict[str, str]:
    """This machine's marker environment, asking for ``extra``."""
    return {**cast(dict[str, str], default_environment()), "extra": extra}


def check(lock: Path, extras: list[str]) -> list[str]:
    """Every problem with ``lock`` against the pyproject.toml beside it and this venv."""
    pins = read_lock(lock)
    problems: list[str] = []
    seen: set[str] = set()
    queue = [(r, "pyproject.toml") for r in roots(lock.parent, extras)]
    while queue:
        req, wanted_by = queue.pop()
        if req.marker is not None and not req.marker.evaluate(_env("")):
            continue
        name = canonicalize_name(req.name)
        pinned = pins.get(name)
        if pinned is None:
            problems.append(f"{lock.name}: {wanted_by} needs {req}, which is not pinned")
            continue
        if not req.specifier.contains(pinned, prereleases=True):
            problems.append(f"{lock.name}: {wanted_by} needs {req}, the pin is {pinned}")
        key = f"{name}[{','.join(sorted(req.extras))}]"
        if key in seen:
            continue
        seen.add(key)
        try:
            installed = Version(metadata.version(name))
        except metadata.PackageNotFoundError:
            problems.append(f"{lock.name}: {name} is pinned but not installed in this venv")
            continue
        if installed != pinned:
            problems.append(f"{lock.name}: {name} {installed} installed, the lock pins {pinned}")
        for text in metadata.requires(name) or []:
            dep = Requirement(text)
            active = dep.marker is None or any(
                dep.marker.evaluate(_env(e)) for e in ["", *req.extras]
            )
            if active:
                dep.marker = None
                queue.append((dep, f"{name} {pinned}"))
    reached = {k.split("[")[0] for k in seen}
    problems += [
        f"{lock.name}: {name}=={pins[name]} is pinned but nothing in pyproject.toml needs it"
        for name in sorted(set(pins) - reached)
    ]
    return problems


def main(args: list[str]) -> int:
    """``check_lock.py [--root DIR]`` checks DIR's locks (default: this checkout's)."""
    if args == ["--build-requirements"]:
        print("\n".join(build_requirements()))
        return 0
    root = Path(args[1]) if args[:1] == ["--root"] else ROOT
    extras = list(project(root)["project"].get("optional-dependencies", {}))
    problems = check(root / "requirements-test.lock", extras) + check(
        root / "requirements.lock", []
    )
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    if problems:
        print("the locks do not match pyproject.toml: run scripts/lock", file=sys.stderr)
        return 1
    print("locks match pyproject.toml and this venv")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
