"""Checks that requirements.lock still matches the runtime dependencies of pyproject.toml.

Every requirement of ``[project] dependencies`` (extras are not checked, only the package itself) must have
an entry ``name==version`` in the lock whose version satisfies the requirement's specifier, and every entry
of the lock must carry at least one ``--hash``, so that ``pip install --require-hashes`` accepts the file.
Nothing is resolved against an index: the result depends on the two files only.

    python scripts/check-lock.py [--pyproject pyproject.toml] [--lock requirements.lock]

Exits 0 when the lock is consistent, 1 with one line per problem otherwise. Needs ``packaging``.
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

ROOT = Path(__file__).resolve().parent.parent

# The image the lock is for (Dockerfile: python:3.11-slim-bookworm on x86_64), for dependencies that carry
# an environment marker; packaging takes the other marker variables from the running interpreter.
TARGET_ENVIRONMENT: dict[str, str] = {
    "implementation_name": "cpython",
    "os_name": "posix",
    "platform_machine": "x86_64",
    "platform_python_implementation": "CPython",
    "platform_system": "Linux",
    "python_full_version": "3.11.0",
    "python_version": "3.11",
    "sys_platform": "linux",
}

HASH = re.compile(r"--hash[= ](sha256|sha384|sha512):[0-9a-f]+")
# Global options that keep the lock self-contained; -r/-c/-e and the like would not.
ALLOWED_OPTIONS = ("--index-url", "--extra-index-url", "--find-links", "--only-binary", "--no-binary")


@dataclass
class Entry:
    """One requirement of the lock: its pinned version and its hashes."""

    line: int
    version: str | None
    hashes: list[str] = field(default_factory=list)


def logical_lines(text: str) -> list[tuple[int, str]]:
    """The lock's lines with backslash continuations joined and comments removed, with their line number."""
    result: list[tuple[int, str]] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split(" #", 1)[0].strip() if not raw.lstrip().startswith("#") else ""
        if not pending:
            start = number
        if line.endswith("\\"):
            pending.append(line[:-1].strip())
            continue
        pending.append(line)
        joined = " ".join(part for part in pending if part)
        pending = []
        if joined:
            result.append((start, joined))
    if pending and (joined := " ".join(part for part in pending if part)):
        result.append((start, joined))
    return result


def parse_lock(path: Path, problems: list[str]) -> dict[str, Entry]:
    """The lock's entries by normalised name; what cannot be read is added to ``problems``."""
    entries: dict[str, Entry] = {}
    for number, line in logical_lines(path.read_text(encoding="utf-8")):
        where = f"{path.name}:{number}"
        if line.startswith("-"):
            if not line.startswith(ALLOWED_OPTIONS):
                problems.append(f"{where}: unsupported option line {line!r}")
            continue
        requirement_text, *options = line.split(" --")
        options = ["--" + option for option in options]
        try:
            requirement = Requirement(requirement_text)
        except InvalidRequirement as exc:
            problems.append(f"{where}: cannot parse {requirement_text!r}: {exc}")
            continue
        name = canonicalize_name(requirement.name)
        specifiers = list(requirement.specifier)
        version = None
        if len(specifiers) == 1 and specifiers[0].operator == "==" and "*" not in specifiers[0].version:
            version = specifiers[0].version
        else:
            problems.append(f"{where}: {requirement.name} is not pinned with == ({requirement_text!r})")
        entry = Entry(number, version)
        for option in options:
            if HASH.fullmatch(option):
                entry.hashes.append(option)
            else:
                problems.append(f"{where}: {requirement.name}: unexpected option {option!r}")
        if not entry.hashes:
            problems.append(f"{where}: {requirement.name}=={version} has no --hash")
        if name in entries:
            problems.append(f"{where}: {requirement.name} listed twice (also on line {entries[name].line})")
        entries[name] = entry
    return entries


def check(dependencies: list[str], entries: dict[str, Entry], lock_name: str) -> list[str]:
    """Every runtime dependency that the lock's ``entries`` do not pin within its specifier, as messages."""
    problems: list[str] = []
    for text in dependencies:
        requirement = Requirement(text)
        if requirement.marker is not None and not requirement.marker.evaluate(TARGET_ENVIRONMENT):
            continue
        entry = entries.get(canonicalize_name(requirement.name))
        if entry is None:
            problems.append(f"{requirement.name}: pyproject.toml requires {text!r}, {lock_name} has no entry")
            continue
        if entry.version is None:
            continue  # reported by parse_lock: not pinned
        try:
            pinned = Version(entry.version)
        except InvalidVersion:
            problems.append(f"{requirement.name}: {lock_name} pins an invalid version {entry.version!r}")
            continue
        if not requirement.specifier.contains(pinned, prereleases=True):
            problems.append(
                f"{requirement.name}: {lock_name} pins {entry.version}, which does not satisfy "
                f"pyproject.toml's {text!r}"
            )
    return problems


def main() -> int:
    """Command-line entry point: 0 when the lock is consistent, 1 otherwise."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--pyproject", type=Path, default=ROOT / "pyproject.toml")
    parser.add_argument("--lock", type=Path, default=ROOT / "requirements.lock")
    args = parser.parse_args()
    for path in (args.pyproject, args.lock):
        if not path.is_file():
            print(f"check-lock: {path} does not exist", file=sys.stderr)
            return 1
    project = tomllib.loads(args.pyproject.read_text(encoding="utf-8"))["project"]
    dependencies: list[str] = project["dependencies"]
    problems: list[str] = []
    entries = parse_lock(args.lock, problems)
    if not entries:
        problems.append(f"{args.lock.name}: no requirement at all")
    problems += check(dependencies, entries, args.lock.name)
    if problems:
        for problem in problems:
            print(f"check-lock: {problem}", file=sys.stderr)
        print(f"check-lock: {args.lock} does not match {args.pyproject}; run `make lock`", file=sys.stderr)
        return 1
    print(
        f"{args.lock.name}: the {len(dependencies)} dependencies of {args.pyproject.name} are pinned within "
        f"their specifiers; {len(entries)} packages, each with hashes"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
