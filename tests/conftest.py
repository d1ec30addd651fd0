"""Shared fixtures: the real recordings, and a Context wired with in-memory fakes."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from alphaengine.clock import LiveClock
from alphaengine.kernel.module import Context

REPO = Path(__file__).resolve().parents[1]


def real_data_dir() -> Path:
    """Where the shared recordings are: $ALPHAENGINE_REAL_DATA, else ../shared/data beside the checkout."""
    configured = os.environ.get("ALPHAENGINE_REAL_DATA")
    return Path(configured) if configured else (REPO.parent / "shared" / "data").resolve()


def real_file(relative: str) -> Path:
    """A shared recording; a missing file fails the test (it is never skipped)."""
    path = real_data_dir() / relative
    if not path.is_file():
        pytest.fail(
            f"real data file {path} is missing: set ALPHAENGINE_REAL_DATA to the shared data directory",
            pytrace=False,
        )
    return path


@pytest.fixture
async def ctx(tmp_path: Path) -> AsyncIterator[Context]:
    """A Context of started in-memory fakes."""
    from alphaengine.bus.memory import MemoryBus
    from alphaengine.objectstore.memory import MemoryObjectStore
    from alphaengine.store.memory import MemoryStore

    bus, store, objects = MemoryBus(), MemoryStore(), MemoryObjectStore()
    await bus.start()
    await store.start()
    await objects.start()
    yield Context(bus=bus, store=store, objects=objects, clock=LiveClock(), data_dir=tmp_path)
    await objects.close()
    await store.close()
    await bus.close()
