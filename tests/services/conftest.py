"""Service-test tier: the real Kafka, ClickHouse, S3 (moto) and Prometheus started by scripts/services.

Start them first (`scripts/services/all.sh start`), which writes the env file these tests read:
$ALPHAENGINE_SERVICES_ENV, else $STATE_DIR/services.env, else /tmp/alphaengine-services/services.env.
A missing env file or a service that does not answer FAILS the test; nothing here is ever skipped.
Not part of the default `pytest` run: see docs/services.md (`make test-services`).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.services.envfile import parse_env_file, services_env_path

HERE = Path(__file__).resolve().parent


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "services: needs the real services of scripts/services/all.sh")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.services)


@pytest.fixture(scope="session")
def services_env() -> dict[str, str]:
    """The env file of the running services; a missing or incomplete file fails the test."""
    path = services_env_path()
    if not path.is_file():
        pytest.fail(
            f"services env file {path} is missing: run `scripts/services/all.sh start` "
            "(or set ALPHAENGINE_SERVICES_ENV to the env file it wrote)",
            pytrace=False,
        )
    return parse_env_file(path)
