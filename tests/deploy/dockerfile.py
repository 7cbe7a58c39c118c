"""Just enough of a Dockerfile reader to check what an image will run, without a daemon.

It follows Docker's rules where they matter to the checks: line continuations and
comment lines, ``FROM ... AS name`` stages and stages built ``FROM`` another stage
(whose settings they inherit), ``$VAR`` / ``${VAR}`` substitution in ``ENV`` from what
was set before, and ``ENTRYPOINT`` resetting an inherited ``CMD``. Exec (JSON) forms are
kept as lists; a shell form is kept as ``["/bin/sh", "-c", text]`` and flagged, so a
check can insist on exec form. ``.dockerignore`` matching follows Docker's patterns
(``*``, ``?``, ``**``, ``!`` exceptions, the last match winning).
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Instruction:
    keyword: str  # upper case
    args: str  # the rest of the (joined) line
    line: int  # 1-based, where it starts


@dataclass
class Command:
    argv: list[str]
    exec_form: bool


@dataclass
class Healthcheck:
    options: dict[str, str]
    command: Command | None  # None: HEALTHCHECK NONE


@dataclass
class Stage:
    index: int
    name: str  # the AS name (lower case), else the index as text
    base: str  # the FROM image, ARGs substituted
    instructions: list[Instruction] = field(default_factory=list)


@dataclass
class Image:
    """One target: the settings of its stage after everything it inherits."""

    target: str
    chain: list[Stage]  # the stage built FROM an image first, the target last
    env: dict[str, str] = field(default_factory=dict)
    user: str | None = None
    entrypoint: Command | None = None
    cmd: Command | None = None
    healthcheck: Healthcheck | None = None
    exposed: list[int] = field(default_factory=list)
    volumes: list[str] = field(default_factory=list)

    @property
    def base_image(self) -> str:
        return self.chain[0].base

    def instructions(self, keyword: str | None = None) -> list[Instruction]:
        """Every instruction of the chain, in build order (of one keyword if given)."""
        return [i for s in self.chain for i in s.instructions if keyword in (None, i.keyword)]

    def runs(self) -> list[str]:
        return [i.args for i in self.instructions("RUN")]

    def apt_packages(self) -> set[str]:
        """Packages the chain's RUNs install with apt-get / apt (versions dropped)."""
        packages = set()
        for run in self.runs():
            for command in shell_commands(run):
                words = [w for w in command if not w.startswith("-")]
                if len(words) >= 2 and words[0] in ("apt-get", "apt") and words[1] == "install":
                    packages.update(w.split("=", 1)[0] for w in words[2:])
        return packages

    def copies_from(self) -> list[tuple[str, list[str], str]]:
        """(stage, sources, destination) of every ``COPY --from`` of the chain."""
        return copy_sources(self.instructions("COPY"))


def copy_sources(instructions: list[Instruction]) -> list[tuple[str, list[str], str]]:
    """(stage, sources, destination) of each ``COPY --from=stage`` among ``instructions``."""
    copies = []
    for ins in instructions:
        if ins.keyword != "COPY":
            continue
        words = shlex.split(ins.args)
        flags = {w.split("=", 1)[0]: w.partition("=")[2] for w in words if w.startswith("--")}
        paths = [w for w in words if not w.startswith("--")]
        if "--from" in flags:
            copies.append((flags["--from"].lower(), paths[:-1], paths[-1]))
    return copies


class Dockerfile:
    def __init__(self, path: Path):
        self.path = path
        self.global_args: dict[str, str] = {}
        self.stages: list[Stage] = []
        for ins in parse_instructions(path.read_text()):
            if ins.keyword == "FROM":
                self._add_stage(ins)
            elif not self.stages:
                if ins.keyword == "ARG":
                    name, sep, value = ins.args.strip().partition("=")
                    if sep:
                        self.global_args[name] = unquote(value)
                else:
                    raise ValueError(f"{path}:{ins.line}: {ins.keyword} before the first FROM")
            else:
                self.stages[-1].instructions.append(ins)

    def _add_stage(self, ins: Instruction) -> None:
        words = [w for w in ins.args.split() if not w.startswith("--platform")]
        name = str(len(self.stages))
        if len(words) == 3 and words[1].lower() == "as":
            name = words[2].lower()
        elif len(words) != 1:
            raise ValueError(f"{self.path}:{ins.line}: cannot read FROM {ins.args!r}")
        base = substitute(words[0], self.global_args)
        self.stages.append(Stage(len(self.stages), name, base))

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name.lower())

    def parent(self, stage: Stage) -> Stage | None:
        """The earlier stage that ``stage`` is built FROM, if any."""
        earlier = {s.name: s for s in self.stages[: stage.index]}
        return earlier.get(stage.base.lower())

    def targets(self) -> list[str]:
        """The stages meant to be built: those no other stage builds on or copies from."""
        used = set()
        for stage in self.stages:
            parent = self.parent(stage)
            if parent is not None:
                used.add(parent.name)
            used.update(source for source, _, _ in copy_sources(stage.instructions))
        return [s.name for s in self.stages if s.name not in used]

    def image(self, target: str) -> Image:
        """The target with what it inherits from the stages it is built on."""
        chain = [self.stage(target)]
        while (parent := self.parent(chain[0])) is not None:
            chain.insert(0, parent)
        return _resolve(Image(target, chain))


def _resolve(image: Image) -> Image:
    for ins in image.instructions():
        if ins.keyword == "ENV":
            image.env.update(parse_env(ins.args, image.env))
        elif ins.keyword == "USER":
            image.user = substitute(ins.args.strip(), image.env)
        elif ins.keyword == "ENTRYPOINT":
            image.entrypoint = parse_command(ins.args)
            image.cmd = None  # Docker resets an inherited CMD when ENTRYPOINT is set
        elif ins.keyword == "CMD":
            image.cmd = parse_command(ins.args)
        elif ins.keyword == "HEALTHCHECK":
            image.healthcheck = parse_healthcheck(ins.args)
        elif ins.keyword == "EXPOSE":
            image.exposed += [int(p.split("/")[0]) for p in ins.args.split()]
        elif ins.keyword == "VOLUME":
            text = ins.args.strip()
            image.volumes += json.loads(text) if text.startswith("[") else text.split()
    return image


def parse_instructions(text: str) -> list[Instruction]:
    """Instructions with continuation lines joined and comment lines dropped."""
    instructions: list[Instruction] = []
    parts: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not parts):
            continue  # a comment, even inside a continued instruction, or a blank line
        if not parts:
            start = number
        if stripped.endswith("\\"):
            parts.append(stripped[:-1].strip())
            continue
        parts.append(stripped)
        line = " ".join(p for p in parts if p)
        parts = []
        keyword, _, args = line.partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip(), start))
    if parts:
        raise ValueError("the last instruction ends with a line continuation")
    return instructions


def substitute(text: str, env: dict[str, str]) -> str:
    """``$VAR`` and ``${VAR}`` replaced where known; unknown ones are left as written."""

    def value(match: re.Match) -> str:
        name = match.group(1) or match.group(2)
        return env.get(name, match.group(0))

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", value, text)


def unquote(text: str) -> str:
    words = shlex.split(text)
    return words[0] if words else ""


def parse_env(args: str, before: dict[str, str]) -> dict[str, str]:
    """``ENV a=1 b="x y"`` or the old ``ENV a 1``; substitution uses the values from
    before this instruction, as Docker does."""
    words = shlex.split(args)
    if words and "=" not in words[0]:
        return {words[0]: substitute(args.split(None, 1)[1].strip(), before)}
    pairs = {}
    for word in words:
        name, sep, value = word.partition("=")
        if not sep:
            raise ValueError(f"ENV {args!r}: {word!r} is not NAME=VALUE")
        pairs[name] = substitute(value, before)
    return pairs


def parse_command(args: str) -> Command:
    text = args.strip()
    if text.startswith("["):
        try:
            argv = json.loads(text)
        except json.JSONDecodeError:
            pass  # Docker runs an invalid JSON array as a shell command
        else:
            if isinstance(argv, list) and all(isinstance(a, str) for a in argv):
                return Command(argv, exec_form=True)
    return Command(["/bin/sh", "-c", text], exec_form=False)


def parse_healthcheck(args: str) -> Healthcheck:
    match = re.fullmatch(r"((?:--\S+\s+)*)(CMD|NONE)\b\s*(.*)", args.strip(), re.I | re.S)
    if match is None:
        raise ValueError(f"HEALTHCHECK {args!r}: expected [OPTIONS] CMD ... or NONE")
    options = dict(o.partition("=")[::2] for o in match.group(1).split())
    if match.group(2).upper() == "NONE":
        return Healthcheck(options, None)
    return Healthcheck(options, parse_command(match.group(3)))


def shell_commands(run: str) -> list[list[str]]:
    """A RUN's simple commands (split at ``&&``, ``||``, ``;`` and ``|``) as words."""
    commands, current = [], []
    lexer = shlex.shlex(run, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    for word in lexer:
        if word in ("&&", "||", ";", "|", "&"):
            if current:
                commands.append(current)
            current = []
        else:
            current.append(word)
    if current:
        commands.append(current)
    return commands


# --- .dockerignore ---------------------------------------------------------------------


def read_dockerignore(path: Path) -> list[tuple[bool, re.Pattern]]:
    """(is an exception, pattern) per line of a .dockerignore, in order."""
    rules = []
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        exception = line.startswith("!")
        pattern = line[1:].strip() if exception else line
        pattern = "/".join(p for p in pattern.strip("/").split("/") if p not in ("", "."))
        rules.append((exception, re.compile(_glob_regex(pattern))))
    return rules


def _glob_regex(pattern: str) -> str:
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return "".join(out) + r"\Z"


def ignored(rules: list[tuple[bool, re.Pattern]], path: str) -> bool:
    """Whether ``path`` (relative to the context) stays out of the build context: it,
    or a folder above it, matches a pattern, and no later exception matches."""
    parts = path.strip("/").split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    result = False
    for exception, regex in rules:
        if any(regex.match(p) for p in prefixes):
            result = not exception
    return result
