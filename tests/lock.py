"""requirements/lock.txt read as exact pins, for one environment.

The lock is universal: a line may carry a marker (a platform, a Python version), and
then it applies only where the marker holds. ``pins`` evaluates the markers for one
environment, the running interpreter's by default.
"""

from __future__ import annotations

from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import NormalizedName, canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "requirements" / "lock.txt"
PINS_IN = REPO / "requirements" / "pins.in"


def linux_x86_64(python: str) -> dict[str, str]:
    """The environment of an image (or of this machine) with CPython ``python``."""
    env = default_environment()
    env.update(
        python_version=python,
        python_full_version=f"{python}.0",
        implementation_name="cpython",
        platform_python_implementation="CPython",
        platform_system="Linux",
        platform_machine="x86_64",
        sys_platform="linux",
        os_name="posix",
    )
    return env


def requirements(path: Path) -> list[Requirement]:
    """The requirement lines of a requirements file (comments and blanks left out)."""
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return [Requirement(line) for line in lines if line]


def pins(
    environment: dict[str, str] | None = None, path: Path = LOCK
) -> dict[NormalizedName, Version]:
    """Every package the lock pins where ``environment`` (default: here) applies."""
    found: dict[NormalizedName, Version] = {}
    for req in requirements(path):
        if req.marker is not None and not req.marker.evaluate(environment):
            continue
        (spec,) = req.specifier
        assert spec.operator == "==", f"{req} is not an exact pin"
        name = canonicalize_name(req.name)
        assert name not in found, f"{name} is pinned twice for one environment"
        found[name] = Version(spec.version)
    return found
