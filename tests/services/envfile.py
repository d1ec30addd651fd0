"""The services env file written by scripts/services/all.sh, as the service tests read it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def services_env_path() -> Path:
    configured = os.environ.get("ALPHAENGINE_SERVICES_ENV")
    if configured:
        return Path(configured)
    return Path(os.environ.get("STATE_DIR", "/tmp/alphaengine-services")) / "services.env"


def parse_env_file(path: Path) -> dict[str, str]:
    """`export NAME=value` lines (as written by scripts/services/all.sh) into a dict."""
    env: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        line = line.removeprefix("export ").strip()
        name, sep, value = line.partition("=")
        if sep:
            env[name.strip()] = value.strip().strip("'\"")
    return env


def require(env: dict[str, str], *names: str) -> list[str]:
    """The values of `names` in the services env; a missing one fails the test."""
    missing = [n for n in names if not env.get(n)]
    if missing:
        pytest.fail(
            f"{', '.join(missing)} missing from {services_env_path()}: was that service started?",
            pytrace=False,
        )
    return [env[n] for n in names]
