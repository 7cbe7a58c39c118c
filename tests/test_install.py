"""The install: pagoda's import names are its own, and the venv holds what was locked.

transformers (≥ 5.25) imports PyPI's ``kernels`` package at module level. pagoda once
had a top-level package of that name: from the repository folder (pytest's rootdir,
``python -m``, ``PYTHONPATH=.``) ours shadowed theirs and transformers failed to
import; from elsewhere theirs won and pagoda's modules were grafted onto it. These
tests fail if any such clash comes back, whichever package brings it.
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import tomllib

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from pagoda.default_model import DEFAULT_MODEL_PACKAGE, DEFAULT_MODEL_VERSION
from tests.lock import REPO, pins


def owners() -> dict[str, set[str]]:
    """Each importable top-level name in this environment, and the distributions that
    install it."""
    return {
        name: {canonicalize_name(d) for d in dists}
        for name, dists in importlib.metadata.packages_distributions().items()
    }


def pagoda_top_level() -> set[str]:
    """The top-level packages pagoda installs, as pyproject.toml declares them."""
    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"][
        "packages"
    ]["find"]["include"]
    tops = {p.split(".")[0].rstrip("*") for p in patterns}
    assert all((REPO / t / "__init__.py").is_file() for t in tops), tops
    return tops


def test_pagoda_alone_installs_each_of_its_top_level_packages():
    tops = pagoda_top_level()
    installed = set(importlib.metadata.distribution("pagoda").read_text("top_level.txt").split())
    assert installed == tops, "the installed pagoda is stale: run bash scripts/setup.sh"
    found = owners()
    for name in sorted(tops):
        assert found.get(name) == {"pagoda"}, f"`import {name}` is also {found.get(name)}"


def test_no_module_at_the_repository_root_shadows_another_distribution():
    """From the repository folder, its top-level packages and modules come first on
    sys.path: none may share a name with a package of another distribution."""
    found = owners()
    for path in sorted(REPO.iterdir()):
        if (path / "__init__.py").is_file():
            name = path.name
        elif path.suffix == ".py":
            name = path.stem
        else:
            continue  # a folder without __init__.py never wins over a real package
        others = found.get(name, set()) - {"pagoda"}
        assert not others, f"{path.relative_to(REPO)} shadows `import {name}` of {others}"


SIDE_BY_SIDE = """
import importlib.metadata, pathlib, sys
import transformers.integrations.hub_kernels
import kernels
from pagoda_kernels.dispatch import get_ops
assert get_ops("auto", "cpu").name in ("cpu", "torch")
dist = importlib.metadata.distribution("kernels")
here = pathlib.Path(kernels.__file__).resolve()
assert here.is_relative_to(pathlib.Path(dist.locate_file("")).resolve()), here
assert not hasattr(kernels, "dispatch"), "pagoda's modules grafted onto PyPI's kernels"
print("ok")
"""


@pytest.mark.parametrize("where", ["repository", "elsewhere"])
def test_transformers_hub_kernels_and_pagoda_kernels_import_side_by_side(where, tmp_path):
    """A worker-side process, with the repository first on sys.path or not at all."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if where == "repository":
        cwd, env["PYTHONPATH"] = REPO, str(REPO)
    else:
        cwd = tmp_path
    out = subprocess.run(
        [sys.executable, "-c", SIDE_BY_SIDE],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


def closure(root: str, extras: tuple[str, ...]) -> dict[str, str]:
    """Every distribution that installing ``root[extras]`` brings in here, with its
    installed version (the requirements of each, markers evaluated, walked to the end;
    each distribution with each set of extras once, so cycles end)."""
    versions: dict[str, str] = {}
    visited: set[tuple[str, frozenset[str]]] = set()
    todo = [(root, frozenset(extras))]
    while todo:
        name, wanted = todo.pop()
        if (canonicalize_name(name), wanted) in visited:
            continue
        visited.add((canonicalize_name(name), wanted))
        for text in importlib.metadata.distribution(name).requires or []:
            req = Requirement(text)
            if req.marker is not None and not any(
                req.marker.evaluate({"extra": extra}) for extra in (*wanted, "")
            ):
                continue
            key = canonicalize_name(req.name)
            if key != canonicalize_name(root):  # pagoda[all] names pagoda[worker,dev]
                versions.setdefault(key, importlib.metadata.version(req.name))
            todo.append((req.name, frozenset(req.extras)))
    return versions


def test_the_environment_holds_the_locked_versions():
    """What scripts/setup.sh installed is the lock (a package missing from it, or
    installed at another version, means the lock or the venv is stale)."""
    locked = pins()
    installed = closure("pagoda", ("all",))
    assert {"torch", "transformers", "kernels", "uv"} <= installed.keys()
    for name, version in sorted(installed.items()):
        assert name in locked, f"{name} {version} is installed but not in the lock"
        # torch's CPU build is 2.13.0+cpu: the same release as the lock's 2.13.0.
        public = version.split("+", 1)[0]
        assert public == str(locked[name]), f"{name} {version} installed, {locked[name]} locked"
    assert importlib.metadata.version(DEFAULT_MODEL_PACKAGE) == DEFAULT_MODEL_VERSION


def test_the_lock_holds_transformers_with_pypis_kernels():
    """transformers ≥ 5.25 together with the package whose name pagoda gave up."""
    locked = pins()
    assert locked["transformers"].release >= (5, 25, 0)
    assert "kernels" in locked
